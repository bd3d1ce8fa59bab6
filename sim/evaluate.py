"""Success-rate evaluation of any controller on seeded EgoPush episodes, in parallel workers.

The controller comes as a Hydra `_target_` config (a dict such as
`{"_target_": "sim.experts.PushExpert", "v_max": 0.2}`, or just the dotted path),
instantiated inside each worker with `hydra.utils.instantiate`, so that `sim` never
imports the learners. Each worker builds its env and controller once and calls
`controller.reset` at every episode. Episode i uses reset seed `seed + i`;
evaluation seeds (default 1000..) are kept apart from training-data seeds (0..).

Videos show the third-person overview, the egocentric RGB and the colour-mapped
depth side by side (depth from 0.1 m, bright, to 3 m, dark).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sim.collect import EpisodeWorkers, check_choice, env_kwargs, rollout
from sim.dataset import VideoFile, colorize_depth, resize_nearest
from sim.env import CONTROL_HZ, EgoPushEnv

DEFAULT_CONTROLLER: dict[str, Any] = {"_target_": "sim.experts.PushExpert"}
VIDEO_CHOICES = ("failures", "all")
DEPTH_RANGE_SHOWN = (0.1, 3.0)  # metres, a fixed colour scale for every frame


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}]; got {successes}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def controller_config(controller: Mapping[str, Any] | DictConfig | str) -> dict[str, Any]:
    """A plain `_target_` dict (picklable, for workers) from a dict, DictConfig or dotted path."""
    if isinstance(controller, str):
        return {"_target_": controller}
    if isinstance(controller, DictConfig):
        controller = OmegaConf.to_container(controller, resolve=True)
    if not isinstance(controller, Mapping) or "_target_" not in controller:
        raise ValueError(f"controller must be a dotted path or a mapping with a '_target_' key; got {controller!r}")
    return dict(controller)


# ---------------------------------------------------------------------------- video


def compose_frame(overview: np.ndarray, rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """uint8 (S, 3S, 3): overview | egocentric RGB | depth, each scaled to the overview's height S."""
    size = overview.shape[0]
    depth_rgb = colorize_depth(depth, *DEPTH_RANGE_SHOWN)
    return np.concatenate([overview, resize_nearest(rgb, size, size), resize_nearest(depth_rgb, size, size)], axis=1)


# ---------------------------------------------------------------------------- episodes

#: why an episode failed, in the order the task needs things done (the first that applies)
FAILURE_CAUSES = ("never saw a box", "never saw a goal", "no box moved", "pushed, not placed")
MOVED_M = 0.05  # a box counts as moved once this far from where it started


class EpisodeAnatomy:
    """What happened in one episode, read from the simulator's privileged `info` for the report (no
    controller sees it): the step on which a box to push was first in the camera's view, and a goal;
    how far the boxes were moved; the closest the task came to done; and, for a failure, its cause
    (`FAILURE_CAUSES`: the first thing the task needed that did not happen)."""

    def __init__(self, env: EgoPushEnv, info: dict[str, Any]) -> None:
        self.boxes = env.pushable_indices()
        self.tolerance = env.tolerance
        self.start = np.asarray(info["object_poses"])[self.boxes, :2]
        self.first_box: int | None = None
        self.first_goal: int | None = None
        self.moved_m = 0.0
        self.best_error = math.inf
        self.update(0, info)

    def update(self, step: int, info: dict[str, Any]) -> None:
        """The state after `step` env steps (0: at reset)."""
        if self.first_box is None and np.asarray(info["visible"])[self.boxes].any():
            self.first_box = step
        if self.first_goal is None and np.asarray(info["goal_visible"]).any():
            self.first_goal = step
        shift = np.linalg.norm(np.asarray(info["object_poses"])[self.boxes, :2] - self.start, axis=-1)
        self.moved_m = max(self.moved_m, float(shift.max()))
        self.best_error = min(self.best_error, float(np.max(info["goal_errors"])))

    def result(self, final: dict[str, Any]) -> dict[str, Any]:
        cause = ""
        if not final["is_success"]:
            done = (self.first_box is not None, self.first_goal is not None, self.moved_m >= MOVED_M, False)
            cause = FAILURE_CAUSES[done.index(False)]
        return {"first_box_seen": self.first_box, "first_goal_seen": self.first_goal,
                "box_moved_m": round(self.moved_m, 3), "min_goal_error": round(self.best_error, 3),
                "goals_reached": int((np.asarray(final["goal_errors"]) < self.tolerance).sum()), "failure": cause}


def failure_counts(results: list[dict[str, Any]]) -> dict[str, int]:
    """Failed episodes per cause, every cause listed (0 where none)."""
    return {c: sum(r.get("failure") == c for r in results) for c in FAILURE_CAUSES}


class EpisodeEvaluator:
    """Worker-side runner: builds env and controller once, then evaluates one seeded episode per call."""

    def __init__(self, env_args: dict[str, Any], controller: dict[str, Any], video_dir: str | None = None,
                 videos: str = "failures") -> None:
        from hydra.utils import instantiate

        self.env = EgoPushEnv(render_mode="rgb_array" if video_dir else None, **env_args)
        self.controller = instantiate(controller)
        self.video_dir = None if video_dir is None else Path(video_dir)
        self.videos = videos

    def __call__(self, seed: int) -> dict[str, Any]:
        cfg = self.env.config
        video = None
        if self.video_dir is not None:
            video = VideoFile(self.video_dir / f"{cfg.task}_{cfg.level}_seed{seed:05d}.mp4", fps=CONTROL_HZ)
        try:
            length, episode_return, anatomy = 0, 0.0, None
            for tr in rollout(self.env, self.controller, seed, overview=video is not None):
                if video is not None:
                    video.append(compose_frame(tr.overview, tr.obs["rgb"], tr.obs["depth"]))
                anatomy = anatomy or EpisodeAnatomy(self.env, tr.info)
                length += 1
                anatomy.update(length, tr.next_info)
                episode_return += tr.reward
        except BaseException:
            if video is not None:
                video.discard()
            raise
        final = tr.next_info
        result = {
            "seed": seed,
            "success": bool(final["is_success"]),
            "length": length,
            "return": episode_return,
            "final_goal_error": float(np.max(final["goal_errors"])),
            "n_clipped_actions": int(final["n_clipped_actions"]),
            "formation": final["formation"],
            **anatomy.result(final),
        }
        if video is not None:
            if self.videos == "all" or not result["success"]:
                result["video"] = str(video.commit())
            else:
                video.discard()
        return result

    def close(self) -> None:
        self.env.close()


def evaluate(
    controller: Mapping[str, Any] | DictConfig | str = DEFAULT_CONTROLLER,
    task: str = "single",
    level: str = "easy",
    episodes: int = 50,
    seed: int = 1000,
    workers: int = 2,
    *,
    image_size: int = 64,
    max_steps: int | None = None,
    randomize: bool = False,
    video_dir: str | os.PathLike[str] | None = None,
    videos: str = "failures",
    progress: bool = True,
) -> dict[str, Any]:
    """Run `episodes` seeded episodes (seeds `seed`..) of `task`/`level` and summarise them.

    Returns task, level, controller, episodes, seed, successes, success_rate,
    ci95_low/ci95_high (Wilson), mean_length, steps, wall_s, steps_per_s (after the
    workers were up), and
    `results`: per episode (by seed) seed, success, length, return,
    final_goal_error, n_clipped_actions, formation, `EpisodeAnatomy`'s fields (first_box_seen,
    first_goal_seen, box_moved_m, min_goal_error, goals_reached, failure) and, where saved, video;
    `failures`: the failed episodes per cause (`FAILURE_CAUSES`); `goals_reached`: how many episodes
    ended with 0, 1, ... goals (formation slots) filled, the partial progress a success rate hides.
    With `video_dir`, MP4s of the failed episodes (`videos="all"`: of all) go there.
    """
    target = controller_config(controller)
    check_choice("videos", videos, VIDEO_CHOICES)
    if episodes < 1 or workers < 0:
        raise ValueError(f"episodes must be >= 1 and workers >= 0; got {episodes}, {workers}")
    args = env_kwargs(task, level, image_size, max_steps, randomize)
    runner = partial(EpisodeEvaluator, args, target, None if video_dir is None else os.fspath(video_dir), videos)
    t0 = time.perf_counter()
    results = []
    bar = tqdm(total=episodes, unit="ep", desc=f"evaluate {task}/{level}", disable=not progress, dynamic_ncols=True)
    with bar, EpisodeWorkers(runner, range(seed, seed + episodes), workers) as pool:
        for _, result in pool:
            results.append(result)
            bar.update(1)
            bar.set_postfix(success=f"{sum(r['success'] for r in results)}/{len(results)}")
    end = time.perf_counter()
    results.sort(key=lambda r: r["seed"])
    successes = sum(r["success"] for r in results)
    low, high = wilson_interval(successes, episodes)
    steps = sum(r["length"] for r in results)
    return {
        "task": task,
        "level": level,
        "controller": target,
        "episodes": episodes,
        "seed": seed,
        "successes": successes,
        "success_rate": successes / episodes,
        "ci95_low": low,
        "ci95_high": high,
        "mean_length": steps / episodes,
        "steps": steps,
        "wall_s": end - t0,
        "steps_per_s": steps / (end - pool.ready_time),
        "failures": failure_counts(results),
        "goals_reached": np.bincount([r["goals_reached"] for r in results]).tolist(),
        "results": results,
    }
