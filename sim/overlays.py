"""What `ego-view` draws into the 3D scene, as plain MuJoCo decor geoms (no torch here).

Markers are computed once per step and written into any `mjvScene`: the passive viewer's
`user_scn` in a window, or the offscreen scene of the headless video. Colours are emissive
and unlit, so that each overlay keeps one exact, recognisable colour on screen:

  goal                 yellow poles with a ball on top, one per goal / formation slot
  base path            magenta capsules: where the current action chunk drives the base
  world-model objects  cyan balls: object positions decoded from the world model's slots
  predicted tracks     cyan capsules: the world model's predicted object trajectories

World-model overlays come from an *overlay provider* (any object with `reset(obs, info)`
and `update(obs, planned_actions) -> OverlayFrame`), named by a Hydra `_target_` so that
`sim` never imports the learners (see `worldmodel.overlay.SlotOverlay` and `PredictionOverlay`).
A provider may also define `observe_action(action)`: the viewer calls it with every action the
robot executed, before the `update` that sees the observation it led to.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import mujoco
import numpy as np

from sim.env import CONTROL_HZ

# RGBA of each overlay: pure, saturated colours that nothing in the scene has.
GOAL_RGBA = (1.0, 1.0, 0.0, 1.0)
PATH_RGBA = (1.0, 0.0, 1.0, 1.0)
SLOT_RGBA = (0.0, 1.0, 1.0, 1.0)
TRACK_RGBA = (0.0, 1.0, 1.0, 0.8)

PATH_HORIZON_S = 1.0  # a controller with no plan is assumed to repeat its last action this long
PATH_Z = 0.012  # the path floats just above the floor (and the goal discs)


@dataclass
class OverlayFrame:
    """What a world-model overlay provider reports for one step (world frame, metres).

    points: (K, 3) object positions decoded from the slots; labels: one short name per point.
    trajectories: predicted positions per object, each (H, 3), first row = the next step.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    labels: list[str] = field(default_factory=list)
    trajectories: list[np.ndarray] = field(default_factory=list)


@runtime_checkable
class OverlayProvider(Protocol):
    """A world-model view of the scene, drawn by `ego-view`; built from a Hydra `_target_`.
    Optional: `observe_action(action)`, called with each executed action (see the module docstring)."""

    def reset(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> None: ...

    def update(self, obs: dict[str, np.ndarray], planned_actions: np.ndarray | None) -> OverlayFrame: ...


@dataclass
class Marker:
    """One decor geom. With `ends`, a connector (capsule, line, arrow) from ends[0] to ends[1] of
    radius `size[0]`; otherwise a geom of `type` and `size` at `pos` with orientation `mat`."""

    type: int
    rgba: tuple[float, float, float, float]
    size: np.ndarray = field(default_factory=lambda: np.zeros(3))
    pos: np.ndarray = field(default_factory=lambda: np.zeros(3))
    mat: np.ndarray = field(default_factory=lambda: np.eye(3).ravel())
    ends: tuple[np.ndarray, np.ndarray] | None = None
    label: str = ""


def add_markers(scene: mujoco.MjvScene, markers: Iterable[Marker]) -> int:
    """Append markers to `scene` after its current geoms (as many as fit); returns how many were added."""
    added = 0
    for m in markers:
        if scene.ngeom >= scene.maxgeom:
            break
        g = scene.geoms[scene.ngeom]
        mujoco.mjv_initGeom(g, m.type, np.asarray(m.size, float), np.asarray(m.pos, float),
                            np.asarray(m.mat, float).ravel(), np.asarray(m.rgba, np.float32))
        if m.ends is not None:
            start, end = (np.asarray(p, float) for p in m.ends)
            mujoco.mjv_connector(g, m.type, float(m.size[0]), start, end)
        g.category = mujoco.mjtCatBit.mjCAT_DECOR
        g.emission = 1.0  # unlit: the overlay keeps its exact colour
        g.specular = 0.0
        g.reflectance = 0.0
        g.castshadow = False
        g.label = m.label
        scene.ngeom += 1
        added += 1
    return added


# ---------------------------------------------------------------------------- kinematics


def integrate_unicycle(pose: Sequence[float], actions: np.ndarray, dt: float = 1.0 / CONTROL_HZ) -> np.ndarray:
    """Planar poses (H + 1, 3) reached from `pose` (x, y, yaw) by actions (H, 2) = (v, omega),
    each held for dt: the differential-drive base's kinematics, exact for constant v and omega."""
    x, y, yaw = (float(p) for p in pose)
    out = [(x, y, yaw)]
    for v, w in np.asarray(actions, float).reshape(-1, 2):
        if abs(w) < 1e-6:
            x += v * dt * np.cos(yaw)
            y += v * dt * np.sin(yaw)
        else:  # an arc of radius v / w
            x += v / w * (np.sin(yaw + w * dt) - np.sin(yaw))
            y -= v / w * (np.cos(yaw + w * dt) - np.cos(yaw))
        yaw += w * dt
        out.append((x, y, yaw))
    return np.array(out)


def planned_actions(controller: Any, last_action: np.ndarray | None, horizon_s: float = PATH_HORIZON_S) -> np.ndarray:
    """(H, 2) actions the controller will take from now on: its `planned_actions()` when it has
    one (an action-chunk policy's buffer, a planner's plan), else its last action held `horizon_s`."""
    hook = getattr(controller, "planned_actions", None)
    if callable(hook):
        plan = hook()
        if plan is not None:
            plan = np.asarray(plan, float).reshape(-1, 2)
            if len(plan):
                return plan
    if last_action is None:
        return np.zeros((0, 2))
    steps = max(1, round(horizon_s * CONTROL_HZ))
    return np.repeat(np.asarray(last_action, float).reshape(1, 2), steps, axis=0)


# ---------------------------------------------------------------------------- marker builders


def goal_markers(goals: np.ndarray, height: float = 0.3) -> list[Marker]:
    """A pole with a ball on top at every goal point (G, 2)."""
    out = []
    for gx, gy in np.asarray(goals, float).reshape(-1, 2):
        base, top = np.array([gx, gy, 0.0]), np.array([gx, gy, height])
        out.append(Marker(mujoco.mjtGeom.mjGEOM_CAPSULE, GOAL_RGBA, size=np.array([0.008, 0, 0]), ends=(base, top)))
        out.append(Marker(mujoco.mjtGeom.mjGEOM_SPHERE, GOAL_RGBA, size=np.full(3, 0.025), pos=top))
    return out


def polyline_markers(points: np.ndarray, rgba: tuple[float, ...], radius: float) -> list[Marker]:
    """Capsules joining consecutive points (N, 3); segments shorter than 1 mm are skipped."""
    pts = np.asarray(points, float).reshape(-1, 3)
    out = []
    for a, b in itertools.pairwise(pts):
        if np.linalg.norm(b - a) > 1e-3:
            out.append(Marker(mujoco.mjtGeom.mjGEOM_CAPSULE, rgba, size=np.array([radius, 0, 0]), ends=(a, b)))
    return out


def path_markers(robot_pose: Sequence[float], actions: np.ndarray) -> list[Marker]:
    """The base path that `actions` (H, 2) drive from `robot_pose`, with a ball at its end."""
    if len(actions) == 0:
        return []
    poses = integrate_unicycle(robot_pose, actions)
    if np.abs(poses[:, :2] - poses[0, :2]).max() < 1e-3:  # standing still (turning in place included)
        return []
    pts = np.column_stack([poses[:, :2], np.full(len(poses), PATH_Z)])
    out = polyline_markers(pts, PATH_RGBA, 0.012)
    out.append(Marker(mujoco.mjtGeom.mjGEOM_SPHERE, PATH_RGBA, size=np.full(3, 0.022), pos=pts[-1]))
    return out


def world_model_markers(frame: OverlayFrame) -> list[Marker]:
    """Balls at the decoded object positions and capsules along the predicted trajectories."""
    out = []
    labels = list(frame.labels) + [""] * len(frame.points)
    for p, label in zip(np.asarray(frame.points, float).reshape(-1, 3), labels):
        out.append(Marker(mujoco.mjtGeom.mjGEOM_SPHERE, SLOT_RGBA, size=np.full(3, 0.03), pos=p, label=label))
    for track in frame.trajectories:
        out += polyline_markers(track, TRACK_RGBA, 0.007)
    return out
