"""`ego-train-policy`: train the diffusion policy on expert demonstrations (Hydra CLI).

    ego-train-policy                                   # slots policy, Single easy, encoder runs/wm_encoder
    ego-train-policy policy.obs=cnn                    # the end-to-end RGB-D CNN baseline
    ego-train-policy data.level=hard out=runs/policy_hard

Two phases, one training loop (`worldmodel.loop.fit`):
1. `diffusion`: DDPM (epsilon loss) over the expert's action chunks, EMA weights;
2. `distill`: consistency distillation of the EMA U-Net into a 1-2 step student (Consistency
   Policy's recipe: the teacher's one DDIM step defines the target, an EMA of the student is it).

Missing demonstrations are collected first (`data.episodes` noisy-expert episodes, successful ones
kept). The slots policy streams the frozen encoder over every demonstration once (cached) and
copies the encoder into `<out>/encoder`, so the policy directory loads on its own. A run directory
is a checkpoint (config.yaml, model.safetensors, stats.json, metrics.json) plus train_state.pt,
tb/, report.md and loss.png; rerunning the same command resumes.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from policies.data import DemoData, datasets_fingerprint, load_demos
from policies.diffusion import EMA, consistency_distillation_loss
from policies.policy import DiffusionPolicy, PolicyConfig, config_from_dict, policy_config_dict
from sim.collect import check_choice, to_config
from worldmodel.checkpoint import read_checkpoint, read_json, save_checkpoint
from worldmodel.loop import Progress, finished, fit
from worldmodel.train import resolve_device

ENCODER_FILES = ("config.yaml", "model.safetensors", "stats.json", "metrics.json")


@dataclass
class PolicyDataConfig:
    task: str = "single"
    level: str = "easy"
    paths: list[str] = field(default_factory=list)  # train on these ego-collect datasets instead
    root: str = "data/policy"  # where the default demonstrations are collected: <root>/<task>_<level>.zarr
    episodes: int = 200
    policy: str = "noisy_expert"  # expert | noisy_expert: bursts of action noise, noise-free labels
    # the expert's settings (`sim.experts.ExpertConfig`), e.g. +data.expert.goal_range_m=1.2: the expert takes
    # the goal as seen only within 1.2 m, where the 64x64 camera shows it as more than a few pixels
    expert: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    image_size: int = 64
    max_steps: int | None = None
    workers: int = 2


@dataclass
class PolicyTrainConfig:
    steps: int = 4000  # diffusion phase: length of the learning-rate schedule
    stop_at: int = 0
    batch_size: int = 128
    lr: float = 3e-4
    warmup: int = 300
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    ema_power: float = 0.75
    time_budget_min: float = 30.0  # the diffusion phase (and the distillation's unless set below)
    distill_time_budget_min: float | None = None  # the distillation phase; None = time_budget_min
    # weight of the auxiliary read-out of where the task's objects are (`DiffusionPolicy.aux_loss`), a
    # training-only privileged target; 0 = none (on Single easy, 1.0 gave 0.49 against 0.57 without)
    aux_weight: float = 0.0
    distill_steps: int = 1000  # consistency distillation; 0 = no few-step sampler
    distill_lr: float = 1e-4
    distill_skip: int = 10  # teacher DDIM step length (in DDPM steps) per consistency pair
    distill_target_decay: float = 0.95
    log_every: int = 50
    ckpt_every: int = 500
    seed: int = 0
    device: str = "auto"
    threads: int = 0


@dataclass
class TrainPolicyConfig:
    """Options of `ego-train-policy` (defaults mirrored in policies/conf/train_policy.yaml)."""

    out: str = "runs/policy_${policy.obs}"
    encoder: str = "runs/wm_encoder"  # slots policy: the frozen world-model encoder
    cache_dir: str = ""  # slots policy: where encoded demonstrations are cached; "" = <out>/cache
    init: str = ""  # start from this policy checkpoint's weights and normalisation (fine-tuning, DAgger)
    resume: bool = True
    progress: bool = True
    data: PolicyDataConfig = field(default_factory=PolicyDataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: PolicyTrainConfig = field(default_factory=PolicyTrainConfig)


ConfigStore.instance().store(name="train_policy_schema", node=TrainPolicyConfig)


def default_demo_path(root: str, task: str, level: str, expert: dict[str, Any] | None = None) -> str:
    """Where the default demonstrations of `task` / `level` live: <root>/<task>_<level>.zarr, and for an expert
    with other settings another dataset, <root>/<task>_<level>_<setting><value>....zarr."""
    tag = "".join(f"_{k}{v}" for k, v in sorted((expert or {}).items()))
    return str(Path(root) / f"{task}_{level}{tag}.zarr")


def demo_paths(cfg: PolicyDataConfig, progress: bool = True) -> list[str]:
    """The demonstration datasets, collecting the default ones first when missing."""
    if cfg.paths:
        return list(cfg.paths)
    from sim.collect import collect

    path = default_demo_path(cfg.root, cfg.task, cfg.level, cfg.expert)
    collect(out=path, task=cfg.task, level=cfg.level, policy=cfg.policy, episodes=cfg.episodes, seed=cfg.seed,
            max_steps=cfg.max_steps, image_size=cfg.image_size, workers=cfg.workers, only_success=True,
            progress=progress, expert=dict(cfg.expert))
    return [path]


def demo_stats(data: DemoData, kind: str) -> dict[str, Any]:
    """Normalisation: action min/max (a little margin), state and slot-token mean/std."""
    lo, hi = data.action.min(0), data.action.max(0)
    pad = np.maximum((hi - lo) * 0.02, 1e-3)
    stats = {"action_min": (lo - pad).tolist(), "action_max": (hi + pad).tolist(),
             "state_mean": data.state.mean(0).tolist(), "state_std": np.maximum(data.state.std(0), 1e-3).tolist()}
    if kind == "slots":
        x = data.tokens.reshape(-1, data.tokens.shape[-1])
        stats |= {"token_mean": x.mean(0).tolist(), "token_std": np.maximum(x.std(0), 1e-3).tolist()}
    return stats


def train(config: TrainPolicyConfig | DictConfig | dict | None = None, *, demos: DemoData | None = None,
          **overrides: Any) -> dict[str, Any]:
    """Train (or resume) a policy; returns its metrics. `demos`: observations built elsewhere (e.g. the
    privileged tokens of benchmarks/policy_oracle_perception.py) instead of collecting and encoding."""
    cfg: TrainPolicyConfig = to_config(config, TrainPolicyConfig, overrides)
    tc, pc = cfg.train, cfg.policy
    pc.check()
    check_choice("data.policy", cfg.data.policy, ("expert", "noisy_expert"))
    if tc.steps < 1 or tc.batch_size < 1 or tc.distill_steps < 0:
        raise ValueError(f"train.steps and train.batch_size must be >= 1, distill_steps >= 0; got {tc.steps}, "
                         f"{tc.batch_size}, {tc.distill_steps}")
    dev = resolve_device(tc.device)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = demo_paths(cfg.data, cfg.progress) if demos is None else []
    data = demos if demos is not None else _load_data(cfg, paths, out, dev)
    fingerprint = datasets_fingerprint(paths) if paths else None
    mcfg = replace(pc, state_dim=data.state.shape[-1], action_dim=data.action.shape[-1],
                   aux_targets=data.aux.shape[1] if data.aux is not None and tc.aux_weight > 0 else 0)
    if pc.obs == "slots":
        mcfg = replace(mcfg, token_dim=data.tokens.shape[-1], num_slots=data.tokens.shape[-2])
    else:
        mcfg = replace(mcfg, image_size=list(data.rgb.shape[1:3]))

    state = _resume_state(out, mcfg, fingerprint) if cfg.resume else None
    init = _init_state(cfg.init, mcfg) if cfg.init and not state else None
    if state:
        stats = state["stats"]
    elif init:
        stats = init["stats"]
    else:
        stats = demo_stats(data, pc.obs) | {"task": cfg.data.task, "level": cfg.data.level}
    resolved = _resolved(cfg, mcfg) | {"data_fingerprint": fingerprint}
    # seeded here, after the data: encoding the demonstrations draws random numbers (the slots' first-frame
    # noise), and a run that found them cached must start from the same weights as the one that encoded them
    torch.manual_seed(tc.seed)
    model = DiffusionPolicy(mcfg, stats).to(dev)
    if init:
        from worldmodel.checkpoint import load_state_strict

        load_state_strict(model, init["weights"], cfg.init)
        model.distilled.fill_(False)  # its student was distilled from the old teacher: distil again
    ema = EMA(model, power=tc.ema_power)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    ts = state["train_state"] if state else {}
    p1 = tc  # the loop reads steps, stop_at, lr, warmup, grad_clip, log_every, ckpt_every, time_budget_min
    p2 = replace(tc, steps=tc.distill_steps, stop_at=0, lr=tc.distill_lr, warmup=0,
                 time_budget_min=tc.time_budget_min if tc.distill_time_budget_min is None
                 else tc.distill_time_budget_min)
    prog1 = Progress(*ts.get("diffusion_progress", (0, 0.0, [])))
    prog2 = Progress(*ts.get("distill_progress", (0, 0.0, [])))
    if ts:
        model.load_state_dict(ts["model"])
        ema.load_state_dict(ts["ema"])
        if "optimizer" in ts:
            opt.load_state_dict(ts["optimizer"])
    steps = np.arange(data.n_steps)

    def batch_at(phase: str, step: int) -> tuple[dict[str, torch.Tensor], torch.Generator]:
        rng = np.random.default_rng([tc.seed, 0 if phase == "diffusion" else 1, step])
        b = data.sample(rng.choice(steps, tc.batch_size), mcfg.n_obs, mcfg.horizon, mcfg.obs)
        return {k: v.to(dev) for k, v in b.items()}, torch.Generator(dev).manual_seed(int(rng.integers(2**62)))

    def summary(final: bool) -> dict[str, Any]:
        return {"stage": "policy", "obs": mcfg.obs, "task": cfg.data.task, "level": cfg.data.level,
                "demo_episodes": len(data.starts), "demo_steps": data.n_steps,
                "diffusion_steps": prog1.step, "diffusion_seconds": round(prog1.train_s, 1),
                "distill_steps": prog2.step, "distill_seconds": round(prog2.train_s, 1),
                "history": prog1.history, "distill_history": prog2.history, "finished": final}

    def save_phase1(parts: dict[str, float], final: bool) -> None:
        done = final and tc.distill_steps == 0
        save_checkpoint(out, ema.module, resolved, stats, summary(done) | {"last": parts}, train_state={
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "diffusion_progress": (prog1.step, prog1.train_s, prog1.history),
            "distill_progress": (0, 0.0, [])})

    fit(prog1, p1, opt=opt, params=list(model.parameters()),
        loss_fn=lambda s: model.loss(*batch_at("diffusion", s), aux_weight=tc.aux_weight), save=save_phase1,
        tag="diffusion", out=out, main=True, world=1, dev=dev, show_progress=cfg.progress,
        after_step=lambda: ema.update(model), program="ego-train-policy")

    if tc.distill_steps > 0:
        teacher = ema.module  # frozen: the DDPM U-Net and the observation encoder
        student = copy.deepcopy(teacher.unet).train().requires_grad_(True)
        if "student" in ts:
            student.load_state_dict(ts["student"])
        target = EMA(student, fixed=tc.distill_target_decay)
        if "target" in ts:
            target.load_state_dict(ts["target"])
        opt2 = torch.optim.AdamW(student.parameters(), lr=tc.distill_lr, weight_decay=tc.weight_decay)
        if "optimizer2" in ts:
            opt2.load_state_dict(ts["optimizer2"])

        def distill_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            batch, gen = batch_at("distill", step)
            with torch.no_grad():
                cond = teacher.condition(batch["obs"], batch["state"])
            x0 = teacher.normalise_action(batch["action"])
            loss = consistency_distillation_loss(student, target.module, teacher.unet, teacher.schedule,
                                                 x0, cond,
                                                 skip=tc.distill_skip, generator=gen)
            return loss, {"consistency": loss.item()}

        def save_phase2(parts: dict[str, float], final: bool) -> None:
            teacher.student.load_state_dict(target.module.state_dict())
            teacher.distilled.fill_(True)
            save_checkpoint(out, teacher, resolved, stats, summary(final) | {"last": parts}, train_state={
                "model": model.state_dict(), "ema": ema.state_dict(),
                "diffusion_progress": (prog1.step, prog1.train_s, prog1.history),
                "distill_progress": (prog2.step, prog2.train_s, prog2.history),
                "student": student.state_dict(), "target": target.state_dict(), "optimizer2": opt2.state_dict()})

        fit(prog2, p2, opt=opt2, params=list(student.parameters()), loss_fn=distill_loss, save=save_phase2,
            tag="distill", out=out, main=True, world=1, dev=dev, show_progress=cfg.progress,
            after_step=lambda: target.update(student), program="ego-train-policy")
    metrics = summary(finished(prog1, p1) and (tc.distill_steps == 0 or finished(prog2, p2)))
    write_report(out, cfg, metrics)
    return metrics


def _load_data(cfg: TrainPolicyConfig, paths: list[str], out: Path, dev: torch.device) -> DemoData:
    """The demonstrations, encoded into slot tokens for the slots policy (the encoder copied into
    <out>/encoder) or as frames for the CNN."""
    pc, tc = cfg.policy, cfg.train
    encoder = None
    if pc.obs == "slots":
        from worldmodel.train import load_encoder

        if not (Path(cfg.encoder) / "model.safetensors").exists():
            raise ValueError(f"encoder={cfg.encoder!r} is not an encoder checkpoint directory; train one first "
                             "(ego-train-wm stage=encoder) or use policy.obs=cnn")
        encoder = load_encoder(cfg.encoder, dev)
        (out / "encoder").mkdir(exist_ok=True)
        for f in ENCODER_FILES:
            if (Path(cfg.encoder) / f).exists():
                shutil.copy2(Path(cfg.encoder) / f, out / "encoder" / f)
    return load_demos(paths, pc.obs, encoder, cache_dir=cfg.cache_dir or out / "cache", encoder_dir=cfg.encoder,
                      device=dev, seed=tc.seed, progress=cfg.progress, tracker=pc.tracker,
                      forget_steps=pc.memory_forget_steps)


def _resolved(cfg: TrainPolicyConfig, mcfg: PolicyConfig) -> dict[str, Any]:
    d = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    d["policy"] = policy_config_dict(mcfg)
    d["stage"] = "policy"
    return d


def _resume_state(out: Path, mcfg: PolicyConfig, fingerprint: str | None) -> dict[str, Any] | None:
    if not (out / "train_state.pt").exists():
        return None
    config, _, stats = read_checkpoint(out)
    if config.get("stage") != "policy" or _shape_differences(config.get("policy", {}), mcfg):
        raise ValueError(f"{out} holds a different run (policy config differs); pass out=<new dir> or resume=false")
    theirs = config.get("data_fingerprint")
    if theirs and fingerprint and theirs != fingerprint:
        raise ValueError(f"{out} was trained on other demonstrations (its datasets have changed since); pass "
                         "out=<new dir>, or delete it to train again")
    return {"stats": stats, "metrics": read_json(out / "metrics.json"),
            "train_state": torch.load(out / "train_state.pt", weights_only=False)}


def _shape_differences(theirs: dict[str, Any], mcfg: PolicyConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Where a checkpoint's policy config differs from this run's, as "field theirs vs ours"; a field an
    older checkpoint does not name counts as its default."""
    ours, default = policy_config_dict(mcfg), policy_config_dict(PolicyConfig())
    return [f"{k} {theirs.get(k, default[k])!r} vs {ours[k]!r}" for k in sorted(ours)
            if k not in ignore and theirs.get(k, default[k]) != ours[k]]


def _init_state(directory: str, mcfg: PolicyConfig) -> dict[str, Any]:
    """The weights and normalisation of the checkpoint a run starts from (`init=`), after checking it
    has this run's shape."""
    config, weights, stats = read_checkpoint(directory)
    if config.get("stage") != "policy":
        raise ValueError(f"init={directory} is not a policy checkpoint (stage {config.get('stage')!r})")
    differ = _shape_differences(config.get("policy", {}), mcfg, ignore=("sampler",))
    if differ:
        raise ValueError(f"init={directory} has another policy shape: " + ", ".join(differ))
    return {"weights": weights, "stats": stats}


def load_policy(directory: str | Path, device: str | torch.device = "cpu") -> tuple[DiffusionPolicy, dict[str, Any]]:
    """A trained `DiffusionPolicy` (eval mode) and its config.yaml, from the directory alone."""
    from worldmodel.checkpoint import load_state_strict

    config, weights, stats = read_checkpoint(directory)
    if config.get("stage") != "policy" or "policy" not in config:
        raise ValueError(f"{directory} is not a policy checkpoint (stage {config.get('stage')!r})")
    model = DiffusionPolicy(config_from_dict(config["policy"]), stats)
    load_state_strict(model, weights, directory)
    return model.to(device).eval(), config


def write_report(out: Path, cfg: TrainPolicyConfig, metrics: dict[str, Any]) -> None:
    """report.md and loss.png (the learning curves of both phases)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, hist in ((axes[0], "diffusion", metrics["history"]), (axes[1], "consistency",
                                                                          metrics["distill_history"])):
        for name in (key, "aux"):
            pts = [(h["step"], h[name]) for h in hist if name in h]
            if pts:
                ax.plot(*zip(*pts), label=name)
        if any("aux" in h for h in hist):
            ax.legend()
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{key} loss")
    fig.suptitle(f"ego-train-policy ({cfg.policy.obs}, {cfg.data.task}/{cfg.data.level})")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    (out / "report.md").write_text(
        f"# ego-train-policy: {cfg.policy.obs} policy, {cfg.data.task}/{cfg.data.level}\n\n"
        f"- demonstrations: {metrics['demo_episodes']} episodes, {metrics['demo_steps']} steps\n"
        f"- diffusion: {metrics['diffusion_steps']} steps in {metrics['diffusion_seconds'] / 60:.1f} min\n"
        f"- consistency distillation: {metrics['distill_steps']} steps in {metrics['distill_seconds'] / 60:.1f} min\n\n"
        f"![loss](loss.png)\n\nEvaluate it: `ego-eval checkpoint={out} task={cfg.data.task} level={cfg.data.level}`\n")


@hydra.main(version_base=None, config_path="conf", config_name="train_policy")
def main(cfg: DictConfig) -> None:
    from sim.collect import run_cli

    run_cli("ego-train-policy", lambda: train(cfg), kept=cfg.out)


if __name__ == "__main__":
    main()
