"""Causal JEPA predictor: how the object slots change under the robot's actions.

    per frame t:  K slot tokens + an action token (the commands since frame t-1) + a proprio token
                  (the robot's planar pose and velocity)
    transformer over T frames x (K + 2) tokens, causal over time: a token sees its own frame and
                  the frames before it, never a later one (dense or block-sparse attention)
    heads:        per slot, the transition into frame t: the physical part advanced by a symplectic
                  Euler step from gated, bounded accelerations (`worldmodel.physics`), the appearance
                  part kept (or moved by a residual when that prior is off)

Training follows C-JEPA's object-level masking: every slot is visible at the first frame (its
identity anchor); M randomly chosen slots are hidden over the rest of the history; every future
frame is hidden. A hidden token is a learned mask token + the time encoding + a projection of that
slot's first-frame token. The loss is in the frozen encoder's slot space (stop-gradient targets),
on the hidden positions only.

A slot's state here is (appearance S, physical 6): the encoder's slot vector, and the planar
position, heading and their velocities read from the slot's features by `PhysicalProbe`.

Shapes: B batch, N candidates, T frames (history Th + future Tf), K slots, S slot width,
F = S + 5 encoder features, Z = S + 6 predictor states, D width, s frameskip.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sim.env import ACTION_HIGH, CONTROL_HZ
from worldmodel.attention import BlockSparseAttention, block_sparse_attention
from worldmodel.physics import (
    HEADING_SYMMETRY,
    PAIR_REACH_M,
    PHYS_DIM,
    POSITION_SCALE_M,
    ROBOT_CONTACT_M,
    SPEED_SCALE,
    FreeDynamics,
    InteractionDynamics,
    PhysicalProbe,
    acceleration_smoothness,
    finite_difference_states,
    gate_sparsity,
    integrate_robot,
    physical_features,
    robot_from_camera,
)

POSITION_HUBER_M = 0.05  # position losses are Huber in units of this (about 1 at a few centimetres)
MIN_OBJECT_PIXELS = 20  # an object counts as seen in a frame from this many segmentation pixels


@dataclass
class PredictorConfig:
    """Architecture, priors and loss weights of `CausalJEPAPredictor` (saved in config.yaml)."""

    slot_dim: int = 128  # S: the encoder's slot width (set from the encoder checkpoint)
    num_slots: int = 8  # K (set from the encoder checkpoint)
    history: int = 4  # Th frames of context
    future: int = 3  # Tf frames predicted in training; rollouts go on autoregressively
    frameskip: int = 2  # env steps (0.1 s each) per predictor frame
    dim: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    sparse: bool = False  # block-sparse attention (switchable at run time)
    block: int = 8  # tokens per block for block-sparse attention
    topk: int = 4  # key blocks kept per query block
    # object-level masking (C-JEPA)
    masking: bool = True
    mask_slots: int = 2  # M slots hidden over history frames 1..Th-1
    # physics-aware transition prior
    physics: bool = True  # symplectic step from accelerations; False = the next physical state predicted freely
    gates: bool = True  # interaction gates between slots and from the robot (False: every gate is 1)
    quasi_static: bool = True  # an untouched slot loses its velocity (needs gates)
    contact: bool = True  # gates close out of contact reach (physics.ROBOT_CONTACT_M, PAIR_REACH_M)
    # slot-on-slot interactions; False: only the robot acts on slots (a scene with one pushable object, as
    # EgoPush-Single). A switch that keeps the weights: `load_predictor(..., overrides={"pairs": False})`
    pairs: bool = True
    accel_max: float = 2.0  # m/s^2 bound of the tanh; 0 = unbounded
    accel_max_angular: float = 40.0  # rad/s^2 of phi = 4 yaw
    constant_appearance: bool = True  # the appearance part is carried unchanged
    interaction_hidden: int = 64
    # False: a slot's position is the encoder's centre estimate, the probe learns the heading only
    # (on held-out clips a learned correction of the position came out 1 cm worse than none)
    probe_offset: bool = False
    # targets
    ema_target: bool = False  # targets through an EMA copy of the probe (the probe then also learns from the
    ema_decay: float = 0.99   # prediction loss, with the anti-collapse term); False = frozen, stop-gradient targets
    # loss weights (0 = off)
    latent_weight: float = 1.0  # appearance part (normalised slot vectors), when it is predicted
    position_weight: float = 1.0  # physical part: positions against the probe's reading of the target
    heading_weight: float = 0.1
    probe_weight: float = 1.0  # privileged: probe and predicted positions against the simulator's objects
    gate_weight: float = 0.01  # sparsity of the interaction gates
    smooth_weight: float = 0.01  # change of the accelerations over time
    anti_collapse_weight: float = 1.0  # variance hinge on the states when targets are not frozen

    def __post_init__(self) -> None:
        for name in ("slot_dim", "num_slots", "history", "future", "frameskip", "dim", "layers", "heads", "block",
                     "topk", "interaction_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if not 0 <= self.mask_slots <= self.num_slots:
            raise ValueError(f"mask_slots must be in [0, num_slots={self.num_slots}]; got {self.mask_slots}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1); got {self.ema_decay}")

    @property
    def window(self) -> int:
        return self.history + self.future

    @property
    def dt(self) -> float:
        """Seconds per predictor frame."""
        return self.frameskip / CONTROL_HZ

    @property
    def feature_dim(self) -> int:
        return self.slot_dim + 5

    @property
    def state_dim(self) -> int:
        return self.slot_dim + PHYS_DIM


# ---------------------------------------------------------------------------- masking


def object_mask(batch: int, num_slots: int, history: int, future: int, hidden_slots: int,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Visible tokens (B, Th + Tf, K) bool for C-JEPA's object-level masking: all slots at frame 0,
    all but `hidden_slots` random slots (drawn per sample) at frames 1..Th-1, none in the future."""
    if not 0 <= hidden_slots <= num_slots:
        raise ValueError(f"hidden_slots must be in [0, {num_slots}]; got {hidden_slots}")
    visible = torch.ones(batch, history + future, num_slots, dtype=torch.bool)
    visible[:, history:] = False
    if hidden_slots and history > 1:
        rank = torch.rand(batch, num_slots, generator=generator).argsort(-1).argsort(-1)
        visible[:, 1:history] &= ~(rank < hidden_slots).unsqueeze(1)
    return visible.to(device)


# ---------------------------------------------------------------------------- attention


def frame_causal_attention(q: Tensor, k: Tensor, v: Tensor, frames: int, *, sparse: bool = False, block: int = 8,
                           topk: int = 4) -> Tensor:
    """Attention where a token sees every token of its own frame and of the frames before it.
    q, k, v (B, H, T*n, d), frame-major -> (B, H, T*n, d).

    Dense: one SDPA call with the block-lower-triangular (frame-causal) mask. Block-sparse: the
    frames are folded into the batch, each frame's queries against all keys with the later frames'
    keys padded out (`key_padding_mask`), so `block_sparse_attention` picks its top-k key blocks
    among the allowed ones only; k and v are projected once and only expanded."""
    b, h, n_tok, d = q.shape
    if n_tok % frames:
        raise ValueError(f"{n_tok} tokens do not split into {frames} frames")
    n = n_tok // frames
    frame_of = torch.arange(n_tok, device=q.device) // n
    if not sparse:
        allowed = frame_of[:, None] >= frame_of[None, :]  # (T*n, T*n), every row holds its own frame
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    qf = q.view(b, h, frames, n, d).transpose(1, 2).reshape(b * frames, h, n, d)
    kf = k.unsqueeze(1).expand(b, frames, h, n_tok, d).reshape(b * frames, h, n_tok, d)
    vf = v.unsqueeze(1).expand(b, frames, h, n_tok, v.shape[-1]).reshape(b * frames, h, n_tok, -1)
    later = frame_of[None, :] > torch.arange(frames, device=q.device)[:, None]  # (T, T*n)
    pad = later.unsqueeze(0).expand(b, frames, n_tok).reshape(b * frames, n_tok)
    out = block_sparse_attention(qf, kf, vf, block_q=block, block_k=block, topk=topk, key_padding_mask=pad,
                                 keep_diagonal=False)
    return out.view(b, frames, h, n, -1).transpose(1, 2).reshape(b, h, n_tok, -1)


class CausalBlock(nn.Module):
    """Pre-norm transformer block; its attention is the encoder's `BlockSparseAttention` (weights and
    dense/sparse switch) applied with the frame-causal pattern."""

    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = BlockSparseAttention(cfg.dim, cfg.heads, None, sparse=cfg.sparse, block_q=cfg.block,
                                         block_k=cfg.block, topk=cfg.topk)
        self.norm2 = nn.LayerNorm(cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: Tensor, frames: int, past: tuple[Tensor, Tensor] | None = None, repeat: int = 1
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T*n, D) -> (B, T*n, D), and this layer's keys and values (B, H, T*n, d).

        past: keys and values (B', H, P, d) of P earlier tokens (whole frames) that every token of x also
        sees; x's batch is B' x repeat, each past row shared by `repeat` adjacent rows of x (the
        candidates of one history). Dense attention then, whatever the sparse switch."""
        a = self.attn
        b, n_tok, dim = x.shape
        y = self.norm1(x)
        q = a.to_q(y).view(b, n_tok, a.heads, a.head_dim).transpose(1, 2)
        k, v = a.to_kv(y).view(b, n_tok, 2, a.heads, a.head_dim).permute(2, 0, 3, 1, 4)
        if past is None:
            o = frame_causal_attention(q, k, v, frames, sparse=a.sparse, block=a.block_q, topk=a.topk)
        else:
            kp, vp = (t.repeat_interleave(repeat, 0) for t in past)
            frame_of = torch.arange(n_tok, device=x.device) // (n_tok // frames)
            allowed = torch.cat([torch.ones(n_tok, kp.shape[2], dtype=torch.bool, device=x.device),
                                 frame_of[:, None] >= frame_of[None, :]], 1)
            o = F.scaled_dot_product_attention(q, torch.cat([kp, k], 2), torch.cat([vp, v], 2), attn_mask=allowed)
        x = x + a.proj(o.transpose(1, 2).reshape(b, n_tok, dim))
        return x + self.mlp(self.norm2(x)), (k, v)


# ---------------------------------------------------------------------------- the model


@dataclass
class Rollout:
    """Predicted futures of every candidate action sequence."""

    states: Tensor  # (B, N, H, K, Z): appearance (S) + physical (x, y, phi, vx, vy, omega)
    robot: Tensor  # (B, N, H, 6): the robot's axle x, y, cos yaw, sin yaw, v, omega (from the commands)
    slot_dim: int

    @property
    def positions(self) -> Tensor:
        """(B, N, H, K, 2) planar slot positions, world frame, metres."""
        return self.states[..., self.slot_dim:self.slot_dim + 2]

    @property
    def appearance(self) -> Tensor:
        return self.states[..., :self.slot_dim]


class CausalJEPAPredictor(nn.Module):
    """Object-slot dynamics under actions (see the module docstring)."""

    def __init__(self, cfg: PredictorConfig | None = None, stats: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PredictorConfig()
        s, d = cfg.slot_dim, cfg.dim
        stats = stats or {}
        self.register_buffer("slot_mean", torch.tensor(stats.get("slot_mean", [0.0] * s), dtype=torch.float32))
        self.register_buffer("slot_std", torch.tensor(stats.get("slot_std", [1.0] * s), dtype=torch.float32))
        if self.slot_mean.shape != (s,) or self.slot_std.shape != (s,):
            raise ValueError(f"stats slot_mean/slot_std must have slot_dim={s} entries")
        self.probe = PhysicalProbe(cfg.feature_dim, offset=cfg.probe_offset)
        self.target_probe = copy.deepcopy(self.probe).requires_grad_(False) if cfg.ema_target else None
        self.slot_in = nn.Sequential(nn.Linear(s + 7, d), nn.GELU(), nn.Linear(d, d))
        self.anchor_in = nn.Linear(d, d)  # hidden token = mask + time + Linear(first-frame token)
        self.mask_token = nn.Parameter(torch.randn(d) * 0.02)
        self.no_action = nn.Parameter(torch.randn(d) * 0.02)  # frame 0 has no action before it in the window
        self.action_in = nn.Linear(2 * cfg.frameskip, d)
        self.robot_in = nn.Linear(6, d)
        self.time_embed = nn.Parameter(torch.randn(cfg.window, d) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(3, d) * 0.02)  # slot, action, proprio
        self.blocks = nn.ModuleList(CausalBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        if cfg.physics:
            self.dynamics: nn.Module = InteractionDynamics(
                d, cfg.interaction_hidden, cfg.dt, gates=cfg.gates, quasi_static=cfg.quasi_static,
                accel_max=(cfg.accel_max, cfg.accel_max_angular),
                contact_range=(ROBOT_CONTACT_M, PAIR_REACH_M) if cfg.contact else None, pairs=cfg.pairs)
        else:
            self.dynamics = FreeDynamics(d, cfg.interaction_hidden)
        self.appearance_head = None
        if not cfg.constant_appearance:
            self.appearance_head = nn.Linear(d, s)
            nn.init.zeros_(self.appearance_head.weight)
            nn.init.zeros_(self.appearance_head.bias)
        self.register_buffer("action_scale", torch.tensor(ACTION_HIGH, dtype=torch.float32).repeat(cfg.frameskip))

    def set_sparse(self, sparse: bool) -> None:
        for blk in self.blocks:
            blk.attn.sparse = sparse

    # -- slot states -------------------------------------------------------------

    def encode_states(self, features: Tensor, probe: nn.Module | None = None) -> Tensor:
        """Encoder features (B, T, K, S + 5) -> states (B, T, K, S + 6): the slot vector and the probed
        physical part (velocities by backward differences over the T frames; 0 at the first)."""
        if features.shape[-1] != self.cfg.feature_dim:
            raise ValueError(f"slot features must end in S + 5 = {self.cfg.feature_dim}; got {tuple(features.shape)}")
        pos, heading = (probe or self.probe)(features)
        phys = finite_difference_states(pos, torch.atan2(heading[..., 1], heading[..., 0]), self.cfg.dt)
        return torch.cat([features[..., :self.cfg.slot_dim], phys], -1)

    def robot_states(self, cam_pose: Tensor, proprio: Tensor | None, actions: Tensor, observed: int) -> Tensor:
        """Robot states (B, T, 6) of a window: frames < `observed` from the camera pose (B, T', 4, 4) and
        proprio; later frames integrated from the last observed one by the commands actions (B, T, s, 2)."""
        robot = robot_from_camera(cam_pose[:, :observed], None if proprio is None else proprio[:, :observed])
        t = actions.shape[1]
        if t > observed:
            future = actions[:, observed:].flatten(1, 2)  # (B, (T - observed) * s, 2)
            robot = torch.cat([robot, integrate_robot(robot[:, -1], future, 1.0 / CONTROL_HZ, self.cfg.frameskip)], 1)
        return robot

    # -- the transformer and the transitions ---------------------------------------

    def forward(self, states: Tensor, visible: Tensor, actions: Tensor, robot: Tensor
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """states (B, T, K, Z) (only visible ones are read), visible (B, T, K) bool (frame 0 all visible),
        actions (B, T, s, 2) commands from frame t-1 to t (frame 0's are not read), robot (B, T, 6)
        -> states (B, T, K, Z): visible ones as given, hidden ones predicted; and per transition
        'acc' (B, T-1, K, 3), 'gate' (B, T-1, K, K), 'robot_gate' (B, T-1, K) for the priors."""
        cfg = self.cfg
        b, t, k, _ = states.shape
        if t > cfg.window:
            raise ValueError(f"at most {cfg.window} frames per window; got {t}")
        if not bool(visible[:, 0].all()):
            raise ValueError("every slot must be visible at the first frame (the identity anchor)")
        states = self._anchored(states)
        tok = self._slot_tokens(states)  # (B, T, K, D)
        tok = torch.where(visible.unsqueeze(-1), tok, self.mask_token + self.anchor_in(tok[:, :1]))
        x = self._frame_tokens(tok, actions, robot, 0).reshape(b, t * (k + 2), -1)
        for blk in self.blocks:
            x, _ = blk(x, t)
        h = self.norm(x).view(b, t, k + 2, -1)[:, :, :k]
        out, extras = self._transitions(states, h, visible, robot)
        return torch.stack([states[:, 0], *out], 1), extras

    def _anchored(self, states: Tensor) -> Tensor:
        """The window's first frame is the identity anchor: its velocities are unknown at a clip start,
        so they are never read (the same in training and in rollouts)."""
        s = self.cfg.slot_dim
        return torch.cat([torch.cat([states[:, :1, :, :s + 3], torch.zeros_like(states[:, :1, :, s + 3:])], -1),
                          states[:, 1:]], 1)

    def _slot_tokens(self, states: Tensor) -> Tensor:
        """(B, T, K, Z) -> (B, T, K, D)."""
        s = self.cfg.slot_dim
        app = (states[..., :s] - self.slot_mean) / self.slot_std
        return self.slot_in(torch.cat([app, physical_features(states[..., s:])], -1))

    def _frame_tokens(self, tok: Tensor, actions: Tensor, robot: Tensor, t0: int) -> Tensor:
        """Slot tokens (B, T, K, D), commands (B, T, s, 2), robot (B, T, 6) of window frames t0.. ->
        tokens (B, T, K + 2, D) with type and time encodings (window frame 0 has no command before it)."""
        b, t = tok.shape[:2]
        act = self.action_in(actions.flatten(2) / self.action_scale)  # (B, T, D)
        if t0 == 0:
            act = torch.cat([self.no_action.expand(b, 1, -1), act[:, 1:]], 1)
        rob = self.robot_in(torch.cat([robot[..., :2] / POSITION_SCALE_M, robot[..., 2:4],
                                       robot[..., 4:5] / SPEED_SCALE, robot[..., 5:6] / 2.0], -1))
        return torch.cat([tok + self.type_embed[0], (act + self.type_embed[1]).unsqueeze(2),
                          (rob + self.type_embed[2]).unsqueeze(2)], 2) + self.time_embed[t0:t0 + t, None]

    def _transitions(self, states: Tensor, h: Tensor, visible: Tensor, robot: Tensor
                     ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """States of frames 1..T-1 (B, K, Z) each: a visible slot as given, a hidden one advanced from the
        frame before by the dynamics from its context h (B, T, K, D); and the priors' inputs."""
        s = self.cfg.slot_dim
        cur = states[:, 0]
        out, aux = [], []
        for i in range(1, h.shape[1]):
            command = torch.cat([robot[:, i - 1, :4], robot[:, i, 4:]], -1)  # where the robot was, what it was told
            phys, info = self.dynamics(cur[..., s:], h[:, i], command)
            app_next = cur[..., :s]
            if self.appearance_head is not None:
                app_next = app_next + self.appearance_head(h[:, i]) * self.slot_std
            cur = torch.where(visible[:, i].unsqueeze(-1), states[:, i], torch.cat([app_next, phys], -1))
            out.append(cur)
            aux.append(info)
        extras = {key: torch.stack([a[key] for a in aux], 1) for key in (aux[0] if aux else {})}
        return out, extras

    def _future_of_shared_history(self, states: Tensor, robot: Tensor, past: Tensor, future_robot: Tensor,
                                  future_actions: Tensor, n: int) -> Tensor:
        """The first rollout chunk with the history computed once: history states (B, Th, K, Z), robot
        (B, Th, 6), commands (B, Th, s, 2); each history's n candidates' future robot (B*n, f, 6) and
        commands (B*n, f, s, 2) -> predicted states (B*n, f, K, Z). Equals `forward` on the history
        repeated n times with f hidden frames after it, for the cost of the f frames alone."""
        b, th, k, z = states.shape
        f = future_robot.shape[1]
        states = self._anchored(states)
        tok = self._slot_tokens(states)
        x_hist = self._frame_tokens(tok, past, robot, 0).reshape(b, th * (k + 2), -1)
        hidden = (self.mask_token + self.anchor_in(tok[:, :1])).expand(b, f, k, -1).repeat_interleave(n, 0)
        x_fut = self._frame_tokens(hidden, future_actions, future_robot, th).reshape(b * n, f * (k + 2), -1)
        for blk in self.blocks:
            x_hist, kv = blk(x_hist, th)
            x_fut, _ = blk(x_fut, f, past=kv, repeat=n)
        h = self.norm(x_fut).view(b * n, f, k + 2, -1)[:, :, :k]
        last = states[:, -1:].repeat_interleave(n, 0)
        win = torch.cat([last, last.new_zeros(b * n, f, k, z)], 1)
        vis = torch.zeros(b * n, f + 1, k, dtype=torch.bool, device=states.device)
        vis[:, 0] = True
        rob = torch.cat([robot[:, -1:].repeat_interleave(n, 0), future_robot], 1)
        out, _ = self._transitions(win, torch.cat([h[:, :1], h], 1), vis, rob)
        return torch.stack(out, 1)

    # -- rollouts ----------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, features: Tensor, actions: Tensor, *, cam_pose: Tensor, proprio: Tensor | None = None,
                past_actions: Tensor | None = None, horizon: int | None = None, share_history: bool = True
                ) -> Rollout:
        """Predicted slots for `horizon` predictor frames after the history, for every candidate.

        features (B, Th, K, S + 5): encoder features of the history frames, `frameskip` env steps apart,
            oldest first (the last `history` are used; fewer are padded with copies of the first).
        actions (B, N, L, 2): N candidate command sequences (v m/s, omega rad/s) per env step, L =
            horizon * frameskip; the first is executed at the last history frame.
        cam_pose (B, Th, 4, 4), proprio (B, Th, P) or None: the history's observations (robot pose).
        past_actions (B, Th - 1, s, 2): the commands between history frames; None = the measured base
            velocity (proprio) of the frame they led to, held for its s steps (0 without proprio).
        share_history: the first `future` frames of every candidate attend to one computation of the
            history (dense attention; the block-sparse switch takes the plain path); False = the history
            is recomputed per candidate (the same result, for checking).
        -> Rollout: states (B, N, H, K, S + 6), robot (B, N, H, 6)."""
        cfg = self.cfg
        fs = cfg.frameskip
        features, cam_pose, proprio, past_actions, horizon = self._check_rollout(
            features, actions, cam_pose, proprio, past_actions, horizon)
        b, n = actions.shape[:2]
        th = features.shape[1]
        states = self.encode_states(features)
        robot = robot_from_camera(cam_pose, proprio)
        if past_actions is None:
            past_actions = robot[:, 1:, None, 4:6].expand(b, th - 1, fs, 2) if th > 1 else robot.new_zeros(b, 0, fs, 2)
        past = torch.cat([robot.new_zeros(b, 1, fs, 2), past_actions], 1)  # (B, Th, s, 2)
        if th < cfg.history:  # a short history: the first frame held still before it
            pad = cfg.history - th
            states = torch.cat([states[:, :1].expand(b, pad, -1, -1), states], 1)
            states[:, :pad + 1, :, cfg.slot_dim + 3:] = 0.0
            still = robot[:, :1].clone()
            still[..., 4:] = 0.0
            robot = torch.cat([still.expand(b, pad, -1), robot], 1)
            past = torch.cat([past.new_zeros(b, pad, fs, 2), past], 1)
        fold = lambda a: a.repeat_interleave(n, 0)  # (B, ...) -> (B * N, ...), candidates of a sample adjacent
        win_states, win_robot, win_act = fold(states), fold(robot), fold(past)
        cand = actions.reshape(b * n, horizon, fs, 2)
        future_robot = integrate_robot(win_robot[:, -1], actions.reshape(b * n, horizon * fs, 2), 1.0 / CONTROL_HZ, fs)
        hist = cfg.history
        preds = []
        done = 0
        if share_history and not any(blk.attn.sparse for blk in self.blocks):
            f = min(cfg.future, horizon)
            first = self._future_of_shared_history(states, robot, past, future_robot[:, :f], cand[:, :f], n)
            preds.append(first)
            win_states = torch.cat([win_states, first], 1)[:, -hist:]
            win_robot = torch.cat([win_robot, future_robot[:, :f]], 1)[:, -hist:]
            win_act = torch.cat([win_act, cand[:, :f]], 1)[:, -hist:]
            done = f
        while done < horizon:
            f = min(cfg.future, horizon - done)  # causal: fewer hidden frames give the same first ones
            st = torch.cat([win_states, win_states.new_zeros(b * n, f, *win_states.shape[2:])], 1)
            vis = torch.zeros(b * n, hist + f, cfg.num_slots, dtype=torch.bool, device=st.device)
            vis[:, :hist] = True
            rob = torch.cat([win_robot, future_robot[:, done:done + f]], 1)
            act = torch.cat([win_act, cand[:, done:done + f]], 1)
            pred, _ = self(st, vis, act, rob)
            new = pred[:, hist:]
            preds.append(new)
            win_states = torch.cat([win_states, new], 1)[:, -hist:]
            win_robot, win_act = rob[:, -hist:], act[:, -hist:]
            done += f
        out = torch.cat(preds, 1)
        return Rollout(states=out.view(b, n, horizon, cfg.num_slots, -1), robot=future_robot.view(b, n, horizon, 6),
                       slot_dim=cfg.slot_dim)

    def _check_rollout(self, features: Tensor, actions: Tensor, cam_pose: Tensor, proprio: Tensor | None,
                       past_actions: Tensor | None, horizon: int | None):
        cfg = self.cfg
        if features.dim() != 4 or features.shape[2:] != (cfg.num_slots, cfg.feature_dim):
            raise ValueError(f"history features must be (B, Th, K={cfg.num_slots}, S+5={cfg.feature_dim}); "
                             f"got {tuple(features.shape)}")
        b, th = features.shape[:2]
        if th < 1:
            raise ValueError("the history needs at least one frame")
        if actions.dim() != 4 or actions.shape[0] != b or actions.shape[-1] != 2:
            raise ValueError(f"actions must be (B={b}, N candidates, L env steps, 2); got {tuple(actions.shape)}")
        length = actions.shape[2]
        if horizon is None:
            if length == 0 or length % cfg.frameskip:
                raise ValueError(f"actions must cover a whole number of predictor frames of frameskip "
                                 f"{cfg.frameskip} env steps; got {length} steps")
            horizon = length // cfg.frameskip
        elif horizon < 1 or length != horizon * cfg.frameskip:
            raise ValueError(f"a horizon of {horizon} frames needs {horizon} x frameskip {cfg.frameskip} = "
                             f"{horizon * cfg.frameskip} actions per candidate; got {length}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")
        if not torch.isfinite(features).all():
            raise ValueError("history features contain NaN or inf")
        if tuple(cam_pose.shape) != (b, th, 4, 4) or not torch.isfinite(cam_pose).all():
            raise ValueError(f"cam_pose must be finite (B, Th, 4, 4) = {(b, th, 4, 4)}; got {tuple(cam_pose.shape)}")
        if proprio is not None and (proprio.dim() != 3 or proprio.shape[:2] != (b, th) or proprio.shape[-1] < 2):
            raise ValueError(f"proprio must be (B, Th, P>=2) = ({b}, {th}, P); got {tuple(proprio.shape)}")
        if past_actions is not None:
            want = (b, th - 1, cfg.frameskip, 2)
            if tuple(past_actions.shape) != want:
                raise ValueError(f"past_actions must be (B, Th-1, frameskip, 2) = {want}; "
                                 f"got {tuple(past_actions.shape)}")
            if not torch.isfinite(past_actions).all():
                raise ValueError("past_actions contain NaN or inf")
        keep = min(th, cfg.history)
        if th > keep:
            features, cam_pose = features[:, -keep:], cam_pose[:, -keep:]
            proprio = None if proprio is None else proprio[:, -keep:]
            if past_actions is not None:
                past_actions = past_actions[:, th - keep:]
        return features.float(), cam_pose.float(), None if proprio is None else proprio.float(), \
            None if past_actions is None else past_actions.float(), horizon

    # -- EMA target ----------------------------------------------------------------------

    @torch.no_grad()
    def update_target(self) -> None:
        """EMA step of the target probe (with `ema_target`)."""
        if self.target_probe is None:
            return
        decay = self.cfg.ema_decay
        for tgt, src in zip(self.target_probe.parameters(), self.probe.parameters()):
            tgt.lerp_(src, 1.0 - decay)


# ---------------------------------------------------------------------------- training loss


def predictor_loss(model: CausalJEPAPredictor, batch: dict[str, Tensor], generator: torch.Generator | None = None,
                   visible: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its parts on a batch of windows.

    batch: features (B, T, K, S+5), actions (B, T, s, 2) (the commands from frame t-1 to t), cam_pose
    (B, T, 4, 4), proprio (B, T, P) (optional); for the privileged probe loss (optional): object_poses
    (B, T, O, 3) x, y, yaw, object_pixels (B, T, O) pixels each object shows, slot_object (B, K) the
    object index of each slot, -1 = none. T = history + future."""
    cfg = model.cfg
    feats = batch["features"]
    b, t, k, _ = feats.shape
    if t != cfg.window:
        raise ValueError(f"training windows must have history + future = {cfg.window} frames; got {t}")
    s = cfg.slot_dim
    if visible is None:
        visible = object_mask(b, k, cfg.history, cfg.future, cfg.mask_slots if cfg.masking else 0, generator,
                              feats.device)
    with torch.no_grad():
        target = model.encode_states(feats, model.target_probe if model.target_probe is not None else None)
    states = model.encode_states(feats) if cfg.ema_target else target
    robot = model.robot_states(batch["cam_pose"], batch.get("proprio"), batch["actions"], cfg.history)
    pred, aux = model(states, visible, batch["actions"], robot)
    hidden = (~visible).float()
    n_hidden = hidden.sum().clamp(min=1)
    parts: dict[str, Tensor] = {}
    if model.appearance_head is not None and cfg.latent_weight > 0:
        err = (((pred[..., :s] - target[..., :s]) / model.slot_std) ** 2).mean(-1)
        parts["latent"] = (err * hidden).sum() / n_hidden * cfg.latent_weight
    if cfg.position_weight > 0:
        err = F.huber_loss(pred[..., s:s + 2] / POSITION_HUBER_M, target[..., s:s + 2] / POSITION_HUBER_M,
                           reduction="none").sum(-1)
        parts["position"] = (err * hidden).sum() / n_hidden * cfg.position_weight
    if cfg.heading_weight > 0:
        err = 1.0 - torch.cos(pred[..., s + 2] - target[..., s + 2])
        parts["heading"] = (err * hidden).sum() / n_hidden * cfg.heading_weight
    if cfg.probe_weight > 0 and "object_poses" in batch and "slot_object" in batch:
        parts["probe"] = cfg.probe_weight * privileged_loss(model, feats, pred[..., s:s + 2], hidden, batch)
    if "gate" in aux and cfg.gate_weight > 0:
        parts["gates"] = cfg.gate_weight * gate_sparsity(aux["gate"], aux["robot_gate"])
    if "acc" in aux and cfg.smooth_weight > 0:
        parts["smooth"] = cfg.smooth_weight * acceleration_smoothness(aux["acc"])
    if cfg.ema_target and cfg.anti_collapse_weight > 0:
        x = physical_features(states[..., s:]).flatten(0, 2)
        parts["anti_collapse"] = cfg.anti_collapse_weight * F.relu(0.1 - x.std(0)).mean()
    loss = sum(parts.values()) if parts else pred.sum() * 0.0
    with torch.no_grad():
        future = hidden[:, cfg.history:]
        dist = (pred[:, cfg.history:, :, s:s + 2] - target[:, cfg.history:, :, s:s + 2]).norm(dim=-1)
        logs = {key: float(v.detach()) for key, v in parts.items()}
        logs["loss"] = float(loss.detach())
        logs["future_pos_err_m"] = float((dist * future).sum() / future.sum().clamp(min=1))
        if "object_poses" in batch and "slot_object" in batch:  # what the benchmark measures: object slots only
            obj = batch["slot_object"].long()
            true = batch["object_poses"][:, cfg.history:].float().gather(
                2, obj.clamp(min=0)[:, None, :, None].expand(b, cfg.future, k, 3))[..., :2]
            ok = (obj >= 0)[:, None, :] & torch.isfinite(true).all(-1)
            err = (pred[:, cfg.history:, :, s:s + 2] - torch.nan_to_num(true)).norm(dim=-1)
            if ok.any():
                logs["future_object_err_m"] = float(err[ok].mean())
    return loss, logs


def privileged_loss(model: CausalJEPAPredictor, features: Tensor, pred_pos: Tensor, hidden: Tensor,
                    batch: dict[str, Tensor]) -> Tensor:
    """Huber (in POSITION_HUBER_M) of the probe's positions on frames where the slot's object shows,
    plus of the predicted positions at hidden positions, against the simulator's object positions;
    heading (1 - cos) of the probe against HEADING_SYMMETRY x yaw."""
    slot_obj = batch["slot_object"].long()  # (B, K)
    poses = batch["object_poses"].float()  # (B, T, O, 3)
    b, t, k = pred_pos.shape[:3]
    matched = slot_obj >= 0
    idx = slot_obj.clamp(min=0)[:, None, :, None].expand(b, t, k, 3)
    true = poses.gather(2, idx)  # (B, T, K, 3) the matched object's pose per slot
    ok = matched[:, None, :] & torch.isfinite(true).all(-1)
    seen = ok
    if "object_pixels" in batch:
        pix = batch["object_pixels"].float().gather(2, slot_obj.clamp(min=0)[:, None, :].expand(b, t, k))
        seen = ok & (pix >= MIN_OBJECT_PIXELS)
    true = torch.nan_to_num(true)
    pos, heading = model.probe(features)
    probe_err = F.huber_loss(pos / POSITION_HUBER_M, true[..., :2] / POSITION_HUBER_M, reduction="none").sum(-1)
    yaw = true[..., 2] * HEADING_SYMMETRY
    head_err = 1.0 - (heading[..., 0] * yaw.cos() + heading[..., 1] * yaw.sin())
    pred_err = F.huber_loss(pred_pos / POSITION_HUBER_M, true[..., :2] / POSITION_HUBER_M, reduction="none").sum(-1)
    w_seen, w_pred = seen.float(), ok.float() * hidden
    total = (probe_err * w_seen).sum() / w_seen.sum().clamp(min=1)
    total = total + model.cfg.heading_weight * (head_err * w_seen).sum() / w_seen.sum().clamp(min=1)
    return total + (pred_err * w_pred).sum() / w_pred.sum().clamp(min=1)


def predictor_config_dict(cfg: PredictorConfig) -> dict[str, Any]:
    return asdict(cfg)
