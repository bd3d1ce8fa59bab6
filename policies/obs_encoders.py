"""Observation encoders: a diffusion policy's observation history -> its FiLM conditioning vector.

    SlotSetEncoder      the frozen world model's object slots of the last To frames + proprio.
                        One token per slot (its To frames concatenated, so the token sees the object
                        move), a transformer with no positional encoding over the K tokens, then
                        pooling by multi-head attention (Set Transformer's PMA): the result does not
                        depend on the order of the slots.
    RGBDResNetEncoder   the end-to-end image baseline of diffusion_policy (Chi et al. 2023, CNN
                        variant): a ResNet-18 layout with GroupNorm, a spatial-softmax keypoint head,
                        shared over the To frames.

Both expect inputs already normalised by the caller (the dataset statistics in stats.json).

Shapes: B batch, To observation frames, K slots, F slot features, P proprio, C channels, H x W pixels,
D width, Q pooling queries, N = B * To images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------- set encoder over slots


class MultiHeadAttention(nn.Module):
    """Queries attend to a context; `allowed` says which query may see which key."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, allowed: Tensor | None = None) -> Tensor:
        """x (B, Nq, D), context (B, Nk, D), allowed (B, Nq, Nk) bool, True = may attend -> (B, Nq, D)."""
        b, nq, dim = x.shape
        nk = context.shape[1]
        q = self.to_q(x).view(b, nq, self.heads, dim // self.heads).transpose(1, 2)
        k, v = self.to_kv(context).view(b, nk, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if allowed is None else allowed.unsqueeze(1)  # broadcast over heads
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(b, nq, dim))


class SetAttentionBlock(nn.Module):
    """Pre-norm transformer encoder layer. With no positional encoding it is permutation equivariant."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, allowed: Tensor | None = None) -> Tensor:
        """x (B, K, D), allowed (B, K, K) -> (B, K, D)."""
        y = self.norm1(x)
        x = x + self.attn(y, y, allowed)
        return x + self.mlp(self.norm2(x))


class PoolingByAttention(nn.Module):
    """Set Transformer's PMA: Q learned queries attend to the set -> (B, Q, D), invariant to its order.

    A learned null token is always among the keys, so a query has somewhere to put its attention
    when no slot is relevant, and a sample whose slots are all masked still has a defined output
    (a softmax over no keys is NaN on some attention backends)."""

    def __init__(self, dim: int, heads: int, n_queries: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.null = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, present: Tensor | None = None) -> Tensor:
        """x (B, K, D), present (B, K) bool -> (B, Q, D)."""
        b = x.shape[0]
        context = torch.cat([self.norm_kv(x), self.null.expand(b, 1, -1)], dim=1)
        q = self.queries.expand(b, -1, -1)
        allowed = None
        if present is not None:
            keys = torch.cat([present, present.new_ones(b, 1)], dim=1)  # (B, K + 1)
            allowed = keys.unsqueeze(1).expand(b, q.shape[1], keys.shape[1])
        y = q + self.attn(q, context, allowed)
        return y + self.mlp(self.norm2(y))


class SlotSetEncoder(nn.Module):
    """Object slots of the last To frames + proprio -> conditioning vector, invariant to the order of the K slots.

    Slot k of frame t and slot k of frame t+1 are the same object (the world model's encoder tracks
    them), so a token is one slot's whole history; the order of the K slots themselves means nothing."""

    def __init__(self, slot_dim: int, n_obs: int, proprio_dim: int, out_dim: int = 256, hidden: int = 128,
                 heads: int = 4, layers: int = 2, n_queries: int = 4) -> None:
        super().__init__()
        for name, value in (("slot_dim", slot_dim), ("n_obs", n_obs), ("proprio_dim", proprio_dim),
                            ("out_dim", out_dim), ("hidden", hidden), ("heads", heads), ("n_queries", n_queries)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if layers < 0:
            raise ValueError(f"layers must be >= 0; got {layers}")
        if hidden % heads:
            raise ValueError(f"hidden {hidden} must be divisible by heads {heads}")
        self.slot_dim, self.n_obs, self.proprio_dim, self.out_dim = slot_dim, n_obs, proprio_dim, out_dim
        self.tokenize = nn.Sequential(nn.Linear(n_obs * slot_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(SetAttentionBlock(hidden, heads) for _ in range(layers))
        self.pool = PoolingByAttention(hidden, heads, n_queries)
        self.proprio = nn.Sequential(nn.Linear(n_obs * proprio_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(n_queries * hidden + hidden)
        self.head = nn.Linear(n_queries * hidden + hidden, out_dim)

    def _check(self, slots: Tensor, proprio: Tensor, mask: Tensor | None) -> None:
        if slots.dim() != 4:
            raise ValueError(f"slots must be (B, To, K, F); got shape {tuple(slots.shape)}")
        b, t, k, f = slots.shape
        if t != self.n_obs:
            raise ValueError(f"slots have {t} frames; the encoder was built for To={self.n_obs}")
        if f != self.slot_dim:
            raise ValueError(f"slots have {f} features; the encoder was built for F={self.slot_dim}")
        if proprio.dim() != 3:
            raise ValueError(f"proprio must be (B, To, P); got shape {tuple(proprio.shape)}")
        if proprio.shape[0] != b or proprio.shape[1] != t:
            raise ValueError(f"proprio {tuple(proprio.shape)} does not match slots (B={b}, To={t})")
        if proprio.shape[2] != self.proprio_dim:
            raise ValueError(f"proprio has {proprio.shape[2]} features; the encoder was built for "
                             f"P={self.proprio_dim}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool (True = slot present); got {mask.dtype}")
            if mask.shape != (b, k):
                raise ValueError(f"mask must be (B, K) = {(b, k)}; got {tuple(mask.shape)}")
        if torch.isnan(proprio).any():
            raise ValueError("proprio contains NaN")

    def forward(self, slots: Tensor, proprio: Tensor, mask: Tensor | None = None) -> Tensor:
        """slots (B, To, K, F), proprio (B, To, P), mask (B, K) bool True = slot present -> (B, out_dim)."""
        self._check(slots, proprio, mask)
        b, t, k, f = slots.shape
        if mask is not None:
            # A masked slot may hold anything (NaN included, e.g. a lost track): zero it with `where`,
            # since NaN * 0 would still reach the output through the attention's weighted sum.
            slots = torch.where(mask[:, None, :, None], slots, torch.zeros((), dtype=slots.dtype,
                                                                           device=slots.device))
            seen = mask[:, None, :, None].expand_as(slots)
            if torch.isnan(slots[seen]).any():
                raise ValueError("slots contain NaN")
        elif torch.isnan(slots).any():
            raise ValueError("slots contain NaN")

        x = self.tokenize(slots.permute(0, 2, 1, 3).reshape(b, k, t * f))  # (B, K, D)
        allowed = None
        if mask is not None:
            # A present slot sees only present slots; a masked one sees those and itself, so its row
            # of the softmax is never empty (NaN on some backends) and it never feeds a present slot or the pool.
            allowed = mask.unsqueeze(1) | torch.eye(k, dtype=torch.bool, device=mask.device)
        for block in self.blocks:
            x = block(x, allowed)
        pooled = self.pool(x, mask).flatten(1)  # (B, Q * D)
        z = torch.cat([pooled, self.proprio(proprio.flatten(1))], dim=-1)
        return self.head(self.norm(z))


# ---------------------------------------------------------------------------- image encoder


class SpatialSoftmax(nn.Module):
    """Per channel, the expected pixel position under softmax(features / temperature).

    (N, C, H, W) -> (N, C, 2) as (x, y) in [-1, 1]: x along the width (left -1, right +1), y along
    the height (top -1, bottom +1), pixel centres at the ends (align_corners=True convention)."""

    def __init__(self, temperature: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        # Learned in log space so it stays positive.
        log_t = torch.tensor(float(temperature)).log()
        if learnable:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def forward(self, features: Tensor) -> Tensor:
        """features (N, C, H, W) -> (N, C, 2)."""
        n, c, h, w = features.shape
        weights = F.softmax(features.flatten(2) / self.log_temperature.exp(), dim=-1).view(n, c, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device, dtype=features.dtype)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device, dtype=features.dtype)
        x = (weights.sum(dim=2) * xs).sum(dim=-1)  # marginal over rows, then E[x]
        y = (weights.sum(dim=3) * ys).sum(dim=-1)
        return torch.stack([x, y], dim=-1)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + shortcut) with GroupNorm: BatchNorm's batch statistics
    would tie a sample's features to its batch-mates and drift under the EMA weights a diffusion
    policy evaluates with, as Chi et al. note."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups, c_out))

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class RGBDResNetEncoder(nn.Module):
    """RGB-D frames of the last To steps + proprio -> conditioning vector. ResNet-18 layout (4 stages x 2 basic blocks)
    with GroupNorm instead of BatchNorm and a spatial-softmax keypoint head, shared over frames.

    The stem is a 3x3 conv with no max-pool: ImageNet's stride-4 stem would leave a 2x2 map at 64x64
    input after the three stride-2 stages, too coarse for keypoints on small pushed objects. At
    `stem_stride=1` the keypoints come from an 8x8 map at 64x64 (12x12 at 96x96), at the price of the
    first stage running at full resolution; the default 2 reads a 4x4 map (soft-argmax coordinates
    are continuous) for a quarter of the compute, which is what a CPU training budget affords."""

    MIN_SIZE = 16

    def __init__(self, n_obs: int, proprio_dim: int, out_dim: int = 256, in_channels: int = 4, base_width: int = 32,
                 keypoints: int = 32, groups: int = 8, frame_dim: int = 128, stem_stride: int = 2) -> None:
        super().__init__()
        for name, value in (("stem_stride", stem_stride), ("n_obs", n_obs), ("proprio_dim", proprio_dim), ("out_dim", out_dim),
                            ("in_channels", in_channels), ("base_width", base_width), ("keypoints", keypoints),
                            ("groups", groups), ("frame_dim", frame_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if base_width % groups:
            raise ValueError(f"base_width {base_width} must be divisible by groups {groups}")
        self.n_obs, self.proprio_dim, self.out_dim, self.in_channels = n_obs, proprio_dim, out_dim, in_channels

        self.stem = nn.Sequential(nn.Conv2d(in_channels, base_width, 3, stem_stride, 1, bias=False),
                                  nn.GroupNorm(groups, base_width), nn.ReLU())
        stages, c_in = [], base_width
        for mult, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
            c_out = base_width * mult
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride, groups), BasicBlock(c_out, c_out, 1, groups)))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.to_keypoints = nn.Conv2d(c_in, keypoints, 1)
        self.spatial_softmax = SpatialSoftmax()
        self.frame = nn.Linear(2 * keypoints, frame_dim)
        self.proprio = nn.Sequential(nn.Linear(n_obs * proprio_dim, frame_dim), nn.GELU(),
                                     nn.Linear(frame_dim, frame_dim))
        self.norm = nn.LayerNorm((n_obs + 1) * frame_dim)
        self.head = nn.Linear((n_obs + 1) * frame_dim, out_dim)

    def _check(self, images: Tensor, proprio: Tensor) -> None:
        if images.dim() != 5:
            raise ValueError(f"images must be (B, To, C, H, W); got shape {tuple(images.shape)}")
        b, t, c, h, w = images.shape
        if t != self.n_obs:
            raise ValueError(f"images have {t} frames; the encoder was built for To={self.n_obs}")
        if c != self.in_channels:
            raise ValueError(f"images have {c} channels; the encoder was built for C={self.in_channels}")
        if h < self.MIN_SIZE or w < self.MIN_SIZE:
            raise ValueError(f"images must be at least {self.MIN_SIZE}x{self.MIN_SIZE}; got {h}x{w}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float (normalised by the caller); got {images.dtype}")
        if proprio.dim() != 3 or proprio.shape[0] != b or proprio.shape[1] != t:
            raise ValueError(f"proprio must be (B, To, P) with B={b}, To={t}; got shape {tuple(proprio.shape)}")
        if proprio.shape[2] != self.proprio_dim:
            raise ValueError(f"proprio has {proprio.shape[2]} features; the encoder was built for "
                             f"P={self.proprio_dim}")
        if torch.isnan(images).any():
            raise ValueError("images contain NaN")
        if torch.isnan(proprio).any():
            raise ValueError("proprio contains NaN")

    def forward(self, images: Tensor, proprio: Tensor) -> Tensor:
        """images (B, To, C, H, W) float, normalised; proprio (B, To, P) -> (B, out_dim)."""
        self._check(images, proprio)
        b, t = images.shape[:2]
        x = self.stages(self.stem(images.flatten(0, 1)))  # (N, 8 * base_width, H / (8 s), W / (8 s))
        kp = self.spatial_softmax(self.to_keypoints(x))  # (N, keypoints, 2)
        frames = self.frame(kp.flatten(1)).view(b, t * self.frame.out_features)
        z = torch.cat([frames, self.proprio(proprio.flatten(1))], dim=-1)
        return self.head(self.norm(z))
