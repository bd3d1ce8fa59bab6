"""EgoPush gymnasium environments: a differential-drive robot pushes boxes to goals,
seen through its own head RGB-D camera.

Observation (DESIGN.md contract), per step:
  rgb        uint8   (H, W, 3)
  depth      float32 (H, W)   z-depth in metres, 0 = invalid (outside [0.1, 4] m or dropped out)
  intrinsics float32 (3, 3)   pinhole K, OpenCV pixel convention
  cam_pose   float32 (4, 4)   world(odometry)-from-optical-camera
  proprio    float32 (4,)     see PROPRIO_FIELDS

Action: float32 (2,) = (v m/s, omega rad/s), clipped to ACTION_LOW/ACTION_HIGH.
Control runs at 10 Hz (5 physics steps of 20 ms per env step).
Privileged state (object/goal/robot poses, visibility, segmentation) is in `info` only.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from sim.geometry import MJCAM_FROM_OPTICAL, point_segment_distance, quat_from_yaw, rot_z, wrap_angle, yaw_from_quat
from sim.render import RGBDRenderer

ASSETS = Path(__file__).resolve().parent / "assets"
SCENE_XML = ASSETS / "egopush.xml"

#: proprio layout, the one place it is defined (units: m/s, rad/s, rad/s, rad/s).
PROPRIO_FIELDS = ("base_linear_velocity", "base_angular_velocity", "wheel_left_speed", "wheel_right_speed")
ACTION_LOW = np.array([-0.25, -2.0], np.float32)
ACTION_HIGH = np.array([0.25, 2.0], np.float32)

WHEEL_RADIUS = 0.033
WHEEL_SEPARATION = 0.16
CONTROL_HZ = 10
ARENA_HALF = 1.2  # inner half-width of the walled arena, metres
DEPTH_RANGE = (0.1, 4.0)
# segmentation ids: 0 floor/sky, 1 walls, 2 robot, FIRST_OBJECT_SEG_ID + i for object i of info["object_names"],
# GOAL_SEG_ID + k for goal marker k (the goal disc, or formation slot k): what a perception model must
# see to know where to push, so world-model training treats a marker as one more object
FIRST_OBJECT_SEG_ID = 3
PUSHER_OFFSET = 0.108  # pusher face ahead of the wheel axle, metres

BOX_NAMES = ("box_anchor", "box_red", "box_green", "box_blue")
DISTRACTOR_NAMES = ("distractor_0", "distractor_1", "distractor_2")
MARKER_NAMES = ("marker_0", "marker_1", "marker_2", "marker_3")
MARKER_GROUP, HIDDEN_GROUP = 2, 5  # geom groups (see egopush.xml)
GOAL_SEG_ID = FIRST_OBJECT_SEG_ID + len(BOX_NAMES) + len(DISTRACTOR_NAMES)  # after every object of any task

# Formation slots in the anchor's frame (x along the anchor's heading): line spacing, cross arm length.
_S, _ARM = 0.22, 0.33
FORMATIONS = {
    "line": np.array([[_S, 0.0], [2 * _S, 0.0], [3 * _S, 0.0]]),
    # three arms of a plus sign with the anchor at its centre, long enough for the robot to push between them
    "cross": np.array([[_ARM, 0.0], [0.0, _ARM], [0.0, -_ARM]]),
}


def task_objects(task: str, n_distractors: int) -> list[str]:
    """The names of a task's objects in `info["object_names"]` order (segmentation id i + FIRST_OBJECT_SEG_ID
    is object i)."""
    boxes = ["box_red"] if task == "single" else list(BOX_NAMES)
    return [*boxes, *DISTRACTOR_NAMES[:n_distractors]]


@dataclass
class Randomization:
    """Domain-randomisation switches. All off = the fixed, seeded evaluation setting."""

    object_colors: bool = False
    object_sizes: bool = False
    object_masses: bool = False
    friction: bool = False
    lighting: bool = False
    camera_jitter: bool = False
    depth_noise: bool = False
    depth_dropout: bool = False
    odometry_drift: bool = False

    @classmethod
    def all_on(cls) -> "Randomization":
        return cls(**{k: True for k in asdict(cls())})


@dataclass
class EgoPushConfig:
    task: str = "single"  # "single" | "formation"
    level: str = "easy"  # "easy": objects and goal start in view; "hard": anywhere, search needed
    image_size: int | tuple[int, int] = 64  # square size or (height, width)
    max_steps: int | None = None  # None: task/level default (see DEFAULT_MAX_STEPS)
    success_tolerance: float | None = None  # metres; None: 0.07 single, 0.08 formation
    formation: str = "random"  # "line" | "cross" | "random"
    n_distractors: int = 2
    randomization: Randomization = field(default_factory=Randomization)
    segmentation: bool = False  # add per-pixel object ids to info["segmentation"]


DEFAULT_MAX_STEPS = {("single", "easy"): 250, ("single", "hard"): 400, ("formation", "easy"): 1000, ("formation", "hard"): 1200}


class EgoPushEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, config: EgoPushConfig | None = None, render_mode: str | None = None, **overrides: Any) -> None:
        cfg = config or EgoPushConfig()
        if isinstance(overrides.get("randomization"), dict):
            overrides["randomization"] = Randomization(**overrides["randomization"])
        if overrides:
            cfg = EgoPushConfig(**{**asdict(cfg), "randomization": cfg.randomization, **overrides})
        if cfg.task not in ("single", "formation"):
            raise ValueError(f"task must be 'single' or 'formation', got {cfg.task!r}")
        if cfg.level not in ("easy", "hard"):
            raise ValueError(f"level must be 'easy' or 'hard', got {cfg.level!r}")
        if cfg.formation not in ("line", "cross", "random"):
            raise ValueError(f"formation must be 'line', 'cross' or 'random', got {cfg.formation!r}")
        if not 0 <= cfg.n_distractors <= len(DISTRACTOR_NAMES):
            raise ValueError(f"n_distractors must be in [0, {len(DISTRACTOR_NAMES)}], got {cfg.n_distractors}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.config = cfg
        self.render_mode = render_mode
        h, w = (cfg.image_size, cfg.image_size) if np.isscalar(cfg.image_size) else tuple(cfg.image_size)
        self.image_shape = (int(h), int(w))
        for name in ("max_steps", "success_tolerance"):
            value = getattr(cfg, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None (task default), got {value!r}")
        self.max_steps = cfg.max_steps if cfg.max_steps is not None else DEFAULT_MAX_STEPS[(cfg.task, cfg.level)]
        tol = cfg.success_tolerance
        self.tolerance = tol if tol is not None else (0.07 if cfg.task == "single" else 0.08)

        self.model = mujoco.MjModel.from_xml_path(str(SCENE_XML))
        self.data = mujoco.MjData(self.model)
        self.n_substeps = int(round(1.0 / (CONTROL_HZ * self.model.opt.timestep)))
        self._renderer = RGBDRenderer(self.model, "head", *self.image_shape)
        self._overview: RGBDRenderer | None = None
        self._intrinsics = self._renderer.intrinsics()
        self._ids()
        self._nominal = {
            "geom_rgba": self.model.geom_rgba.copy(),
            "geom_size": self.model.geom_size.copy(),
            "geom_rbound": self.model.geom_rbound.copy(),
            "geom_aabb": self.model.geom_aabb.copy(),
            "geom_friction": self.model.geom_friction.copy(),
            "body_mass": self.model.body_mass.copy(),
            "body_inertia": self.model.body_inertia.copy(),
            "light_diffuse": self.model.light_diffuse.copy(),
            "light_dir": self.model.light_dir.copy(),
            "cam_pos": self.model.cam_pos.copy(),
            "cam_quat": self.model.cam_quat.copy(),
        }
        # Camera extrinsic in the robot body frame, as calibrated (nominal, before jitter).
        self._body_from_cam = np.eye(4)
        mujoco.mj_forward(self.model, self.data)
        self._body_from_cam[:3, :3] = (
            self.data.xmat[self.robot_body].reshape(3, 3).T @ self.data.cam_xmat[self.cam_id].reshape(3, 3) @ MJCAM_FROM_OPTICAL
        )
        self._body_from_cam[:3, 3] = self.data.xmat[self.robot_body].reshape(3, 3).T @ (
            self.data.cam_xpos[self.cam_id] - self.data.xpos[self.robot_body]
        )
        fovy = np.deg2rad(self.model.cam_fovy[self.cam_id])
        self._tan_half_fov = np.array([np.tan(fovy / 2) * w / h, np.tan(fovy / 2)])

        self.observation_space = gym.spaces.Dict(
            {
                "rgb": gym.spaces.Box(0, 255, (h, w, 3), np.uint8),
                "depth": gym.spaces.Box(0.0, DEPTH_RANGE[1], (h, w), np.float32),
                "intrinsics": gym.spaces.Box(-np.inf, np.inf, (3, 3), np.float32),
                "cam_pose": gym.spaces.Box(-np.inf, np.inf, (4, 4), np.float32),
                "proprio": gym.spaces.Box(-np.inf, np.inf, (len(PROPRIO_FIELDS),), np.float32),
            }
        )
        self.action_space = gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self.objects: list[str] = []
        self.goals = np.zeros((0, 2))
        self._steps = 0
        self._n_clipped = 0

    # ------------------------------------------------------------------ setup
    def _ids(self) -> None:
        m = self.model
        name2id = lambda t, n: mujoco.mj_name2id(m, t, n)  # noqa: E731
        self.robot_body = name2id(mujoco.mjtObj.mjOBJ_BODY, "robot")
        self.cam_id = name2id(mujoco.mjtObj.mjOBJ_CAMERA, "head")
        self.pusher_geom = name2id(mujoco.mjtObj.mjOBJ_GEOM, "robot_pusher")
        self._robot_qadr = m.jnt_qposadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, "robot_root")]
        self._robot_vadr = m.jnt_dofadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, "robot_root")]
        self._wheel_vadr = [m.jnt_dofadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, f"robot_wheel_{s}")] for s in ("left", "right")]
        self._wheel_qadr = [m.jnt_qposadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, f"robot_wheel_{s}")] for s in ("left", "right")]
        self._obj = {}
        for n in BOX_NAMES + DISTRACTOR_NAMES:
            j = name2id(mujoco.mjtObj.mjOBJ_JOINT, n)
            self._obj[n] = dict(
                body=name2id(mujoco.mjtObj.mjOBJ_BODY, n), geom=name2id(mujoco.mjtObj.mjOBJ_GEOM, n),
                qadr=m.jnt_qposadr[j], vadr=m.jnt_dofadr[j],
            )
        self._markers = [m.body_mocapid[name2id(mujoco.mjtObj.mjOBJ_BODY, n)] for n in MARKER_NAMES]
        self._marker_geoms = [name2id(mujoco.mjtObj.mjOBJ_GEOM, n) for n in MARKER_NAMES]
        self._light = name2id(mujoco.mjtObj.mjOBJ_LIGHT, "sun")
        robot_geoms = {g for g in range(m.ngeom) if self._is_robot_body(m.geom_bodyid[g])}
        # Segmentation classes: 0 background/floor, 1 walls, 2 robot, 3.. the task's objects in order.
        self._geom_class_base = np.zeros(m.ngeom, np.int32)
        for g in range(m.ngeom):
            if m.geom(g).name.startswith("wall"):
                self._geom_class_base[g] = 1
            elif g in robot_geoms:
                self._geom_class_base[g] = 2

    def _is_robot_body(self, b: int) -> bool:
        while b > 0:
            if b == self.robot_body:
                return True
            b = self.model.body_parentid[b]
        return False

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        rng = self.np_random
        m, d = self.model, self.data
        self._apply_randomization(rng)
        if self.config.randomization.object_masses or self.config.randomization.object_sizes:
            # the solver's mass-dependent constants (body/dof invweight0) must follow the new masses
            mujoco.mj_setConst(m, d)
        mujoco.mj_resetData(m, d)
        cfg = self.config
        self.formation = None
        if cfg.task != "single":
            self.formation = cfg.formation if cfg.formation != "random" else ("line", "cross")[rng.integers(2)]
        self.objects = task_objects(cfg.task, cfg.n_distractors)
        self._objects_qidx = np.array([self._obj[n]["qadr"] + np.arange(7) for n in self.objects])
        self._place_scene(rng)
        if self.formation is not None:  # neutral slot markers; the single task's goal disc is green
            m.geom_rgba[self._marker_geoms[0]] = [0.95, 0.95, 0.95, 1]
        self._steps = 0
        self._n_clipped = 0
        self._odom_error = np.zeros(3)  # (dx, dy, dyaw) of odometry drift, world frame
        mujoco.mj_forward(m, d)
        self._update_markers()
        mujoco.mj_forward(m, d)
        poses = self.object_poses()
        errors = self.goal_errors(poses)
        self._prev_potential = self._potential(errors, poses)
        obs = self._observation()
        return obs, self._info(poses, errors, success=False)

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        a = self._validate_action(action)
        clipped = np.clip(a, ACTION_LOW, ACTION_HIGH)
        was_clipped = bool(np.any(clipped != a))
        self._n_clipped += was_clipped
        v, w = float(clipped[0]), float(clipped[1])
        half = 0.5 * WHEEL_SEPARATION
        self.data.ctrl[:] = [(v - w * half) / WHEEL_RADIUS, (v + w * half) / WHEEL_RADIUS]
        drift = self.config.randomization.odometry_drift
        pose_before = self.robot_pose() if drift else None
        mujoco.mj_step(self.model, self.data, nstep=self.n_substeps)
        if drift:
            self._update_odometry(pose_before)
        if self.formation is not None:  # slot markers follow the anchor; the single goal stays put
            self._update_markers()
        # mj_step leaves positions-derived quantities (body and camera poses) one substep behind qpos
        mujoco.mj_forward(self.model, self.data)
        self._steps += 1
        poses = self.object_poses()
        errors = self.goal_errors(poses)
        success = bool(np.all(errors < self.tolerance))
        potential = self._potential(errors, poses)
        reward = float(potential - self._prev_potential) - 0.01 + (5.0 if success else 0.0)
        self._prev_potential = potential
        obs = self._observation()
        info = self._info(poses, errors, success)
        info["action_clipped"] = was_clipped
        return obs, reward, success, self._steps >= self.max_steps, info

    def render(self) -> np.ndarray | None:
        """Third-person overview (256x256 RGB) for videos; the robot's own view is obs["rgb"]."""
        if self.render_mode != "rgb_array":
            return None
        if self._overview is None:
            self._overview = RGBDRenderer(self.model, "overview", 256, 256, geom_groups=(0, 1, 2, 3))
        return self._overview.render(self.data)[0]

    def close(self) -> None:
        for r in (self._renderer, self._overview):
            if r is not None:
                r.close()

    # ------------------------------------------------------------------ state access
    def get_state(self) -> dict[str, Any]:
        """Everything `step` depends on, to come back to with `set_state` (e.g. after letting a scripted
        expert look ahead from here): MuJoCo's integration state (physics, controls, warm start), the
        episode's counters, odometry drift, reward potential and the env's random generator."""
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        physics = np.empty(mujoco.mj_stateSize(self.model, spec))
        mujoco.mj_getState(self.model, self.data, physics, spec)
        return {"physics": physics, "steps": self._steps, "n_clipped": self._n_clipped,
                "odom_error": self._odom_error.copy(), "prev_potential": self._prev_potential,
                "rng": copy.deepcopy(self.np_random.bit_generator.state)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Return to a state taken by `get_state` in this episode."""
        mujoco.mj_setState(self.model, self.data, state["physics"], mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(self.model, self.data)
        self._steps, self._n_clipped = state["steps"], state["n_clipped"]
        self._odom_error = state["odom_error"].copy()
        self._prev_potential = state["prev_potential"]
        self.np_random.bit_generator.state = copy.deepcopy(state["rng"])

    def place_object(self, index: int, x: float, y: float, yaw: float | None = None) -> tuple[dict, dict]:
        """Intervene on the scene: put object `index` (of info["object_names"]) at rest at (x, y), its yaw
        kept unless given, and return the observation and info as seen now (for counterfactual
        experiments: the episode then goes on from the changed scene). Formation goals follow the anchor."""
        if not 0 <= index < len(self.objects):
            raise ValueError(f"object index must be in [0, {len(self.objects)}); got {index}")
        if not (np.isfinite(x) and np.isfinite(y) and abs(x) < ARENA_HALF and abs(y) < ARENA_HALF):
            raise ValueError(f"(x, y) must be finite and inside the arena (|x|, |y| < {ARENA_HALF} m); got ({x}, {y})")
        name = self.objects[index]
        self._set_free_pose(name, x, y, self.object_poses()[index, 2] if yaw is None else yaw)
        mujoco.mj_forward(self.model, self.data)
        self._update_markers()
        mujoco.mj_forward(self.model, self.data)
        poses = self.object_poses()
        errors = self.goal_errors(poses)
        self._prev_potential = self._potential(errors, poses)
        return self._observation(), self._info(poses, errors, success=bool(np.all(errors < self.tolerance)))

    def robot_pose(self) -> np.ndarray:
        """True planar pose (x, y, yaw) of the robot's axle centre."""
        q = self.data.qpos[self._robot_qadr : self._robot_qadr + 7]
        return np.array([q[0], q[1], yaw_from_quat(q[3:7])])

    def object_poses(self) -> np.ndarray:
        """(N, 3) planar poses (x, y, yaw) of the task's objects, in `self.objects` order."""
        q = self.data.qpos[self._objects_qidx]  # (N, 7): x y z qw qx qy qz
        w, x, y, z = q[:, 3], q[:, 4], q[:, 5], q[:, 6]
        yaw = np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
        return np.column_stack([q[:, 0], q[:, 1], yaw])

    def goal_points(self, poses: np.ndarray | None = None) -> np.ndarray:
        """(G, 2): the goal (single) or the three formation slots (formation), world frame."""
        if self.formation is None:
            return self.goals.copy()
        anchor = (self.object_poses() if poses is None else poses)[0]
        return anchor[:2] + FORMATIONS[self.formation] @ rot_z(anchor[2])[:2, :2].T

    def pushable_indices(self) -> list[int]:
        """Indices into `self.objects` of the boxes that must reach goals."""
        return [0] if self.formation is None else [1, 2, 3]

    def goal_errors(self, poses: np.ndarray | None = None) -> np.ndarray:
        """Per goal, the distance to the box assigned to it by the best assignment."""
        poses = self.object_poses() if poses is None else poses
        boxes = poses[self.pushable_indices(), :2]
        goals = self.goal_points(poses)
        dist = np.linalg.norm(boxes[:, None] - goals[None], axis=-1)
        if len(goals) == 1:
            return dist[0]
        best = min(itertools.permutations(range(len(goals))), key=lambda p: max(dist[i, p[i]] for i in range(len(p))))
        return np.array([dist[i, best[i]] for i in range(len(best))])

    # ------------------------------------------------------------------ internals
    def _validate_action(self, action: Any) -> np.ndarray:
        try:
            a = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"action must be numeric array-like of shape (2,), got {action!r}") from e
        if a.shape != (2,):
            raise ValueError(f"action must have shape (2,) = (v m/s, omega rad/s), got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action contains NaN or infinite values: {a.tolist()}")
        return a.astype(np.float32)

    def _potential(self, errs: np.ndarray, poses: np.ndarray) -> float:
        """Dense shaping: boxes' distance to goals, plus the robot's distance to the nearest unsolved box."""
        boxes = poses[self.pushable_indices(), :2]
        unsolved = errs >= self.tolerance
        # goal_errors is per goal; approach distance uses any box still far from every goal
        approach = 0.0
        if np.any(unsolved):
            tip = self.pusher_point()
            approach = float(np.min(np.linalg.norm(boxes - tip, axis=-1)))
        return -10.0 * float(np.sum(errs)) - 1.0 * approach

    def pusher_point(self) -> np.ndarray:
        """World (x, y) of the middle of the pusher plate's front face."""
        x, y, yaw = self.robot_pose()
        return np.array([x + PUSHER_OFFSET * np.cos(yaw), y + PUSHER_OFFSET * np.sin(yaw)])

    def _set_free_pose(self, name: str, x: float, y: float, yaw: float) -> None:
        o = self._obj[name]
        z = self.model.geom_size[o["geom"]][2] if self.model.geom_type[o["geom"]] == mujoco.mjtGeom.mjGEOM_BOX else None
        if z is None:
            gt = self.model.geom_type[o["geom"]]
            size = self.model.geom_size[o["geom"]]
            z = size[0] if gt == mujoco.mjtGeom.mjGEOM_SPHERE else size[1]
        self.data.qpos[o["qadr"] : o["qadr"] + 7] = [x, y, z, *quat_from_yaw(yaw)]
        self.data.qvel[o["vadr"] : o["vadr"] + 6] = 0.0

    def _place_scene(self, rng: np.random.Generator) -> None:
        lim_obj, lim_robot = 0.85, 0.9
        for _ in range(10_000):
            robot = np.array([*rng.uniform(-lim_robot, lim_robot, 2), rng.uniform(-np.pi, np.pi)])
            placed = self._sample_task_layout(rng, robot, lim_obj)
            if placed is None:
                continue
            self._apply_layout(rng, robot, *placed)
            if self.config.level == "hard" or self._all_task_items_visible():
                return
        raise RuntimeError("could not sample a scene layout")  # pragma: no cover - layouts are far from infeasible

    def _all_task_items_visible(self) -> bool:
        """Easy level: every box of the task and every goal must be seen, unoccluded, at the start."""
        mujoco.mj_forward(self.model, self.data)
        self._update_markers()
        info = self._visibility_info(self.object_poses())
        n_boxes = 1 if self.formation is None else 4
        return bool(info["visible"][:n_boxes].all() and info["goal_visible"].all())

    def _apply_layout(self, rng: np.random.Generator, robot: np.ndarray, positions: np.ndarray, goals: np.ndarray) -> None:
        d = self.data
        d.qpos[self._robot_qadr : self._robot_qadr + 7] = [robot[0], robot[1], 0.04, *quat_from_yaw(robot[2])]
        d.qvel[self._robot_vadr : self._robot_vadr + 6] = 0.0
        for i, name in enumerate(self.objects):
            is_anchor = self.formation is not None and i == 0
            yaw = positions[i][2] if is_anchor else rng.uniform(-np.pi, np.pi)
            self._set_free_pose(name, positions[i][0], positions[i][1], yaw)
        for k, name in enumerate(n for n in BOX_NAMES + DISTRACTOR_NAMES if n not in self.objects):
            self._set_free_pose(name, 3.0 + 0.4 * k, 3.0, 0.0)  # parked behind the walls, out of sight
        # parked objects and unused markers leave the rendered groups: drawing them costs time
        for name in BOX_NAMES + DISTRACTOR_NAMES:
            self.model.geom_group[self._obj[name]["geom"]] = 0 if name in self.objects else HIDDEN_GROUP
        n_goals = 1 if self.formation is None else 3
        for k, geom in enumerate(self._marker_geoms):
            self.model.geom_group[geom] = MARKER_GROUP if k < n_goals else HIDDEN_GROUP
        self.goals = goals

    def _sample_task_layout(
        self, rng: np.random.Generator, robot: np.ndarray, lim: float
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Positions (N, 3: x, y, yaw for the anchor) of self.objects and goals (G, 2), or None to retry."""
        easy = self.config.level == "easy"

        def in_view(r_min, r_max, bearing):
            r, b = rng.uniform(r_min, r_max), rng.uniform(-bearing, bearing)
            return robot[:2] + r * np.array([np.cos(robot[2] + b), np.sin(robot[2] + b)])

        def free(p, others, clearance):
            return np.all(np.abs(p) <= lim) and all(np.linalg.norm(p - q[:2]) >= clearance for q in others)

        pts: list[np.ndarray] = [np.array([*robot[:2], 0.0])]
        if self.formation is None:
            box = in_view(0.35, 0.8, 0.35) if easy else rng.uniform(-lim, lim, 2)
            if not free(box, pts, 0.35):
                return None
            goal = in_view(0.5, 1.3, 0.4) if easy else rng.uniform(-lim, lim, 2)
            if not free(goal, pts, 0.25) or np.linalg.norm(goal - box) < (0.3 if easy else 0.4):
                return None
            if easy and not (self._in_fov_planar(robot, box) and self._in_fov_planar(robot, goal)):
                return None
            goals = goal[None]
            pts.append(np.array([*box, 0.0]))
            keep_clear = [(box, goal)]
        else:
            yaw = rng.uniform(-np.pi, np.pi)
            anchor = in_view(0.6, 1.3, 0.4) if easy else rng.uniform(-lim, lim, 2)
            goals = anchor + FORMATIONS[self.formation] @ rot_z(yaw)[:2, :2].T
            if not free(anchor, pts, 0.45) or not all(free(g, pts, 0.3) for g in goals):
                return None
            if not np.all(np.abs(goals) <= lim):
                return None
            pts.append(np.array([*anchor, yaw]))
            keep_clear = []
            for _ in range(3):
                for _ in range(100):
                    b = in_view(0.35, 1.3, 0.45) if easy else rng.uniform(-lim, lim, 2)
                    if free(b, pts, 0.3) and all(np.linalg.norm(b - g) >= 0.25 for g in goals):
                        if not easy or self._in_fov_planar(robot, b):
                            break
                else:
                    return None
                pts.append(np.array([*b, 0.0]))
            if easy and not self._in_fov_planar(robot, anchor):
                return None
        for _ in range(self.config.n_distractors):
            for _ in range(100):
                p = rng.uniform(-lim - 0.1, lim + 0.1, 2)
                clear = (
                    all(np.linalg.norm(p - q[:2]) >= 0.3 for q in pts)
                    and all(np.linalg.norm(p - g) >= 0.25 for g in goals)
                    and all(point_segment_distance(p, a, b) >= 0.22 for a, b in keep_clear)
                )
                if clear:
                    break
            else:
                return None
            pts.append(np.array([*p, 0.0]))
        return np.array(pts[1:]), np.asarray(goals, float)

    def _in_fov_planar(self, robot: np.ndarray, p: np.ndarray, margin: float = 0.8) -> bool:
        """Whether a floor point is inside the head camera's horizontal field of view and range."""
        local = rot_z(robot[2])[:2, :2].T @ (p - robot[:2])
        fwd = local[0] - self._body_from_cam[0, 3]
        return fwd > 0.25 and abs(local[1]) < margin * self._tan_half_fov[0] * fwd and fwd < 2.0

    def _update_markers(self) -> None:
        goals = self.goal_points()
        for k, mocap in enumerate(self._markers):
            if k < len(goals):
                self.data.mocap_pos[mocap] = [goals[k][0], goals[k][1], 0.0008]
            else:
                self.data.mocap_pos[mocap] = [0.0, 0.0, -1.0]

    # --- randomisation
    def _apply_randomization(self, rng: np.random.Generator) -> None:
        m, r, nom = self.model, self.config.randomization, self._nominal
        for k, v in nom.items():
            getattr(m, k)[:] = v
        obj_geoms = [self._obj[n]["geom"] for n in BOX_NAMES + DISTRACTOR_NAMES]
        obj_bodies = [self._obj[n]["body"] for n in BOX_NAMES + DISTRACTOR_NAMES]
        if r.object_colors:
            for g in obj_geoms:
                m.geom_rgba[g, :3] = np.clip(nom["geom_rgba"][g, :3] + rng.uniform(-0.12, 0.12, 3), 0, 1)
        if r.object_sizes:
            for g, b in zip(obj_geoms, obj_bodies):
                s = rng.uniform(0.85, 1.2)
                m.geom_size[g] = nom["geom_size"][g] * s
                m.geom_rbound[g] = nom["geom_rbound"][g] * s
                m.geom_aabb[g] = nom["geom_aabb"][g] * s
                m.body_inertia[b] = nom["body_inertia"][b] * s**2
        if r.object_masses:
            for b in obj_bodies:
                s = rng.uniform(0.6, 1.6)
                m.body_mass[b] = nom["body_mass"][b] * s
                m.body_inertia[b] *= s
        if r.friction:
            for g in obj_geoms:
                m.geom_friction[g, 0] = nom["geom_friction"][g, 0] * rng.uniform(0.6, 1.4)
        if r.lighting:
            m.light_diffuse[self._light] = nom["light_diffuse"][self._light] * rng.uniform(0.5, 1.5)
            direction = nom["light_dir"][self._light] + rng.uniform(-0.4, 0.4, 3)
            m.light_dir[self._light] = direction / np.linalg.norm(direction)
        if r.camera_jitter:
            m.cam_pos[self.cam_id] = nom["cam_pos"][self.cam_id] + rng.uniform(-0.01, 0.01, 3)
            axis = rng.normal(size=3)
            dq = np.zeros(4)
            mujoco.mju_axisAngle2Quat(dq, axis / np.linalg.norm(axis), np.deg2rad(rng.uniform(0, 2.0)))
            q = np.zeros(4)
            mujoco.mju_mulQuat(q, dq, nom["cam_quat"][self.cam_id])
            m.cam_quat[self.cam_id] = q

    def _update_odometry(self, pose_before: np.ndarray) -> None:
        """Random-walk drift of the odometry frame, growing with the distance and turn just driven."""
        after = self.robot_pose()
        dist = np.linalg.norm(after[:2] - pose_before[:2])
        turn = abs(wrap_angle(after[2] - pose_before[2]))
        rng = self.np_random
        self._odom_error[:2] += rng.normal(0.0, 0.02 * dist, 2)  # 2% of the distance driven
        self._odom_error[2] += rng.normal(0.0, 0.02 * turn + 0.01 * dist)

    def _odometry_from_world(self) -> np.ndarray:
        """(4, 4) drift transform: odometry frame from true world frame."""
        T = np.eye(4)
        T[:3, :3] = rot_z(self._odom_error[2])
        T[:2, 3] = self._odom_error[:2]
        return T

    def camera_pose(self) -> np.ndarray:
        """World-from-optical-camera (4, 4) as the robot believes it: odometry pose + calibrated extrinsic."""
        d = self.data
        world_from_body = np.eye(4)
        world_from_body[:3, :3] = d.xmat[self.robot_body].reshape(3, 3)
        world_from_body[:3, 3] = d.xpos[self.robot_body]
        pose = world_from_body @ self._body_from_cam
        if self.config.randomization.odometry_drift:
            pose = self._odometry_from_world() @ pose
        return pose

    def _proprio(self) -> np.ndarray:
        wl, wr = self.data.qvel[self._wheel_vadr[0]], self.data.qvel[self._wheel_vadr[1]]
        if self.config.randomization.odometry_drift:
            wl, wr = np.array([wl, wr]) * (1.0 + self.np_random.normal(0.0, 0.02, 2))
        v = WHEEL_RADIUS * (wl + wr) / 2.0
        w = WHEEL_RADIUS * (wr - wl) / WHEEL_SEPARATION
        return np.array([v, w, wl, wr], np.float32)

    def _observation(self) -> dict[str, np.ndarray]:
        rgb, depth = self._renderer.render(self.data)
        lo, hi = DEPTH_RANGE
        r = self.config.randomization
        if r.depth_noise:
            sigma = 0.001 + 0.0025 * depth**2
            depth = depth + self.np_random.normal(size=depth.shape).astype(np.float32) * sigma.astype(np.float32)
        depth[(depth < lo) | (depth > hi)] = 0.0
        if r.depth_dropout:
            # random holes plus holes along depth edges, as structured-light sensors give
            gy, gx = np.gradient(depth)
            edge = np.hypot(gx, gy) > 0.08
            drop = self.np_random.random(depth.shape) < np.where(edge, 0.5, 0.02)
            depth[drop] = 0.0
        return {
            "rgb": rgb,
            "depth": depth,
            "intrinsics": self._intrinsics.copy(),
            "cam_pose": self.camera_pose().astype(np.float32),
            "proprio": self._proprio(),
        }

    def _visibility(self, points: np.ndarray, targets: list[int | None]) -> np.ndarray:
        """Virtual field of view of the true camera: inside the frustum, in range, not occluded."""
        d = self.data
        cam_pos = d.cam_xpos[self.cam_id]
        cam_rot = d.cam_xmat[self.cam_id].reshape(3, 3) @ MJCAM_FROM_OPTICAL
        out = np.zeros(len(points), bool)
        geomid = np.zeros(1, np.int32)
        groups = np.array([1, 0, 0, 0, 0, 0], np.uint8)
        for i, (p, target) in enumerate(zip(points, targets)):
            local = cam_rot.T @ (p - cam_pos)
            z = local[2]
            if not (DEPTH_RANGE[0] < z < 3.0):
                continue
            if abs(local[0]) > self._tan_half_fov[0] * z or abs(local[1]) > self._tan_half_fov[1] * z:
                continue
            vec = p - cam_pos
            dist = np.linalg.norm(vec)
            hit = mujoco.mj_ray(self.model, d, cam_pos, vec / dist, groups, 1, self.robot_body, geomid)
            out[i] = hit < 0 or hit >= dist - 0.03 or (target is not None and geomid[0] == target)
        return out

    def _info(self, poses: np.ndarray, errors: np.ndarray, success: bool) -> dict[str, Any]:
        goals = self.goal_points(poses)
        info: dict[str, Any] = {
            "robot_pose": self.robot_pose(),
            "object_poses": poses,
            "object_names": list(self.objects),
            "goal": goals,
            **self._visibility_info(poses, goals),
            "goal_errors": errors,
            "is_success": success,
            "action_clipped": False,
            "n_clipped_actions": self._n_clipped,
            "step": self._steps,
            "formation": self.formation or "",
            "seg_ids": {n: i + FIRST_OBJECT_SEG_ID for i, n in enumerate(self.objects)}
            | {f"goal_{k}": GOAL_SEG_ID + k for k in range(len(goals))}
            | {"background": 0, "walls": 1, "robot": 2},
        }
        if self.config.segmentation:
            info["segmentation"] = self.segmentation()
        return info

    def _visibility_info(self, poses: np.ndarray, goals: np.ndarray | None = None) -> dict[str, np.ndarray]:
        goals = self.goal_points(poses) if goals is None else goals
        obj_pts = np.column_stack([poses[:, :2], [self.model.geom_size[self._obj[n]["geom"]][2] * 0.5 + 0.02 for n in self.objects]])
        goal_pts = np.column_stack([goals, np.zeros(len(goals))])
        return {
            "visible": self._visibility(obj_pts, [self._obj[n]["geom"] for n in self.objects]),
            "goal_visible": self._visibility(goal_pts, [None] * len(goals)),
        }

    def segmentation(self) -> np.ndarray:
        """Per-pixel object class (H, W) int32 of the head camera, ids as in info["seg_ids"]."""
        geom = self._renderer.render_segmentation(self.data)
        cls = self._geom_class_base.copy()
        for i, n in enumerate(self.objects):
            cls[self._obj[n]["geom"]] = i + FIRST_OBJECT_SEG_ID
        for k, g in enumerate(self._marker_geoms):  # markers a task does not use are not rendered
            cls[g] = GOAL_SEG_ID + k
        out = np.where(geom >= 0, cls[np.clip(geom, 0, None)], 0)
        return out.astype(np.int32)
