"""Parallel collection of demonstration episodes into an episode dataset (`ego-collect`).

Worker processes (spawned, so that each creates its own MuJoCo EGL context) each
build an env once and run seeded episodes; every finished episode goes back to the
parent, the dataset's one writer, which commits it atomically (episodes that finished
while it was writing are committed together, in one atomic commit). Episode i of a run
uses reset seed `seed + i`. Seeds already in the dataset are skipped, so rerunning
the same command after a crash, Ctrl-C or SIGTERM completes the dataset without
duplicates. Episodes are committed in the order they finish, not in seed order.

Per-step keys (step t = observation t, the action chosen from it, its outcome):

  rgb, depth, intrinsics, cam_pose, proprio   observation t (DESIGN.md contract)
  action            float32 (2,)    the label to imitate (`recorded_action`; for the
                                    noisy expert the noise-free action)
  executed_action   float32 (2,)    what was sent to `env.step`
  action_chunk      float32 (L, 2)  only from controllers that set `label_chunk`: the
                                    actions to imitate from step t on (DAgger's labels)
  reward            float32 ()      reward of the step
  is_success        bool ()         success after the step
  robot_pose (3,), object_poses (N, 3), goal (G, 2)   float32, privileged state at
  visible (N,), goal_visible (G,)                     observation t (bool)
  overview          uint8 (256, 256, 3)   third-person view, only with render_overview

The observation after the last action is not stored. Per-episode info: success,
length, seed, return, n_clipped_actions, formation.

    ego-collect out=data/demos.zarr episodes=200 policy=noisy_expert workers=2
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import mujoco
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import sim
from sim.controllers import Controller, recorded_action
from sim.env import ACTION_HIGH, ACTION_LOW, CONTROL_HZ, FIRST_OBJECT_SEG_ID, PROPRIO_FIELDS, EgoPushEnv, Randomization
from sim.dataset import DatasetError
from sim.experts import ExpertConfig, PushExpert, RandomExplorer

TASKS = ("single", "formation")
LEVELS = ("easy", "hard")
POLICIES = ("expert", "noisy_expert", "random")
OBS_KEYS = ("rgb", "depth", "intrinsics", "cam_pose", "proprio")
STATE_KEYS = ("robot_pose", "object_poses", "goal", "visible", "goal_visible")


@dataclass
class CollectConfig:
    """Options of `ego-collect` (defaults mirrored in sim/conf/collect.yaml)."""

    out: str = "data/egopush_single_easy.zarr"  # dataset directory (zarr store)
    task: str = "single"  # single | formation
    level: str = "easy"  # easy | hard
    episodes: int = 100  # seeds seed .. seed + episodes - 1
    seed: int = 0  # base reset seed
    workers: int = 2  # worker processes; 0 runs episodes in this process
    policy: str = "expert"  # expert | noisy_expert | random
    # any Controller as a Hydra `_target_` mapping (as ego-eval takes it) instead of `policy` ({} = policy):
    # built once per worker, reset per episode; its `label` attribute is recorded when it sets one (DAgger)
    controller: dict[str, Any] = field(default_factory=dict)
    image_size: int = 64
    max_steps: int | None = None  # None: the task's default time limit
    randomize: bool = False  # all domain randomisation on
    noise_std: list[float] = field(default_factory=lambda: [0.08, 0.6])  # noisy_expert: (v, omega) std
    noise_prob: float = 0.3  # noisy_expert: fraction of steps in noise bursts
    # expert | noisy_expert: `sim.experts.ExpertConfig` settings, e.g. +expert.goal_range_m=1.2 (recorded in meta)
    expert: dict[str, Any] = field(default_factory=dict)
    only_success: bool = False  # drop failed episodes (a rerun retries their seeds)
    render_overview: bool = False  # also store the 256x256 third-person view per step
    segmentation: bool = False  # also store per-pixel object ids (uint8, ids as info["seg_ids"]) per step
    progress: bool = True  # tqdm progress bar


ConfigStore.instance().store(name="collect_schema", node=CollectConfig)


# ---------------------------------------------------------------------------- config checks


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def to_config(config: Any, schema: type, overrides: Mapping[str, Any] | None = None) -> Any:
    """A `schema` instance, type-checked, from an instance, a DictConfig composed on it (as by
    Hydra) or a mapping merged into the defaults; `overrides` are merged on top."""
    if config is None:
        config = {}
    if is_dataclass(config) or (isinstance(config, DictConfig) and OmegaConf.get_type(config) is schema):
        base = OmegaConf.structured(config)  # complete already: mappings inside are not merged with defaults
    else:
        base = OmegaConf.merge(OmegaConf.structured(schema), config)
    return OmegaConf.to_object(OmegaConf.merge(base, dict(overrides or {})))


def _check(cfg: CollectConfig) -> None:
    """Options that `env_kwargs` does not check."""
    check_choice("policy", cfg.policy, POLICIES)
    if cfg.controller and "_target_" not in cfg.controller:
        raise ValueError(f"controller must be a mapping with a '_target_' key; got {cfg.controller!r}")
    if cfg.episodes < 0 or cfg.workers < 0:
        raise ValueError(f"episodes and workers must be >= 0; got {cfg.episodes}, {cfg.workers}")
    if len(cfg.noise_std) != 2 or min(cfg.noise_std) < 0:
        raise ValueError(f"noise_std must be two non-negative numbers (v m/s, omega rad/s); got {cfg.noise_std}")
    if not 0.0 <= cfg.noise_prob <= 1.0:
        raise ValueError(f"noise_prob must lie in [0, 1]; got {cfg.noise_prob}")
    if cfg.expert:
        if cfg.controller or cfg.policy not in ("expert", "noisy_expert"):
            raise ValueError(f"expert settings apply to policy=expert or noisy_expert only; got policy={cfg.policy!r}"
                             + (" with a controller" if cfg.controller else ""))
        expert_config(cfg.expert)  # unknown or bad settings fail before any worker starts


def expert_config(settings: Mapping[str, Any] | None, **fixed: Any) -> ExpertConfig:
    """`ExpertConfig` from `CollectConfig.expert` plus the collector's own settings (noise, seed), naming any
    setting it does not know."""
    settings = dict(settings or {})
    own = {"noise_std", "noise_prob", "seed"}
    known = {f.name for f in fields(ExpertConfig)} - own
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown expert settings {unknown}; known: {sorted(known)} "
                         f"(noise and seed are ego-collect's own options)")
    return ExpertConfig(**settings, **fixed)


def env_kwargs(task: str, level: str, image_size: int, max_steps: int | None, randomize: bool,
               segmentation: bool = False) -> dict[str, Any]:
    """Plain-data EgoPushEnv arguments (they travel to worker processes)."""
    check_choice("task", task, TASKS)
    check_choice("level", level, LEVELS)
    randomization = asdict(Randomization.all_on() if randomize else Randomization())
    return dict(task=task, level=level, image_size=image_size, max_steps=max_steps, randomization=randomization,
                segmentation=segmentation)


# ---------------------------------------------------------------------------- episodes


@dataclass
class Transition:
    """One env step: observation and privileged info it was taken in, actions, outcome."""

    obs: dict[str, np.ndarray]
    info: dict[str, Any]
    executed: np.ndarray  # float32 (2,)
    label: np.ndarray  # float32 (2,), see `recorded_action`
    reward: float
    next_info: dict[str, Any]
    overview: np.ndarray | None  # uint8 (256, 256, 3) at observation time, if asked for


def rollout(env: EgoPushEnv, controller: Controller, seed: int, overview: bool = False) -> Iterator[Transition]:
    """Run one seeded episode, yielding every transition until termination or the time limit."""
    obs, info = env.reset(seed=seed)
    controller.reset(obs, info)
    while True:
        frame = env.render() if overview else None
        executed = np.asarray(controller.act(obs, info), np.float32)
        label = recorded_action(controller, executed)
        next_obs, reward, terminated, truncated, next_info = env.step(executed)
        yield Transition(obs, info, executed, label, float(reward), next_info, frame)
        if terminated or truncated:
            return
        obs, info = next_obs, next_info


def make_policy(policy: str, seed: int, noise_std: Sequence[float] = (0.0, 0.0), noise_prob: float = 0.0,
                expert: Mapping[str, Any] | None = None) -> Controller:
    """A fresh controller for one episode, its randomness seeded by the episode seed; `expert`: ExpertConfig
    settings of the (noisy) expert."""
    check_choice("policy", policy, POLICIES)
    if policy == "expert":
        return PushExpert(expert_config(expert, seed=seed))
    if policy == "noisy_expert":
        return PushExpert(expert_config(expert, noise_std=tuple(noise_std), noise_prob=noise_prob, seed=seed))
    return RandomExplorer(seed=seed)


class EpisodeRecorder:
    """Worker-side runner: builds its env once, then records one episode per call."""

    def __init__(self, env_args: dict[str, Any], policy: str, noise_std: Sequence[float], noise_prob: float,
                 overview: bool = False, controller: dict[str, Any] | None = None,
                 expert: dict[str, Any] | None = None) -> None:
        self.env = EgoPushEnv(render_mode="rgb_array" if overview else None, **env_args)
        self.policy, self.noise_std, self.noise_prob, self.overview = policy, noise_std, noise_prob, overview
        self.expert = dict(expert or {})
        self.controller = None
        if controller is not None:
            from hydra.utils import instantiate

            self.controller = instantiate(controller)
            bind = getattr(self.controller, "bind_env", None)
            if bind is not None:
                bind(self.env)

    def __call__(self, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        controller = self.controller or make_policy(self.policy, seed, self.noise_std, self.noise_prob, self.expert)
        columns: dict[str, list] = {}
        episode_return = 0.0
        for tr in rollout(self.env, controller, seed, overview=self.overview):
            row = {k: tr.obs[k] for k in OBS_KEYS} | {k: tr.info[k] for k in STATE_KEYS}
            row |= {"action": tr.label, "executed_action": tr.executed, "reward": tr.reward,
                    "is_success": tr.next_info["is_success"]}
            chunk = getattr(controller, "label_chunk", None)
            if chunk is not None:
                row["action_chunk"] = np.asarray(chunk, np.float32)
            if self.overview:
                row["overview"] = tr.overview
            if "segmentation" in tr.info:
                row["segmentation"] = tr.info["segmentation"].astype(np.uint8)
            for key, value in row.items():
                columns.setdefault(key, []).append(value)
            episode_return += tr.reward
        steps = {key: _stack(values) for key, values in columns.items()}
        info = {
            "success": bool(tr.next_info["is_success"]),
            "length": len(steps["action"]),
            "seed": seed,
            "return": episode_return,
            "n_clipped_actions": int(tr.next_info["n_clipped_actions"]),
            "formation": tr.next_info["formation"],
        }
        return steps, info

    def close(self) -> None:
        self.env.close()


def _stack(values: list) -> np.ndarray:
    arr = np.stack([np.asarray(v) for v in values])
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr


# ---------------------------------------------------------------------------- worker processes


def _worker_main(make_runner: Callable[[], Callable[[int], Any]], tasks: mp.Queue, results: mp.Queue) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops its workers
    parent = mp.parent_process()
    try:
        runner = make_runner()
    except BaseException:
        results.put(("error", None, traceback.format_exc()))
        return
    results.put(("ready", None, None))
    while True:
        try:
            seed = tasks.get(timeout=1.0)
        except queue.Empty:
            if _orphaned(parent, results):
                break
            continue
        if seed is None:
            break
        try:
            payload = runner(seed)
        except Exception:
            results.put(("error", seed, traceback.format_exc()))
            break
        results.put(("done", seed, payload))
        if _orphaned(parent, results):
            break
    getattr(runner, "close", lambda: None)()


def _orphaned(parent: mp.process.BaseProcess | None, results: mp.Queue) -> bool:
    """True when the parent is gone (killed); the results then need not be flushed at exit."""
    if parent is None or parent.is_alive():
        return False
    results.cancel_join_thread()
    return True


class EpisodeWorkers:
    """Runs `runner(seed)` for every seed in worker processes; iterate for `(seed, result)`.

    Each worker calls `make_runner()` (picklable, e.g. a `functools.partial` of a class)
    once and then takes seeds from a shared queue, so results arrive in the order they
    finish. `workers=0` runs in this process. Leaving the `with` block stops the workers,
    killing them if the iteration was cut short (exception, Ctrl-C).
    """

    def __init__(self, make_runner: Callable[[], Callable[[int], Any]], seeds: Sequence[int], workers: int) -> None:
        self.make_runner = make_runner
        self.seeds = list(seeds)
        self.n_workers = min(workers, len(self.seeds))
        self.ready_time: float | None = None  # perf_counter() when the first worker was ready
        self._procs: list[mp.process.BaseProcess] = []

    def __enter__(self) -> EpisodeWorkers:
        if self.n_workers > 0:
            ctx = mp.get_context("spawn")
            self._tasks, self._results = ctx.Queue(), ctx.Queue()
            for seed in [*self.seeds, *[None] * self.n_workers]:
                self._tasks.put(seed)
            self._procs = [
                ctx.Process(target=_worker_main, args=(self.make_runner, self._tasks, self._results),
                            name=f"ego-worker-{i}", daemon=True)
                for i in range(self.n_workers)
            ]
            for p in self._procs:
                p.start()
        return self

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for batch in self.batches():
            yield from batch

    def batches(self, max_size: int = 8) -> Iterator[list[tuple[int, Any]]]:
        """Results in lists: each holds one result plus those already waiting (up to `max_size`),
        so that a slow consumer (the dataset writer) can handle them in one go."""
        if not self.seeds:
            return
        if self.n_workers == 0:
            for item in self._run_here():
                yield [item]
            return
        done, idle_since_all_exited = 0, 0
        while done < len(self.seeds):
            try:
                message = self._results.get(timeout=1.0)
            except queue.Empty:
                idle_since_all_exited = idle_since_all_exited + 1 if self._all_exited() else 0
                if idle_since_all_exited > 1:  # one more wait for what a last worker flushed as it exited
                    raise RuntimeError("all workers exited before every episode was returned") from None
                continue
            batch = []
            while True:
                item = self._handle(message)
                if item is not None:
                    batch.append(item)
                if len(batch) >= max_size or done + len(batch) >= len(self.seeds):
                    break
                try:
                    message = self._results.get_nowait()
                except queue.Empty:
                    break
            if batch:
                done += len(batch)
                yield batch

    def _handle(self, message: tuple[str, int | None, Any]) -> tuple[int, Any] | None:
        kind, seed, payload = message
        if kind == "ready":
            self.ready_time = self.ready_time or time.perf_counter()
            return None
        if kind == "error":
            where = "while starting" if seed is None else f"in the episode with seed {seed}"
            raise RuntimeError(f"a worker failed {where}:\n{payload}")
        return seed, payload

    def _run_here(self) -> Iterator[tuple[int, Any]]:
        runner = self.make_runner()
        self.ready_time = time.perf_counter()
        try:
            for seed in self.seeds:
                yield seed, runner(seed)
        finally:
            getattr(runner, "close", lambda: None)()

    def _all_exited(self) -> bool:
        """Whether every worker has exited normally; raises if one died."""
        crashed = [p for p in self._procs if p.exitcode not in (None, 0)]
        if crashed:
            raise RuntimeError(f"worker {crashed[0].name} died with exit code {crashed[0].exitcode}")
        return all(p.exitcode == 0 for p in self._procs)

    def __exit__(self, *exc: object) -> None:
        if not self._procs:
            return
        for p in self._procs:
            p.join(timeout=10.0 if exc[0] is None else 0.0)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (self._tasks, self._results):
            q.cancel_join_thread()
            q.close()
        self._procs = []


@contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C inside the block (a CLI's graceful stop); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------- collection


def dataset_meta(cfg: CollectConfig, env_args: dict[str, Any]) -> dict[str, Any]:
    """The dataset's `meta` block: setup, versions, camera model, units."""
    env = EgoPushEnv(**env_args)
    try:
        obs, _ = env.reset(seed=cfg.seed)
        env_config = asdict(env.config)
    finally:
        env.close()
    h, w = obs["rgb"].shape[:2]
    policy: dict[str, Any] = {"name": cfg.policy}
    if cfg.controller:
        policy = {"name": "controller", "controller": dict(cfg.controller)}
    elif cfg.policy == "noisy_expert":
        policy |= {"noise_std": list(cfg.noise_std), "noise_prob": cfg.noise_prob}
    if cfg.expert:  # only when set, so datasets of the default expert keep their meta
        policy |= {"expert": dict(cfg.expert)}
    return {
        "task": cfg.task,
        "level": cfg.level,
        "image_size": [h, w],
        "env_config": env_config,
        "policy": policy,
        "only_success": cfg.only_success,
        "sim_version": sim.__version__,
        "mujoco_version": mujoco.__version__,
        "camera": {
            "name": "head",
            "model": "pinhole",
            "width": w,
            "height": h,
            "intrinsics": obs["intrinsics"].tolist(),
            "depth_units": "metres",
            "depth": "z along the optical axis, 0 = invalid",
            "cam_pose": "world-from-optical-camera (x right, y down, z forward)",
        },
        "proprio_fields": list(PROPRIO_FIELDS),
        "segmentation_ids": f"object i of object_poses has id i + {FIRST_OBJECT_SEG_ID}; 0 floor/sky, 1 walls, 2 robot",
        "action_fields": ["v (m/s)", "omega (rad/s)"],
        "action_low": ACTION_LOW.tolist(),
        "action_high": ACTION_HIGH.tolist(),
        "control_hz": CONTROL_HZ,
    }


def collect(config: CollectConfig | Mapping[str, Any] | DictConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Collect `episodes` seeded episodes into the dataset at `out`, resuming; returns a summary.

    Summary keys: out, requested, skipped (seeds already committed), episodes (new,
    committed), discarded (failures with only_success), steps (simulated in this
    run), successes, success_rate (of this run's episodes), dataset_episodes,
    wall_s, startup_s (until the first worker was ready), steps_per_s (after that).
    KeyboardInterrupt (Ctrl-C) stops the workers and propagates; what was committed stays.
    """
    from sim.dataset import EpisodeWriter

    cfg: CollectConfig = to_config(config, CollectConfig, overrides)
    _check(cfg)
    args = env_kwargs(cfg.task, cfg.level, cfg.image_size, cfg.max_steps, cfg.randomize, cfg.segmentation)
    t0 = time.perf_counter()
    meta = dataset_meta(cfg, args)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    with EpisodeWriter(cfg.out, meta=meta) as writer:
        wanted = range(cfg.seed, cfg.seed + cfg.episodes)
        todo = [s for s in wanted if not writer.has_seed(s)]
        recorder = partial(EpisodeRecorder, args, cfg.policy, tuple(cfg.noise_std), cfg.noise_prob,
                           cfg.render_overview, cfg.controller or None, dict(cfg.expert))
        n_steps = n_new = n_success = n_discarded = 0
        bar = tqdm(total=len(todo), unit="ep", desc=f"collect {cfg.task}/{cfg.level}", disable=not cfg.progress,
                   dynamic_ncols=True)
        with bar, EpisodeWorkers(recorder, todo, cfg.workers) as pool:
            # episodes that finished while the writer was busy are committed together (one commit)
            for batch in pool.batches():
                keep = [(steps, seed, info) for seed, (steps, info) in batch if info["success"] or not cfg.only_success]
                writer.add_episodes(keep)
                n_new += len(keep)
                n_discarded += len(batch) - len(keep)
                n_steps += sum(info["length"] for _, (_, info) in batch)
                n_success += sum(info["success"] for _, (_, info) in batch)
                bar.update(len(batch))
                bar.set_postfix(steps_per_s=f"{n_steps / (time.perf_counter() - pool.ready_time):.0f}",
                                success=f"{n_success}/{n_new + n_discarded}")
        end = time.perf_counter()
        ran = n_new + n_discarded
        return {
            "out": str(cfg.out),
            "requested": cfg.episodes,
            "skipped": cfg.episodes - len(todo),
            "episodes": n_new,
            "discarded": n_discarded,
            "steps": n_steps,
            "successes": n_success,
            "success_rate": n_success / ran if ran else None,
            "dataset_episodes": writer.n_episodes,
            "wall_s": end - t0,
            "startup_s": pool.ready_time - t0 if pool.ready_time else None,
            "steps_per_s": n_steps / (end - pool.ready_time) if pool.ready_time and n_steps else None,
        }


def run_cli(prog: str, job: Callable[[], Any], kept: str) -> Any:
    """Run a CLI's job: SIGTERM stops it like Ctrl-C (exit 130, saying that `kept` stays and a rerun
    resumes); bad options or a bad dataset path print one line instead of a traceback (exit 2)."""
    with sigterm_as_keyboard_interrupt():
        try:
            return job()
        except (ValueError, DatasetError) as e:
            print(f"{prog}: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"\ninterrupted; {kept} stay: rerun the same command to resume", file=sys.stderr)
            sys.exit(130)


@hydra.main(version_base="1.3", config_path="conf", config_name="collect")
def main(cfg: DictConfig) -> None:
    """`ego-collect`: Hydra CLI around `collect`."""
    s = run_cli("ego-collect", lambda: collect(cfg), f"committed episodes in {cfg.out}")
    rate = "n/a" if s["success_rate"] is None else f"{s['success_rate']:.0%}"
    speed = "n/a" if s["steps_per_s"] is None else f"{s['steps_per_s']:.0f}"
    print(f"{s['out']}: +{s['episodes']} episodes ({s['skipped']} already there, {s['discarded']} discarded), "
          f"{s['dataset_episodes']} in total; success {rate}; {s['steps']} steps at {speed} steps/s; "
          f"{s['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
