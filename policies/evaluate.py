"""`ego-eval`: success rate of a trained policy (or any controller) on seeded EgoPush episodes.

    ego-eval checkpoint=runs/policy_slots                      # Single easy, 100 episodes, 2 workers
    ego-eval checkpoint=runs/policy_slots level=hard sampler=ddim steps=8
    ego-eval controller=expert task=formation episodes=20      # the scripted expert, for reference

Episodes run in parallel worker processes (`sim.evaluate.evaluate`), episode i with reset seed
`seed + i` (evaluation seeds start at 1000, apart from the demonstrations' 0..). Writes
`<out>/metrics.json` (success rate with its Wilson 95% interval, mean episode length, per-episode
results), `<out>/report.md`, and MP4s of the failed episodes under `<out>/videos`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from sim.collect import LEVELS, TASKS, check_choice, to_config
from sim.evaluate import evaluate
from worldmodel.checkpoint import write_json

CONTROLLER = "policies.controller.DiffusionPolicyController"
TOKEN_CONTROLLER = "policies.task_tokens.TokenPolicyController"


@dataclass
class EvalConfig:
    """Options of `ego-eval` (defaults mirrored in policies/conf/eval.yaml)."""

    checkpoint: str = ""  # a policy directory (ego-train-policy's out)
    controller: str = "policy"  # policy | expert | tokens (a `policies.task_tokens` policy)
    task: str = "single"
    level: str = "easy"
    episodes: int = 100
    seed: int = 1000
    workers: int = 2
    sampler: str | None = None  # ddim | consistency; default: the checkpoint's
    steps: int | None = None  # sampler steps; default: the checkpoint's
    n_action: int | None = None  # actions executed per chunk before re-planning; default: the checkpoint's
    same_noise: bool = False  # sample every chunk of an episode from the same starting noise
    select: int = 0  # world-model-guided selection: sample this many chunks, execute the predictor's best
    predictor: str = ""  # with select > 0: the predictor checkpoint (trained on the policy's encoder)
    coherence: int = 0  # sample this many chunks, execute the one that best continues the current chunk
    coherence_decay: float = 0.9  # with coherence: the weight of each further step of agreement
    forget_steps: int | None = None  # the object tracker's memory (SlotMemory); None = as the policy was trained
    perception: str = ""  # controller=tokens: a scene segmenter (policies.perception); "" reads privileged state
    plan: bool = False  # controller=tokens: the policy was trained with the expert's task column
    videos: str = "failures"  # failures | all | none
    max_steps: int | None = None
    out: str = ""  # default: <checkpoint>/eval_<task>_<level> (or runs/eval/expert_<task>_<level>)
    progress: bool = True


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def controller_target(cfg: EvalConfig) -> dict[str, Any]:
    """The Hydra `_target_` dict the workers instantiate."""
    if cfg.controller == "expert":
        return {"_target_": "sim.experts.PushExpert"}
    if not cfg.checkpoint or not (Path(cfg.checkpoint) / "model.safetensors").exists():
        raise ValueError(f"checkpoint={cfg.checkpoint!r} is not a policy directory; train one with ego-train-policy")
    # both policy controllers: set only what ego-eval overrides, the rest stays the checkpoint's
    sampling = {k: v for k, v in (("sampler", cfg.sampler), ("steps", cfg.steps), ("n_action", cfg.n_action)) if v}
    if cfg.controller == "tokens":
        return {"_target_": TOKEN_CONTROLLER, "checkpoint": cfg.checkpoint, "plan": cfg.plan,
                "perception": cfg.perception or None} | sampling
    target = {"_target_": CONTROLLER, "checkpoint": cfg.checkpoint, "task": cfg.task} | sampling
    if cfg.same_noise:
        target["same_noise"] = True
    if cfg.select > 0:
        target |= {"select": cfg.select, "predictor": cfg.predictor}
    if cfg.coherence > 0:
        target |= {"coherence": cfg.coherence, "coherence_decay": cfg.coherence_decay}
    if cfg.forget_steps:
        target["forget_steps"] = cfg.forget_steps
    return target


def run(config: EvalConfig | DictConfig | dict | None = None, **overrides: Any) -> dict[str, Any]:
    """Evaluate and write metrics.json / report.md; returns the summary (without per-episode videos' frames)."""
    cfg: EvalConfig = to_config(config, EvalConfig, overrides)
    check_choice("task", cfg.task, TASKS)
    check_choice("level", cfg.level, LEVELS)
    check_choice("controller", cfg.controller, ("policy", "expert", "tokens"))
    check_choice("videos", cfg.videos, ("failures", "all", "none"))
    target = controller_target(cfg)
    if cfg.out:
        out = Path(cfg.out)
    elif cfg.controller in ("policy", "tokens"):
        out = Path(cfg.checkpoint) / f"eval_{cfg.task}_{cfg.level}"
    else:
        out = Path("runs/eval") / f"expert_{cfg.task}_{cfg.level}"
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(target, cfg.task, cfg.level, cfg.episodes, cfg.seed, cfg.workers, max_steps=cfg.max_steps,
                      video_dir=None if cfg.videos == "none" else out / "videos",
                      videos="all" if cfg.videos == "all" else "failures", progress=cfg.progress)
    write_json(out / "metrics.json", result)
    write_report(out, cfg, result)
    return result


def write_report(out: Path, cfg: EvalConfig, r: dict[str, Any]) -> None:
    failures = [x for x in r["results"] if not x["success"]]
    lines = [f"# ego-eval: {cfg.controller} on {r['task']}/{r['level']}", "",
             f"- controller: `{json.dumps(r['controller'])}`",
             f"- success rate: **{r['success_rate']:.3f}** ({r['successes']}/{r['episodes']}, Wilson 95% "
             f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]), seeds {r['seed']}..{r['seed'] + r['episodes'] - 1}",
             f"- mean episode length: {r['mean_length']:.1f} steps; wall time {r['wall_s']:.0f} s",
             f"- failed seeds: {[x['seed'] for x in failures][:30]}",
             f"- failures by cause: {', '.join(f'{c}: {n}' for c, n in r['failures'].items())}",
             f"- episodes by goals filled at the end: {', '.join(f'{g}: {n}' for g, n in enumerate(r['goals_reached']))}"]
    videos = [x["video"] for x in failures if "video" in x]
    if videos:
        lines.append(f"- videos of failures: {', '.join(Path(v).name for v in videos[:10])} (in videos/)")
    (out / "report.md").write_text("\n".join(lines) + "\n")


@hydra.main(version_base=None, config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from sim.collect import run_cli

    def go() -> None:
        r = run(cfg)
        print(f"{r['task']}/{r['level']}: success {r['success_rate']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]"
              f" over {r['episodes']} episodes, mean length {r['mean_length']:.1f}; failures by cause {r['failures']}")

    run_cli("ego-eval", go, kept=cfg.out or "the finished videos")


if __name__ == "__main__":
    main()
