"""DAgger for the diffusion policy: the learner drives, the scripted expert labels what it sees.

A policy trained on the expert's own trajectories only ever saw states the expert visits; in closed
loop its small errors take it elsewhere (the box off line, the goal behind it) and it has never seen
how to recover. DAgger (Ross et al. 2011) rolls the learner out, asks the expert for the right action
at every state the learner reached, adds those labelled episodes to the demonstrations and trains
again. The expert is the simulator's scripted `PushExpert`, so labels are free.

A diffusion policy imitates chunks of actions, not single ones. Stitching the expert's one-step labels
along the learner's path gives chunks no one planned: the expert's plan switches (approach, push,
re-approach) as the learner drifts, and a chunk that mixes them taught the policy worse than nothing
(0.57 -> 0.25 on Single easy). So by default (`labels=chunk`) each state is labelled with the chunk the
expert itself would drive from there: the simulator is saved, the expert (a copy of it, memory
included) drives the next actions, and the simulator is rewound (`EgoPushEnv.get_state`/`set_state`),
about 15 extra physics steps per learner step. `labels=step` keeps the one-step labels.

    ego-dagger policy=runs/pipeline/policy out=runs/dagger            # 1 round of 100 episodes
    ego-dagger policy=runs/pipeline/policy rounds=2 episodes=150 beta=0.3

Each round writes `<out>/round<r>/data.zarr` (an `ego-collect` dataset: `action` is the expert's
label, `executed_action` what drove the robot) and `<out>/round<r>/policy` (the policy trained on the
demonstrations and every round's data so far, starting from the previous round's weights). Rounds,
collection and training all resume. `<out>/metrics.json` lists the rounds; the last round's policy is
the result.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from policies.controller import DiffusionPolicyController, first_frame_key
from policies.train import PolicyTrainConfig, default_demo_path
from sim.collect import check_choice, to_config


class DAggerController:
    """A `sim` Controller that executes the learner's action (or, with probability `beta` per step, the
    expert's) and sets `label` to the noise-free expert's action for the recorder; with
    `labels="chunk"` also `label_chunk`: the expert's own next actions from this state (see the module
    docstring), as many as the learner's chunk holds from the current step on.

    Both see every frame: the learner streams its world-model encoder, the expert updates its memory
    of what it has seen. The mixing is seeded per episode from the first frame, as the learner is."""

    def __init__(self, checkpoint: str, beta: float = 0.0, seed: int = 0, threads: int = 1,
                 labels: str = "chunk", expert: dict[str, Any] | None = None, **learner: Any) -> None:
        from sim.collect import expert_config
        from sim.experts import PushExpert

        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1]; got {beta}")
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}; got {labels!r}")
        self.learner = DiffusionPolicyController(checkpoint, seed=seed, threads=threads, **learner)
        self.expert = PushExpert(expert_config(expert, seed=seed))  # the demonstrations' expert settings
        self.beta, self.seed, self.labels = beta, seed, labels
        cfg = self.learner.policy.cfg
        self.chunk_len = cfg.horizon - cfg.n_obs + 1
        self.rng = np.random.default_rng(seed)
        self.label: np.ndarray | None = None
        self.label_chunk: np.ndarray | None = None
        self.env = None

    def bind_env(self, env: Any) -> None:
        """The env the episodes run in (called once by the recorder): `labels="chunk"` looks ahead in it."""
        self.env = env

    def reset(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        self.rng = np.random.default_rng([first_frame_key(obs), self.seed])
        self.learner.reset(obs, info)
        self.expert.reset(obs, info)
        self.label = None

    def act(self, obs: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> np.ndarray:
        self.label = np.asarray(self.expert.act(obs, info), np.float32)
        if self.labels == "chunk":
            self.label_chunk = self.expert_chunk()
        learned = self.learner.act(obs, info)
        return self.label.copy() if self.rng.random() < self.beta else learned

    def expert_chunk(self) -> np.ndarray:
        """(chunk_len, 2): `label`, then the actions the expert would take next if it drove from here,
        simulated in the bound env, which is then rewound. Past a success, the last action repeats (as
        a demonstration's chunk is padded at its end)."""
        if self.env is None:
            raise RuntimeError("labels='chunk' needs the env to look ahead in: call bind_env(env) first "
                               "(ego-collect does), or use labels='step'")
        saved = self.env.get_state()
        expert = copy.deepcopy(self.expert)
        actions = [self.label]
        try:
            for _ in range(self.chunk_len - 1):
                obs, _, terminated, _, info = self.env.step(actions[-1])
                if terminated:
                    break
                actions.append(np.asarray(expert.act(obs, info), np.float32))
        finally:
            self.env.set_state(saved)
        actions += [actions[-1]] * (self.chunk_len - len(actions))
        return np.stack(actions)


LABELS = ("chunk", "step")


@dataclass
class DAggerConfig:
    """Options of `ego-dagger` (defaults mirrored in policies/conf/dagger.yaml)."""

    policy: str = "runs/pipeline/policy"  # the trained policy to improve (round 0's learner)
    out: str = "runs/dagger"
    demos: list[str] = field(default_factory=list)  # the demonstrations; [] = those the policy was trained on
    rounds: int = 1
    episodes: int = 100  # learner episodes per round
    beta: float = 0.0  # probability per step that the expert drives instead
    labels: str = "chunk"  # chunk: the expert's own next actions from each state; step: its one-step labels
    seed: int = 100_000  # round r uses reset seeds seed + r * episodes ..
    max_steps: int | None = None  # None: the task's time limit
    workers: int = 2
    threads: int = 1  # torch threads per collection worker
    train: PolicyTrainConfig = field(default_factory=lambda: PolicyTrainConfig(
        steps=2000, warmup=100, distill_steps=600, time_budget_min=6.0))  # ego-train-policy train.* per round
    progress: bool = True


ConfigStore.instance().store(name="dagger_schema", node=DAggerConfig)


def run_dagger(config: DAggerConfig | DictConfig | dict | None = None, **overrides: Any) -> dict[str, Any]:
    """Run (or resume) the DAgger rounds; returns metrics with one entry per round."""
    from policies.train import train
    from sim.collect import collect
    from worldmodel.checkpoint import read_checkpoint

    cfg: DAggerConfig = to_config(config, DAggerConfig, overrides)
    if cfg.rounds < 1 or cfg.episodes < 1:
        raise ValueError(f"rounds and episodes must be >= 1; got {cfg.rounds}, {cfg.episodes}")
    if not 0.0 <= cfg.beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1]; got {cfg.beta}")
    check_choice("labels", cfg.labels, LABELS)
    base, _, _ = read_checkpoint(cfg.policy)
    if base.get("stage") != "policy":
        raise ValueError(f"{cfg.policy} is not a policy checkpoint (stage {base.get('stage')!r})")
    data_cfg = base["data"]
    demos = list(cfg.demos) or list(data_cfg.get("paths") or [])
    if not demos:
        demos = [default_demo_path(data_cfg["root"], data_cfg["task"], data_cfg["level"], data_cfg.get("expert"))]
    missing = [p for p in demos if not Path(p).exists()]
    if missing:
        raise ValueError(f"demonstrations {missing} not found; pass demos=[...]")
    out = Path(cfg.out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    _reuse_cache(Path(base.get("cache_dir") or Path(cfg.policy) / "cache"), out / "cache")
    learner, paths, rounds = cfg.policy, list(demos), []
    for r in range(cfg.rounds):
        rdir = out / f"round{r}"
        data = str(rdir / "data.zarr")
        target = {"_target_": "policies.dagger.DAggerController", "checkpoint": str(learner), "beta": cfg.beta,
                  "labels": cfg.labels, "seed": cfg.seed + r, "threads": cfg.threads, "task": data_cfg["task"],
                  "expert": dict(data_cfg.get("expert") or {})}
        c = collect(out=data, task=data_cfg["task"], level=data_cfg["level"], episodes=cfg.episodes,
                    seed=cfg.seed + r * cfg.episodes, workers=cfg.workers, controller=target,
                    image_size=data_cfg.get("image_size", 64), max_steps=cfg.max_steps, only_success=False,
                    progress=cfg.progress)
        paths.append(data)
        m = train({"out": str(rdir / "policy"), "init": str(learner), "encoder": str(Path(cfg.policy) / "encoder"),
                   "cache_dir": str(out / "cache"), "progress": cfg.progress, "data": {**data_cfg, "paths": paths},
                   "policy": base["policy"],
                   "train": asdict(cfg.train)})
        rounds.append({"round": r, "data": data, "policy": str(rdir / "policy"), "episodes": cfg.episodes,
                       "learner_success_rate": c["success_rate"] if c["episodes"] else None,
                       "steps": c["steps"], "train_steps": m["diffusion_steps"], "demo_steps": m["demo_steps"]})
        learner = rdir / "policy"
    metrics = {"policy": str(learner), "base": cfg.policy, "demos": demos, "rounds": rounds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _reuse_cache(src: Path, dst: Path) -> None:
    """Copy the base policy's encoded demonstrations (slot tokens, keyed by encoder and dataset) so that
    the rounds encode only their own rollouts."""
    if src.is_dir():
        for f in src.glob("*.npy"):
            if not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)


@hydra.main(version_base=None, config_path="conf", config_name="dagger")
def main(cfg: DictConfig) -> None:
    from sim.collect import run_cli

    run_cli("ego-dagger", lambda: run_dagger(cfg), kept=cfg.out)


if __name__ == "__main__":
    main()
