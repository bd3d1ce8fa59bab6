"""The one optimisation loop of every training stage (`ego-train-wm stage=encoder|predictor`, `ego-train-policy`).

A stage supplies its loss for a step and how to save a checkpoint; the loop owns what is common:
the learning-rate schedule, gradient clipping, the progress bar, TensorBoard scalars, the loss
history, the time budget, periodic atomic checkpoints and the stop decision shared across DDP
processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from worldmodel.checkpoint import load_state_strict


class Schedule(Protocol):
    """The fields of a stage's train config that the loop reads."""

    steps: int
    stop_at: int
    lr: float
    warmup: int
    grad_clip: float
    log_every: int
    ckpt_every: int
    time_budget_min: float


@dataclass
class Progress:
    """Where a run is: restored from train_state.pt / metrics.json on resume."""

    step: int = 0
    train_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def restore(state: dict[str, Any] | None, model: torch.nn.Module, opt: torch.optim.Optimizer, out: Path,
            dev: torch.device) -> Progress:
    """Load a resumed run's weights and optimiser state (state: checkpoint weights, metrics and
    train_state, as the stages read them from `out`); a fresh Progress when there is none."""
    if not state:
        return Progress()
    load_state_strict(model, {k: v.to(dev) for k, v in state["weights"].items()}, out)
    opt.load_state_dict(state["train_state"]["optimizer"])
    return Progress(state["train_state"]["step"], state["train_state"]["train_seconds"],
                    state["metrics"].get("history", []))


def lr_at(step: int, cfg: Schedule) -> float:
    """Linear warm-up, then cosine decay to 10% over `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def last_step(cfg: Schedule) -> int:
    return min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps


def finished(progress: Progress, cfg: Schedule) -> bool:
    over = cfg.time_budget_min > 0 and progress.train_s >= cfg.time_budget_min * 60
    return progress.step >= last_step(cfg) or over


def broadcast_flag(flag: bool, world: int, dev: torch.device) -> bool:
    """Rank 0's decision, on every rank."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.broadcast(t, 0)
    return bool(t.item())


def fit(progress: Progress, cfg: Schedule, *, opt: torch.optim.Optimizer, params: Sequence[Tensor],
        loss_fn: Callable[[int], tuple[Tensor, dict[str, float]]], save: Callable[[dict[str, float], bool], None],
        tag: str, out: Path, main: bool, world: int, dev: torch.device, show_progress: bool,
        after_step: Callable[[], None] | None = None, postfix: Sequence[str] | None = None,
        program: str = "ego-train-wm") -> dict[str, float]:
    """Optimise until `finished`; returns the last step's loss parts. `loss_fn(step)` -> (loss, parts);
    `save(parts, final)` writes a checkpoint (rank 0 only); `after_step` runs after each optimiser step
    (e.g. an EMA target update). Resumes from `progress`, which it advances in place."""
    last = last_step(cfg)
    stop = finished(progress, cfg)
    writer = None
    if main and not stop:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=progress.step)
    bar = tqdm(total=last, initial=progress.step, desc=f"{program} {tag}", unit="step",
               disable=not (main and show_progress), dynamic_ncols=True)
    parts: dict[str, float] = {}
    try:
        while not stop:
            t0 = time.perf_counter()
            step = progress.step
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss, parts = loss_fn(step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; last parts {parts}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            opt.step()
            if after_step is not None:
                after_step()
            progress.step = step = step + 1
            progress.train_s += time.perf_counter() - t0
            if main:
                bar.update(1)
                if step % cfg.log_every == 0 or step == 1:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items() if postfix is None or k in postfix})
                    for k, v in parts.items():
                        writer.add_scalar(f"{tag}/{k}", v, step)
                    writer.add_scalar(f"{tag}/lr", lr_at(step - 1, cfg), step)
                    writer.add_scalar(f"{tag}/grad_norm", gnorm, step)
                    progress.history.append({"step": step, "train_s": round(progress.train_s, 1), **parts})
            stop = broadcast_flag(finished(progress, cfg), world, dev)
            if main and (step % cfg.ckpt_every == 0 or stop):
                save(parts, stop)
    finally:
        bar.close()
        if writer:
            writer.close()
    return parts
