"""`ego-pipeline`: the main job, from nothing to a measured policy.

1. collect noisy-expert demonstrations of the task (`<out>/data/demos.zarr`);
2. train the world model's encoder (`ego-train-wm stage=encoder`, its own data under `<out>/data/wm`);
3. train its predictor (`ego-train-wm stage=predictor`);
4. train the diffusion policy on the encoder's slots (`ego-train-policy`);
5. evaluate it on every suite in parallel workers (`ego-eval`), record one episode as a video;
6. write `report.md` with the figures, the learning curves and the video, and `metrics.json`.

Every stage resumes: the trainers continue from their last checkpoint and leave a finished run as
it is, the collector adds only missing episodes, and evaluations are cached with their settings.
So a crashed or interrupted pipeline continues where it stopped when the same command is rerun.

    ego-pipeline                                    # default profile: about 45 min on a 2-core CPU
    ego-pipeline profile=tiny out_dir=/tmp/smoke    # a smoke run of every stage in a minute or two
    ego-pipeline profile=gpu train_device=cuda      # larger budgets for one GPU

The stage options are the stage CLIs' own (`encoder`, `predictor`: `ego-train-wm`'s; `policy`:
`ego-train-policy`'s), given as overrides, e.g. `policy.train.steps=8000`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sim.collect import LEVELS, TASKS, check_choice, collect, run_cli, to_config
from sim.pipeline import SuiteConfig, cached_stage, work_settings, write_text

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass
class PipelineDemos:
    episodes: int = 400
    policy: str = "noisy_expert"
    seed: int = 0
    only_success: bool = True  # keep successful episodes only (a rerun retries the failed seeds)
    expert: dict[str, Any] = field(default_factory=dict)  # the expert's settings (ego-collect's expert=)


@dataclass
class PolicySuiteConfig(SuiteConfig):
    n_action: int | None = None  # actions executed per chunk before re-planning; None: the policy's (8)
    select: int = 0  # > 0: world-model-guided selection, the pipeline's predictor picks the best of this many chunks


def _default_suites() -> dict[str, PolicySuiteConfig]:
    # the policy as trained (8 of every 16 predicted actions executed), re-planning every 2 steps and every step
    return {"single_easy": PolicySuiteConfig("single", "easy", 100),
            "single_easy_replan2": PolicySuiteConfig("single", "easy", 100, n_action=2),
            "single_easy_replan1": PolicySuiteConfig("single", "easy", 100, n_action=1)}


@dataclass
class PolicyPipelineConfig:
    """Options of `ego-pipeline` (defaults mirrored in policies/conf/pipeline.yaml)."""

    out_dir: str = "runs/pipeline"
    task: str = "single"  # the demonstrations' task and level (the policy's)
    level: str = "easy"
    workers: int = 2
    image_size: int = 64
    max_steps: int | None = None  # episode limit in collection and evaluation; None: each task's default
    train_device: str = "auto"
    progress: bool = True
    note: str = ""
    demos: PipelineDemos = field(default_factory=PipelineDemos)
    encoder: dict[str, Any] = field(default_factory=dict)  # ego-train-wm stage=encoder overrides
    predictor: dict[str, Any] = field(default_factory=dict)  # ego-train-wm stage=predictor overrides
    policy: dict[str, Any] = field(default_factory=dict)  # ego-train-policy overrides
    eval_seed: int = 1000
    suites: dict[str, PolicySuiteConfig] = field(default_factory=_default_suites)
    video_seed: int = 1000


ConfigStore.instance().store(name="policy_pipeline_schema", node=PolicyPipelineConfig)


def load_config(overrides: list[str] | None = None) -> PolicyPipelineConfig:
    """The pipeline config composed as the CLI would, e.g. `load_config(["profile=tiny"])`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=list(overrides or []))
    return to_config(cfg, PolicyPipelineConfig)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(extra)), resolve=True)


def _timed(out: Path, name: str, run, settings: dict[str, Any]) -> Any:
    """Run a stage and record its wall time in stages/times.json: summed over runs of the same stage
    settings (a resumed stage adds to its time), started afresh when they changed (a stage redone for
    new settings does not count the old run's time). Settings that only change how it runs
    (`sim.pipeline.HOW_NOT_WHAT`) do not count; a trainer's settings are given resolved (`_resolved`), so
    that a default changed in the code restarts the time as a changed option does."""
    path = out / "stages" / "times.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    key = hashlib.sha1(json.dumps(work_settings(settings), sort_keys=True, default=str).encode()).hexdigest()[:16]
    entry = times.get(name)
    if not isinstance(entry, dict):  # a times.json from before the settings were recorded: keep summing
        entry = {"seconds": float(entry or 0.0), "settings": key}
    if entry["settings"] != key:
        entry = {"seconds": 0.0, "settings": key}
    t0 = time.perf_counter()
    result = run()
    times[name] = {"seconds": round(entry["seconds"] + time.perf_counter() - t0, 1), "settings": key}
    write_text(path, json.dumps(times, indent=1))
    return result


def _resolved(schema: type, settings: dict[str, Any]) -> dict[str, Any]:
    """A trainer's settings with every default filled in, as the trainer will run them."""
    return OmegaConf.to_container(OmegaConf.structured(to_config(settings, schema)), resolve=True)


def stage_seconds(out: Path) -> dict[str, float]:
    """Each stage's wall time from stages/times.json."""
    times = json.loads((out / "stages" / "times.json").read_text())
    return {name: float(e["seconds"] if isinstance(e, dict) else e) for name, e in times.items()}


def _check(cfg: PolicyPipelineConfig) -> None:
    check_choice("task", cfg.task, TASKS)
    check_choice("level", cfg.level, LEVELS)
    check_choice("demos.policy", cfg.demos.policy, ("expert", "noisy_expert"))
    if not cfg.suites:
        raise ValueError("suites must name at least one evaluation (task, level, episodes)")
    for name, s in cfg.suites.items():
        check_choice(f"suites.{name}.task", s.task, TASKS)
        check_choice(f"suites.{name}.level", s.level, LEVELS)
        if s.task != cfg.task:
            raise ValueError(f"suites.{name} evaluates task {s.task!r}; the policy is trained on {cfg.task!r}")
        if s.n_action is not None and s.n_action < 1:
            raise ValueError(f"suites.{name}.n_action must be >= 1 or null (as trained); got {s.n_action}")
        if s.select < 0:
            raise ValueError(f"suites.{name}.select must be >= 0 (0: no selection); got {s.select}")


def run_pipeline(config: PolicyPipelineConfig | DictConfig | dict | None = None) -> dict[str, Any]:
    """Run every stage (resuming finished ones); returns the figures, also written to metrics.json."""
    from policies.evaluate import run as run_eval
    from policies.train import TrainPolicyConfig
    from policies.train import train as train_policy
    from sim.evaluate import evaluate
    from worldmodel.checkpoint import weights_digest
    from worldmodel.train import WorldModelTrainConfig
    from worldmodel.train import train as train_wm

    cfg: PolicyPipelineConfig = to_config(config, PolicyPipelineConfig)
    _check(cfg)
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    t_start = time.perf_counter()

    demos_path = out / "data" / "demos.zarr"
    demo_settings = dict(out=str(demos_path), task=cfg.task, level=cfg.level, policy=cfg.demos.policy,
                         episodes=cfg.demos.episodes, seed=cfg.demos.seed, image_size=cfg.image_size,
                         max_steps=cfg.max_steps, only_success=cfg.demos.only_success)
    if cfg.demos.expert:  # only when set: a job of the default expert keeps its cached stages
        demo_settings["expert"] = dict(cfg.demos.expert)
    demos = _timed(out, "demos", lambda: collect(**demo_settings, workers=cfg.workers, progress=cfg.progress),
                   demo_settings)

    wm_data = {"root": str(out / "data" / "wm"), "image_size": cfg.image_size, "workers": cfg.workers}
    enc_dir, pred_dir, pol_dir = out / "wm_encoder", out / "wm_predictor", out / "policy"
    enc_cfg = _merge({"stage": "encoder", "out": str(enc_dir), "progress": cfg.progress, "data": wm_data,
                      "train": {"device": cfg.train_device}}, cfg.encoder)
    _timed(out, "encoder", lambda: train_wm(enc_cfg), _resolved(WorldModelTrainConfig, enc_cfg))
    pred_cfg = _merge({"stage": "predictor", "out": str(pred_dir), "encoder": str(enc_dir), "progress": cfg.progress,
                       "data": wm_data, "predictor": {"device": cfg.train_device}}, cfg.predictor)
    _timed(out, "predictor", lambda: train_wm(pred_cfg), _resolved(WorldModelTrainConfig, pred_cfg))
    pol_cfg = _merge({"out": str(pol_dir), "encoder": str(enc_dir), "progress": cfg.progress,
                      "data": {"task": cfg.task, "level": cfg.level, "paths": [str(demos_path)]},
                      "train": {"device": cfg.train_device}}, cfg.policy)
    policy = _timed(out, "policy", lambda: train_policy(pol_cfg),
                    _resolved(TrainPolicyConfig, pol_cfg) | {"demos": demo_settings})

    # an evaluation is redone when the policy it measured changed, even at the same step counts (trained
    # afresh with other settings); and with selection, when the predictor did
    stamp = {"policy_step": [policy["diffusion_steps"], policy["distill_steps"]],
             "policy_weights": weights_digest(pol_dir)[:16]}
    suites = {}
    for name, s in cfg.suites.items():
        settings = dict(checkpoint=str(pol_dir), task=s.task, level=s.level, episodes=s.episodes, seed=cfg.eval_seed,
                        workers=cfg.workers, max_steps=cfg.max_steps, out=str(out / "eval" / name),
                        progress=cfg.progress, n_action=s.n_action)
        key = dict(stamp)
        if s.select:
            settings |= {"select": s.select, "predictor": str(pred_dir)}
            key["predictor_weights"] = weights_digest(pred_dir)[:16]
        suites[name] = _timed(out, f"eval_{name}", lambda st=settings, n=name, k=key: cached_stage(
            out / "stages" / f"eval_{n}.json", st | k, lambda: run_eval(st)), settings | key)
    video_settings = dict(task=cfg.task, level=cfg.level, episodes=1, seed=cfg.video_seed, max_steps=cfg.max_steps)
    target = {"_target_": "policies.controller.DiffusionPolicyController", "checkpoint": str(pol_dir),
              "task": cfg.task}
    video = _timed(out, "video", lambda: cached_stage(out / "stages" / "video.json", video_settings | stamp, lambda: evaluate(
        target, **video_settings, workers=0, video_dir=out / "media", videos="all", progress=False)),
        video_settings | stamp)
    times = stage_seconds(out)
    metrics = {
        "demos": {k: demos[k] for k in ("out", "dataset_episodes", "success_rate")},
        "encoder": _stage_summary(enc_dir), "predictor": _stage_summary(pred_dir),
        "policy": {k: policy[k] for k in ("demo_episodes", "demo_steps", "diffusion_steps", "diffusion_seconds",
                                           "distill_steps", "distill_seconds")},
        "evaluation": {n: {k: v for k, v in r.items() if k != "results"} for n, r in suites.items()},
        "video": video["results"][0].get("video"),
        "stage_seconds": times,
        "this_run_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    report = write_text(out / "report.md", render_report(cfg, metrics, out))
    return metrics | {"report": str(report)}


def _stage_summary(run_dir: Path) -> dict[str, Any]:
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"step": m.get("step"), "train_seconds": m.get("train_seconds"), "last": m.get("last", {})}


def render_report(cfg: PolicyPipelineConfig, m: dict[str, Any], out: Path) -> str:
    """report.md: what ran, how long each stage took, the success table, curves and video."""
    times = m["stage_seconds"]
    total = sum(times.values())
    lines = ["# EgoPush pipeline report", "",
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}, {os.cpu_count()} CPUs. Resolved config: "
             "[config.yaml](config.yaml), figures: [metrics.json](metrics.json).", ""]
    if cfg.note:
        lines += [f"> {cfg.note}", ""]
    lines += ["## Policy success", "",
              f"Slot diffusion policy trained on {m['policy']['demo_episodes']} noisy-expert demonstrations of "
              f"{cfg.task}/{cfg.level} ({m['policy']['demo_steps']} steps); evaluation seeds from {cfg.eval_seed}.", "",
              "| suite | task | level | re-plans every | chunk | episodes | success rate | 95% CI (Wilson) | mean length "
              "| failures: box unseen / goal unseen / no box moved / not placed |",
              "| --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | --- |"]
    for name, r in m["evaluation"].items():
        n_action = r["controller"].get("n_action")
        every = (f"{n_action} steps" if n_action > 1 else "1 step") if n_action else "as trained"
        select = r["controller"].get("select")
        chunk = f"predictor's best of {select}" if select else "one sample"
        lines.append(f"| {name} | {r['task']} | {r['level']} | {every} | {chunk} | {r['episodes']} "
                     f"| **{r['success_rate']:.2f}** | [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}] "
                     f"| {r['mean_length']:.1f} | {' / '.join(str(n) for n in r.get('failures', {}).values())} |")
    lines += ["", "## Stages", "", "| stage | wall time (min) | what |", "| --- | ---: | --- |"]
    what = {"demos": f"{m['demos']['dataset_episodes']} demonstrations",
            "encoder": f"{m['encoder']['step']} steps", "predictor": f"{m['predictor']['step']} steps",
            "policy": f"{m['policy']['diffusion_steps']} DDPM + {m['policy']['distill_steps']} distillation steps"}
    for name, sec in times.items():
        lines.append(f"| {name} | {sec / 60:.1f} | {what.get(name, '')} |")
    lines += [f"| **total** | **{total / 60:.1f}** | |", "", "## Learning curves", ""]
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    for stage in ("wm_encoder", "wm_predictor", "policy"):
        src = out / stage / "loss.png"
        if src.is_file():
            shutil.copy2(src, media / f"{stage}_loss.png")
            lines += [f"![{stage}](media/{stage}_loss.png)", ""]
    if m["video"]:
        lines += ["## Video", "", f"[one episode of the policy, seed {cfg.video_seed}]"
                  f"({Path(m['video']).relative_to(out)}): overview | egocentric RGB | depth.", ""]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    """`ego-pipeline`: Hydra CLI around `run_pipeline`."""
    result = run_cli("ego-pipeline", lambda: run_pipeline(cfg), f"finished stages in {cfg.out_dir}")
    for name, r in result["evaluation"].items():
        print(f"{name}: success {r['success_rate']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}] "
              f"over {r['episodes']} episodes")
    print(f"report: {result['report']}")


if __name__ == "__main__":
    main()
