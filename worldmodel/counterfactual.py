"""Open-loop prediction errors of the predictor, on recorded segments and on counterfactual ones.

Counterfactual segments change a real scene in the simulator, then replay the same commands in the
simulator and in the model, and compare where the changed objects end up:

    factual  the scripted expert pushes the box (the segment starts when its pusher is within reach)
    move     the same start with the box moved sideways out of the robot's path: the simulator
             leaves it where it is; a model that did not see the change pushes it anyway
    swap     the same start with the box and a distractor exchanged: the robot now pushes the
             distractor, and the box, moved away, stays

The commands are the expert's from the factual run, replayed open loop in every variant.

Shapes: G segments, L steps, K slots, O objects, H horizons.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

INTERVENTIONS = ("move", "swap")
VARIANTS = ("factual", *INTERVENTIONS)
SHIFT_M = 0.25  # how far `move` puts the box sideways, metres
CLEARANCE_M = 0.16  # a moved object's centre keeps this far from every other object and from the robot's axle
FRAME_KEYS = ("rgb", "depth", "intrinsics", "cam_pose", "proprio", "segmentation")


# ---------------------------------------------------------------------------- prediction errors


@dataclass
class RolloutErrors:
    """Per horizon (env steps): position errors (m) of the model and of the stay-still baseline, one
    entry per object seen at the last history frame, and how far the simulator moved that object over
    the horizon (`moved`, m: how much there was to predict)."""

    model: dict[int, np.ndarray]
    still: dict[int, np.ndarray]
    moved: dict[int, np.ndarray]

    def split(self, h: int, min_moved_m: float) -> dict[str, dict[str, Any]]:
        """At horizon h, the medians over the objects the simulator moved at least `min_moved_m`
        ("moved") and over the rest ("static"): {part: {objects, err_m, baseline_err_m}}."""
        out = {}
        moved = self.moved[h] >= min_moved_m
        for part, keep in (("moved", moved), ("static", ~moved)):
            n = int(keep.sum())
            out[part] = {"objects": n, "err_m": float(np.median(self.model[h][keep])) if n else None,
                         "baseline_err_m": float(np.median(self.still[h][keep])) if n else None}
        return out


def open_loop_positions(model: torch.nn.Module, cache: dict[str, np.ndarray], horizon: int) -> tuple[np.ndarray, int]:
    """Every cached segment's recorded commands rolled out open loop for `horizon` env steps from its
    first `history` frames (`frameskip` steps apart) -> predicted planar slot positions (G, H, K, 2), one
    per predictor frame, and the segment step of the last history frame."""
    cfg = model.cfg
    fs, th = cfg.frameskip, cfg.history
    length = cache["features"].shape[1]
    hist = np.arange(th) * fs
    last = int(hist[-1])
    if last + horizon >= length:
        raise ValueError(f"segments of {length} steps are too short for {th} history frames and a "
                         f"{horizon}-step horizon")
    acts = cache["actions"]
    past = np.stack([acts[:, hist[t] - fs + np.arange(fs)] for t in range(1, th)], 1)  # (G, Th-1, s, 2)
    future = acts[:, last:last + horizon][:, None]  # (G, 1, L, 2)
    tens = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    with torch.no_grad():
        roll = model.rollout(tens(cache["features"][:, hist]), tens(future), cam_pose=tens(cache["cam_pose"][:, hist]),
                             proprio=tens(cache["proprio"][:, hist]) if "proprio" in cache else None,
                             past_actions=tens(past))
    return roll.positions[:, 0].numpy(), last


def rollout_errors(model: torch.nn.Module, cache: dict[str, np.ndarray], horizons: list[int],
                   min_pixels: int = 20, objects: np.ndarray | None = None) -> RolloutErrors:
    """Roll every cached segment's recorded commands out open loop from its first `history` frames
    (`frameskip` steps apart) and compare each object's predicted planar position, in the slot the
    encoder gave it, with the simulator's `h` steps after the last history frame.

    cache: as `worldmodel.train_predictor.encode_clip_arrays` gives it. horizons: env steps, each a
    whole number of predictor frames. objects (G, J): only these object indices (-1 = none) count.
    The baseline predicts that each object stays where its slot's centre estimate put it."""
    cfg = model.cfg
    fs = cfg.frameskip
    if any(h < fs or h % fs for h in horizons):
        raise ValueError(f"horizons must be whole predictor frames of {fs} env steps; got {horizons}")
    g = cache["features"].shape[0]
    pred, last = open_loop_positions(model, cache, max(horizons))
    still = cache["features"][:, last, :, -5:-3]
    out_model: dict[int, list[float]] = {h: [] for h in horizons}
    out_still: dict[int, list[float]] = {h: [] for h in horizons}
    out_moved: dict[int, list[float]] = {h: [] for h in horizons}
    for s in range(g):
        for k, o in enumerate(cache["slot_object"][s]):
            if o < 0 or cache["object_pixels"][s, last, o] < min_pixels:
                continue
            if objects is not None and o not in objects[s]:
                continue
            for h in horizons:
                true = cache["object_poses"][s, last + h, o, :2]
                if np.isfinite(true).all():
                    out_model[h].append(float(np.linalg.norm(pred[s, h // fs - 1, k] - true)))
                    out_still[h].append(float(np.linalg.norm(still[s, k] - true)))
                    out_moved[h].append(float(np.linalg.norm(cache["object_poses"][s, last, o, :2] - true)))
    as_arrays = lambda d: {h: np.asarray(v) for h, v in d.items()}
    return RolloutErrors(model=as_arrays(out_model), still=as_arrays(out_still), moved=as_arrays(out_moved))


# ---------------------------------------------------------------------------- counterfactual segments


def _frame(obs: dict[str, np.ndarray], info: dict[str, Any]) -> dict[str, np.ndarray]:
    return {**{k: obs[k] for k in FRAME_KEYS[:-1]}, "segmentation": info["segmentation"],
            "object_poses": info["object_poses"].astype(np.float32)}


def _replay(env: Any, start: dict[str, Any], actions: np.ndarray, change: Any = None) -> list[dict[str, np.ndarray]]:
    """From the saved state `start`, apply `change(env) -> (obs, info)` (or observe as is), then the commands."""
    env.set_state(start)
    obs, info = change(env) if change is not None else env.place_object(0, *env.object_poses()[0])
    frames = [_frame(obs, info)]
    for a in actions:
        obs, _, _, _, info = env.step(a)
        frames.append(_frame(obs, info))
    return frames


def _free(p: np.ndarray, env: Any, skip: tuple[int, ...]) -> bool:
    from sim.env import ARENA_HALF

    others = [q[:2] for i, q in enumerate(env.object_poses()) if i not in skip]
    return bool(np.all(np.abs(p) < ARENA_HALF - 0.15) and np.linalg.norm(p - env.robot_pose()[:2]) > CLEARANCE_M
                and all(np.linalg.norm(p - q) > CLEARANCE_M for q in others))


def record_counterfactuals(seeds: list[int], steps: int, push_after: int, *, level: str = "easy",
                           image_size: int = 64, approach_steps: int = 200, reach_m: float = 0.3,
                           min_push_m: float = 0.03, progress: bool = False) -> dict[str, Any]:
    """Counterfactual segments of `steps` commands on EgoPush-Single (see the module docstring).

    For each seed the expert drives until its pusher is within `reach_m` of the box's centre; that
    state is the segment's start. The expert's next `steps` commands make the factual segment; a seed
    is kept when the box then moves at least `min_push_m` after step `push_after` (the last history
    frame) and both interventions have room. -> {"seeds": [...], variant: {key: (G, steps + 1, ...)},
    "changed": {variant: (G, 2) object indices}}; "actions" (G, steps + 1, 2), the last one 0."""
    from sim.collect import make_policy
    from sim.env import EgoPushEnv

    env = EgoPushEnv(task="single", level=level, image_size=image_size, segmentation=True)
    out: dict[str, Any] = {"seeds": [], "changed": {v: [] for v in VARIANTS}, "actions": []}
    frames: dict[str, list] = {v: [] for v in VARIANTS}
    try:
        for seed in tqdm(seeds, desc="counterfactual segments", disable=not progress, dynamic_ncols=True):
            obs, info = env.reset(seed=seed)
            expert = make_policy("expert", seed)
            expert.reset(obs, info)
            for _ in range(approach_steps):
                pusher = env.pusher_point()
                if np.linalg.norm(pusher - env.object_poses()[0, :2]) < reach_m:
                    break
                obs, _, term, trunc, info = env.step(expert.act(obs, info))
                if term or trunc:
                    break
            else:
                continue
            if np.linalg.norm(env.pusher_point() - env.object_poses()[0, :2]) >= reach_m or info["is_success"]:
                continue
            start = env.get_state()
            shadow = copy.deepcopy(expert)
            actions = []
            o, i = obs, info
            for _ in range(steps):
                a = np.asarray(shadow.act(o, i), np.float32)
                actions.append(a)
                o, _, _, _, i = env.step(a)
            actions = np.stack(actions)
            factual = _replay(env, start, actions)
            box = np.stack([f["object_poses"][0, :2] for f in factual])
            if np.linalg.norm(box[-1] - box[push_after]) < min_push_m:
                continue
            # move: the box sideways (to the robot's left or right), out of the path
            env.set_state(start)
            yaw = env.robot_pose()[2]
            side = np.array([-np.sin(yaw), np.cos(yaw)])
            place = next((box[0] + sgn * SHIFT_M * side for sgn in (1, -1)
                          if _free(box[0] + sgn * SHIFT_M * side, env, (0,))), None)
            # swap: the box and the distractor nearest to it exchange places
            poses = env.object_poses()
            if place is None or len(poses) < 2:
                continue
            other = 1 + int(np.argmin(np.linalg.norm(poses[1:, :2] - poses[0, :2], axis=1)))
            moved = _replay(env, start, actions, lambda e, p=place: e.place_object(0, *p))

            def swap(e: Any, j: int = other) -> tuple[dict, dict]:
                p = e.object_poses()  # the two overlap for a moment: placing does not step the physics
                e.place_object(0, *p[j, :2])
                return e.place_object(j, *p[0, :2])

            swapped = _replay(env, start, actions, swap)
            out["seeds"].append(seed)
            out["actions"].append(np.concatenate([actions, np.zeros((1, 2), np.float32)]))
            for v, f, changed in (("factual", factual, (0, -1)), ("move", moved, (0, -1)),
                                  ("swap", swapped, (0, other))):
                frames[v].append({k: np.stack([x[k] for x in f]) for k in f[0]})
                out["changed"][v].append(changed)
    finally:
        env.close()
    for v in VARIANTS:
        out[v] = {k: np.stack([f[k] for f in frames[v]]) for k in frames[v][0]} if frames[v] else {}
        out["changed"][v] = np.asarray(out["changed"][v], np.int64).reshape(-1, 2)
    out["actions"] = np.stack(out["actions"]) if out["actions"] else np.zeros((0, steps + 1, 2), np.float32)
    return out


def encode_counterfactuals(encoder: torch.nn.Module, record: dict[str, Any], batch: int = 8,
                           seed: int = 0, match_frames: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Each variant's segments as a predictor cache (`encode_clip_arrays`; objects matched to slots
    on the first `match_frames` steps, None = all)."""
    from worldmodel.train_predictor import encode_clip_arrays

    caches = {}
    for v in VARIANTS:
        arr = record[v]
        if not arr:
            continue

        def frames(i: int, j: int, arr: dict[str, np.ndarray] = arr) -> dict[str, torch.Tensor]:
            t = {k: torch.from_numpy(np.ascontiguousarray(arr[k][i:j])) for k in FRAME_KEYS if k != "proprio"}
            t["depth"] = t["depth"].float()
            return t

        per_step = {"actions": record["actions"], "cam_pose": arr["cam_pose"], "object_poses": arr["object_poses"],
                    "proprio": arr["proprio"]}
        caches[v] = encode_clip_arrays(encoder, frames, len(arr["rgb"]), per_step, batch, seed,
                                       match_frames=match_frames)
    return caches
