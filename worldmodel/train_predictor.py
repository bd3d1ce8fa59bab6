"""`ego-train-wm stage=predictor`: the causal JEPA predictor on a frozen encoder's slots.

    ego-train-wm stage=predictor encoder=runs/wm_encoder          # out defaults to runs/wm_predictor
    ego-train-wm stage=predictor predictor.model.physics=false out=runs/wm_pred_nophys

Encoding is the expensive part on a CPU, so the training episodes are encoded once, in segments of
`predictor.segment_len` env steps (slot identity holds within a segment: each is one SAVi clip),
into a cache file keyed by a hash of the encoder checkpoint, the datasets and the segmenting; a
rerun, a resumed run or another run with the same cache_dir reuses it. Training windows (history +
future frames, `frameskip` steps apart) are drawn inside segments.

The rest follows the encoder stage: progress bar, TensorBoard scalars, an atomic checkpoint
directory (config.yaml, model.safetensors, stats.json, metrics.json) plus train_state.pt, resume
by rerunning the same command, report.md and loss.png, DDP under torchrun.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from worldmodel.checkpoint import load_state_strict, read_checkpoint, read_json, save_checkpoint, weights_digest
from worldmodel.loop import finished, fit, restore
from worldmodel.predictor import CausalJEPAPredictor, PredictorConfig, predictor_config_dict, predictor_loss

CACHE_VERSION = 2  # 2: goal-marker slots are not matched to objects


@dataclass
class PredictorStageConfig:
    """`predictor.*` options of `ego-train-wm` (stage=predictor)."""

    model: PredictorConfig = field(default_factory=PredictorConfig)  # slot_dim / num_slots come from the encoder
    steps: int = 4000  # length of the learning-rate schedule
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = at `steps`
    batch_size: int = 32  # windows per optimiser step (per process under DDP)
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    segment_len: int = 24  # env steps per encoded segment (one encoder clip)
    encode_batch: int = 8  # segments per encoder forward when building the cache
    cache_dir: str = ""  # where the slot cache lives; "" = <out>/cache
    time_budget_min: float = 30.0  # stop (with a checkpoint) after this much training time; <= 0: no limit
    log_every: int = 25
    ckpt_every: int = 250
    seed: int = 0
    device: str = "auto"
    threads: int = 0


# ---------------------------------------------------------------------------- the slot cache


def cache_key(encoder_dir: str | Path, paths: list[str], segment_len: int, seed: int) -> str:
    """Hash of what the cache depends on: encoder weights and config, datasets (path, episodes, steps),
    segmenting and the encoder's slot-initialisation seed."""
    from sim.dataset import EpisodeDataset

    enc = Path(encoder_dir)
    parts = {"version": CACHE_VERSION, "weights": weights_digest(enc),
             "config": (enc / "config.yaml").read_text(), "segment_len": segment_len, "seed": seed, "data": []}
    for p in paths:
        ds = EpisodeDataset.open(p)
        parts["data"].append([str(Path(p).resolve()), ds.n_episodes, ds.n_steps])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def segment_starts(starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """Global start steps of segments of `length` steps covering each episode: back to back, plus
    one ending at the episode's end when a tail is left; episodes shorter than `length` are skipped."""
    out = []
    for s, e in zip(starts, ends):
        if e - s < length:
            continue
        seg = list(range(int(s), int(e) - length + 1, length))
        if seg[-1] + length < e:
            seg.append(int(e) - length)
        out.extend(seg)
    return np.asarray(out, np.int64)


def load_segments(paths: list[str], segment_len: int) -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:
    """The datasets cut into segments (`segment_starts`): the clips, the segments' start steps (G,) and
    the per-step arrays (G, L, ...) the predictors read: actions (the command taken at each step),
    cam_pose, object_poses, proprio."""
    from worldmodel.data import FRAME_KEYS, Clips

    clips = Clips.load(paths, need=(*FRAME_KEYS, "segmentation", "object_poses"))
    starts = segment_starts(clips.starts, clips.ends, segment_len)
    if len(starts) == 0:
        raise ValueError(f"no episode is at least predictor.segment_len={segment_len} steps long")
    idx = starts[:, None] + np.arange(segment_len)[None]
    actions = clips.arrays.get("executed_action", clips.arrays.get("action"))
    if actions is None:
        raise ValueError("the datasets have no actions")
    per_step = {"actions": actions, "cam_pose": clips.arrays["cam_pose"], "object_poses": clips.arrays["object_poses"]}
    if "proprio" in clips.arrays:
        per_step["proprio"] = clips.arrays["proprio"]
    return clips, starts, {k: v[idx] for k, v in per_step.items()}


def step_arrays(per_step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-step arrays as the caches store them: float32, actions clipped to the action space."""
    from sim.env import ACTION_HIGH, ACTION_LOW

    out = {"actions": np.clip(per_step["actions"], ACTION_LOW, ACTION_HIGH).astype(np.float32),
           "cam_pose": per_step["cam_pose"].astype(np.float32),
           "object_poses": per_step["object_poses"].astype(np.float32)}
    if "proprio" in per_step:
        out["proprio"] = per_step["proprio"].astype(np.float32)
    return out


@torch.no_grad()
def encode_segments(encoder: torch.nn.Module, paths: list[str], segment_len: int, batch: int, seed: int,
                    device: torch.device, progress: bool = True, match_frames: int | None = None) -> dict[str, np.ndarray]:
    """Encode every segment: features (G, L, K, S + 5) and the per-step arrays the predictor trains on
    (see `encode_clip_arrays`)."""
    clips, starts, per_step = load_segments(paths, segment_len)
    return encode_clip_arrays(encoder, lambda i, j: clips.batch(starts[i:j], segment_len, device=device), len(starts),
                              per_step, batch, seed, progress, match_frames)


@torch.no_grad()
def encode_clip_arrays(encoder: torch.nn.Module, frames: Any, n_clips: int, per_step: dict[str, np.ndarray],
                       batch: int, seed: int, progress: bool = False,
                       match_frames: int | None = None) -> dict[str, np.ndarray]:
    """The predictor's cache of G clips of L steps: features (G, L, K, S + 5) from the encoder, each
    clip encoded from its first frame; slot_object (G, K) (-1 = none); object_pixels (G, L, O); and
    per_step's actions (the command taken at each step), cam_pose, object_poses, proprio (G, L, ...).
    Objects are matched to slots per clip by the encoder's masks against the segmentation
    (Hungarian on the summed log-likelihood, as the encoder's training matched them), over the clip's
    first `match_frames` steps (None: all of it). An open-loop test matches on the history it starts
    from: matched over the whole clip, an object goes to the slot that holds it in most of the
    future, which need not be the slot that held it where the rollout starts.
    frames(i, j): clips i..j-1 as tensors rgb, depth, intrinsics, cam_pose, segmentation (B, L, ...)."""
    if match_frames is not None and match_frames < 1:
        raise ValueError(f"match_frames must be >= 1 (or None: the whole clip); got {match_frames}")
    span = slice(0, match_frames)
    from worldmodel.objectives import match_objects_to_slots, object_onehot

    n_obj = per_step["object_poses"].shape[2]
    k = encoder.cfg.num_slots
    feats, slot_object, pixels = [], [], []
    torch.manual_seed(seed)  # the slots' random initialisation on each clip's first frame
    for i in tqdm(range(0, n_clips, batch), desc="encoding slots", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        b = frames(i, min(i + batch, n_clips))
        out = encoder(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
        feats.append(out.features.float().cpu().numpy())
        onehot = object_onehot(b["segmentation"])  # (B, L, O', H, W), O' from the largest id present
        length = onehot.shape[1]
        pix = np.zeros((len(onehot), length, n_obj), np.int32)
        o = min(onehot.shape[2], n_obj)
        pix[:, :, :o] = onehot[:, :, :o].sum((-1, -2)).cpu().numpy()
        pixels.append(pix)
        so = np.full((len(onehot), k), -1, np.int16)
        if onehot.shape[2]:
            log_masks = torch.log(out.masks[:, span].clamp(min=1e-6))
            for j, (objs, slots) in enumerate(match_objects_to_slots(log_masks, onehot[:, span])):
                keep = objs < n_obj  # goal markers (sim.env.GOAL_SEG_ID) have no pose: no probe target
                so[j, slots[keep]] = objs[keep]
        slot_object.append(so)
    return {"features": np.concatenate(feats), "slot_object": np.concatenate(slot_object),
            "object_pixels": np.minimum(np.concatenate(pixels), 32767).astype(np.int16), **step_arrays(per_step)}


def load_or_build_cache(encoder_dir: str, paths: list[str], cfg: PredictorStageConfig, out: Path,
                        device: torch.device, progress: bool, build: bool = True) -> tuple[dict[str, np.ndarray], Path]:
    """The slot cache for these inputs: read when present, else (with `build`) encoded and written
    atomically."""
    from worldmodel.checkpoint import _atomic_write
    from worldmodel.train import load_encoder

    key = cache_key(encoder_dir, paths, cfg.segment_len, cfg.seed)
    path = Path(cfg.cache_dir or out / "cache") / f"slots_{key}.npz"
    if not path.exists():
        if not build:
            raise FileNotFoundError(f"slot cache {path} is missing")
        encoder = load_encoder(encoder_dir, device)
        cache = encode_segments(encoder, paths, cfg.segment_len, cfg.encode_batch, cfg.seed, device, progress)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **cache)
        _atomic_write(path, write)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}, path


def sample_windows(cache: dict[str, np.ndarray], cfg: PredictorConfig, batch: int, rng: np.random.Generator,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A batch of training windows drawn uniformly inside the cache's segments (see `predictor_loss`)."""
    g, length = cache["features"].shape[:2]
    fs, t = cfg.frameskip, cfg.window
    span = (t - 1) * fs + 1
    if span > length:
        raise ValueError(f"windows of {t} frames at frameskip {fs} span {span} steps, more than "
                         f"predictor.segment_len={length}")
    seg = rng.integers(0, g, batch)
    start = rng.integers(0, length - span + 1, batch)
    frames = start[:, None] + np.arange(t)[None] * fs  # (B, T)
    out = {k: cache[k][seg[:, None], frames] for k in ("features", "cam_pose", "object_poses", "object_pixels",
                                                         "proprio") if k in cache}
    # commands from frame t-1 to frame t: steps frames[t-1] .. frames[t]-1; frame 0 gets zeros (never read)
    steps = np.maximum(frames[:, :, None] - fs + np.arange(fs)[None, None], 0)  # (B, T, s)
    acts = cache["actions"][seg[:, None, None], steps]
    acts[:, 0] = 0.0
    out["actions"] = acts
    out["slot_object"] = cache["slot_object"][seg]
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in out.items()}


def slot_stats(cache: dict[str, np.ndarray], slot_dim: int) -> dict[str, list[float]]:
    x = cache["features"][..., :slot_dim].reshape(-1, slot_dim)
    return {"slot_mean": x.mean(0).tolist(), "slot_std": np.maximum(x.std(0), 1e-3).tolist()}


# ---------------------------------------------------------------------------- training


def train_predictor(cfg: Any) -> dict[str, Any]:
    """Train (or resume) the predictor; cfg is a `worldmodel.train.WorldModelTrainConfig` with stage=predictor."""
    from worldmodel.train import _dist_setup, dataset_paths, load_encoder

    pc: PredictorStageConfig = cfg.predictor
    if pc.steps < 1 or pc.batch_size < 1:
        raise ValueError(f"predictor.steps and predictor.batch_size must be >= 1; got {pc.steps}, {pc.batch_size}")
    if not cfg.encoder or not (Path(cfg.encoder) / "model.safetensors").exists():
        raise ValueError(f"encoder={cfg.encoder!r} is not an encoder checkpoint directory; train one first "
                         "(ego-train-wm stage=encoder) and pass its directory as encoder=...")
    rank, world, dev = _dist_setup(pc.device)
    if pc.threads > 0:
        torch.set_num_threads(pc.threads)
    out = Path(cfg.out)
    main = rank == 0

    enc = load_encoder(cfg.encoder)
    mcfg = replace(pc.model, slot_dim=enc.cfg.slot_dim, num_slots=enc.cfg.num_slots)
    del enc
    span = (mcfg.window - 1) * mcfg.frameskip + 1
    if span > pc.segment_len:
        raise ValueError(f"windows of history + future = {mcfg.window} frames at frameskip {mcfg.frameskip} span "
                         f"{span} steps; predictor.segment_len={pc.segment_len} must be at least that")

    if main:
        paths = dataset_paths(cfg.data, cfg.progress)
        _, cache_path = load_or_build_cache(cfg.encoder, paths, pc, out, dev, cfg.progress)
    if world > 1:
        holder = [(paths, str(cache_path)) if main else None]
        dist.broadcast_object_list(holder, 0)
        paths, cache_path = holder[0]
    with np.load(cache_path) as z:
        cache = {k: z[k] for k in z.files}

    state = _resume_state(out, cfg, mcfg) if cfg.resume else None
    stats = state["stats"] if state else {**slot_stats(cache, mcfg.slot_dim), "encoder": str(cfg.encoder),
                                          "cache": str(cache_path)}
    model = CausalJEPAPredictor(mcfg, stats).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=pc.weight_decay)
    progress = restore(state, model, opt, out, dev)
    done = finished(progress, pc)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    resolved = _resolved(cfg, mcfg)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = np.random.default_rng([pc.seed, rank, step])  # resumable sampling, different per rank
        batch = sample_windows(cache, mcfg, pc.batch_size, rng, dev)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return _loss(ddp, model, batch, gen)

    def save(parts: dict[str, float], final: bool) -> None:
        metrics = _metrics(progress.step, progress.train_s, progress.history, parts, world, pc) | {"finished": final}
        save_checkpoint(out, model, resolved, stats, metrics, train_state={
            "optimizer": opt.state_dict(), "step": progress.step, "train_seconds": progress.train_s})

    parts = fit(progress, pc, opt=opt, params=params, loss_fn=loss_fn, save=save, tag="predictor", out=out,
                main=main, world=world, dev=dev, show_progress=cfg.progress, after_step=model.update_target,
                postfix=("loss", "future_object_err_m"))
    if world > 1:
        dist.barrier()
    metrics = _metrics(progress.step, progress.train_s, progress.history, parts, world, pc)
    if main and not done:
        write_report(out, cfg, mcfg, metrics)
    return metrics


def _loss(ddp: torch.nn.Module, model: CausalJEPAPredictor, batch: dict[str, torch.Tensor],
          gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    if ddp is model:
        return predictor_loss(model, batch, gen)
    # under DDP the transformer's forward goes through the wrapper (gradient all-reduce); the probe's
    # own use outside it is all-reduced by the same per-parameter hooks
    return predictor_loss(_DDPCall(ddp, model), batch, gen)  # type: ignore[arg-type]


class _DDPCall:
    """The predictor with calls going through its DDP wrapper (attributes read from the model)."""

    def __init__(self, ddp: torch.nn.Module, model: CausalJEPAPredictor) -> None:
        self._ddp, self._model = ddp, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _resolved(cfg: Any, mcfg: PredictorConfig) -> dict[str, Any]:
    d = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    d["predictor"]["model"] = predictor_config_dict(mcfg)
    return d


def _metrics(step: int, train_s: float, history: list, parts: dict, world: int, pc: PredictorStageConfig
             ) -> dict[str, Any]:
    return {"stage": "predictor", "step": step, "train_seconds": round(train_s, 1), "processes": world,
            "windows_seen": step * pc.batch_size * world, "last": parts, "history": history}


def _resume_state(out: Path, cfg: Any, mcfg: PredictorConfig) -> dict[str, Any] | None:
    if not (out / "train_state.pt").exists():
        return None
    config, weights, stats = read_checkpoint(out)
    same = (config.get("stage") == "predictor"
            and config.get("predictor", {}).get("model") == predictor_config_dict(mcfg))
    if not same:
        raise ValueError(f"{out} holds a different run (stage/model config differ); pass out=<new dir> or resume=false")
    return {"weights": weights, "stats": stats, "metrics": read_json(out / "metrics.json"),
            "train_state": torch.load(out / "train_state.pt", weights_only=False)}


ROLLOUT_SWITCHES = ("pairs",)  # PredictorConfig fields that may differ from training's (same weights)


def load_predictor(directory: str | Path, device: str | torch.device = "cpu", with_config: bool = False,
                   overrides: dict[str, Any] | None = None):
    """A `CausalJEPAPredictor` from a checkpoint directory, in eval mode (and its config.yaml as a dict).
    `overrides`: `ROLLOUT_SWITCHES` set otherwise than in training, e.g. {"pairs": False}."""
    config, weights, stats = read_checkpoint(directory)
    if config.get("stage") != "predictor" or "model" not in config.get("predictor", {}):
        raise ValueError(f"{directory} is not a predictor checkpoint (stage {config.get('stage')!r})")
    bad = sorted(set(overrides or {}) - set(ROLLOUT_SWITCHES))
    if bad:
        raise ValueError(f"only {list(ROLLOUT_SWITCHES)} can be changed on a trained predictor; got {bad}")
    model = CausalJEPAPredictor(PredictorConfig(**(config["predictor"]["model"] | dict(overrides or {}))), stats)
    load_state_strict(model, weights, directory)
    model = model.to(device).eval()
    return (model, config) if with_config else model


def write_report(out: Path, cfg: Any, mcfg: PredictorConfig, metrics: dict[str, Any]) -> None:
    """report.md and loss.png of a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = metrics["history"]
    if hist:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in [k for k in hist[-1] if k not in ("step", "train_s")]:
            vals = [(h["step"], h[key]) for h in hist if key in h and h[key] > 0]
            if vals:
                ax.plot(*zip(*vals), label=key)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.set_title("ego-train-wm predictor")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
    last = ", ".join(f"{k} {v:.4f}" for k, v in metrics["last"].items())
    switches = ", ".join(f"{k}={getattr(mcfg, k)}" for k in ("masking", "mask_slots", "physics", "gates",
                                                            "quasi_static", "constant_appearance", "ema_target",
                                                            "sparse"))
    text = (f"# ego-train-wm predictor\n\n"
            f"- encoder: {cfg.encoder}\n"
            f"- steps: {metrics['step']} ({metrics['windows_seen']} windows of {mcfg.history} + {mcfg.future} frames "
            f"at frameskip {mcfg.frameskip}, {metrics['processes']} process(es))\n"
            f"- training time: {metrics['train_seconds'] / 60:.1f} min\n"
            f"- final losses: {last}\n"
            f"- model: {mcfg.layers} layers, width {mcfg.dim}, {mcfg.num_slots} slots of {mcfg.slot_dim}; "
            f"{switches}\n\n"
            f"![loss](loss.png)\n")
    (out / "report.md").write_text(text)
