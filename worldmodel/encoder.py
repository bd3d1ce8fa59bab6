"""Object-centric video encoder: RGB-D frames -> K object slots that keep their identity over time.

    frames ─ patchify ─ ViT (GeometryRoPE, dense or block-sparse attention, each frame
    attends to itself and the previous frame) ─ slot attention (SAVi: slots of frame t
    start from the slots of t-1 advanced by a small transition network) ─ slots

A spatial-broadcast decoder reconstructs RGB and depth from each slot with a per-pixel
alpha mask; the masks are the slots' segmentation. Every slot also carries an explicit
geometric part: its object's centre in the world frame, estimated from the centroid of the 3D
points under its mask moved behind the visible surface by a learned offset (`CenterHead`), and
the planar direction from the camera to it.

Shapes: B batch, T frames, K slots, N patches per frame, D model width, S slot width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.attention import BlockSparseAttention
from worldmodel.rope import GeometryRoPE, TokenGeometry, patch_geometry, to_anchor_frame

DEPTH_SCALE_M = 4.0  # depth is fed to the network as metres / DEPTH_SCALE_M (the sim's far limit)
ROPE_MODES = ("2d", "3d-world", "prope")
CENTER_INPUTS = ("slot", "frame")
MASK_SHAPE_DIM = 8  # per slot: share of its pixels on each image border, its bounding box


@dataclass
class EncoderConfig:
    """Architecture of `ObjectCentricEncoder` (saved in the checkpoint's config.yaml)."""

    image_size: tuple[int, int] = (64, 64)
    patch: int = 8
    dim: int = 128  # ViT width
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 3.0
    rope: str = "3d-world"  # 2d | 3d-world | prope
    context_frames: int = 2  # each frame's tokens attend to this many frames: itself and the ones before
    sparse: bool = False  # block-sparse attention in the ViT (switchable at run time)
    block: int = 16  # tokens per block for block-sparse attention
    topk: int = 4  # key blocks kept per query block
    num_slots: int = 8
    slot_dim: int = 128
    slot_iters_first: int = 3  # slot-attention iterations on the first frame (random init)
    # iterations on later frames (init from the previous frame's slots, advanced by the transition): one, as in
    # SAVi. Trained with 2, the encoder scored FG-ARI 0.67 / identity 0.86 on the held-out clips, with 1
    # 0.80 / 0.93 (2026-12-07, the README's encoder figures): a second pass lets slots trade pixels and drift
    slot_iters: int = 1
    pos_freqs: int = 6  # Fourier frequencies per axis of 3D positions fed to slot attention / decoder
    pos_scale_m: float = 2.5  # positions are divided by this before the Fourier features
    decoder_hidden: int = 192
    pixel_embed: int = 32  # width of per-pixel features that sharpen the alpha masks (0 = off)
    pixel_context: bool = True  # the per-pixel features also see the ViT's token features (which object is here)
    center_head: bool = True  # each slot estimates its object's centre behind the visible surface
    # what the centre head reads: "slot" (the slot vector; it drifts over a long stream, so on a robot the
    # estimate of a box close under the camera went 1 cm -> 7 cm off), or "frame" (this frame's evidence
    # alone: the ViT features under the slot's attention, the shape of the mask it wins, where that lies;
    # `ego-train-wm stage=center` refits a trained encoder's head on it)
    center_inputs: str = "slot"
    fallback_depth_m: float = 4.0  # 3D point of a patch with no valid depth: on its centre ray at this depth

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]
        if self.rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}; got {self.rope!r}")
        h, w = self.image_size
        if h % self.patch or w % self.patch:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch {self.patch}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if min(self.context_frames, self.num_slots, self.slot_iters_first, self.slot_iters) < 1:
            raise ValueError("context_frames, num_slots, slot_iters_first and slot_iters must be >= 1; got "
                             f"{self.context_frames}, {self.num_slots}, {self.slot_iters_first}, {self.slot_iters}")
        if self.center_inputs not in CENTER_INPUTS:
            raise ValueError(f"center_inputs must be one of {CENTER_INPUTS}; got {self.center_inputs!r}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch, self.image_size[1] // self.patch

    @property
    def geometry_dim(self) -> int:
        return 5  # centre xyz (world, metres) + planar unit direction camera -> centre


@dataclass
class EncoderOutput:
    """What the encoder says about a clip. Slot order is the slot identity: slot k at t is slot k at t+1."""

    slots: Tensor  # (B, T, K, S) slot vectors
    geometry: Tensor  # (B, T, K, 5) world centre estimate (x, y, z) m + planar view direction (dx, dy)
    masks: Tensor  # (B, T, K, H, W) per-pixel alpha, sums to 1 over K
    recon: Tensor | None  # (B, T, 4, H, W) reconstructed normalised RGB-D (None from `step` unless recon=True)
    attn: Tensor | None = None  # (B, T, K, N) last slot-attention weights, normalised over slots
    # "target": (B, T, 4, H, W) the normalised input; "pixels": (B, T, K) valid-depth pixels each slot wins;
    # "centroid": (B, T, K, 5) the visible centroid + direction, before `CenterHead` moves it;
    # "colour": (B, T, K, 3) mean RGB in [0, 1] of the pixels each slot wins (0 if none);
    # "spread": (B, T, K) m, how far its pixels lie from their centroid on the floor plane (their planar
    # standard deviation): a few cm for an object, tens of cm for the floor or a wall;
    # "sides": (B, T, K, 5) how far sideways its pixels that stand above the floor reach, and whether the
    # image's left or right side cuts them (`mask_geometry`)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> Tensor:
        """(B, T, K, S + 5): slot vector and its geometric part, what downstream models read."""
        return torch.cat([self.slots, self.geometry], dim=-1)


def fourier_features(x: Tensor, n_freqs: int, scale: float) -> Tensor:
    """(..., C) -> (..., C * 2 * n_freqs): sin/cos of x / scale at octave frequencies."""
    freqs = (2.0 ** torch.arange(n_freqs, device=x.device, dtype=x.dtype)) * math.pi
    angles = (x / scale).unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class MLP(nn.Sequential):
    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class Block(nn.Module):
    """Pre-norm transformer block; attention is `BlockSparseAttention` (dense unless .sparse)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        rope = GeometryRoPE(cfg.dim // cfg.heads, cfg.rope)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = BlockSparseAttention(cfg.dim, cfg.heads, rope, sparse=cfg.sparse, block_q=cfg.block,
                                         block_k=cfg.block, topk=cfg.topk)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dim)

    def forward(self, x: Tensor, geom: TokenGeometry, context: Tensor, context_geom: TokenGeometry,
                pad: Tensor | None) -> Tensor:
        """x (B', N, D) queries of one frame each; context (B', C*N, D) that frame and the ones before it."""
        x = x + self.attn(self.norm1(x), geom, context=self.norm1(context), context_geom=context_geom,
                          key_padding_mask=pad)
        return x + self.mlp(self.norm2(x))


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al. 2020): slots compete for tokens (softmax over slots),
    then each slot takes the weighted mean of the values it won and updates through a GRU."""

    def __init__(self, d_in: int, slot_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(d_in)
        self.to_k = nn.Linear(d_in, slot_dim, bias=False)
        self.to_v = nn.Linear(d_in, slot_dim, bias=False)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.norm_mlp = nn.LayerNorm(slot_dim)
        self.mlp = MLP(slot_dim, hidden, slot_dim)
        self.scale = slot_dim ** -0.5

    def forward(self, inputs: Tensor, slots: Tensor, iters: int) -> tuple[Tensor, Tensor]:
        """inputs (B, N, d_in), slots (B, K, S) -> slots (B, K, S), attn (B, K, N) (sums to 1 over K)."""
        x = self.norm_in(inputs)
        k, v = self.to_k(x), self.to_v(x)
        b, n_slots, s = slots.shape
        for _ in range(iters):
            q = self.to_q(self.norm_slots(slots))
            attn = torch.softmax(torch.einsum("bks,bns->bkn", q, k) * self.scale, dim=1)
            weights = attn / (attn.sum(-1, keepdim=True) + 1e-6)
            updates = torch.einsum("bkn,bns->bks", weights, v)
            slots = self.gru(updates.reshape(-1, s), slots.reshape(-1, s)).view(b, n_slots, s)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


class SlotTransition(nn.Module):
    """SAVi's predictor: slots of t-1 -> initial slots of t (slots exchange information once)."""

    def __init__(self, slot_dim: int, heads: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(slot_dim)
        self.attn = nn.MultiheadAttention(slot_dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(slot_dim)
        self.mlp = MLP(slot_dim, 2 * slot_dim, slot_dim)

    def forward(self, slots: Tensor) -> Tensor:
        """(B, K, S) -> (B, K, S)."""
        h = self.norm1(slots)
        slots = slots + self.attn(h, h, h, need_weights=False)[0]
        return slots + self.mlp(self.norm2(slots))


class PixelFeatures(nn.Module):
    """Per-pixel features that say where mask edges are: two 3x3 convolutions over the RGB-D input
    (local colour and depth steps), fused with the ViT's token features upsampled to pixels (which
    object a region belongs to, so that a pixel on an edge can be given to the right side)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        e = cfg.pixel_embed
        self.local = nn.Sequential(nn.Conv2d(4, e, 3, padding=1), nn.GELU(), nn.Conv2d(e, e, 3, padding=1))
        self.context = nn.Linear(cfg.dim, e) if cfg.pixel_context else None
        if self.context is not None:
            self.fuse = nn.Sequential(nn.GELU(), nn.Conv2d(2 * e, e, 1), nn.GELU(), nn.Conv2d(e, e, 1))
        self.grid = cfg.grid

    def forward(self, image: Tensor, tokens: Tensor | None) -> Tensor:
        """image (B, 4, H, W) normalised input, tokens (B, N, D) ViT features -> (B, E, H, W)."""
        local = self.local(image)
        if self.context is None:
            return local
        b, _, h, w = image.shape
        ctx = self.context(tokens).transpose(1, 2).reshape(b, -1, *self.grid)
        ctx = F.interpolate(ctx, size=(h, w), mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([local, ctx], 1))


class SlotDecoder(nn.Module):
    """Spatial-broadcast decoder at patch resolution: every slot is decoded at every patch from
    (slot, patch position in the image, patch 3D point relative to the slot's centroid) into the
    patch's pixels: RGB-D and an alpha logit per pixel. Alphas compete over slots per pixel.

    A patch-level decoder alone cannot place a mask edge inside a patch, so (with `pixel_embed`)
    each slot also emits a mask query per patch that is matched against per-pixel features of the
    input (`PixelFeatures`): the slot says what it is, the pixel features say where edges are.
    Appearance still comes from the slot alone, so reconstruction stays a test of what the slot
    knows."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        gh, gw = cfg.grid
        self.patch, self.grid, self.embed = cfg.patch, (gh, gw), cfg.pixel_embed
        self.pos_freqs, self.pos_scale = cfg.pos_freqs, cfg.pos_scale_m
        self.grid_embed = nn.Parameter(torch.randn(gh * gw, cfg.decoder_hidden) * 0.02)
        self.slot_in = nn.Linear(cfg.slot_dim, cfg.decoder_hidden)
        self.rel_in = nn.Linear(3 * 2 * cfg.pos_freqs, cfg.decoder_hidden)
        self.net = nn.Sequential(
            nn.GELU(), nn.Linear(cfg.decoder_hidden, cfg.decoder_hidden), nn.GELU(),
            nn.Linear(cfg.decoder_hidden, cfg.decoder_hidden), nn.GELU(),
            nn.Linear(cfg.decoder_hidden, cfg.patch * cfg.patch * 5 + cfg.pixel_embed),
        )
        if cfg.pixel_embed:
            self.pixel_net = PixelFeatures(cfg)
        # the output rows a mask needs: each pixel's alpha logit (every 5th, after its RGB-D) and the mask queries
        p2 = cfg.patch * cfg.patch
        self.register_buffer("mask_rows", torch.cat([torch.arange(p2) * 5 + 4, p2 * 5 + torch.arange(cfg.pixel_embed)]),
                             persistent=False)

    def forward(self, slots: Tensor, rel: Tensor, image: Tensor | None = None,
                tokens: Tensor | None = None, colour: bool = True) -> tuple[Tensor | None, Tensor]:
        """slots (B, K, S), rel (B, K, N, 3) token point - slot centroid (anchor frame, metres),
        image (B, 4, H, W) normalised input, tokens (B, N, D) ViT features
        -> rgbd (B, K, 4, H, W), alpha logits (B, K, H, W). With colour=False only the masks are decoded
        (the output layer's alpha and query rows; a third of the decoder's work) and rgbd is None."""
        b, k, _ = slots.shape
        h = (self.slot_in(slots).unsqueeze(2) + self.grid_embed
             + self.rel_in(fourier_features(rel, self.pos_freqs, self.pos_scale)))
        gh, gw, p = *self.grid, self.patch
        if colour:
            out = self.net(h)  # (B, K, N, p*p*5 + E)
            pix = out[..., : p * p * 5].reshape(b, k, gh, gw, p, p, 5).permute(0, 1, 6, 2, 4, 3, 5)
            pix = pix.reshape(b, k, 5, gh * p, gw * p)
            rgbd, logits = pix[:, :, :4], pix[:, :, 4]
            query = out[..., p * p * 5:]
        else:
            last = self.net[-1]
            out = F.linear(self.net[:-1](h), last.weight[self.mask_rows], last.bias[self.mask_rows])  # (.., p*p + E)
            logits = out[..., : p * p].reshape(b, k, gh, gw, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, k, gh * p, gw * p)
            rgbd, query = None, out[..., p * p:]
        if self.embed:
            query = query.reshape(b, k, gh, gw, self.embed)  # one query per slot and patch
            feats = self.pixel_net(image, tokens).view(b, self.embed, gh, p, gw, p)  # (B, E, H, W) by patch
            match = torch.einsum("bkgwe,begiwj->bkgiwj", query, feats).reshape(b, k, gh * p, gw * p)
            logits = logits + match * self.embed ** -0.5
        return rgbd, logits


class CenterHead(nn.Module):
    """A slot's estimate of its object's centre: the visible centroid (what the pixels it wins say)
    moved by a learned offset in the camera's planar frame: along the view direction (an object's
    centre lies behind its visible surface), across it (an object cut by the image border), and up.
    The offset is trained with the simulator's object positions; the frame makes it invariant to
    where the robot is. It reads `in_dim` features per slot (see `ObjectCentricEncoder.center_evidence`)."""

    def __init__(self, in_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, 3)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, evidence: Tensor, geometry: Tensor, pixels: Tensor) -> Tensor:
        """evidence (..., K, in_dim), geometry (..., K, 5) visible centroid + direction, pixels (..., K)
        pixels won -> (..., K, 5) centre estimate + direction. A slot that wins no pixel is left as it is."""
        along, across, up = self.mlp(evidence).unbind(-1)
        d = geometry[..., 3:5]
        shift = torch.stack([along * d[..., 0] - across * d[..., 1], along * d[..., 1] + across * d[..., 0], up], -1)
        centre = geometry[..., :3] + shift * (pixels > 0).unsqueeze(-1).to(shift.dtype)
        return torch.cat([centre, d], -1)


def mask_shape(won: Tensor) -> Tensor:
    """Per slot, from the hard masks won (B, T, K, H, W): the share of its pixels in the image's bottom
    row, top row, left and right column (an object cut there is bigger than it looks), and its bounding
    box (top, bottom, left, right in [0, 1]) -> (B, T, K, 8); zeros for a slot that wins nothing."""
    h, w = won.shape[-2:]
    won = won.float()
    count = won.sum((-1, -2)).clamp(min=1.0)
    rows, cols = won.amax(-1), won.amax(-2)  # (B, T, K, H), (B, T, K, W): rows / columns it touches
    border = torch.stack([won[..., -1, :].sum(-1), won[..., 0, :].sum(-1), won[..., :, 0].sum(-1),
                          won[..., :, -1].sum(-1)], -1) / count.unsqueeze(-1)
    ih = torch.arange(h, device=won.device, dtype=won.dtype) / max(h - 1, 1)
    iw = torch.arange(w, device=won.device, dtype=won.dtype) / max(w - 1, 1)
    top = torch.where(rows > 0, ih, torch.ones_like(ih)).amin(-1)
    bottom = (rows * ih).amax(-1)
    left = torch.where(cols > 0, iw, torch.ones_like(iw)).amin(-1)
    right = (cols * iw).amax(-1)
    box = torch.stack([top, bottom, left, right], -1) * (rows.amax(-1) > 0).unsqueeze(-1).to(won.dtype)
    return torch.cat([border, box], -1)


def camera_planar(points: Tensor, cam_pose: Tensor) -> Tensor:
    """World points (B, T, K, 3) -> (forward, left, up) metres from the camera (B, T, 4, 4), forward along
    its optical axis projected on the floor."""
    rel = points - cam_pose[..., None, :3, 3]
    fwd = cam_pose[..., :2, 2]
    fwd = fwd / fwd.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    f, l = fwd[..., None, 0], fwd[..., None, 1]
    return torch.stack([rel[..., 0] * f + rel[..., 1] * l, -rel[..., 0] * l + rel[..., 1] * f, rel[..., 2]], -1)


@dataclass
class StreamState:
    """What `ObjectCentricEncoder.step` carries from one frame to the next."""

    context: list[Tensor]  # per layer, the previous frames' layer inputs (B, (C-1)*N, D)
    context_geom: TokenGeometry  # their token geometry
    slots: Tensor  # (B, K, S)
    anchor: Tensor  # (B, 4, 4) world-from-anchor frame of the stream
    t: int


class ObjectCentricEncoder(nn.Module):
    """RGB-D video -> object slots (see the module docstring)."""

    def __init__(self, cfg: EncoderConfig | None = None, stats: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or EncoderConfig()
        stats = stats or default_stats()
        self.register_buffer("in_mean", torch.tensor(stats["rgbd_mean"], dtype=torch.float32).view(4, 1, 1))
        self.register_buffer("in_std", torch.tensor(stats["rgbd_std"], dtype=torch.float32).view(4, 1, 1))
        p = cfg.patch
        self.patch_embed = nn.Linear(4 * p * p, cfg.dim)
        self.frame_embed = nn.Parameter(torch.zeros(cfg.context_frames, cfg.dim))  # which frame of the window
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        pos_dim = 3 * 2 * cfg.pos_freqs
        self.pos_in = MLP(pos_dim, cfg.dim, cfg.dim)
        self.slot_attention = SlotAttention(cfg.dim, cfg.slot_dim, 2 * cfg.slot_dim)
        self.slot_init_mu = nn.Parameter(torch.randn(1, 1, cfg.slot_dim) * 0.02)
        self.slot_init_logsigma = nn.Parameter(torch.full((1, 1, cfg.slot_dim), -1.0))
        self.transition = SlotTransition(cfg.slot_dim)
        self.decoder = SlotDecoder(cfg)
        evidence = cfg.slot_dim if cfg.center_inputs == "slot" else cfg.dim + MASK_SHAPE_DIM + 3
        self.center = CenterHead(evidence + 1) if cfg.center_head else None

    def set_sparse(self, sparse: bool) -> None:
        """Switch every ViT attention layer between dense and block-sparse (same weights)."""
        for blk in self.blocks:
            blk.attn.sparse = sparse

    # -- inputs ----------------------------------------------------------------

    def normalise(self, rgb: Tensor, depth: Tensor) -> Tensor:
        """rgb uint8/float (B, T, H, W, 3), depth (B, T, H, W) metres -> (B, T, 4, H, W) normalised."""
        self.check_frames(rgb, depth)
        x = torch.cat([rgb.float() / 255.0, (torch.nan_to_num(depth.float(), nan=0.0, posinf=0.0, neginf=0.0)
                                             .clamp(min=0.0) / DEPTH_SCALE_M).unsqueeze(-1)], dim=-1)
        return (x.permute(0, 1, 4, 2, 3) - self.in_mean) / self.in_std

    def check_frames(self, rgb: Tensor, depth: Tensor) -> None:
        h, w = self.cfg.image_size
        if rgb.dim() != 5 or rgb.shape[-1] != 3:
            raise ValueError(f"rgb must be (B, T, H, W, 3); got shape {tuple(rgb.shape)}")
        if tuple(rgb.shape[2:4]) != (h, w):
            raise ValueError(f"this encoder was built for {h}x{w} images; got {rgb.shape[2]}x{rgb.shape[3]} "
                             f"(collect data with image_size={h} or train a new encoder)")
        if tuple(depth.shape) != tuple(rgb.shape[:4]):
            raise ValueError(f"depth must be (B, T, H, W) = {tuple(rgb.shape[:4])}; got {tuple(depth.shape)}")

    def patchify(self, x: Tensor) -> Tensor:
        """(B, T, C, H, W) -> (B, T, N, C*p*p), patches row-major."""
        b, t, c, h, w = x.shape
        p = self.cfg.patch
        x = x.view(b, t, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, t, (h // p) * (w // p), c * p * p)

    # -- clip forward (training) ------------------------------------------------

    def forward(self, rgb: Tensor, depth: Tensor, intrinsics: Tensor, cam_pose: Tensor) -> EncoderOutput:
        """rgb (B, T, H, W, 3), depth (B, T, H, W) m, intrinsics (B, T, 3, 3), cam_pose (B, T, 4, 4)."""
        x_in = self.normalise(rgb, depth)
        t = x_in.shape[1]
        geom = patch_geometry(depth.float(), intrinsics.float(), cam_pose.float(), self.cfg.patch,
                              fallback_depth=self.cfg.fallback_depth_m)
        feats = self.vit(self.patchify(x_in), geom)  # (B, T, N, D)
        local = self.anchor_points(geom)  # (B, T, N, 3)
        slots = None
        outs = []
        for i in range(t):
            slots, attn = self.bind(feats[:, i], local[:, i], slots)
            outs.append((slots, attn))
        slots = torch.stack([o[0] for o in outs], 1)
        attn = torch.stack([o[1] for o in outs], 1)
        return self.decode(slots, attn, local, x_in, feats, depth, intrinsics, cam_pose)

    def vit(self, tokens: Tensor, geom: TokenGeometry) -> Tensor:
        """tokens (B, T, N, 4p^2) -> features (B, T, N, D). Frame t attends to frames t-C+1 .. t."""
        b, t, n, _ = tokens.shape
        c = self.cfg.context_frames
        x = self.patch_embed(tokens)
        frame_geom = _split_frames(geom, t)  # batch (B*T), N tokens each
        # context window: frames t-c+1..t, padded before the clip start and masked out there
        idx = torch.arange(t).view(t, 1) + torch.arange(-c + 1, 1).view(1, c)  # (T, C)
        pad = (idx < 0).view(1, t, c, 1).expand(b, t, c, n).reshape(b * t, c * n).to(x.device)
        idx = idx.clamp(min=0)
        ctx_geom = _window(frame_geom, idx, b, t)
        for blk in self.blocks:
            ctx = x[:, idx] + self.frame_embed.view(1, 1, c, 1, -1)  # (B, T, C, N, D)
            q = x + self.frame_embed[-1]
            x = blk(q.reshape(b * t, n, -1), frame_geom, ctx.reshape(b * t, c * n, -1), ctx_geom,
                    pad if c > 1 else None).view(b, t, n, -1)
        return self.norm(x)

    def anchor_points(self, geom: TokenGeometry) -> Tensor:
        """Token 3D points in the clip's anchor frame (B, T, N, 3): gravity-aligned, at the first camera."""
        local = to_anchor_frame(geom.points, geom.anchor)
        return local.view(local.shape[0], -1, self.cfg.grid[0] * self.cfg.grid[1], 3)

    def bind(self, feats: Tensor, local: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        """One frame of slot attention. feats (B, N, D), local (B, N, 3) -> slots (B, K, S), attn (B, K, N)."""
        inputs = feats + self.pos_in(fourier_features(local, self.cfg.pos_freqs, self.cfg.pos_scale_m))
        if prev is None:
            b = feats.shape[0]
            noise = torch.randn(b, self.cfg.num_slots, self.cfg.slot_dim, device=feats.device, dtype=feats.dtype)
            init = self.slot_init_mu + self.slot_init_logsigma.exp() * noise
            return self.slot_attention(inputs, init, self.cfg.slot_iters_first)
        return self.slot_attention(inputs, self.transition(prev), self.cfg.slot_iters)

    def decode(self, slots: Tensor, attn: Tensor, local: Tensor, x_in: Tensor, feats: Tensor, depth: Tensor,
               intrinsics: Tensor, cam_pose: Tensor, recon: bool = True) -> EncoderOutput:
        """Masks, reconstruction (unless recon=False) and geometry of slots (B, T, K, S); feats (B, T, N, D)
        ViT features."""
        b, t, k, s = slots.shape
        weights = attn / (attn.sum(-1, keepdim=True) + 1e-6)
        centre = torch.einsum("btkn,btnc->btkc", weights, local)  # attention-weighted centroid, anchor frame
        rel = local.unsqueeze(2) - centre.unsqueeze(3)  # (B, T, K, N, 3)
        rgbd, logits = self.decoder(slots.reshape(b * t, k, s), rel.reshape(b * t, k, -1, 3), x_in.flatten(0, 1),
                                    feats.flatten(0, 1), colour=recon)
        h, w = self.cfg.image_size
        masks = torch.softmax(logits, dim=1).view(b, t, k, h, w)
        recon_img = (masks.unsqueeze(3) * rgbd.view(b, t, k, 4, h, w)).sum(2) if recon else None
        won = F.one_hot(masks.argmax(2), k).permute(0, 1, 4, 2, 3).float()  # (B, T, K, H, W) hard assignment
        centroid, pixels, spread, sides = mask_geometry(won, depth, intrinsics, cam_pose)
        if self.center is not None:
            evidence = self.center_evidence(slots, weights, feats, won, centroid, pixels, cam_pose)
            geometry = self.center(evidence, centroid, pixels)
        else:
            geometry = centroid
        rgb = (x_in[:, :, :3] * self.in_std[:3] + self.in_mean[:3]).unsqueeze(2)  # (B, T, 1, 3, H, W) in [0, 1]
        colour = (won.unsqueeze(3) * rgb).sum((-2, -1)) / won.sum((-2, -1)).unsqueeze(-1).clamp(min=1)
        return EncoderOutput(slots=slots, geometry=geometry, masks=masks, recon=recon_img, attn=attn,
                             extras={"target": x_in, "pixels": pixels, "centroid": centroid, "colour": colour,
                                     "spread": spread, "sides": sides})

    def center_evidence(self, slots: Tensor, weights: Tensor, feats: Tensor, won: Tensor, centroid: Tensor,
                        pixels: Tensor, cam_pose: Tensor) -> Tensor:
        """What the centre head reads per slot (B, T, K, E): the slot vector (`center_inputs="slot"`), or
        this frame's evidence alone (`"frame"`): the ViT features under the slot's attention, the shape of
        the mask it wins, and where its visible centroid lies from the camera; both with its pixel count."""
        size = (torch.log1p(pixels) / 8).unsqueeze(-1)
        if self.cfg.center_inputs == "slot":
            return torch.cat([slots, size], -1)
        pooled = torch.einsum("btkn,btnd->btkd", weights, feats)
        where = camera_planar(centroid[..., :3], cam_pose) * (pixels > 0).unsqueeze(-1).to(pooled.dtype)
        return torch.cat([pooled, mask_shape(won), where, size], -1)

    # -- streaming (robot) -----------------------------------------------------

    @torch.no_grad()
    def step(self, rgb: Tensor, depth: Tensor, intrinsics: Tensor, cam_pose: Tensor,
             state: StreamState | None = None, recon: bool = False) -> tuple[EncoderOutput, StreamState]:
        """One new frame per stream: rgb (B, H, W, 3), depth (B, H, W), intrinsics (B, 3, 3), cam_pose (B, 4, 4).

        Gives the same slots, masks and geometry as `forward` on the whole clip (up to float error and the
        random slot initialisation of the first frame). The reconstruction, a picture of what the slots
        know that nothing downstream reads, is decoded only with recon=True."""
        rgb, depth, intrinsics, cam_pose = (a.unsqueeze(1) for a in (rgb, depth, intrinsics, cam_pose))
        x_in = self.normalise(rgb, depth)
        geom = patch_geometry(depth.float(), intrinsics.float(), cam_pose.float(), self.cfg.patch,
                              fallback_depth=self.cfg.fallback_depth_m)
        anchor = geom.anchor if state is None else state.anchor
        geom = TokenGeometry(grid=geom.grid, points=geom.points, valid=geom.valid,
                             time=geom.time + (0 if state is None else state.t), proj=geom.proj, anchor=anchor)
        c, n = self.cfg.context_frames, self.cfg.grid[0] * self.cfg.grid[1]
        x = self.patch_embed(self.patchify(x_in))[:, 0]  # (B, N, D)
        b = x.shape[0]
        # the window always holds c frames; before the stream has c real frames, the missing ones
        # are copies of the first frame, masked out (as `vit` does at the start of a clip)
        real = 0 if state is None else min(state.t, c - 1)
        ctx_geom = _cat_geom(_repeat_geom(geom, c - 1), geom) if state is None else _cat_geom(state.context_geom, geom)
        pad = torch.zeros(b, c * n, dtype=torch.bool, device=x.device)
        pad[:, : (c - 1 - real) * n] = True
        fe = self.frame_embed.repeat_interleave(n, 0)
        new_context = []
        for li, blk in enumerate(self.blocks):
            prev = x.repeat(1, c - 1, 1) if state is None else state.context[li]
            window = torch.cat([prev, x], 1)
            new_context.append(window[:, n:])
            x = blk(x + self.frame_embed[-1], geom, window + fe, ctx_geom, pad if c > 1 else None)
        feats = self.norm(x)
        local = to_anchor_frame(geom.points, anchor)
        slots, attn = self.bind(feats, local, None if state is None else state.slots)
        out = self.decode(slots.unsqueeze(1), attn.unsqueeze(1), local.unsqueeze(1), x_in, feats.unsqueeze(1), depth,
                          intrinsics, cam_pose, recon=recon)
        keep_geom = _last_frames(ctx_geom, n, c - 1)
        t_next = 1 if state is None else state.t + 1
        return out, StreamState(context=new_context, context_geom=keep_geom, slots=slots, anchor=anchor, t=t_next)


# ---------------------------------------------------------------------------- geometry of the slots


ABOVE_FLOOR_M = 0.02  # a pixel this high above the floor plane (world z) is a standing object's, not the floor's


def mask_geometry(won: Tensor, depth: Tensor, intrinsics: Tensor, cam_pose: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per slot: world-frame centroid of the valid-depth pixels it wins, and the planar unit direction
    from the camera to it; how widely those pixels spread on the floor plane; and how far sideways those
    of them that stand above the floor reach. won (B, T, K, H, W) the one-hot argmax of the masks over
    slots, depth (B, T, H, W) -> geometry (B, T, K, 5), pixels won (B, T, K), planar spread (B, T, K) m
    (the root of the summed variance of x and y; 0 with no pixel), sides (B, T, K, 5).
    Hard assignment, because soft alphas leak a little weight over the whole image and a little
    weight on thousands of floor pixels drags an object's centroid far off (this part is not
    trained through). A slot that wins no valid pixel gets the camera position and a zero direction.

    Sides: of the pixels standing over `ABOVE_FLOOR_M` above the floor, the leftmost and rightmost as
    planar offsets (m) from the camera to the right of its optical axis laid on the floor (0, 0 where
    there are none), 1.0 where one of them lies in the image's left / right border column (else 0.0),
    and their count. A box pushed off the pusher plate's centre line is cut by the frame's side and its
    visible centroid lies inward of its centre; its inner side is whole, which is what
    `policies.observation.SlotMemory` completes it from. Only pixels above the floor count, because a
    slot that wins an object also wins scraps of the floor around it (a box's pixel extent then reaches
    17 to 26 cm for a 10 cm box), and a flat object (the goal disc) has none: it is never completed."""
    h, w = won.shape[-2:]
    d = torch.nan_to_num(depth.float(), nan=0.0, posinf=0.0, neginf=0.0)
    valid = (d > 0).float()
    v, u = torch.meshgrid(torch.arange(h, device=d.device, dtype=d.dtype),  # pixel centres at integers,
                          torch.arange(w, device=d.device, dtype=d.dtype), indexing="ij")  # as sim.geometry
    fx, fy = intrinsics[..., 0, 0, None, None], intrinsics[..., 1, 1, None, None]
    cx, cy = intrinsics[..., 0, 2, None, None], intrinsics[..., 1, 2, None, None]
    pts_cam = torch.stack([(u - cx) / fx * d, (v - cy) / fy * d, d], -1)  # (B, T, H, W, 3)
    pts = pts_cam @ cam_pose[..., None, :3, :3].transpose(-1, -2) + cam_pose[..., None, None, :3, 3]
    wmask = won.to(d.dtype) * valid.unsqueeze(2)  # (B, T, K, H, W)
    mass = wmask.sum((-1, -2))
    centre = torch.einsum("btkhw,bthwc->btkc", wmask, pts) / mass.clamp(min=1e-6).unsqueeze(-1)
    # planar variance as E[p^2] - E[p]^2, with p taken from the camera (metres, so float32 keeps the digits)
    rel = pts[..., :2] - cam_pose[..., None, None, :2, 3]
    mean_rel = centre[..., :2] - cam_pose[..., None, :2, 3]
    second = torch.einsum("btkhw,bthw->btk", wmask, (rel ** 2).sum(-1)) / mass.clamp(min=1e-6)
    spread = (second - (mean_rel ** 2).sum(-1)).clamp(min=0).sqrt() * (mass > 0.5).to(d.dtype)
    cam = cam_pose[..., :3, 3].unsqueeze(2).expand_as(centre)
    centre = torch.where(mass.unsqueeze(-1) > 0.5, centre, cam)
    planar = centre[..., :2] - cam[..., :2]
    direction = planar / planar.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return torch.cat([centre, direction], -1), mass, spread, _sides(won, valid > 0, pts, cam_pose)


def _sides(won: Tensor, valid: Tensor, pts: Tensor, cam_pose: Tensor) -> Tensor:
    """`mask_geometry`'s sides: won (B, T, K, H, W), valid depth (B, T, H, W) bool, the pixels' world points
    (B, T, H, W, 3) -> (B, T, K, 5)."""
    h, w = won.shape[-2:]
    b, t = pts.shape[:2]
    right = -camera_planar(pts.reshape(b, t, h * w, 3), cam_pose)[..., 1].view(b, t, h, w)
    on = (won > 0.5) & (valid & (pts[..., 2] > ABOVE_FLOOR_M)).unsqueeze(2)  # (B, T, K, H, W)
    lat = right.unsqueeze(2).expand_as(on)
    count = on.flatten(-2).sum(-1)
    left_most = torch.where(on, lat, torch.full_like(lat, float("inf"))).flatten(-2).amin(-1)
    right_most = torch.where(on, lat, torch.full_like(lat, float("-inf"))).flatten(-2).amax(-1)
    zero = torch.zeros_like(left_most)
    return torch.stack([torch.where(count > 0, left_most, zero), torch.where(count > 0, right_most, zero),
                        on[..., 0].any(-1).to(pts.dtype), on[..., w - 1].any(-1).to(pts.dtype),
                        count.to(pts.dtype)], -1)


def default_stats() -> dict[str, Any]:
    """Input normalisation used before any data has been seen (replaced by dataset statistics)."""
    return {"rgbd_mean": [0.5, 0.5, 0.5, 0.25], "rgbd_std": [0.25, 0.25, 0.25, 0.15]}


# ---------------------------------------------------------------------------- token-geometry plumbing


def _map_geom(geom: TokenGeometry, fn, anchor: Tensor) -> TokenGeometry:
    return TokenGeometry(grid=fn(geom.grid), points=fn(geom.points), valid=fn(geom.valid), time=fn(geom.time),
                         proj=fn(geom.proj), anchor=anchor)


def _split_frames(geom: TokenGeometry, t: int) -> TokenGeometry:
    """(B, T*N, ...) -> (B*T, N, ...); the anchor is repeated per frame."""
    b = geom.grid.shape[0]
    return _map_geom(geom, lambda a: a.reshape(b * t, -1, *a.shape[2:]), geom.anchor.repeat_interleave(t, 0))


def _window(frame_geom: TokenGeometry, idx: Tensor, b: int, t: int) -> TokenGeometry:
    """Per frame, the geometry of its context window idx (T, C): (B*T, N) -> (B*T, C*N)."""
    def take(a: Tensor) -> Tensor:
        a = a.view(b, t, *a.shape[1:])[:, idx]  # (B, T, C, N, ...)
        return a.reshape(b * t, -1, *a.shape[4:])
    return _map_geom(frame_geom, take, frame_geom.anchor)


def _cat_geom(a: TokenGeometry, b: TokenGeometry) -> TokenGeometry:
    return TokenGeometry(*(torch.cat([getattr(a, f), getattr(b, f)], 1) for f in ("grid", "points", "valid",
                                                                                  "time", "proj")),
                         anchor=b.anchor)


def _last_frames(geom: TokenGeometry, n: int, frames: int) -> TokenGeometry:
    return _map_geom(geom, lambda a: a[:, a.shape[1] - frames * n:], geom.anchor)


def _repeat_geom(geom: TokenGeometry, times: int) -> TokenGeometry:
    return _map_geom(geom, lambda a: a.repeat(1, times, *([1] * (a.dim() - 2))), geom.anchor)


def config_dict(cfg: EncoderConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["image_size"] = list(cfg.image_size)
    return d
