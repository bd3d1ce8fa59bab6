"""The ablation without slots: a patch-token JEPA in the manner of DINO-WM.

The frozen encoder's ViT features (one token per 8x8 patch, before slot attention) are the state.
A frame-causal transformer over T frames x (N patch tokens + an action token + a proprio token)
predicts every frame's patch features from the frames before it (teacher forcing; the action token
of frame t holds the commands from t to t+1), with the loss in the encoder's feature space; rollouts
feed predictions back autoregressively. It uses the slot predictor's transformer block and width, so
the two have about the same number of parameters.

Objects are read from patch features by `ObjectQueryProbe` (trained on the simulator's object
positions, on real encoder features only, as DINO-WM trains its probes): the query is the mean
feature of the object's patches in a reference frame, attending over a frame's patches, and the
answer is the object's position in the robot's frame at that frame (world frame through the robot's
pose, observed or integrated from the commands).

    python -c "from worldmodel.patch_jepa import train_patch_jepa; ..."   # see benchmarks/wm_predictor.py

Shapes: B batch, G segments, L steps, T frames, N patches, E encoder width, D width, O objects.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from sim.env import ACTION_HIGH, CONTROL_HZ
from worldmodel.physics import (
    POSITION_SCALE_M,
    SPEED_SCALE,
    integrate_robot,
    robot_from_camera,
    to_robot_frame,
    to_world,
)
from worldmodel.predictor import CausalBlock, PredictorConfig

MIN_PATCH_PIXELS = 4  # an object counts as in a patch from this many of its 64 pixels


@dataclass
class PatchJEPAConfig:
    token_dim: int = 128  # E (set from the encoder)
    num_patches: int = 64  # N (set from the encoder)
    history: int = 4
    future: int = 3
    frameskip: int = 2
    dim: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    probe_weight: float = 1.0

    @property
    def window(self) -> int:
        return self.history + self.future


class ObjectQueryProbe(nn.Module):
    """(query tokens (B, E), frame tokens (B, N, E)) -> the object's position in the robot's frame (B, 2) m."""

    def __init__(self, token_dim: int, num_patches: int, dim: int = 128) -> None:
        super().__init__()
        self.q = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, dim))
        self.k = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, dim))
        self.v = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, dim))
        self.pos = nn.Parameter(torch.randn(num_patches, dim) * 0.02)
        self.out = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 2))

    def forward(self, query: Tensor, tokens: Tensor) -> Tensor:
        q = self.q(query).unsqueeze(1)  # (B, 1, D)
        k = self.k(tokens) + self.pos
        v = self.v(tokens) + self.pos
        att = torch.softmax((q * k).sum(-1) / k.shape[-1] ** 0.5, -1)  # (B, N)
        read = (att.unsqueeze(-1) * v).sum(1)
        return self.out(torch.cat([read, q[:, 0]], -1)) * POSITION_SCALE_M


class PatchJEPA(nn.Module):
    def __init__(self, cfg: PatchJEPAConfig, stats: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        e, d = cfg.token_dim, cfg.dim
        stats = stats or {}
        self.register_buffer("tok_mean", torch.tensor(stats.get("tok_mean", [0.0] * e), dtype=torch.float32))
        self.register_buffer("tok_std", torch.tensor(stats.get("tok_std", [1.0] * e), dtype=torch.float32))
        self.tok_in = nn.Linear(e, d)
        self.action_in = nn.Linear(2 * cfg.frameskip, d)
        self.robot_in = nn.Linear(6, d)
        self.patch_embed = nn.Parameter(torch.randn(cfg.num_patches, d) * 0.02)
        self.time_embed = nn.Parameter(torch.randn(cfg.window, d) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(3, d) * 0.02)
        block_cfg = PredictorConfig(dim=d, layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio)
        self.blocks = nn.ModuleList(CausalBlock(block_cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, e)
        self.probe = ObjectQueryProbe(e, cfg.num_patches)
        self.register_buffer("action_scale", torch.tensor(ACTION_HIGH, dtype=torch.float32).repeat(cfg.frameskip))

    def normalise(self, tokens: Tensor) -> Tensor:
        return (tokens.float() - self.tok_mean) / self.tok_std

    def forward(self, tokens: Tensor, actions: Tensor, robot: Tensor) -> Tensor:
        """Normalised tokens (B, T, N, E), commands out of each frame (B, T, s, 2), robot (B, T, 6) ->
        each frame's prediction of the next frame's normalised tokens (B, T, N, E)."""
        b, t, n, _ = tokens.shape
        x = self.tok_in(tokens) + self.patch_embed + self.type_embed[0]
        act = self.action_in(actions.flatten(2) / self.action_scale) + self.type_embed[1]
        rob = self.robot_in(torch.cat([robot[..., :2] / POSITION_SCALE_M, robot[..., 2:4],
                                       robot[..., 4:5] / SPEED_SCALE, robot[..., 5:6] / 2.0], -1)) + self.type_embed[2]
        x = torch.cat([x, act.unsqueeze(2), rob.unsqueeze(2)], 2) + self.time_embed[:t, None]
        x = x.reshape(b, t * (n + 2), -1)
        for blk in self.blocks:
            x, _ = blk(x, t)
        return self.head(self.norm(x).view(b, t, n + 2, -1)[:, :, :n])

    @torch.no_grad()
    def rollout(self, tokens: Tensor, actions: Tensor, robot: Tensor, future_actions: Tensor) -> tuple[Tensor, Tensor]:
        """History tokens (B, Th, N, E) (raw), commands out of each history frame (B, Th, s, 2) (the last
        one is the first future command group), robot (B, Th, 6), later commands (B, H - 1, s, 2) ->
        predicted raw tokens (B, H, N, E) and the robot's integrated states (B, H, 6)."""
        cfg = self.cfg
        _b, th = tokens.shape[:2]
        h = future_actions.shape[1] + 1
        all_act = torch.cat([actions, future_actions], 1)
        steps = all_act[:, th - 1:].flatten(1, 2)
        robot_future = integrate_robot(robot[:, -1], steps, 1.0 / CONTROL_HZ, cfg.frameskip)  # (B, H, 6)
        seq, rob = self.normalise(tokens), robot
        preds = []
        for j in range(h):
            w = cfg.window
            pred = self(seq[:, -w:], all_act[:, max(0, th + j - w):th + j], rob[:, -w:])[:, -1]
            preds.append(pred)
            seq = torch.cat([seq, pred.unsqueeze(1)], 1)
            rob = torch.cat([rob, robot_future[:, j:j + 1]], 1)
        out = torch.stack(preds, 1) * self.tok_std + self.tok_mean
        return out, robot_future


def object_query(tokens: Tensor, patch_pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens (..., N, E), one object's pixels per patch (..., N) -> its mean patch feature (..., E) and
    whether it shows in any patch (...)."""
    w = (patch_pixels >= MIN_PATCH_PIXELS).float()
    seen = w.sum(-1) > 0
    return (w.unsqueeze(-1) * tokens.float()).sum(-2) / w.sum(-1, keepdim=True).clamp(min=1), seen


# ---------------------------------------------------------------------------- data


@torch.no_grad()
def encode_patch_segments(encoder: nn.Module, paths: list[str], segment_len: int, batch: int = 8,
                          progress: bool = False) -> dict[str, np.ndarray]:
    """Per segment (as the slot cache cuts them): tokens (G, L, N, E) float16, patch_pixels (G, L, O, N)
    each object's pixels per patch, actions, cam_pose, object_poses, proprio (G, L, ...)."""
    from worldmodel.objectives import object_onehot
    from worldmodel.rope import patch_geometry
    from worldmodel.train_predictor import load_segments, step_arrays

    clips, starts, per_step = load_segments(paths, segment_len)
    n_obj = per_step["object_poses"].shape[2]
    p = encoder.cfg.patch
    toks, pix = [], []
    for i in tqdm(range(0, len(starts), batch), desc="encoding patches", disable=not progress, dynamic_ncols=True):
        b = clips.batch(starts[i:i + batch], segment_len)
        x_in = encoder.normalise(b["rgb"], b["depth"])
        geom = patch_geometry(b["depth"].float(), b["intrinsics"].float(), b["cam_pose"].float(), p,
                              fallback_depth=encoder.cfg.fallback_depth_m)
        toks.append(encoder.vit(encoder.patchify(x_in), geom).half().numpy())
        onehot = object_onehot(b["segmentation"])[:, :, :n_obj]  # (B, L, O', H, W)
        bb, ll, oo, hh, ww = onehot.shape
        per_patch = onehot.view(bb, ll, oo, hh // p, p, ww // p, p).sum((4, 6)).flatten(3)  # (B, L, O', N)
        full = np.zeros((bb, ll, n_obj, per_patch.shape[-1]), np.uint8)
        full[:, :, :oo] = per_patch.numpy().astype(np.uint8)
        pix.append(full)
    return {"tokens": np.concatenate(toks), "patch_pixels": np.concatenate(pix), **step_arrays(per_step)}


def _window(cache: dict[str, np.ndarray], seg: np.ndarray, frames: np.ndarray, fs: int) -> dict[str, Tensor]:
    """Frames (B, T) of segments seg (B,): tokens, commands out of each frame (B, T, s, 2), robot, ..."""
    length = cache["tokens"].shape[1]
    steps = np.minimum(frames[:, :, None] + np.arange(fs)[None, None], length - 1)
    out = {"tokens": cache["tokens"][seg[:, None], frames], "actions": cache["actions"][seg[:, None, None], steps],
           "cam_pose": cache["cam_pose"][seg[:, None], frames], "object_poses": cache["object_poses"][seg[:, None], frames],
           "patch_pixels": cache["patch_pixels"][seg[:, None], frames]}
    if "proprio" in cache:
        out["proprio"] = cache["proprio"][seg[:, None], frames]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def patch_loss(model: PatchJEPA, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Next-frame prediction in normalised token space, plus the probe on real features: the query
    from each window's first frame, read at every frame where the object shows."""
    tok = model.normalise(batch["tokens"])
    robot = robot_from_camera(batch["cam_pose"], batch.get("proprio"))
    pred = model(tok, batch["actions"], robot)
    latent = F.mse_loss(pred[:, :-1], tok[:, 1:])
    parts = {"latent": latent}
    if model.cfg.probe_weight > 0:
        raw = batch["tokens"].float()
        pix = batch["patch_pixels"].float()  # (B, T, O, N)
        b, _t, o, _ = pix.shape
        query, seen0 = object_query(raw[:, :1].expand(b, o, -1, -1), pix[:, 0])  # (B, O, E)
        shows = (pix.sum(-1) >= 20) & seen0.unsqueeze(1) & torch.isfinite(batch["object_poses"][..., 0])  # (B, T, O)
        if shows.any():
            bi, ti, oi = shows.nonzero(as_tuple=True)
            local = model.probe(query[bi, oi], raw[bi, ti])
            true = to_robot_frame(batch["object_poses"][bi, ti, oi, :2].float(), robot[bi, ti])
            parts["probe"] = model.cfg.probe_weight * F.huber_loss(local / 0.05, true / 0.05)
    loss = sum(parts.values())
    return loss, {k: float(v.detach()) for k, v in parts.items()} | {"loss": float(loss.detach())}


def train_patch_jepa(encoder_dir: str, paths: list[str], out: str | Path, minutes: float = 15.0, batch: int = 16,
                     lr: float = 3e-4, seed: int = 0, segment_len: int = 24, cfg: PatchJEPAConfig | None = None,
                     progress: bool = True) -> PatchJEPA:
    """Train with the world model's one optimisation loop (`worldmodel.loop.fit`: progress bar,
    TensorBoard, checkpoints, resume) for `minutes` of training time, the cosine schedule sized from the
    speed of a few first steps; saved to `out` in the checkpoint layout. A finished run there is loaded."""
    from worldmodel.checkpoint import read_checkpoint, read_json, save_checkpoint
    from worldmodel.loop import fit, restore
    from worldmodel.train import load_encoder
    from worldmodel.train_predictor import PredictorStageConfig

    out = Path(out)
    if (out / "metrics.json").exists() and read_json(out / "metrics.json").get("finished"):
        return load_patch_jepa(out)
    cache_path = out / "patch_cache.npz"
    if cache_path.exists():
        with np.load(cache_path) as z:
            cache = {k: z[k] for k in z.files}
    else:
        cache = encode_patch_segments(load_encoder(encoder_dir), paths, segment_len, progress=progress)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(cache_path, **cache)
    g, length, n, e = cache["tokens"].shape
    cfg = cfg or PatchJEPAConfig()
    cfg.token_dim, cfg.num_patches = e, n
    span = (cfg.window - 1) * cfg.frameskip + 1

    def batch_at(step: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([seed, step])  # resumable sampling
        seg = rng.integers(0, g, batch)
        start = rng.integers(0, length - span + 1, batch)
        return _window(cache, seg, start[:, None] + np.arange(cfg.window)[None] * cfg.frameskip, cfg.frameskip)

    state = None
    if (out / "train_state.pt").exists():
        config, weights, stats = read_checkpoint(out)
        state = {"weights": weights, "stats": stats, "metrics": read_json(out / "metrics.json"),
                 "train_state": torch.load(out / "train_state.pt", weights_only=False)}
        steps = int(config["schedule"]["steps"])
    else:
        sample = cache["tokens"][:: max(1, g // 200)].reshape(-1, e).astype(np.float32)
        stats = {"tok_mean": sample.mean(0).tolist(), "tok_std": np.maximum(sample.std(0), 1e-3).tolist()}
        probe = PatchJEPA(cfg, stats)
        t0 = time.perf_counter()
        for i in range(3):  # the speed of a step, to size the schedule to the budget
            probe.zero_grad()
            patch_loss(probe, batch_at(10**9 + i))[0].backward()
        steps = max(10, int(minutes * 60.0 / ((time.perf_counter() - t0) / 3)))
    torch.manual_seed(seed)
    model = PatchJEPA(cfg, stats)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = PredictorStageConfig(steps=steps, lr=lr, warmup=min(100, steps // 10), time_budget_min=minutes,
                                 batch_size=batch, log_every=25, ckpt_every=250)
    config = {"stage": "patch_jepa", "encoder": str(encoder_dir), "model": asdict(cfg),
              "schedule": {"steps": steps, "lr": lr, "batch_size": batch, "minutes": minutes, "seed": seed}}
    prog = restore(state, model, opt, out, torch.device("cpu"))

    def save(parts: dict[str, float], final: bool) -> None:
        metrics = {"stage": "patch_jepa", "step": prog.step, "train_seconds": round(prog.train_s, 1),
                   "finished": final, "last": parts, "history": prog.history}
        save_checkpoint(out, model, config, stats, metrics, train_state={
            "optimizer": opt.state_dict(), "step": prog.step, "train_seconds": prog.train_s})

    fit(prog, sched, opt=opt, params=list(model.parameters()), loss_fn=lambda step: patch_loss(model, batch_at(step)),
        save=save, tag="patch_jepa", out=out, main=True, world=1, dev=torch.device("cpu"), show_progress=progress,
        postfix=("latent", "probe"))
    return model.eval()


def load_patch_jepa(directory: str | Path) -> PatchJEPA:
    from worldmodel.checkpoint import load_state_strict, read_checkpoint

    config, weights, stats = read_checkpoint(directory)
    if config.get("stage") != "patch_jepa":
        raise ValueError(f"{directory} is not a patch-JEPA checkpoint (stage {config.get('stage')!r})")
    model = PatchJEPA(PatchJEPAConfig(**config["model"]), stats)
    load_state_strict(model, weights, directory)
    return model.eval()


def patch_rollout_errors(model: PatchJEPA, cache: dict[str, np.ndarray], horizons: list[int],
                         min_pixels: int = 20) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """As `worldmodel.counterfactual.rollout_errors` for the patch model: objects seen at the last history
    frame, queried there, read on the predicted frames; the baseline reads them at the last history frame."""
    cfg = model.cfg
    fs, th = cfg.frameskip, cfg.history
    hist = np.arange(th) * fs
    last = hist[-1]
    hmax = max(horizons) // fs
    g = cache["tokens"].shape[0]
    frames = np.broadcast_to(np.concatenate([hist, last + fs * np.arange(1, hmax + 1)]), (g, th + hmax))
    w = _window(cache, np.arange(g), np.ascontiguousarray(frames), fs)
    robot = robot_from_camera(w["cam_pose"][:, :th], w["proprio"][:, :th] if "proprio" in w else None)
    pred, robot_future = model.rollout(w["tokens"][:, :th], w["actions"][:, :th], robot, w["actions"][:, th:th + hmax - 1])
    raw_last = w["tokens"][:, th - 1].float()
    err: dict[int, list[float]] = {h: [] for h in horizons}
    base: dict[int, list[float]] = {h: [] for h in horizons}
    n_obj = cache["object_poses"].shape[2]
    with torch.no_grad():
        for o in range(n_obj):
            pix = w["patch_pixels"][:, th - 1, o].float()
            query, seen = object_query(raw_last, pix)
            seen = seen & (pix.sum(-1) >= min_pixels)
            if not seen.any():
                continue
            still = to_world(model.probe(query, raw_last), robot[:, -1])
            for h in horizons:
                j = h // fs - 1
                true = torch.from_numpy(cache["object_poses"][:, last + h, o, :2])
                at = to_world(model.probe(query, pred[:, j]), robot_future[:, j])
                ok = seen & torch.isfinite(true).all(-1)
                err[h].extend((at - true).norm(dim=-1)[ok].tolist())
                base[h].extend((still - true).norm(dim=-1)[ok].tolist())
    return {h: np.asarray(v) for h, v in err.items()}, {h: np.asarray(v) for h, v in base.items()}
