"""The simulator-only job (`ego-pipeline-expert`): expert demonstrations, expert evaluation, report.

The full main job, with the world model and the policy, is `ego-pipeline` (`policies.pipeline`),
which reuses this module's atomic-output and stage-cache helpers.

Stages, each writing its outputs atomically under `out_dir` and skipped on a rerun
when its recorded settings are unchanged (so a crashed or interrupted run resumes):

1. collect expert demonstrations into `data/demos.zarr` (resumes episode by episode);
2. evaluate the controller (default: the scripted expert) on every suite -> `eval/<suite>.json`;
3. record one episode as a video (overview | egocentric RGB | depth) -> `media/*.mp4`;
4. plot success rates and episode lengths -> `media/summary.png`, write `metrics.json`
   and `report.md`.

    ego-pipeline-expert                  # defaults: about a minute or two on 2 CPU cores
    ego-pipeline-expert profile=tiny out_dir=/tmp/smoke   # seconds: every stage, tiny sizes
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import mujoco
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import sim
from sim.collect import (
    LEVELS,
    POLICIES,
    TASKS,
    CollectConfig,
    check_choice,
    collect,
    run_cli,
    to_config,
)
from sim.evaluate import DEFAULT_CONTROLLER, controller_config, evaluate

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass
class DemoConfig:
    task: str = "single"
    level: str = "easy"
    episodes: int = 40
    seed: int = 0  # training-data seeds start at 0
    policy: str = "expert"  # expert | noisy_expert | random


@dataclass
class SuiteConfig:
    task: str = "single"
    level: str = "easy"
    episodes: int = 30


@dataclass
class VideoConfig:
    task: str = "single"
    level: str = "easy"
    seed: int = 1000


def _default_suites() -> dict[str, SuiteConfig]:
    return {
        "single_easy": SuiteConfig("single", "easy", 30),
        "single_hard": SuiteConfig("single", "hard", 30),
        "formation_easy": SuiteConfig("formation", "easy", 20),
    }


@dataclass
class PipelineConfig:
    """Options of `ego-pipeline-expert` (defaults mirrored in sim/conf/pipeline.yaml)."""

    out_dir: str = "runs/pipeline"
    workers: int = 2
    image_size: int = 64
    max_steps: int | None = None  # every stage's time limit; None: each task's default
    progress: bool = True
    note: str = ""  # shown at the top of the report (profiles say what they are)
    demos: DemoConfig = field(default_factory=DemoConfig)
    controller: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CONTROLLER))  # evaluated controller
    eval_seed: int = 1000  # evaluation seeds, apart from the demonstrations'
    suites: dict[str, SuiteConfig] = field(default_factory=_default_suites)
    video: VideoConfig = field(default_factory=VideoConfig)


ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


def load_config(overrides: list[str] | None = None) -> PipelineConfig:
    """The pipeline config composed as the CLI would, e.g. `load_config(["profile=tiny"])`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="pipeline", overrides=list(overrides or []))
    return to_config(cfg, PipelineConfig)


# ---------------------------------------------------------------------------- atomic outputs


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path` (same suffix), then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# settings that change how a stage runs, not what it computes (episodes are seeded one by one)
HOW_NOT_WHAT = ("progress", "workers")


def work_settings(settings: Any) -> Any:
    """`settings` as plain JSON without the `HOW_NOT_WHAT` keys, at any depth: what a stage's result depends on."""
    if isinstance(settings, Mapping):
        return {k: work_settings(v) for k, v in settings.items() if k not in HOW_NOT_WHAT}
    if isinstance(settings, list | tuple):
        return [work_settings(v) for v in settings]
    return settings


def cached_stage(path: Path, settings: Mapping[str, Any], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s result, stored at `path` with its settings; reused while the settings are the same, apart
    from `HOW_NOT_WHAT` (a rerun with `progress=false` or other workers reuses it)."""
    settings = _jsonable(dict(settings))
    if path.is_file():
        stored = json.loads(path.read_text())
        if work_settings(stored.get("settings")) == work_settings(settings):
            return stored["result"]
    result = _jsonable(run())
    write_text(path, json.dumps({"settings": settings, "result": result}, indent=1))
    return result


# ---------------------------------------------------------------------------- stages


def _check(cfg: PipelineConfig) -> None:
    if not cfg.suites:
        raise ValueError("suites must name at least one evaluation (task, level, episodes)")
    for where, task, level in [("demos", cfg.demos.task, cfg.demos.level), ("video", cfg.video.task, cfg.video.level),
                               *[(f"suites.{n}", s.task, s.level) for n, s in cfg.suites.items()]]:
        check_choice(f"{where}.task", task, TASKS)
        check_choice(f"{where}.level", level, LEVELS)
    check_choice("demos.policy", cfg.demos.policy, POLICIES)
    controller_config(cfg.controller)


def collect_demos(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """Stage 1: the demonstration dataset; figures cover the whole dataset, speed the last run that added to it."""
    from sim.dataset import EpisodeDataset

    d = cfg.demos
    path = out / "data" / "demos.zarr"
    summary = collect(CollectConfig(out=str(path), task=d.task, level=d.level, episodes=d.episodes, seed=d.seed,
                                    workers=cfg.workers, policy=d.policy, image_size=cfg.image_size,
                                    max_steps=cfg.max_steps, progress=cfg.progress))
    speed_file = out / "stages" / "collect_speed.json"
    if summary["steps"]:
        speed = {k: summary[k] for k in ("episodes", "steps", "wall_s", "startup_s", "steps_per_s")}
        write_text(speed_file, json.dumps(speed | {"workers": cfg.workers}, indent=1))
    speed = json.loads(speed_file.read_text()) if speed_file.is_file() else {}
    dataset = EpisodeDataset.open(path)
    infos = [dataset.episode_info(i) for i in range(dataset.n_episodes)]
    return {
        "path": str(path),
        "task": d.task,
        "level": d.level,
        "policy": d.policy,
        "episodes": dataset.n_episodes,
        "steps": dataset.n_steps,
        "success_rate": float(np.mean([i["success"] for i in infos])) if infos else None,
        "mean_length": float(np.mean(dataset.episode_lengths)) if infos else None,
        "steps_per_s": speed.get("steps_per_s"),
        "collect_workers": speed.get("workers"),
    }


def evaluate_suites(cfg: PipelineConfig, out: Path) -> dict[str, dict[str, Any]]:
    """Stage 2: one evaluation per suite, each cached in eval/<suite>.json."""
    results = {}
    for name, suite in cfg.suites.items():
        settings = dict(controller=cfg.controller, task=suite.task, level=suite.level, episodes=suite.episodes,
                        seed=cfg.eval_seed, image_size=cfg.image_size, max_steps=cfg.max_steps)
        results[name] = cached_stage(
            out / "eval" / f"{name}.json", settings,
            lambda s=settings: evaluate(**s, workers=cfg.workers, progress=cfg.progress),
        )
    return results


def record_video(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """Stage 3: one episode of the controller as an MP4, in this process."""
    v = cfg.video
    settings = dict(controller=cfg.controller, task=v.task, level=v.level, episodes=1, seed=v.seed,
                    image_size=cfg.image_size, max_steps=cfg.max_steps)
    path = out / "stages" / "video.json"
    if path.is_file() and not Path(json.loads(path.read_text())["result"]["results"][0]["video"]).is_file():
        path.unlink()  # the video was deleted by hand: record it again
    return cached_stage(path, settings, lambda: evaluate(**settings, workers=0, video_dir=out / "media",
                                                         videos="all", progress=False))


def plot_summary(suites: dict[str, dict[str, Any]], path: Path) -> Path:
    """Success rates with Wilson 95% intervals, and per-suite histograms of episode length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(suites)
    rates = np.array([suites[n]["success_rate"] for n in names])
    lows = np.array([suites[n]["ci95_low"] for n in names])
    highs = np.array([suites[n]["ci95_high"] for n in names])
    fig, (ax_rate, ax_len) = plt.subplots(1, 2, figsize=(10, 4))
    ax_rate.bar(names, rates, yerr=[rates - lows, highs - rates], capsize=6, color="tab:blue", alpha=0.8)
    ax_rate.set_ylim(0, 1.05)
    ax_rate.set_ylabel("success rate (Wilson 95% CI)")
    ax_rate.set_title("controller success")
    lengths = {name: [r["length"] for r in suites[name]["results"]] for name in names}
    bins = np.histogram_bin_edges(np.concatenate([*lengths.values()]), bins=25)  # shared, so suites compare
    for name in names:
        ax_len.hist(lengths[name], bins=bins, histtype="step", linewidth=2, label=name)
    ax_len.set_xlabel("episode length (steps)")
    ax_len.set_ylabel("episodes")
    ax_len.set_title("episode lengths")
    ax_len.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_report(cfg: PipelineConfig, demos: dict[str, Any], suites: dict[str, dict[str, Any]],
                  video: dict[str, Any], plot: Path, out: Path) -> str:
    """report.md: the figures as tables, the plot and a link to the video."""
    target = controller_config(cfg.controller)["_target_"]
    lines = [
        "# EgoPush pipeline report",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}, sim {sim.__version__}, MuJoCo {mujoco.__version__}, "
        f"{os.cpu_count()} CPUs, {cfg.workers} workers. Resolved config: [config.yaml](config.yaml), "
        "figures: [metrics.json](metrics.json).",
        "",
    ]
    if cfg.note:
        lines += [f"> {cfg.note}", ""]
    lines += [
        "## Demonstrations",
        "",
        "| dataset | task | level | policy | episodes | steps | success | mean length | collection steps/s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| `{Path(demos['path']).relative_to(out)}` | {demos['task']} | {demos['level']} | {demos['policy']} "
        f"| {demos['episodes']} | {demos['steps']} | {_fmt(demos['success_rate'], '.0%')} "
        f"| {_fmt(demos['mean_length'], '.1f')} | {_fmt(demos['steps_per_s'], '.0f')} |",
        "",
        f"Collection steps/s: all workers together ({demos['collect_workers']}), rendering 64x64 RGB-D, "
        "stepping, expert and dataset writing included, from the moment the first worker was ready.",
        "",
        f"## Evaluation of `{target}`",
        "",
        f"Seeds {cfg.eval_seed} onwards (the demonstrations use {cfg.demos.seed} onwards).",
        "",
        "| suite | task | level | episodes | success rate | 95% CI (Wilson) | mean length | steps/s |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, r in suites.items():
        lines.append(
            f"| {name} | {r['task']} | {r['level']} | {r['episodes']} | {r['success_rate']:.0%} "
            f"| [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}] | {r['mean_length']:.1f} | {r['steps_per_s']:.0f} |"
        )
    episode = video["results"][0]
    video_path = Path(episode["video"]).relative_to(out)
    outcome = "success" if episode["success"] else "failure"
    lines += [
        "",
        f"![success rates and episode lengths]({plot.relative_to(out)})",
        "",
        "## Video",
        "",
        f"[{video['task']} {video['level']}, seed {episode['seed']}]({video_path}) ({outcome}, "
        f"{episode['length']} steps): third-person overview | egocentric RGB | depth (bright = near).",
        "",
    ]
    return "\n".join(lines)


def run_pipeline(config: PipelineConfig | Mapping[str, Any] | DictConfig | None = None) -> dict[str, Any]:
    """Run every stage (skipping finished ones); returns the figures, also written to metrics.json."""
    cfg: PipelineConfig = to_config(config, PipelineConfig)
    _check(cfg)
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    demos = collect_demos(cfg, out)
    suites = evaluate_suites(cfg, out)
    video = record_video(cfg, out)
    plot = plot_summary(suites, out / "media" / "summary.png")
    metrics = {
        "demos": demos,
        "evaluation": {name: {k: v for k, v in r.items() if k != "results"} for name, r in suites.items()},
        "video": video["results"][0]["video"],
        "plot": str(plot),
    }
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    report = write_text(out / "report.md", render_report(cfg, demos, suites, video, plot, out))
    return metrics | {"report": str(report)}


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    """`ego-pipeline-expert`: Hydra CLI around `run_pipeline`."""
    result = run_cli("ego-pipeline-expert", lambda: run_pipeline(cfg), f"finished stages in {cfg.out_dir}")
    print(f"report: {result['report']}")


if __name__ == "__main__":
    main()
