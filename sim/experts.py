"""Scripted experts for EgoPush, and a random-exploration policy for world-model data.

The expert's decisions use exact poses, but only of what its camera has seen, as
EgoPush's privileged teacher does: `info["visible"]` / `info["goal_visible"]` come
from a virtual field of view (frustum, range, occlusion), and the expert keeps a
memory of the last pose it saw of each object and goal. With nothing useful in
memory it searches (turn in place, then move to a lookout point and turn again),
so its behaviour can be imitated from egocentric input alone.

Pushing: go to a point behind the box on the box-goal line (along a grid path
around the objects it remembers), turn to face the box, push with the plate's
normal towards the goal while steering to keep the box centred on the plate, and
re-approach when the box drifts off the plate. In the formation task each box is
pushed along a path planned for it around the anchor and the boxes already placed,
first somewhere else when the pushing position is taken, and given up for a while
when it makes no progress.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.env import ACTION_HIGH, ACTION_LOW, ARENA_HALF, PUSHER_OFFSET
from sim.geometry import point_segment_distance, to_local, wrap_angle

LOOKOUTS = np.array([[0.0, 0.0], [0.6, 0.6], [-0.6, -0.6], [0.6, -0.6], [-0.6, 0.6]])


@dataclass
class ExpertConfig:
    v_max: float = 0.25
    w_max: float = 1.8
    standoff: float = 0.12  # gap between the pusher and the box face at the approach point
    box_half: float = 0.05
    obstacle_clearance: float = 0.24  # robot centre to an obstacle's centre
    target_clearance: float = 0.23  # robot centre to the pushed box's centre while going behind it
    corridor: float = 0.18  # half-width of the swept path of a push that must be free of other objects
    behind_clearance: float = 0.17  # an object nearer than this to the pushing position blocks it
    box_lookahead: float = 0.25  # metres along a box's planned path to push towards
    lookahead: float = 0.1  # metres along a planned path to steer at
    push_lateral_limit: float = 0.075  # box centre off the plate's centre line before re-approach
    patience: int = 60  # pushing steps without the box getting 2 cm closer before giving up on it for a while
    place_tolerance: float = 0.04  # formation: push a box until it is this near its slot...
    placed_tolerance: float = 0.06  # ...and count it as placed (left alone) while it stays this near
    # noise injection with recovery (DART-like): executed = label + noise, recorded = label
    noise_std: tuple[float, float] = (0.0, 0.0)
    noise_prob: float = 0.0  # probability that an episode step falls in a noisy burst
    seed: int | None = None
    # the goal counts as seen only within this planar distance of the robot (None: wherever the virtual field
    # of view sees it, up to 3 m). The learner's 64x64 camera shows a far goal disc as a few pixels (5 at
    # 1.5 m), too few for its encoder to give it an object of its own; an expert that acts on such a goal
    # does what its student cannot explain from its frames, so demonstrations for that student go nearer
    goal_range_m: float | None = None

    def __post_init__(self) -> None:
        if self.goal_range_m is not None and not self.goal_range_m > 0:
            raise ValueError(f"goal_range_m must be a positive distance in metres or None; got {self.goal_range_m!r}")


def _heading_control(err: float, w_max: float, k: float = 3.0) -> float:
    return float(np.clip(k * err, -w_max, w_max))


class PushExpert:
    """Scripted expert for both tasks (single: one box to its goal; formation: three boxes to slots)."""

    def __init__(self, config: ExpertConfig | None = None, **overrides: Any) -> None:
        self.cfg = config or ExpertConfig(**overrides)
        self.rng = np.random.default_rng(self.cfg.seed)
        self.planner = shared_planner()
        self.label: np.ndarray | None = None

    # ------------------------------------------------------------------ Controller API
    def reset(self, obs: dict, info: dict) -> None:
        n, g = len(info["object_names"]), len(info["goal"])
        self.formation = info.get("formation") or None
        self.pushable = [0] if g == 1 and not info.get("formation") else [1, 2, 3]
        self.mem_obj: list[np.ndarray | None] = [None] * n
        self.mem_goal: list[np.ndarray | None] = [None] * g
        self.assignment: tuple[int, int] | None = None
        self.mode = "search"
        self.search_steps = 0
        self.lookout = 0
        self.lookout_target: np.ndarray | None = None
        self.backoff = 0
        self.stuck_counter = 0
        self.escape = 0
        self.last_pose: np.ndarray | None = None
        self.unseen_in_view = np.zeros(n, int)
        self.noise_left = 0
        self.t = 0
        self.blocked: dict[tuple[int, int], int] = {}
        self.progress_task: tuple[int, int] | None = None
        self.progress_best, self.progress_steps = np.inf, 0
        self._update_memory(info)

    def act(self, obs: dict, info: dict | None = None) -> np.ndarray:
        if info is None:
            raise ValueError("PushExpert needs the env's info dict (it reads the virtual field of view)")
        self._update_memory(info)
        pose = np.asarray(info["robot_pose"], float)
        label = self._decide(pose)
        self.label = label
        return self._maybe_noise(label)

    # ------------------------------------------------------------------ perception memory
    def _update_memory(self, info: dict) -> None:
        poses, visible = info["object_poses"], info["visible"]
        pose = np.asarray(info["robot_pose"], float)
        for i in range(len(self.mem_obj)):
            if visible[i]:
                self.mem_obj[i] = poses[i].copy()
                self.unseen_in_view[i] = 0
            elif self.mem_obj[i] is not None and self._should_see(pose, i):
                # remembered where it should now be in plain view, yet not seen: it was moved
                self.unseen_in_view[i] += 1
                if self.unseen_in_view[i] > 3:
                    self.mem_obj[i] = None
                    self.unseen_in_view[i] = 0
                    if self.assignment is not None and self.assignment[0] == i:
                        self.assignment = None
        goal_visible = np.asarray(info["goal_visible"], bool)
        if self.cfg.goal_range_m is not None:
            goal_visible = goal_visible & (np.linalg.norm(np.asarray(info["goal"], float)[:, :2] - pose[:2], axis=-1)
                                           <= self.cfg.goal_range_m)
        anchor_seen = bool(info.get("formation")) and visible[0]
        for k in range(len(self.mem_goal)):
            if goal_visible[k] or anchor_seen:  # formation slots follow from the anchor's pose
                self.mem_goal[k] = np.asarray(info["goal"][k], float).copy()

    def _should_see(self, pose: np.ndarray, i: int) -> bool:
        """Whether remembered object i would be in plain view now (ahead, in range, nothing remembered in between)."""
        p = self.mem_obj[i][:2]
        local = to_local(p, pose)
        if not (0.45 < local[0] < 1.2 and abs(local[1]) < 0.35 * local[0]):
            return False
        return not any(
            point_segment_distance(m[:2], pose[:2], p) < 0.12
            for j, m in enumerate(self.mem_obj)
            if m is not None and j != i
        )

    # ------------------------------------------------------------------ decisions
    def _decide(self, pose: np.ndarray) -> np.ndarray:
        self.t += 1
        if self.escape > 0:  # unstick: back up while turning
            self.escape -= 1
            return np.array([-0.15, 1.2], np.float32)
        if self._stuck(pose):
            self.escape = 8
            self.assignment = None
            return np.array([-0.15, 1.2], np.float32)
        if self.backoff > 0:  # formation: back away from a box just placed
            self.backoff -= 1
            return np.array([-0.18, 0.0], np.float32)

        task = self._choose_task(pose)
        if self.backoff > 0:  # _choose_task saw the box of its assignment arrive
            self.backoff -= 1
            return np.array([-0.18, 0.0], np.float32)
        if task is None:
            return self._search(pose)
        self.search_steps = 0
        self.lookout_target = None
        box_i, goal_k = task
        box = self.mem_obj[box_i][:2]
        if self._no_progress(task, box):
            # this box will not go: try another one (or, alone, try again after backing away)
            self.blocked[task] = self.t + 200
            self.assignment = None
            self.escape = 8
            return np.array([-0.15, 1.2], np.float32)
        return self._push(pose, box_i, box, self._push_target(box, goal_k))

    def _no_progress(self, task: tuple[int, int], box: np.ndarray) -> bool:
        """True when the box has come no closer to its goal during `patience` steps of pushing."""
        dist = float(np.linalg.norm(box - self.mem_goal[task[1]]))
        if task != self.progress_task or dist < self.progress_best - 0.02:
            self.progress_task, self.progress_best, self.progress_steps = task, dist, 0
            return False
        self.progress_steps += self.mode == "push"
        if self.progress_steps > self.cfg.patience:
            self.progress_task = None
            return True
        return False

    def _push_target(self, box: np.ndarray, goal_k: int) -> np.ndarray:
        """Where to push the box now: straight to its goal when the swept path is clear, else to a
        point ahead on a path planned for the box around the anchor and the boxes already placed."""
        goal = self.mem_goal[goal_k]
        if self.formation is None or self.mem_obj[0] is None:
            return goal
        others = [m[:2] for m in self.mem_obj if m is not None and np.linalg.norm(m[:2] - box) > 1e-6]
        target = goal
        if any(point_segment_distance(o, box, goal) <= self.cfg.corridor for o in others):
            # push along a path planned for the box around the anchor and the other boxes
            path = self.planner.plan(box, goal, [(o, self.cfg.corridor) for o in others])
            along = np.cumsum(np.r_[0.0, np.linalg.norm(np.diff(path, axis=0), axis=1)])
            target = path[min(np.searchsorted(along, self.cfg.box_lookahead), len(path) - 1)]
        if self._behind_blocked(box, target, others):
            # the robot cannot get behind the box for this push: first push it somewhere it can
            best, best_dist = target, np.inf
            for a in np.linspace(-np.pi, np.pi, 12, endpoint=False):
                cand = box + 0.15 * np.array([np.cos(a), np.sin(a)])
                if np.any(np.abs(cand) > ARENA_HALF - 0.2) or self._behind_blocked(box, cand, others):
                    continue
                if any(point_segment_distance(o, box, cand) <= self.cfg.corridor - 0.04 for o in others):
                    continue
                if np.linalg.norm(cand - goal) < best_dist:
                    best, best_dist = cand, np.linalg.norm(cand - goal)
            target = best
        return target

    def _behind_blocked(self, box: np.ndarray, target: np.ndarray, others: list[np.ndarray]) -> bool:
        """Whether another object stands where the robot must be to push the box towards target."""
        u = (target - box) / max(np.linalg.norm(target - box), 1e-6)
        behind = box - u * (PUSHER_OFFSET + self.cfg.box_half + 0.05)
        return any(np.linalg.norm(o - behind) < self.cfg.behind_clearance for o in others)

    def _stuck(self, pose: np.ndarray) -> bool:
        if self.last_pose is not None and self.mode in ("approach", "push"):
            moved = np.linalg.norm(pose[:2] - self.last_pose[:2]) + 0.1 * abs(wrap_angle(pose[2] - self.last_pose[2]))
            self.stuck_counter = self.stuck_counter + 1 if moved < 0.003 else 0
        self.last_pose = pose
        if self.stuck_counter > 15:
            self.stuck_counter = 0
            return True
        return False

    def _choose_task(self, pose: np.ndarray) -> tuple[int, int] | None:
        """(object index, goal index) to work on, from memory; None when more must be seen."""
        if len(self.mem_goal) == 1:
            if self.mem_obj[0] is None or self.mem_goal[0] is None:
                return None
            return 0, 0
        if self.assignment is not None:
            i, k = self.assignment
            if self.mem_obj[i] is not None and self.mem_goal[k] is not None:
                if np.linalg.norm(self.mem_obj[i][:2] - self.mem_goal[k]) > self.cfg.place_tolerance:
                    return self.assignment
                # placed: back away from it before choosing the next box
                self.assignment = None
                self.backoff = 6
                return None
            self.assignment = None
        if any(g is None for g in self.mem_goal):
            return None
        goals = np.array(self.mem_goal)
        known = [i for i in self.pushable if self.mem_obj[i] is not None]
        placed_goal, placed_box = set(), set()
        # slots already holding a box count as done
        for i in known:
            d = np.linalg.norm(goals - self.mem_obj[i][:2], axis=1)
            k = int(np.argmin(d))
            if d[k] < self.cfg.placed_tolerance and k not in placed_goal:
                placed_goal.add(k)
                placed_box.add(i)
        free_goals = [k for k in range(len(goals)) if k not in placed_goal]
        candidates = [i for i in known if i not in placed_box]
        if not free_goals or not candidates:
            return None
        obstacles = [self.mem_obj[j][:2] for j in range(len(self.mem_obj)) if self.mem_obj[j] is not None]
        best, best_cost = None, np.inf
        for i in candidates:
            b = self.mem_obj[i][:2]
            for k in free_goals:
                if self.blocked.get((i, k), -1) > self.t:
                    continue
                g = goals[k]
                cost = np.linalg.norm(pose[:2] - b) + 1.5 * np.linalg.norm(b - g)
                # pushing through another object or a filled slot is costly
                for o in obstacles + [goals[j] for j in placed_goal]:
                    if np.linalg.norm(o - b) < 1e-6:
                        continue
                    if point_segment_distance(o, b, g) < 0.14:
                        cost += 1.0
                # the behind-point must be inside the arena
                behind = b - (g - b) / max(np.linalg.norm(g - b), 1e-6) * 0.3
                if np.any(np.abs(behind) > ARENA_HALF - 0.12):
                    cost += 2.0
                if cost < best_cost:
                    best, best_cost = (i, k), cost
        if best is None and self.blocked:  # everything left is blocked: retry all
            self.blocked.clear()
            return self._choose_task(pose)
        self.assignment = best
        return best

    def _search(self, pose: np.ndarray) -> np.ndarray:
        """Turn in place for a full turn; if still missing something, go to the next lookout and turn again."""
        self.mode = "search"
        self.search_steps += 1
        if self.lookout_target is None and self.search_steps <= 40:
            return np.array([0.0, 1.6], np.float32)
        if self.lookout_target is None:
            d = np.linalg.norm(LOOKOUTS - pose[:2], axis=1)
            order = np.argsort(d)
            self.lookout_target = LOOKOUTS[order[self.lookout % len(LOOKOUTS)]]
            self.lookout += 1
        if np.linalg.norm(self.lookout_target - pose[:2]) < 0.1:
            self.lookout_target = None
            self.search_steps = 0
            return np.array([0.0, 1.6], np.float32)
        return self._goto(pose, self.lookout_target, self._obstacles())

    def _obstacles(self, exclude: int | None = None) -> list[tuple[np.ndarray, float]]:
        """Remembered objects as (centre, clearance the robot's centre must keep)."""
        return [(m[:2], self.cfg.obstacle_clearance) for j, m in enumerate(self.mem_obj) if m is not None and j != exclude]

    def _push(self, pose: np.ndarray, box_i: int, box: np.ndarray, goal: np.ndarray) -> np.ndarray:
        c = self.cfg
        to_goal = goal - box
        dist_bg = np.linalg.norm(to_goal)
        u = to_goal / max(dist_bg, 1e-6)
        phi = np.arctan2(u[1], u[0])
        local = to_local(box, pose)  # box centre in the robot frame
        heading_err = wrap_angle(phi - pose[2])
        contact = PUSHER_OFFSET + c.box_half

        in_contact = (
            contact - 0.04 < local[0] < contact + c.standoff + 0.08
            and abs(local[1]) < c.push_lateral_limit
            and abs(heading_err) < 0.7
        )
        if self.mode == "push" and not in_contact:
            self.mode = "approach"
        if self.mode == "push":
            # plate normal towards the goal, corrected to keep the box centred on the plate
            desired = phi + np.clip(2.5 * local[1], -0.5, 0.5)
            err = wrap_angle(desired - pose[2])
            v = min(c.v_max, 0.6 * dist_bg + 0.04) * max(np.cos(err), 0.0)
            return self._clip(v, _heading_control(err, c.w_max, 2.5))

        behind = box - u * (contact + c.standoff)
        behind = np.clip(behind, -(ARENA_HALF - 0.15), ARENA_HALF - 0.15)
        dist_behind = np.linalg.norm(pose[:2] - behind)
        if self.mode == "align" and dist_behind > 0.07:
            self.mode = "approach"
        if self.mode == "approach" and dist_behind < 0.035:
            self.mode = "align"
        if self.mode == "align":
            # turn in place to face the box; push once the robot, box and goal are in line
            to_box = np.arctan2(box[1] - pose[1], box[0] - pose[0])
            facing_err = wrap_angle(to_box - pose[2])
            if abs(facing_err) > 0.1:
                return self._clip(0.0, _heading_control(facing_err, c.w_max, 2.0))
            if abs(wrap_angle(to_box - phi)) < 0.25 and contact - 0.03 < local[0] < contact + c.standoff + 0.06:
                self.mode = "push"
                return self._clip(0.08, _heading_control(facing_err, c.w_max))
        self.mode = "approach"
        obstacles = self._obstacles(exclude=box_i) + [(box, c.target_clearance)]
        return self._goto(pose, behind, obstacles)

    def _goto(self, pose: np.ndarray, target: np.ndarray, obstacles: list[tuple[np.ndarray, float]]) -> np.ndarray:
        """Drive towards target: straight when the way is clear, else along a grid path around obstacles."""
        c = self.cfg
        waypoint = target
        blocked = any(point_segment_distance(o, pose[:2], target) < r for o, r in obstacles)
        if blocked:
            path = self.planner.plan(pose[:2], target, obstacles)
            along = np.cumsum(np.r_[0.0, np.linalg.norm(np.diff(path, axis=0), axis=1)])
            waypoint = path[min(np.searchsorted(along, c.lookahead), len(path) - 1)]
        delta = waypoint - pose[:2]
        dist = np.linalg.norm(delta)
        err = wrap_angle(np.arctan2(delta[1], delta[0]) - pose[2])
        v = min(c.v_max, 1.2 * np.linalg.norm(target - pose[:2]) + 0.03) * max(np.cos(err), 0.0) ** 2
        if abs(err) > 1.0 or dist < 1e-3:
            v = 0.0
        return self._clip(v, _heading_control(err, c.w_max))

    def _clip(self, v: float, w: float) -> np.ndarray:
        return np.clip(np.array([v, w], np.float32), ACTION_LOW, ACTION_HIGH)

    def _maybe_noise(self, label: np.ndarray) -> np.ndarray:
        c = self.cfg
        if c.noise_prob <= 0 or max(c.noise_std) <= 0:
            return label
        if self.noise_left == 0 and self.rng.random() < c.noise_prob / 5.0:
            self.noise_left = int(self.rng.integers(3, 8))  # a burst of a few steps
        if self.noise_left > 0:
            self.noise_left -= 1
            noisy = label + self.rng.normal(0.0, 1.0, 2) * np.asarray(c.noise_std)
            return np.clip(noisy, ACTION_LOW, ACTION_HIGH).astype(np.float32)
        return label


class GridPlanner:
    """Shortest paths for the robot's centre on a 5 cm grid of the arena, around known obstacles.

    Cells near an obstacle are not forbidden but expensive, so a path always exists,
    even when the robot starts inside an inflated obstacle.
    """

    def __init__(self, resolution: float = 0.05, wall_clearance: float = 0.14) -> None:
        self.res = resolution
        half = ARENA_HALF - wall_clearance
        self.coords = np.arange(-half, half + 1e-9, resolution)
        n = len(self.coords)
        self.n = n
        gx, gy = np.meshgrid(self.coords, self.coords, indexing="ij")
        self.cells = np.stack([gx.ravel(), gy.ravel()], axis=1)  # (n*n, 2)
        idx = np.arange(n * n).reshape(n, n)
        rows, cols, lengths = [], [], []
        for di, dj in ((1, 0), (0, 1), (1, 1), (1, -1)):  # each undirected 8-neighbour edge once
            j0, j1 = max(0, -dj), n - max(0, dj)
            a = idx[0 : n - di, j0:j1].ravel()
            b = idx[di:n, j0 + dj : j1 + dj].ravel()
            rows += [a, b]
            cols += [b, a]
            lengths.append(np.full(2 * a.size, np.hypot(di, dj) * resolution))
        self.rows = np.concatenate(rows)
        self.cols = np.concatenate(cols)
        self.lengths = np.concatenate(lengths)

    def cell(self, p: np.ndarray) -> int:
        i = int(np.clip(np.rint((p[0] - self.coords[0]) / self.res), 0, self.n - 1))
        j = int(np.clip(np.rint((p[1] - self.coords[0]) / self.res), 0, self.n - 1))
        return i * self.n + j

    def plan(self, start: np.ndarray, goal: np.ndarray, obstacles: list[tuple[np.ndarray, float]]) -> np.ndarray:
        """Waypoints (K, 2) from start to goal; obstacles are (centre, inflation radius)."""
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import dijkstra

        cost = np.ones(len(self.cells))
        for centre, radius in obstacles:
            d = np.linalg.norm(self.cells - centre, axis=1)
            cost += np.where(d < radius, 30.0 * (1.0 + (radius - d) / radius), 0.0)
        weights = self.lengths * 0.5 * (cost[self.rows] + cost[self.cols])
        graph = csr_matrix((weights, (self.rows, self.cols)), shape=(len(self.cells),) * 2)
        s, g = self.cell(start), self.cell(goal)
        _, pred = dijkstra(graph, indices=s, return_predecessors=True)
        path = [g]
        while path[-1] != s and pred[path[-1]] >= 0:
            path.append(pred[path[-1]])
        return np.concatenate([self.cells[path[::-1]], goal[None]])


@functools.lru_cache(maxsize=1)
def shared_planner() -> GridPlanner:
    """One planner per process: its grid graph is the same for every episode."""
    return GridPlanner()


class RandomExplorer:
    """Exploration for world-model data: smooth random driving, often steered into objects so that
    the data holds many pushes. Uses the robot pose to stay off the walls."""

    def __init__(self, seed: int | None = None, push_prob: float = 0.6) -> None:
        self.rng = np.random.default_rng(seed)
        self.push_prob = push_prob
        self.label = None

    def reset(self, obs: dict, info: dict) -> None:
        self.action = np.zeros(2)
        self.target: int | None = None
        self.segment = 0

    def act(self, obs: dict, info: dict | None = None) -> np.ndarray:
        if info is None:
            raise ValueError("RandomExplorer needs the env's info dict (it reads the robot pose)")
        pose = np.asarray(info["robot_pose"], float)
        if self.segment <= 0:
            self.segment = int(self.rng.integers(10, 40))
            objs = np.asarray(info["object_poses"])
            self.target = int(self.rng.integers(len(objs))) if self.rng.random() < self.push_prob else None
        self.segment -= 1
        if self.target is not None:
            p = np.asarray(info["object_poses"])[self.target, :2]
            err = wrap_angle(np.arctan2(p[1] - pose[1], p[0] - pose[0]) - pose[2])
            a = np.array([0.2 * max(np.cos(err), 0.0), np.clip(2.5 * err, -1.8, 1.8)])
        else:
            # Ornstein-Uhlenbeck-like smooth random command with a forward bias
            self.action = 0.85 * self.action + 0.15 * np.array([0.12, 0.0]) + self.rng.normal(0, [0.05, 0.5])
            a = self.action.copy()
        # turn back towards the centre near the walls
        ahead = pose[:2] + 0.35 * np.array([np.cos(pose[2]), np.sin(pose[2])])
        if np.any(np.abs(ahead) > ARENA_HALF - 0.1):
            err = wrap_angle(np.arctan2(-pose[1], -pose[0]) - pose[2])
            a = np.array([0.05 if abs(err) < 0.5 else -0.05, np.clip(3.0 * err, -1.8, 1.8)])
        return np.clip(a, ACTION_LOW, ACTION_HIGH).astype(np.float32)


