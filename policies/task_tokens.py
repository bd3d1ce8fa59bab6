"""Object-token policies: the diffusion policy reading one token per object and goal (where it was last
seen, in the robot's frame) instead of the world model's slots, optionally told the task the scripted
expert would work on next.

The tokens come from privileged state (`info`: a diagnostic of what perfect perception would give) or
from `policies.perception.SceneMemory` over segmented RGB-D (deployable). `ExpertPlan` runs the
scripted expert's own choice of push (`sim.experts.PushExpert`) on whichever of the two the tokens
come from; `token_demos` builds training data from recorded demonstrations the same way, with the
plan replayed on the demonstrator's states. Trained and measured by
`benchmarks/policy_oracle_perception.py`.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import numpy as np

NEVER_SEEN = 1000.0
# the fields of the env's `info` (or of `SceneMemory`'s estimate) that the tokens and the expert's plan read
SCENE_KEYS = ("robot_pose", "object_poses", "goal", "visible", "goal_visible")


class ObjectTokens:
    """Per-episode memory of where each object and goal was last seen -> tokens (K, K + 5), or (K, K + 6)
    with the plan's column (`plan=True`: 1 on the box being worked on and on its goal)."""

    def __init__(self, plan: bool = False) -> None:
        self.pos: np.ndarray | None = None
        self.age: np.ndarray | None = None
        self.plan = plan

    def __call__(self, robot_pose, object_poses, goals, visible, goal_visible,
                 task: tuple[int, int] | None = None) -> np.ndarray:
        pos = np.concatenate([np.asarray(object_poses)[:, :2], np.asarray(goals)], 0)
        seen = np.concatenate([visible, goal_visible], 0).astype(bool)
        if self.pos is None:
            self.pos, self.age = pos.copy(), np.where(seen, 0.0, NEVER_SEEN)
        else:
            self.pos = np.where(seen[:, None], pos, self.pos)
            self.age = np.where(seen, 0.0, np.minimum(self.age + 1, NEVER_SEEN))
        x, y, yaw = robot_pose
        d = self.pos - np.array([x, y])
        c, s = math.cos(yaw), math.sin(yaw)
        local = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], -1)
        direction = local / np.maximum(np.linalg.norm(local, axis=-1, keepdims=True), 1e-6)
        k = len(pos)
        age = np.log1p(self.age) / np.log1p(NEVER_SEEN)
        columns = [np.eye(k), local, direction, age[:, None]]
        if self.plan:
            active = np.zeros((k, 1))
            if task is not None:
                active[task[0]] = active[len(object_poses) + task[1]] = 1.0
            columns.append(active)
        return np.concatenate(columns, -1).astype(np.float32)


class ExpertPlan:
    """The scripted expert's current (object, goal) task, from watching an episode's states step by step
    (a noise-free copy of the expert: its actions are discarded, its plan is read)."""

    def __init__(self, formation: str = "") -> None:
        from sim.experts import PushExpert

        self.expert = PushExpert()
        self.formation = formation
        self.started = False

    def info(self, robot_pose, object_poses, goals, visible, goal_visible) -> dict:
        return {"object_names": [str(i) for i in range(len(object_poses))], "formation": self.formation,
                "goal": goals, "robot_pose": robot_pose, "object_poses": object_poses, "visible": visible,
                "goal_visible": goal_visible}

    def __call__(self, robot_pose, object_poses, goals, visible,
                 goal_visible) -> tuple[tuple[int, int] | None, np.ndarray]:
        """(the task after this step's decision or None, the expert's own action label)."""
        info = self.info(robot_pose, object_poses, goals, visible, goal_visible)
        if not self.started:
            self.expert.reset({}, info)
            self.started = True
        self.expert.act({}, info)
        ex = self.expert
        if len(goals) == 1:  # Single: the one box to the one goal, once both have been seen
            known = ex.mem_obj[0] is not None and ex.mem_goal[0] is not None
            return ((0, 0) if known else None), ex.label
        return ex.assignment, ex.label


def token_demos(paths: list[str], plan: bool = False, perception: str | None = None, progress: bool = True):
    """Demonstrations as `policies.data.DemoData` with privileged tokens in place of slot tokens (and the
    expert's plan replayed over each episode with `plan`). With `perception` (a trained segmenter) the
    tokens are built from the recorded RGB-D through it instead, as at deployment; the plan is still the
    demonstrator's own (replayed on its privileged states: the actions follow it)."""
    import torch
    from tqdm import tqdm

    from policies.data import DemoData
    from policies.observation import robot_state
    from sim.dataset import EpisodeDataset

    keys = ["proprio", "cam_pose", "action", *SCENE_KEYS]
    if perception:
        from policies.perception import SceneMemory, load_segmenter
        from sim.env import task_objects

        segmenter, seg_stats = load_segmenter(perception)
        keys += ["rgb", "depth", "intrinsics"]
    state, action, tokens, lengths = [], [], [], []
    for p in paths:
        ds = EpisodeDataset.open(p)
        env_cfg = ds.meta.get("env_config", {})
        if perception:
            names = task_objects(env_cfg.get("task", "single"), int(env_cfg.get("n_distractors", 2)))
        for e in tqdm(range(ds.n_episodes), desc=f"tokens {Path(p).name}", disable=not progress):
            ep = ds.episode(e, keys)
            scene = None
            if perception:
                scene = SceneMemory(segmenter, seg_stats, names, ds.episode_info(e).get("formation") or None,
                                    n_goals=ep["goal"].shape[1])
                labels = segmenter.labels(ep["rgb"], ep["depth"])
            cam = torch.from_numpy(ep["cam_pose"])
            state.append(robot_state(torch.from_numpy(ep["proprio"]), cam, cam[:1].expand_as(cam)).numpy())
            action.append(ep["action"].astype(np.float32))
            memory = ObjectTokens(plan)
            watcher = ExpertPlan(ds.episode_info(e).get("formation", "")) if plan else None
            frames, agree = [], 0
            for t in range(len(ep["action"])):
                seen = tuple(ep[k][t] for k in SCENE_KEYS)
                task = None
                if watcher is not None:
                    task, label = watcher(*seen)
                    agree += bool(np.allclose(label, ep["action"][t], atol=1e-4))
                if scene is not None:
                    obs = {k: ep[k][t] for k in ("rgb", "depth", "intrinsics", "cam_pose")}
                    est = scene(obs, labels[t])
                    seen = tuple(est[k] for k in SCENE_KEYS)
                frames.append(memory(*seen, task=task))
            # the states are stored as float32 and the expert decided on float64: a threshold crossed by a rounding
            # error changes a few labels (at most 3% of an episode's in 185 Formation-easy demonstrations, 7.5% in
            # a long Formation-hard one); other expert settings disagree far more
            if watcher is not None and agree < 0.9 * len(frames):
                raise ValueError(f"{p} episode {e}: the replayed expert reproduces {agree} of {len(frames)} recorded "
                                 "labels; the demonstrations were recorded with other expert settings")
            tokens.append(np.stack(frames))
            lengths.append(len(ep["action"]))
    ends = np.cumsum(lengths)
    return DemoData(state=np.concatenate(state).astype(np.float32), action=np.concatenate(action),
                    starts=ends - np.array(lengths), ends=ends, tokens=np.concatenate(tokens))


class TokenPolicyController:
    """A token policy (trained by `benchmarks/policy_oracle_perception.py`) as a `sim` Controller.

    Without `perception` it reads the privileged `info` (a diagnostic); with a trained scene segmenter
    (`policies.perception`) everything comes from the observation, and with `plan` the scripted expert's
    choice of push, made on the same perceived memory, is the tokens' last column: the deployable
    two-level controller for Formation."""

    def __init__(self, checkpoint: str, seed: int = 0, threads: int = 1, n_action: int | None = None,
                 plan: bool = False, perception: str | None = None, perceive: str = "both",
                 sampler: str | None = None, steps: int | None = None) -> None:
        import torch

        from policies.train import load_policy

        torch.set_num_threads(threads)
        self.policy, _ = load_policy(checkpoint)
        self.segmenter = None
        if perceive not in ("both", "tokens", "plan"):
            raise ValueError(f"perceive must be 'both', 'tokens' or 'plan'; got {perceive!r}")
        self.perceive = perceive  # a diagnostic: which of the two reads perception (the other reads `info`)
        if perception:  # deployable: the tokens and the plan from segmented RGB-D, not from `info`
            from policies.perception import load_segmenter

            self.segmenter, self.seg_stats = load_segmenter(perception)
        self.n_action = n_action or self.policy.cfg.n_action
        self.sampler, self.steps = sampler, steps  # None: the checkpoint's own
        self.seed = seed
        self.plan = plan
        self.gen = torch.Generator()

    def reset(self, obs: dict, info: dict) -> None:
        import torch

        self.history: deque = deque(maxlen=self.policy.cfg.n_obs)
        self._buffer: list[np.ndarray] = []
        self.memory = ObjectTokens(self.plan)
        self.watcher = ExpertPlan(info.get("formation") or "") if self.plan else None
        self.scene = None
        if self.segmenter is not None:
            from policies.perception import SceneMemory

            self.scene = SceneMemory.for_episode(self.segmenter, self.seg_stats, info)
        self.start = torch.as_tensor(obs["cam_pose"]).float()
        self.gen.manual_seed(self.seed + int(np.asarray(obs["rgb"], np.int64).sum()))

    def act(self, obs: dict, info: dict | None = None) -> np.ndarray:
        import torch

        from policies.observation import robot_state

        if self.scene is not None:
            perceived = self.scene(obs)
            perceived = tuple(perceived[k] for k in SCENE_KEYS)
            # the diagnostics read one of the two from `info`; the deployable controller reads no `info` at all
            privileged = None if self.perceive == "both" else tuple(info[k] for k in SCENE_KEYS)
            seen = perceived if self.perceive in ("both", "tokens") else privileged
            plan_seen = perceived if self.perceive in ("both", "plan") else privileged
        else:
            seen = plan_seen = tuple(info[k] for k in SCENE_KEYS)
        task = self.watcher(*plan_seen)[0] if self.watcher is not None else None
        tok = self.memory(*seen, task=task)
        state = robot_state(torch.as_tensor(obs["proprio"])[None], torch.as_tensor(obs["cam_pose"]).float()[None],
                            self.start[None])[0]
        self.history.append((torch.from_numpy(tok), state))
        if not self._buffer:
            h = list(self.history)
            h = [h[0]] * (self.policy.cfg.n_obs - len(h)) + h
            chunk = self.policy.predict(torch.stack([x[0] for x in h])[None], torch.stack([x[1] for x in h])[None],
                                        sampler=self.sampler, steps=self.steps, generator=self.gen)[0].numpy()
            first = self.policy.cfg.n_obs - 1
            self._buffer = list(chunk[first:first + self.n_action])
        return self._buffer.pop(0).astype(np.float32)
