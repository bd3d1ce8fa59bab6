"""Tests for sim.env: gymnasium API, the DESIGN.md observation contract, metric depth with
consistent intrinsics/cam_pose, determinism, input validation, levels, domain randomisation,
success/termination. Real MuJoCo physics and EGL rendering, no mocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import sim  # noqa: F401  (first: registers the envs and picks the headless GL backend)

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from sim.env import (
    ACTION_HIGH,
    ACTION_LOW,
    BOX_NAMES,
    DISTRACTOR_NAMES,
    PROPRIO_FIELDS,
    SCENE_XML,
    EgoPushConfig,
    EgoPushEnv,
    Randomization,
)
from sim.geometry import unproject_depth

REPO_ROOT = Path(__file__).resolve().parents[2]
OBS_SPEC = {
    "rgb": (np.uint8, lambda h, w: (h, w, 3)),
    "depth": (np.float32, lambda h, w: (h, w)),
    "intrinsics": (np.float32, lambda h, w: (3, 3)),
    "cam_pose": (np.float32, lambda h, w: (4, 4)),
    "proprio": (np.float32, lambda h, w: (len(PROPRIO_FIELDS),)),
}
CAMERA_HEIGHT = 0.155  # head camera above the floor, robot.xml
CAMERA_AHEAD = 0.032  # head camera ahead of the wheel axle, robot.xml
# Model fields domain randomisation touches; with randomisation off they must stay nominal.
RANDOMIZED_FIELDS = (
    "geom_rgba", "geom_size", "geom_friction", "body_mass", "body_inertia",
    "light_diffuse", "light_dir", "cam_pos", "cam_quat",
)


@pytest.fixture
def make_env():
    """Factory for EgoPushEnv(**config overrides); closes every env (and its GL context) afterwards."""
    envs: list[EgoPushEnv] = []

    def _make(**overrides) -> EgoPushEnv:
        env = EgoPushEnv(**overrides)
        envs.append(env)
        return env

    yield _make
    for env in envs:
        env.close()


def _hw(image_size) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _heading(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw), np.sin(yaw)])


def _project(points_world: np.ndarray, K: np.ndarray, cam_pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (N, 3) -> pixel (u, v) (N, 2) and optical depth z (N,)."""
    cam_from_world = np.linalg.inv(cam_pose.astype(np.float64))
    p = points_world @ cam_from_world[:3, :3].T + cam_from_world[:3, 3]
    uv = p[:, :2] / p[:, 2:3] * np.diag(K)[:2] + K[:2, 2]
    return uv, p[:, 2]


def _inside_image(uv: np.ndarray, z: np.ndarray, h: int, w: int) -> np.ndarray:
    return (z > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] <= w - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] <= h - 0.5)


def _assert_obs_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), f"obs[{k!r}] differs"


# ---------------------------------------------------------------------------- 1. gymnasium API
# Advisory warnings check_env gives for this (documented) design; anything else it warns about
# (obs outside the space, wrong dtype, non-deterministic reset...) fails the test.
_ACCEPTED_CHECKER_WARNINGS = ("symmetric and normalized", "minimum value is -infinity", "maximum value is infinity")


@pytest.mark.parametrize("level", ["easy", "hard"])
@pytest.mark.parametrize("env_id, task", [("EgoPush-Single-v0", "single"), ("EgoPush-Formation-v0", "formation")])
def test_registered_envs_pass_gymnasium_env_checker(env_id, task, level):
    assert env_id in sim.ENV_IDS
    env = gym.make(env_id, level=level)
    try:
        assert env.unwrapped.config.task == task and env.unwrapped.config.level == level
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env.unwrapped, skip_render_check=True)
        messages = [str(w.message) for w in caught]
        unexpected = [m for m in messages if not any(s in m for s in _ACCEPTED_CHECKER_WARNINGS)]
        assert not unexpected, unexpected
    finally:
        env.close()


# ---------------------------------------------------------------------------- 2. observation contract
@pytest.mark.parametrize("image_size", [64, 96, 128, (48, 64)], ids=["64", "96", "128", "48x64"])
def test_observation_contract(make_env, image_size):
    h, w = _hw(image_size)
    env = make_env(image_size=image_size)
    assert env.observation_space["rgb"].shape == (h, w, 3)
    obs0, _ = env.reset(seed=0)
    obs1 = env.step(np.array([0.1, 0.3], np.float32))[0]
    for obs in (obs0, obs1):
        assert set(obs) == set(OBS_SPEC)
        for key, (dtype, shape) in OBS_SPEC.items():
            assert obs[key].dtype == dtype, key
            assert obs[key].shape == shape(h, w), key
        depth = obs["depth"]
        assert np.all(np.isfinite(depth)) and np.all(depth >= 0)
        assert (depth > 0).mean() > 0.5  # looking down into a walled arena: most pixels have a return
        assert obs["rgb"].std() > 5  # an image, not a blank frame
        K = obs["intrinsics"]
        np.testing.assert_array_equal(K[2], [0, 0, 1])
        assert K[0, 1] == 0 and K[1, 0] == 0 and K[0, 0] > 0
        assert K[0, 0] == pytest.approx(K[1, 1], rel=1e-4)  # square pixels, also for a non-square image
        assert abs(K[0, 2] - (w - 1) / 2) <= 0.5 and abs(K[1, 2] - (h - 1) / 2) <= 0.5
        np.testing.assert_array_equal(obs["cam_pose"][3], [0, 0, 0, 1])
        assert np.all(np.isfinite(obs["proprio"]))
        assert env.observation_space.contains(obs)


def test_observations_are_not_aliased_to_renderer_buffers(make_env):
    env = make_env()
    obs0, _ = env.reset(seed=0)
    kept = {k: v.copy() for k, v in obs0.items()}
    for _ in range(3):
        env.step([0.2, 1.0])
    _assert_obs_equal(obs0, kept)  # later steps must not overwrite an earlier observation


# ---------------------------------------------------------------------------- 3. metric depth, K, cam_pose
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("image_size", [64, 96, (48, 64)], ids=["64", "96", "48x64"])
def test_depth_unprojects_onto_scene_geometry(make_env, image_size, seed):
    env = make_env(segmentation=True, image_size=image_size)
    obs, info = env.reset(seed=seed)
    seg, ids = info["segmentation"], info["seg_ids"]
    assert seg.shape == obs["depth"].shape
    pts = unproject_depth(obs["depth"], obs["intrinsics"], obs["cam_pose"])
    valid = obs["depth"] > 0
    assert np.all(np.isfinite(pts[valid])) and np.all(np.isnan(pts[~valid]))

    floor = pts[(seg == ids["background"]) & valid]
    assert len(floor) > 0.2 * seg.size
    assert np.median(np.abs(floor[:, 2])) < 0.01
    assert np.percentile(np.abs(floor[:, 2]), 95) < 0.02

    names = info["object_names"]
    box = pts[(seg == ids["box_red"]) & valid]
    assert len(box) >= 5, "easy level: the target box is in view at reset"
    box_xy = info["object_poses"][names.index("box_red"), :2]
    assert np.max(np.linalg.norm(box[:, :2] - box_xy, axis=1)) < 0.08  # half-diagonal of the 10 cm box is 7.1 cm
    assert box[:, 2].min() > -0.005 and box[:, 2].max() < 0.11
    assert box[:, 2].max() > 0.09  # the camera looks down onto the top face at 10 cm

    for name in names[1:]:  # distractors: 8 cm wide cylinders / spheres
        p = pts[(seg == ids[name]) & valid]
        if len(p) >= 5:
            xy = info["object_poses"][names.index(name), :2]
            assert np.max(np.linalg.norm(p[:, :2] - xy, axis=1)) < 0.08, name
            assert p[:, 2].min() > -0.005 and p[:, 2].max() < 0.13, name
    walls = pts[(seg == ids["walls"]) & valid]
    if len(walls) >= 5:  # inner wall faces at |x| or |y| = 1.2 m, 25 cm high
        r = np.max(np.abs(walls[:, :2]), axis=1)
        assert r.min() > 1.19 and r.max() < 1.26
        assert walls[:, 2].min() > -0.005 and walls[:, 2].max() < 0.26
    robot = pts[(seg == ids["robot"]) & valid]
    if len(robot) >= 5:  # the robot's own pusher plate at the bottom of the image
        assert np.max(np.linalg.norm(robot[:, :2] - info["robot_pose"][:2], axis=1)) < 0.2


# ---------------------------------------------------------------------------- 4. cam_pose vs body pose
def _assert_head_camera_pose(cam_pose: np.ndarray, robot_pose: np.ndarray) -> None:
    T = cam_pose.astype(np.float64)
    R, t = T[:3, :3], T[:3, 3]
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-5)
    assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(T[3], [0, 0, 0, 1])
    assert abs(t[2] - CAMERA_HEIGHT) < 0.01
    fwd, left = _heading(robot_pose[2]), _heading(robot_pose[2] + np.pi / 2)
    rel = t[:2] - robot_pose[:2]
    assert abs(rel @ fwd - CAMERA_AHEAD) < 0.01
    assert abs(rel @ left) < 0.01
    # optical frame: z forward and ~30 deg down, x right, y down
    z_axis, x_axis, y_axis = R[:, 2], R[:, 0], R[:, 1]
    assert z_axis[:2] @ fwd > 0.8
    assert abs(z_axis[2] - (-0.5)) < 0.06
    assert x_axis[:2] @ left < -0.95
    assert y_axis[2] < -0.8


@pytest.mark.parametrize("task", ["single", "formation"])
def test_cam_pose_is_the_head_camera_on_the_robot(make_env, task):
    env = make_env(task=task)
    for seed in (0, 3):
        obs, info = env.reset(seed=seed)
        _assert_head_camera_pose(obs["cam_pose"], info["robot_pose"])
        start = info["robot_pose"].copy()
        for _ in range(5):
            obs, _, _, _, info = env.step([0.2, 0.5])
            _assert_head_camera_pose(obs["cam_pose"], info["robot_pose"])
        assert np.linalg.norm(info["robot_pose"][:2] - start[:2]) > 0.03  # it did drive


@pytest.mark.parametrize("task", ["single", "formation"])
def test_observation_shows_the_state_after_the_step(make_env, task):
    env = make_env(task=task)
    env.reset(seed=1)
    for _ in range(5):
        obs, _, _, _, info = env.step([0.2, 1.0])
    np.testing.assert_array_equal(info["robot_pose"], env.robot_pose())
    mujoco.mj_forward(env.model, env.data)  # kinematics of the current state (qpos); changes no state
    fresh = env._observation()
    np.testing.assert_allclose(obs["cam_pose"], fresh["cam_pose"], atol=1e-4)
    assert (np.abs(obs["depth"] - fresh["depth"]) > 0.01).mean() < 0.01


# ---------------------------------------------------------------------------- 5. determinism
@pytest.mark.parametrize("randomization", [Randomization(), Randomization.all_on()], ids=["fixed", "randomized"])
def test_same_seed_gives_bit_identical_episodes(make_env, randomization):
    a, b = make_env(randomization=randomization), make_env(randomization=randomization)
    actions = np.random.default_rng(0).uniform(ACTION_LOW, ACTION_HIGH, (30, 2)).astype(np.float32)
    oa, ia = a.reset(seed=7)
    ob, ib = b.reset(seed=7)
    _assert_obs_equal(oa, ob)
    np.testing.assert_array_equal(ia["object_poses"], ib["object_poses"])
    for act in actions:
        oa, ra, ta, ua, ia = a.step(act)
        ob, rb, tb, ub, ib = b.step(act.copy())
        _assert_obs_equal(oa, ob)
        assert ra == rb and ta == tb and ua == ub
        np.testing.assert_array_equal(ia["object_poses"], ib["object_poses"])
    first_other, _ = a.reset(seed=8)
    first_again, _ = b.reset(seed=7)
    assert not np.array_equal(first_other["rgb"], first_again["rgb"])
    # reseeding the same instance reproduces its first frame
    np.testing.assert_array_equal(a.reset(seed=7)[0]["rgb"], first_again["rgb"])


# ---------------------------------------------------------------------------- 6. bad input
@pytest.mark.parametrize(
    "action, message",
    [
        ([np.nan, 0.0], "NaN"),
        ([0.1, np.inf], "infinite"),
        (np.array([-np.inf, 0.0], np.float32), "infinite"),
        (np.zeros(3, np.float32), "shape"),
        (np.zeros((2, 2), np.float32), "shape"),
        (np.zeros((1, 2), np.float32), "shape"),
        (0.1, "shape"),
        ([], "shape"),
        ("fast", "numeric"),
        (["0.1", "x"], "numeric"),
    ],
    ids=["nan", "inf", "-inf", "shape3", "shape2x2", "shape1x2", "scalar", "empty", "string", "strings"],
)
def test_invalid_action_raises_value_error_naming_the_problem(make_env, action, message):
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(action)
    # the rejected action did not advance the episode
    _, _, _, _, info = env.step([0.0, 0.0])
    assert info["step"] == 1


def test_out_of_range_action_is_clipped_and_counted(make_env):
    env = make_env(n_distractors=0)
    _, info = env.reset(seed=0)
    assert info["n_clipped_actions"] == 0 and info["action_clipped"] is False
    _, _, _, _, info = env.step([5.0, -9.0])
    assert info["action_clipped"] is True and info["n_clipped_actions"] == 1
    _, _, _, _, info = env.step(ACTION_HIGH.astype(np.float64))  # exactly on the bound: not clipped
    assert info["action_clipped"] is False and info["n_clipped_actions"] == 1
    _, _, _, _, info = env.step([-1.0, 0.0])
    assert info["action_clipped"] is True and info["n_clipped_actions"] == 2
    # the clipped command is what the wheels get: reported speed stays within the bound
    env.reset(seed=0)
    for _ in range(8):
        obs, _, _, _, info = env.step([5.0, 0.0])
    assert info["n_clipped_actions"] == 8
    assert 0.1 < obs["proprio"][0] <= ACTION_HIGH[0] * 1.05


@pytest.mark.parametrize(
    "field, value", [("task", "x"), ("level", "medium"), ("formation", "star"), ("n_distractors", 7)]
)
def test_invalid_config_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EgoPushEnv(EgoPushConfig(**{field: value}))
    with pytest.raises(ValueError, match=field):
        gym.make("EgoPush-Single-v0", **{field: value})


def test_unknown_config_key_is_rejected():
    with pytest.raises(TypeError):
        EgoPushEnv(levle="hard")


# ---------------------------------------------------------------------------- 7. levels
SEEDS = range(20)


def _task_points(env: EgoPushEnv, info: dict) -> np.ndarray:
    """World points (N, 3) that the easy level promises in view: boxes (centre height) and goals."""
    idx = env.pushable_indices() if env.config.task == "single" else [0, 1, 2, 3]
    boxes = np.column_stack([info["object_poses"][idx, :2], np.full(len(idx), 0.05)])
    goals = np.column_stack([info["goal"], np.zeros(len(info["goal"]))])
    return boxes if env.config.task == "formation" else np.vstack([boxes, goals])


@pytest.mark.parametrize("task", ["single", "formation"])
def test_easy_level_starts_with_task_objects_in_the_field_of_view(make_env, task):
    env = make_env(task=task, level="easy")
    h, w = env.image_shape
    for seed in SEEDS:
        obs, info = env.reset(seed=seed)
        uv, z = _project(_task_points(env, info), obs["intrinsics"], obs["cam_pose"])
        assert np.all(_inside_image(uv, z, h, w)), f"seed {seed}: {uv.round(1).tolist()}"
        if task == "single":
            assert info["visible"][0], f"seed {seed}: the target box is unoccluded"


@pytest.mark.parametrize("task", ["single", "formation"])
def test_easy_level_task_objects_are_not_occluded_at_reset(make_env, task):
    env = make_env(task=task, level="easy")
    for seed in SEEDS:
        _, info = env.reset(seed=seed)
        if task == "single":
            assert info["visible"][0] and info["goal_visible"].all(), f"seed {seed}"
        else:
            assert info["visible"][:4].all(), f"seed {seed}: anchor and all three boxes visible"


@pytest.mark.parametrize("task", ["single", "formation"])
def test_hard_level_often_starts_with_boxes_out_of_view(make_env, task):
    env = make_env(task=task, level="hard")
    n_hidden = 0
    for seed in SEEDS:
        _, info = env.reset(seed=seed)
        boxes = info["visible"][env.pushable_indices()]
        n_hidden += not boxes.all()
        assert np.all(np.abs(info["object_poses"][:, :2]) < 1.2) and np.all(np.abs(info["robot_pose"][:2]) < 1.2)
    assert n_hidden >= 5, n_hidden


# ---------------------------------------------------------------------------- 8. domain randomisation
def _object_geoms(env: EgoPushEnv) -> list[int]:
    return [mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_GEOM, n) for n in BOX_NAMES + DISTRACTOR_NAMES]


def _model_fields(model: mujoco.MjModel) -> dict[str, np.ndarray]:
    return {k: getattr(model, k).copy() for k in RANDOMIZED_FIELDS}


def test_randomization_changes_the_model_between_resets_and_stays_stable(make_env):
    env = make_env(randomization=Randomization.all_on())
    geoms = _object_geoms(env)
    nominal = mujoco.MjModel.from_xml_path(str(SCENE_XML))
    env.reset(seed=1)
    first = _model_fields(env.model)
    env.reset(seed=2)
    second = _model_fields(env.model)
    for key in ("geom_rgba", "geom_size"):
        assert not np.array_equal(first[key][geoms], second[key][geoms]), key
        assert not np.array_equal(first[key][geoms], getattr(nominal, key)[geoms]), key
    assert not np.array_equal(first["cam_pos"], second["cam_pos"])
    assert not np.array_equal(first["light_dir"], second["light_dir"])
    # randomisation does not accumulate across resets: the same seed gives the same model
    env.reset(seed=1)
    for key, value in _model_fields(env.model).items():
        np.testing.assert_array_equal(value, first[key], err_msg=key)
    # resized objects still rest on the floor, and the randomised env steps without NaN
    box = geoms[BOX_NAMES.index("box_red")]
    assert env.data.geom_xpos[box][2] == pytest.approx(env.model.geom_size[box][2], abs=1e-6)
    for act in np.random.default_rng(1).uniform(ACTION_LOW, ACTION_HIGH, (15, 2)):
        obs, reward, _, _, info = env.step(act)
        assert all(np.all(np.isfinite(v)) for v in obs.values())
        assert np.isfinite(reward) and np.all(np.isfinite(env.data.qpos))
        assert obs["depth"].min() >= 0 and env.observation_space.contains(obs)


def test_depth_dropout_only_adds_holes(make_env):
    plain, holes = make_env(), make_env(randomization=Randomization(depth_dropout=True))
    d_plain = plain.reset(seed=5)[0]["depth"]
    d_holes = holes.reset(seed=5)[0]["depth"]
    n_plain, n_holes = (d_plain == 0).sum(), (d_holes == 0).sum()
    assert n_holes > n_plain + 0.01 * d_plain.size
    kept = d_holes > 0
    np.testing.assert_array_equal(d_holes[kept], d_plain[kept])  # dropout zeroes pixels, changes no others


def test_evaluation_default_keeps_the_nominal_model(make_env):
    env = make_env()
    assert env.config.randomization == Randomization()
    nominal = _model_fields(mujoco.MjModel.from_xml_path(str(SCENE_XML)))
    for seed in (0, 1):
        env.reset(seed=seed)
        for _ in range(3):
            env.step([0.2, 0.5])
        for key, value in _model_fields(env.model).items():
            np.testing.assert_array_equal(value, nominal[key], err_msg=key)


# ---------------------------------------------------------------------------- 9. success and termination
def test_box_on_goal_terminates_with_success_single(make_env):
    env = make_env(task="single")
    _, info = env.reset(seed=0)
    _, _, terminated, truncated, info = env.step([0.0, 0.0])
    assert not terminated and not info["is_success"]
    gx, gy = info["goal"][0]
    env._set_free_pose("box_red", gx, gy, 0.0)
    mujoco.mj_forward(env.model, env.data)
    _, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert terminated is True and info["is_success"] is True and truncated is False
    assert info["goal_errors"].max() < env.tolerance
    assert reward > 4.0  # success bonus


def test_boxes_on_formation_slots_terminate_with_success(make_env):
    env = make_env(task="formation", formation="line")
    _, info = env.reset(seed=0)
    assert info["formation"] == "line" and info["goal"].shape == (3, 2)
    _, _, terminated, _, info = env.step([0.0, 0.0])
    assert not terminated and not info["is_success"]
    for name, (gx, gy) in zip(("box_blue", "box_red", "box_green"), info["goal"]):  # any assignment counts
        env._set_free_pose(name, gx, gy, 0.0)
    mujoco.mj_forward(env.model, env.data)
    _, _, terminated, _, info = env.step([0.0, 0.0])
    assert terminated is True and info["is_success"] is True
    assert np.all(info["goal_errors"] < env.tolerance)


def test_truncation_at_max_steps(make_env):
    env = make_env(max_steps=5)
    env.reset(seed=0)
    for k in range(1, 6):
        _, _, terminated, truncated, info = env.step([0.0, 0.0])
        assert info["step"] == k and not terminated
        assert truncated is (k == 5)


# ---------------------------------------------------------------------------- 10. privileged state
def test_privileged_state_is_only_in_info(make_env):
    env = make_env(task="formation", segmentation=True)
    for obs, info in (env.reset(seed=0), env.step([0.1, 0.0])[::4]):
        assert set(obs) == set(OBS_SPEC)
        for key in ("robot_pose", "object_poses", "goal", "seg_ids", "segmentation", "visible", "goal_errors"):
            assert key in info and key not in obs
        assert info["segmentation"].shape == obs["depth"].shape


# ---------------------------------------------------------------------------- action semantics, render
def test_action_is_forward_velocity_and_counterclockwise_turn_rate(make_env):
    env = make_env(n_distractors=0)
    for v, omega in ((0.2, 0.0), (0.0, 1.0), (-0.15, 0.0)):
        _, info = env.reset(seed=4)
        env._set_free_pose("box_red", 3.0, 3.5, 0.0)  # out of the way, behind the walls
        mujoco.mj_forward(env.model, env.data)
        start = env.robot_pose()
        for _ in range(10):
            obs, _, _, _, info = env.step([v, omega])
        end = info["robot_pose"]
        moved = (end[:2] - start[:2]) @ _heading(start[2])
        turned = (end[2] - start[2] + np.pi) % (2 * np.pi) - np.pi
        # 1 s of motion: sign and rough size (wheel slip allowed); proprio reports the commanded twist
        assert moved == pytest.approx(v * 1.0, abs=0.05 + 0.3 * abs(v))
        assert turned == pytest.approx(omega * 1.0, abs=0.05 + 0.3 * abs(omega))
        assert obs["proprio"][0] == pytest.approx(v, abs=0.02)
        assert obs["proprio"][1] == pytest.approx(omega, abs=0.1)
        wl, wr = obs["proprio"][2:]
        assert np.sign(wr - wl) == np.sign(omega) or omega == 0


def test_render_gives_overview_frame(make_env):
    env = make_env(render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.shape == (256, 256, 3) and frame.std() > 5
    assert make_env().render() is None


def test_headless_rendering_does_not_depend_on_import_order():
    code = (
        "import mujoco\nimport sim\nfrom sim.env import EgoPushEnv\n"
        "env = EgoPushEnv()\nobs, _ = env.reset(seed=0)\nassert obs['rgb'].std() > 5\nenv.close()\n"
    )
    drop = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY")
    child_env = {k: v for k, v in os.environ.items() if k not in drop}
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), child_env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", code], env=child_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_odometry_drift_moves_cam_pose_off_the_true_pose_by_a_little():
    """With drift, cam_pose is the robot's belief: off the true camera pose, and more so the farther it drives."""
    errors = {}
    for drift in (False, True):
        env = EgoPushEnv(task="single", level="hard", randomization=Randomization(odometry_drift=drift))
        obs, _ = env.reset(seed=3)
        for _ in range(40):
            obs, *_ = env.step([0.2, 0.3])
        d = env.data
        true_pos = d.cam_xpos[env.cam_id]
        errors[drift] = float(np.linalg.norm(obs["cam_pose"][:3, 3] - true_pos))
    assert errors[False] < 1e-4
    assert 1e-4 < errors[True] < 0.15


def test_randomized_physics_stays_stable_under_random_driving():
    """Mass and size randomisation must keep MuJoCo stable: nothing blows up (MuJoCo would reset
    the state, teleporting objects out of the arena) and the robot stays upright."""
    from sim.experts import RandomExplorer

    env = EgoPushEnv(task="formation", level="hard", randomization=Randomization.all_on(), max_steps=150)
    for seed in range(4):
        obs, info = env.reset(seed=seed)
        policy = RandomExplorer(seed=seed)
        policy.reset(obs, info)
        done = False
        while not done:
            obs, _, terminated, truncated, info = env.step(policy.act(obs, info))
            done = terminated or truncated
            assert np.all(np.abs(info["object_poses"][:, :2]) < 1.25), f"seed {seed}: an object left the arena"
            w, x, y, z = env.data.qpos[3:7]
            assert 1 - 2 * (x * x + y * y) > 0.9, f"seed {seed}: the robot tipped over"
            assert all(np.isfinite(v).all() for v in obs.values())


def test_goal_markers_have_their_own_segmentation_ids(make_env):
    from sim.env import GOAL_SEG_ID

    for task, n_goals in (("single", 1), ("formation", 3)):
        env = make_env(task=task, segmentation=True)
        obs, info = env.reset(seed=0)
        ids = info["seg_ids"]
        assert [ids[f"goal_{k}"] for k in range(n_goals)] == [GOAL_SEG_ID + k for k in range(n_goals)]
        assert GOAL_SEG_ID > max(v for k, v in ids.items() if not k.startswith("goal_"))
        if task == "single":  # easy level: the goal disc is in view at reset
            disc = (info["segmentation"] == GOAL_SEG_ID) & (obs["depth"] > 0)
            assert disc.sum() >= 5
            from sim.geometry import unproject_depth

            pts = unproject_depth(obs["depth"], obs["intrinsics"], obs["cam_pose"])[disc]
            assert np.max(np.abs(pts[:, 2])) < 0.02  # on the floor
            assert np.median(np.linalg.norm(pts[:, :2] - info["goal"][0], axis=1)) < 0.1
