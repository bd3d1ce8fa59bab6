"""`ego-train-wm`: train the world model, one stage at a time (Hydra CLI).

    ego-train-wm stage=encoder                      # collects its data first if needed
    ego-train-wm stage=encoder model.rope=2d out=runs/wm_2d train.time_budget_min=20
    torchrun --nproc-per-node 2 --no-python ego-train-wm stage=encoder   # DDP (gloo on CPU, nccl on CUDA)
    ego-train-wm stage=center encoder=runs/wm_encoder out=runs/wm_center   # refit the centre head (minutes)

A run directory is a checkpoint (config.yaml, model.safetensors, stats.json, metrics.json) plus
train_state.pt, tb/ (TensorBoard scalars), report.md and loss.png. Rerunning the same command
resumes from the last checkpoint; a finished run is left as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sim.collect import check_choice, to_config
from worldmodel.checkpoint import load_state_strict, read_checkpoint, read_json, save_checkpoint
from worldmodel.data import FRAME_KEYS, Clips
from worldmodel.encoder import CENTER_INPUTS, EncoderConfig, ObjectCentricEncoder, config_dict
from worldmodel.loop import finished, fit, restore
from worldmodel.objectives import encoder_loss
from worldmodel.train_predictor import PredictorStageConfig

STAGES = ("encoder", "center", "predictor")


@dataclass
class DataSource:
    """One `ego-collect` run whose episodes train the world model."""

    task: str = "formation"
    level: str = "hard"
    policy: str = "random"
    episodes: int = 60
    max_steps: int | None = 200
    seed: int = 0


def _default_sources() -> list[DataSource]:
    # random exploration gives the camera motion, noisy expert episodes the pushing; both tasks so
    # that the encoder sees one box and six objects alike
    return [
        DataSource("formation", "hard", "random", 60, 200),
        DataSource("formation", "hard", "noisy_expert", 30, 300),
        DataSource("single", "hard", "random", 40, 200),
        DataSource("single", "hard", "noisy_expert", 30, 200),
    ]


@dataclass
class DataConfig:
    root: str = "data/wm"  # where `sources` are collected (resumable)
    paths: list[str] = field(default_factory=list)  # use these datasets instead of collecting `sources`
    sources: list[DataSource] = field(default_factory=_default_sources)
    image_size: int = 64
    workers: int = 2  # collection worker processes


@dataclass
class TrainConfig:
    steps: int = 3000  # length of the learning-rate schedule
    stop_at: int = 0  # stop (with a checkpoint) after this step although the schedule runs on; 0 = at `steps`
    batch_size: int = 8  # clips per optimiser step (per process under DDP)
    clip_len: int = 6  # frames per clip (SAVi trains on 6)
    lr: float = 4e-4
    warmup: int = 150
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    depth_weight: float = 1.0
    mask_weight: float = 1.0  # simulator segmentation as an auxiliary mask target; 0 = unsupervised
    boundary_weight: float = 3.0  # weight of pixels on an edge between two ids in the mask target
    center_weight: float = 0.5  # simulator object positions as a target of the slots' centre estimates; 0 = off
    object_balance: bool = True  # every object weighs the same in the mask target, whatever its pixel count
    time_budget_min: float = 45.0  # stop (with a checkpoint) after this much training time; <= 0: no limit
    log_every: int = 25
    ckpt_every: int = 250
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class CenterStageConfig:
    """stage=center: refit the centre head of a trained encoder (`encoder=DIR`), everything else frozen,
    on the same data and target (`center_loss`), for a head that reads other inputs
    (`EncoderConfig.center_inputs`). The result is an encoder checkpoint like any other."""

    inputs: str = "frame"  # EncoderConfig.center_inputs of the new head
    steps: int = 800
    lr: float = 1e-3
    batch_size: int = 8
    clip_len: int = 8  # frames per clip; slots (so masks) run on over the clip as on a robot
    time_budget_min: float = 15.0


@dataclass
class WorldModelTrainConfig:
    """Options of `ego-train-wm` (defaults mirrored in worldmodel/conf/train_wm.yaml)."""

    stage: str = "encoder"
    out: str = "runs/wm_${stage}"
    resume: bool = True  # continue from out/ when it holds a checkpoint of this stage
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    encoder: str = "runs/wm_encoder"  # stage=predictor / center: the frozen encoder checkpoint it starts from
    center: CenterStageConfig = field(default_factory=CenterStageConfig)  # stage=center options
    predictor: PredictorStageConfig = field(default_factory=PredictorStageConfig)  # stage=predictor options


ConfigStore.instance().store(name="train_wm_schema", node=WorldModelTrainConfig)


# ---------------------------------------------------------------------------- data


def dataset_paths(cfg: DataConfig, progress: bool = True) -> list[str]:
    """The datasets to train on, collecting missing `sources` episodes first."""
    if cfg.paths:
        return list(cfg.paths)
    from sim.collect import collect

    paths = []
    for s in cfg.sources:
        path = str(Path(cfg.root) / f"{s.task}_{s.level}_{s.policy}_{cfg.image_size}px.zarr")
        collect(out=path, task=s.task, level=s.level, policy=s.policy, episodes=s.episodes, seed=s.seed,
                max_steps=s.max_steps, image_size=cfg.image_size, segmentation=True, workers=cfg.workers,
                progress=progress)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- distributed


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when there is one, else CPU) or a torch device name."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _dist_setup(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


# ---------------------------------------------------------------------------- training


def _check(cfg: WorldModelTrainConfig) -> None:
    check_choice("stage", cfg.stage, STAGES)
    t = cfg.train
    if t.steps < 1 or t.batch_size < 1 or t.clip_len < 1:
        raise ValueError(f"train.steps, train.batch_size and train.clip_len must be >= 1; got {t.steps}, "
                         f"{t.batch_size}, {t.clip_len}")
    if cfg.model.image_size != (cfg.data.image_size, cfg.data.image_size) and not cfg.data.paths:
        raise ValueError(f"model.image_size {cfg.model.image_size} differs from data.image_size {cfg.data.image_size}")


def train(config: WorldModelTrainConfig | DictConfig | dict | None = None, **overrides: Any) -> dict[str, Any]:
    """Train (or resume) one stage; returns the run's metrics. Works under torchrun (DDP)."""
    if isinstance(config, dict) or config is None:
        config = OmegaConf.merge(OmegaConf.structured(WorldModelTrainConfig), config or {})
    cfg: WorldModelTrainConfig = to_config(config, WorldModelTrainConfig, overrides)
    _check(cfg)
    if cfg.stage == "predictor":
        from worldmodel.train_predictor import train_predictor

        return train_predictor(cfg)
    if cfg.stage == "center":
        cfg = _center_stage(cfg)
    tc = cfg.train
    rank, world, dev = _dist_setup(tc.device)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    out = Path(cfg.out)
    main = rank == 0

    # data: rank 0 collects what is missing, the others wait for it
    if main:
        paths = dataset_paths(cfg.data, cfg.progress)
    if world > 1:
        holder = [paths if main else None]
        dist.broadcast_object_list(holder, 0)
        paths = holder[0]
    need = tuple(FRAME_KEYS)
    if tc.mask_weight > 0 or tc.center_weight > 0:
        need += ("segmentation",)
    if tc.center_weight > 0:
        need += ("object_poses",)
    clips = Clips.load(paths, need=need)
    if clips.image_size != tuple(cfg.model.image_size):
        raise ValueError(f"datasets have {clips.image_size} images; model.image_size is {cfg.model.image_size}")
    starts = clips.clip_starts(tc.clip_len)

    # model, optimiser, resume
    state = _resume_state(out, cfg) if cfg.resume else None
    if cfg.stage == "center":  # the trained encoder, a new head; only the head learns
        _, base_weights, stats = read_checkpoint(cfg.encoder)
        model = ObjectCentricEncoder(cfg.model, stats).to(dev)
        kept = {k: v for k, v in base_weights.items() if not k.startswith("center.")}
        missing, unexpected = model.load_state_dict(kept, strict=False)
        if unexpected or any(not k.startswith("center.") for k in missing):
            raise ValueError(f"{cfg.encoder}: weights do not fit its own config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("center."))
        model.eval()  # frozen parts as at inference (no dropout); the head has none
    else:
        stats = state["stats"] if state else clips.rgbd_stats(seed=tc.seed)
        model = ObjectCentricEncoder(cfg.model, stats).to(dev)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=tc.lr, weight_decay=tc.weight_decay)
    progress = restore(state, model, opt, out, dev)
    done = finished(progress, tc)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    torch.manual_seed(tc.seed * 1000 + rank + progress.step)
    resolved = _resolved(cfg)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = np.random.default_rng([tc.seed, rank, step])  # resumable sampling, different per rank
        batch = clips.batch(rng.choice(starts, size=tc.batch_size), tc.clip_len, device=dev)
        out_ = ddp(batch["rgb"], batch["depth"], batch["intrinsics"], batch["cam_pose"])
        return encoder_loss(out_, batch, tc.depth_weight, tc.mask_weight, tc.boundary_weight, tc.center_weight,
                            tc.object_balance)

    def save(parts: dict[str, float], final: bool) -> None:
        metrics = _metrics(progress.step, progress.train_s, progress.history, parts, world, tc) | {"finished": final}
        save_checkpoint(out, model, resolved, stats, metrics, train_state={
            "optimizer": opt.state_dict(), "step": progress.step, "train_seconds": progress.train_s})

    parts = fit(progress, tc, opt=opt, params=trained, loss_fn=loss_fn, save=save, tag=cfg.stage,
                out=out, main=main, world=world, dev=dev, show_progress=cfg.progress)
    if world > 1:
        dist.barrier()
    metrics = _metrics(progress.step, progress.train_s, progress.history, parts, world, tc)
    if main and not done:
        write_report(out, cfg, metrics)
    return metrics


def _center_stage(cfg: WorldModelTrainConfig) -> WorldModelTrainConfig:
    """The config a center stage trains with: the encoder's own model config with the new head's inputs,
    the centre target alone, the stage's schedule."""
    cc = cfg.center
    check_choice("center.inputs", cc.inputs, CENTER_INPUTS)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("stage=center runs in one process (it trains a small head); run it without torchrun")
    if not (Path(cfg.encoder) / "model.safetensors").exists():
        raise FileNotFoundError(f"stage=center refits the head of a trained encoder: no checkpoint in {cfg.encoder}")
    base = read_checkpoint(cfg.encoder)[0]
    if base.get("stage", "encoder") not in ("encoder", "center"):
        raise ValueError(f"{cfg.encoder} is not an encoder checkpoint (stage {base.get('stage')!r})")
    model = EncoderConfig(**(_with_defaults(base["model"]) | {"center_inputs": cc.inputs, "center_head": True}))
    train_cfg = replace(cfg.train, steps=cc.steps, lr=cc.lr, batch_size=cc.batch_size, clip_len=cc.clip_len,
                        time_budget_min=cc.time_budget_min, warmup=min(cfg.train.warmup, cc.steps // 10), stop_at=0,
                        depth_weight=0.0, mask_weight=0.0, center_weight=1.0)
    return replace(cfg, model=model, train=train_cfg)


def _with_defaults(model: dict[str, Any]) -> dict[str, Any]:
    """An encoder checkpoint's model config; those saved before `center_inputs` existed read the slot."""
    return {"center_inputs": "slot"} | dict(model)


def _resolved(cfg: WorldModelTrainConfig) -> dict[str, Any]:
    d = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    d["model"] = config_dict(cfg.model)
    return d


def _metrics(step: int, train_s: float, history: list, parts: dict, world: int, tc: TrainConfig) -> dict[str, Any]:
    return {"stage": "encoder", "step": step, "train_seconds": round(train_s, 1), "processes": world,
            "clips_seen": step * tc.batch_size * world, "last": parts, "history": history}


def _resume_state(out: Path, cfg: WorldModelTrainConfig) -> dict[str, Any] | None:
    if not (out / "train_state.pt").exists():
        return None
    config, weights, stats = read_checkpoint(out)
    if config.get("stage") != cfg.stage or config.get("model") != config_dict(cfg.model):
        raise ValueError(f"{out} holds a different run (stage/model config differ); pass out=<new dir> or resume=false")
    return {"weights": weights, "stats": stats, "metrics": read_json(out / "metrics.json"),
            "train_state": torch.load(out / "train_state.pt", weights_only=False)}


def load_encoder(directory: str | Path, device: str | torch.device = "cpu") -> ObjectCentricEncoder:
    """An `ObjectCentricEncoder` from a checkpoint directory, in eval mode."""
    config, weights, stats = read_checkpoint(directory)
    if config.get("stage", "encoder") not in ("encoder", "center") or "model" not in config:
        raise ValueError(f"{directory} is not an encoder checkpoint (stage {config.get('stage')!r})")
    model = ObjectCentricEncoder(EncoderConfig(**_with_defaults(config["model"])), stats)
    load_state_strict(model, weights, directory)
    return model.to(device).eval()


def write_report(out: Path, cfg: WorldModelTrainConfig, metrics: dict[str, Any]) -> None:
    """report.md and loss.png of a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = metrics["history"]
    if hist:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in [k for k in hist[-1] if k not in ("step", "train_s")]:
            ax.plot([h["step"] for h in hist if key in h], [h[key] for h in hist if key in h], label=key)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend()
        ax.set_title(f"ego-train-wm {cfg.stage} ({cfg.model.rope})")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
    last = ", ".join(f"{k} {v:.4f}" for k, v in metrics["last"].items())
    text = (f"# ego-train-wm {cfg.stage}\n\n"
            f"- steps: {metrics['step']} ({metrics['clips_seen']} clips of {cfg.train.clip_len} frames, "
            f"{metrics['processes']} process(es))\n"
            f"- training time: {metrics['train_seconds'] / 60:.1f} min\n"
            f"- final losses: {last}\n"
            f"- rope: {cfg.model.rope}, slots: {cfg.model.num_slots}, image {cfg.model.image_size}\n\n"
            f"![loss](loss.png)\n\nMeasure it: `python benchmarks/wm_encoder.py --checkpoint {out}`\n")
    (out / "report.md").write_text(text)


@hydra.main(version_base=None, config_path="conf", config_name="train_wm")
def main(cfg: DictConfig) -> None:
    from sim.collect import run_cli

    run_cli("ego-train-wm", lambda: train(cfg), kept=cfg.out)


if __name__ == "__main__":
    main()
