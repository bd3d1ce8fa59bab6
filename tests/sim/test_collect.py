"""Tests for sim.collect and sim.evaluate: parallel collection round trip, resume without
duplicates, a killed collector, the Hydra CLI, config errors, evaluation and its interval.
Real MuJoCo episodes, kept short (image 64x64, tens of steps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import sim  # first: picks the headless GL backend

import imageio.v2 as imageio
import numpy as np
import pytest

from sim.collect import CollectConfig, EpisodeRecorder, collect, env_kwargs
from sim.dataset import DatasetError, EpisodeDataset
from sim.env import ACTION_HIGH, CONTROL_HZ, PROPRIO_FIELDS, EgoPushEnv
from sim.evaluate import EpisodeAnatomy, evaluate, failure_counts, wilson_interval

REPO_ROOT = Path(__file__).resolve().parents[2]
SHORT = dict(task="single", level="easy", image_size=64, max_steps=30, progress=False)


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


def test_collect_round_trip(tmp_path):
    out = tmp_path / "demos.zarr"
    summary = collect(out=str(out), episodes=3, seed=5, workers=2, **SHORT)
    assert summary["episodes"] == 3 and summary["skipped"] == 0 and summary["dataset_episodes"] == 3
    assert summary["steps"] > 0 and summary["steps_per_s"] > 0

    ds = EpisodeDataset.open(out)
    assert sorted(ds.seeds()) == [5, 6, 7]
    n_obj, n_goal = 3, 1  # single task: the box and two distractors; one goal
    expected = {
        "rgb": (np.uint8, (64, 64, 3)), "depth": (np.float32, (64, 64)), "intrinsics": (np.float32, (3, 3)),
        "cam_pose": (np.float32, (4, 4)), "proprio": (np.float32, (len(PROPRIO_FIELDS),)),
        "action": (np.float32, (2,)), "executed_action": (np.float32, (2,)), "reward": (np.float32, ()),
        "robot_pose": (np.float32, (3,)), "object_poses": (np.float32, (n_obj, 3)), "goal": (np.float32, (n_goal, 2)),
        "visible": (np.bool_, (n_obj,)), "goal_visible": (np.bool_, (n_goal,)), "is_success": (np.bool_, ()),
    }
    assert ds.schema == {k: (np.dtype(d), s) for k, (d, s) in expected.items()}

    meta = ds.meta
    assert (meta["task"], meta["level"], meta["image_size"]) == ("single", "easy", [64, 64])
    assert meta["policy"] == {"name": "expert"} and meta["control_hz"] == CONTROL_HZ
    assert meta["proprio_fields"] == list(PROPRIO_FIELDS) and meta["action_high"] == ACTION_HIGH.tolist()
    assert meta["camera"]["name"] == "head" and meta["camera"]["depth_units"] == "metres"
    assert meta["env_config"]["max_steps"] == 30 and meta["sim_version"] == sim.__version__

    for i in range(ds.n_episodes):
        ep, info = ds.episode(i), ds.episode_info(i)
        assert info["length"] == len(ep["action"]) <= 30 and info["seed"] == ds.seeds()[i]
        assert info["success"] == bool(ep["is_success"][-1])
        np.testing.assert_array_equal(ep["intrinsics"][0], np.asarray(meta["camera"]["intrinsics"], np.float32))
        np.testing.assert_array_equal(ep["action"], ep["executed_action"])  # no noise: label == executed

    # Workers record exactly what an in-process rollout of the same seed gives.
    recorder = EpisodeRecorder(env_kwargs("single", "easy", 64, 30, False), "expert", (0.0, 0.0), 0.0)
    try:
        fresh, fresh_info = recorder(ds.seeds()[0])
    finally:
        recorder.close()
    stored = ds.episode(0)
    assert fresh_info == ds.episode_info(0)
    for key in expected:
        np.testing.assert_array_equal(stored[key], fresh[key], err_msg=key)


def test_noisy_expert_records_clean_labels(tmp_path):
    out = tmp_path / "noisy.zarr"
    collect(out=str(out), episodes=1, workers=0, policy="noisy_expert", noise_std=[0.1, 1.0], noise_prob=1.0, **SHORT)
    ep = EpisodeDataset.open(out).episode(0)
    assert not np.allclose(ep["action"], ep["executed_action"])
    assert np.all(np.abs(ep["action"]) <= ACTION_HIGH + 1e-6)


def test_expert_settings_reach_the_expert_and_the_meta(tmp_path):
    """expert=: ExpertConfig settings of the (noisy) expert, recorded in the dataset's meta (so a dataset of
    another expert is refused on resume); a setting it does not know, or one for a non-expert, is an error."""
    out = tmp_path / "near.zarr"
    collect(out=str(out), episodes=1, workers=0, policy="noisy_expert", expert={"v_max": 0.1}, **SHORT)
    ds = EpisodeDataset.open(out)
    assert ds.meta["policy"]["expert"] == {"v_max": 0.1}
    assert np.abs(ds.episode(0)["action"][:, 0]).max() <= 0.1 + 1e-6  # the slower expert drove
    with pytest.raises(DatasetError, match="meta differs"):
        collect(out=str(out), episodes=2, workers=0, policy="noisy_expert", **SHORT)
    with pytest.raises(ValueError, match="unknown expert settings"):
        collect(out=str(tmp_path / "x.zarr"), episodes=1, workers=0, expert={"goal_rang": 1.0}, **SHORT)
    with pytest.raises(ValueError, match="policy=expert or noisy_expert"):
        collect(out=str(tmp_path / "x.zarr"), episodes=1, workers=0, policy="random", expert={"v_max": 0.1}, **SHORT)


def test_resume_adds_only_missing_seeds(tmp_path):
    out = tmp_path / "demos.zarr"
    first = collect(out=str(out), episodes=2, seed=0, workers=0, **SHORT)
    assert first["episodes"] == 2
    second = collect(out=str(out), episodes=4, seed=0, workers=2, **SHORT)
    assert (second["skipped"], second["episodes"], second["dataset_episodes"]) == (2, 2, 4)
    assert sorted(EpisodeDataset.open(out).seeds()) == [0, 1, 2, 3]
    nothing = collect(out=str(out), episodes=4, seed=0, workers=2, **SHORT)
    assert (nothing["episodes"], nothing["steps_per_s"]) == (0, None)
    with pytest.raises(DatasetError, match="meta differs"):  # another setup must go to another dataset
        collect(out=str(out), episodes=5, policy="random", workers=0, **SHORT)


def test_killed_collector_leaves_a_store_that_a_rerun_completes(tmp_path):
    out, n = tmp_path / "demos.zarr", 12
    code = textwrap.dedent(f"""
        from sim.collect import collect
        if __name__ == "__main__":
            collect(out={str(out)!r}, episodes={n}, workers=2, task="single", level="easy", max_steps=60,
                    progress=False)
    """)
    log = tmp_path / "collector.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", code], env=_subprocess_env(), cwd=tmp_path,
                                stdout=log_file, stderr=log_file, start_new_session=True)
    committed, deadline = 0, time.monotonic() + 90
    try:
        while committed < 1:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no episode committed in time"
            time.sleep(0.05)
            try:
                committed = EpisodeDataset.open(out).n_episodes
            except DatasetError:  # not created yet
                pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the collector and its workers, mid-run
        proc.wait()

    ds = EpisodeDataset.open(out)
    assert 1 <= ds.n_episodes < n
    assert len(ds.episode(ds.n_episodes - 1)["rgb"]) == ds.episode_lengths[-1]
    summary = collect(out=str(out), episodes=n, workers=2, task="single", level="easy", max_steps=60, progress=False)
    assert summary["skipped"] == ds.n_episodes
    assert sorted(EpisodeDataset.open(out).seeds()) == list(range(n))


def test_cli_python_m(tmp_path):
    out = tmp_path / "cli.zarr"
    args = [f"out={out}", "episodes=2", "workers=1", "policy=random", "max_steps=20", "progress=false"]
    run = subprocess.run([sys.executable, "-m", "sim.collect", *args], cwd=tmp_path, env=_subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "+2 episodes" in run.stdout
    assert EpisodeDataset.open(out).meta["policy"] == {"name": "random"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.zarr"]  # no outputs/ or .hydra/ left behind


def test_cli_bad_option_is_a_message_not_a_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "sim.collect", "task=bogus", f"out={tmp_path}/x.zarr"],
                         cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "task must be one of 'single', 'formation'; got 'bogus'" in run.stderr
    assert "Traceback" not in run.stderr


def test_config_yaml_defaults_match_the_dataclass():
    from hydra import compose, initialize_config_dir

    from sim.collect import to_config

    with initialize_config_dir(config_dir=str(REPO_ROOT / "sim" / "conf"), version_base="1.3"):
        cfg = compose(config_name="collect")
    assert to_config(cfg, CollectConfig) == CollectConfig()


@pytest.mark.parametrize(
    "bad, allowed",
    [({"policy": "teleport"}, "'expert', 'noisy_expert', 'random'"), ({"task": "stack"}, "'single', 'formation'"),
     ({"level": "medium"}, "'easy', 'hard'")],
)
def test_collect_rejects_unknown_choices(tmp_path, bad, allowed):
    with pytest.raises(ValueError, match=allowed):
        collect(out=str(tmp_path / "x.zarr"), episodes=1, **bad)
    assert not (tmp_path / "x.zarr").exists()


def test_wilson_interval_hand_computed():
    # 8/10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96 / 1.38416 * sqrt(0.016 + 0.009604)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94332, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_evaluate_expert_is_seeded_and_saves_failure_videos(tmp_path):
    kwargs = dict(task="single", level="easy", episodes=3, seed=1000, max_steps=40, progress=False)
    parallel = evaluate("sim.experts.PushExpert", workers=2, **kwargs)
    assert 0.0 <= parallel["success_rate"] <= 1.0
    assert parallel["ci95_low"] <= parallel["success_rate"] <= parallel["ci95_high"]
    assert (parallel["ci95_low"], parallel["ci95_high"]) == wilson_interval(parallel["successes"], 3)
    assert [r["seed"] for r in parallel["results"]] == [1000, 1001, 1002]
    assert parallel["mean_length"] == pytest.approx(np.mean([r["length"] for r in parallel["results"]]))
    for r in parallel["results"]:  # easy: box and goal start in view
        assert r["first_box_seen"] == 0 and r["first_goal_seen"] == 0
        assert (r["failure"] == "") == r["success"] and r["goals_reached"] == int(r["success"])
    assert sum(parallel["failures"].values()) == 3 - parallel["successes"]
    reached = parallel["goals_reached"]  # episodes by goals filled: Single has one goal
    assert sum(reached) == 3 and len(reached) <= 2 and sum(reached[1:]) == parallel["successes"]

    # Same seeds in this process, with videos: identical episodes; a video for each failure only.
    here = evaluate({"_target_": "sim.experts.PushExpert"}, workers=0, video_dir=tmp_path / "videos", **kwargs)
    videos = [r.pop("video", None) for r in here["results"]]
    assert here["results"] == parallel["results"]
    for result, video in zip(here["results"], videos):
        assert (video is not None) == (not result["success"])
        if video is not None:
            reader = imageio.get_reader(video, format="FFMPEG")
            frame = reader.get_data(0)
            reader.close()
            assert frame.shape == (256, 3 * 256, 3)
    assert not list((tmp_path / "videos").glob(".*partial*"))


def test_evaluate_rejects_bad_config():
    with pytest.raises(ValueError, match="'single', 'formation'"):
        evaluate(task="walk", episodes=1)
    with pytest.raises(ValueError, match="_target_"):
        evaluate({"noise_prob": 0.1}, episodes=1)


def test_worker_failure_is_reported_with_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)a worker failed while starting.*no_such_option"):
        evaluate({"_target_": "sim.experts.PushExpert", "no_such_option": 1}, episodes=2, workers=1, progress=False)


def test_any_controller_records_its_label(tmp_path):
    """`controller=` takes a `_target_` mapping instead of `policy`: built once per worker, reset per episode,
    its `label` recorded as the action (here a noisy expert built directly)."""
    out = tmp_path / "ctrl.zarr"
    target = {"_target_": "sim.experts.PushExpert", "noise_std": [0.1, 1.0], "noise_prob": 1.0}
    collect(out=str(out), episodes=2, workers=0, controller=target, **SHORT)
    ds = EpisodeDataset.open(out)
    assert ds.n_episodes == 2 and ds.meta["policy"] == {"name": "controller", "controller": target}
    ep = ds.episode(1)
    assert not np.allclose(ep["action"], ep["executed_action"])
    with pytest.raises(ValueError, match="_target_"):
        collect(out=str(tmp_path / "bad.zarr"), episodes=1, controller={"name": "expert"}, **SHORT)


def test_episode_anatomy_names_the_first_thing_the_task_lacked():
    env = EgoPushEnv(task="single", level="easy")
    _, info = env.reset(seed=1000)
    anatomy = EpisodeAnatomy(env, info)
    for t in range(1, 6):  # standing still in front of the box
        _, _, _, _, info = env.step(np.zeros(2, np.float32))
        anatomy.update(t, info)
    r = anatomy.result(info)
    assert (r["first_box_seen"], r["first_goal_seen"], r["failure"]) == (0, 0, "no box moved")
    assert r["box_moved_m"] < 0.01 and r["min_goal_error"] == pytest.approx(info["goal_errors"].max(), abs=1e-3)

    blind = {**info, "visible": np.zeros_like(info["visible"]), "goal_visible": np.zeros_like(info["goal_visible"])}
    assert EpisodeAnatomy(env, blind).result(blind)["failure"] == "never saw a box"
    box_only = {**blind, "visible": info["visible"]}
    assert EpisodeAnatomy(env, box_only).result(box_only)["failure"] == "never saw a goal"
    pushed = EpisodeAnatomy(env, info)
    moved = info["object_poses"].copy()
    moved[env.pushable_indices()[0], :2] += [0.2, 0.0]
    pushed.update(1, {**info, "object_poses": moved})
    r = pushed.result(info)
    assert r["failure"] == "pushed, not placed" and r["box_moved_m"] == pytest.approx(0.2, abs=1e-3)
    assert failure_counts([r, {"failure": ""}]) == {"never saw a box": 0, "never saw a goal": 0, "no box moved": 0,
                                                    "pushed, not placed": 1}
    env.close()
