"""The scripted experts on real episodes, their virtual field of view, noise injection,
the grid planner they navigate with, and the geometry helpers."""

from __future__ import annotations

import numpy as np
import pytest

from sim.controllers import Controller, recorded_action
from sim.env import ACTION_HIGH, ACTION_LOW, ARENA_HALF, EgoPushEnv
from sim.experts import ExpertConfig, GridPlanner, PushExpert, RandomExplorer
from sim.geometry import point_segment_distance, to_local, unproject_depth, wrap_angle


def run_episode(env: EgoPushEnv, controller, seed: int) -> tuple[dict, list[np.ndarray]]:
    obs, info = env.reset(seed=seed)
    controller.reset(obs, info)
    actions = []
    while True:
        action = controller.act(obs, info)
        actions.append(np.asarray(action))
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return info, actions


@pytest.mark.parametrize(
    "task, level, seeds",
    [("single", "easy", [0, 1, 2, 3]), ("single", "hard", [0, 1, 2]), ("formation", "easy", [1, 2])],
)
def test_expert_succeeds_on_seeded_episodes(task, level, seeds):
    env = EgoPushEnv(task=task, level=level)
    for seed in seeds:
        info, actions = run_episode(env, PushExpert(), seed)
        assert info["is_success"], f"{task}/{level} seed {seed}: final goal errors {info['goal_errors']}"
        assert all(ACTION_LOW[i] <= a[i] <= ACTION_HIGH[i] for a in actions for i in range(2))


def test_expert_is_a_controller_and_deterministic():
    assert isinstance(PushExpert(), Controller) and isinstance(RandomExplorer(), Controller)
    env = EgoPushEnv(task="single", level="hard", max_steps=80)
    _, first = run_episode(env, PushExpert(), 5)
    _, second = run_episode(env, PushExpert(), 5)
    np.testing.assert_array_equal(np.array(first), np.array(second))


def test_expert_knows_only_what_its_camera_has_seen():
    """In the hard level the box often starts out of view: the expert must not know it, and must search."""
    env = EgoPushEnv(task="single", level="hard")
    for seed in range(30):
        obs, info = env.reset(seed=seed)
        if not info["visible"][0]:
            break
    else:
        pytest.fail("no hard-level seed started with the box out of view")
    expert = PushExpert()
    expert.reset(obs, info)
    assert expert.mem_obj[0] is None
    expert.act(obs, info)
    assert expert.mode == "search"
    # once seen, the remembered pose is the true one
    for _ in range(60):
        obs, _, _, _, info = env.step(expert.act(obs, info))
        if info["visible"][0]:
            expert.act(obs, info)
            np.testing.assert_allclose(expert.mem_obj[0], info["object_poses"][0])
            return
    pytest.fail("the searching expert never saw the box")


def test_expert_with_a_goal_range_takes_a_far_goal_as_unseen():
    """goal_range_m: a goal in the field of view but farther than the range is not remembered; once the robot
    is within range it is, at its true position. The same scene without the option remembers it at once."""
    env = EgoPushEnv(task="single", level="hard")
    for seed in range(60):
        obs, info = env.reset(seed=seed)
        far = np.linalg.norm(info["goal"][0] - info["robot_pose"][:2])
        if info["goal_visible"][0] and far > 1.0:
            break
    else:
        pytest.fail("no hard-level seed started with the goal in view over 1 m away")
    plain, near_only = PushExpert(), PushExpert(goal_range_m=far - 0.2)
    plain.reset(obs, info)
    near_only.reset(obs, info)
    np.testing.assert_allclose(plain.mem_goal[0], info["goal"][0])
    assert near_only.mem_goal[0] is None
    moved = dict(info, robot_pose=info["robot_pose"] + np.r_[0.3 * (info["goal"][0] - info["robot_pose"][:2]) / far, 0])
    near_only.act(obs, moved)  # the same view from 0.3 m nearer the goal
    np.testing.assert_allclose(near_only.mem_goal[0], info["goal"][0])
    with pytest.raises(ValueError, match="goal_range_m"):
        ExpertConfig(goal_range_m=0.0)


def test_expert_needs_info():
    env = EgoPushEnv()
    obs, info = env.reset(seed=0)
    expert = PushExpert()
    expert.reset(obs, info)
    with pytest.raises(ValueError, match="info"):
        expert.act(obs)


def test_noise_injection_executes_noise_but_labels_the_clean_action():
    env = EgoPushEnv(task="single", level="easy", max_steps=120)
    expert = PushExpert(ExpertConfig(noise_std=(0.1, 0.8), noise_prob=0.5, seed=0))
    obs, info = env.reset(seed=0)
    expert.reset(obs, info)
    differing = 0
    for _ in range(100):
        executed = expert.act(obs, info)
        label = recorded_action(expert, executed)
        differing += not np.allclose(executed, label)
        obs, _, terminated, truncated, info = env.step(executed)
        if terminated or truncated:
            break
    assert differing > 5, "noise bursts should perturb a fair share of the executed actions"


def test_random_explorer_moves_and_stays_in_the_arena():
    env = EgoPushEnv(task="single", level="hard", max_steps=300)
    info, actions = run_episode(env, RandomExplorer(seed=0), 3)
    assert np.all(np.abs(info["robot_pose"][:2]) < ARENA_HALF)
    assert np.std(np.array(actions), axis=0).min() > 0.01


def test_grid_planner_goes_around_an_obstacle():
    planner = GridPlanner()
    start, goal, obstacle = np.array([-0.6, 0.0]), np.array([0.6, 0.0]), np.array([0.0, 0.0])
    path = planner.plan(start, goal, [(obstacle, 0.3)])
    np.testing.assert_allclose(path[0], start, atol=planner.res)
    np.testing.assert_allclose(path[-1], goal)
    assert np.min(np.linalg.norm(path - obstacle, axis=1)) > 0.25
    assert np.all(np.linalg.norm(np.diff(path, axis=0), axis=1) < 0.08)  # a connected path


def test_geometry_helpers():
    assert wrap_angle(3 * np.pi / 2) == pytest.approx(-np.pi / 2)
    assert point_segment_distance(np.array([0.0, 1.0]), np.array([-1.0, 0.0]), np.array([1.0, 0.0])) == 1.0
    assert point_segment_distance(np.array([3.0, 0.0]), np.array([-1.0, 0.0]), np.array([1.0, 0.0])) == 2.0
    np.testing.assert_allclose(to_local(np.array([1.0, 1.0]), np.array([1.0, 0.0, np.pi / 2])), [1.0, 0.0], atol=1e-12)
    K = np.array([[50.0, 0, 31.5], [0, 50.0, 31.5], [0, 0, 1]])
    depth = np.full((64, 64), 2.0, np.float32)
    depth[0, 0] = 0.0
    pts = unproject_depth(depth, K)
    assert np.isnan(pts[0, 0]).all()
    np.testing.assert_allclose(pts[31, 31], [-0.5 * 2 / 50, -0.5 * 2 / 50, 2.0])
