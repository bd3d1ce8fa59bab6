"""World-model overlays of `ego-view` with a predictor: `PredictionOverlay`'s forecast tracks, the
`LatentPlanner`'s plan as the viewer's base path, and a headless `ego-view` run with the planner
driving and the predicted tracks drawn, all from tiny random checkpoints saved like real ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from sim.collect import env_kwargs
from sim.env import EgoPushEnv
from sim.overlays import planned_actions
from worldmodel.overlay import PredictionOverlay
from worldmodel.planner import make_latent_planner

ROOT = Path(__file__).resolve().parents[2]
SLOTS, SLOT_DIM = 4, 16  # the `world_model` fixture's (conftest.py)


def test_prediction_overlay_forecasts_tracks_under_the_planned_actions(world_model):
    _, pred = world_model
    overlay = PredictionOverlay(pred, horizon=4, min_height=-1.0, max_height=10.0)
    env = EgoPushEnv(**env_kwargs("single", "easy", 64, None, False))
    try:
        obs, info = env.reset(seed=3)
        torch.manual_seed(0)
        overlay.reset(obs, info)
        frames = [overlay.update(obs, None)]  # no plan and nothing executed yet: standing still
        for action in ([0.1, 0.0], [0.1, 0.3], [0.2, 0.3], [0.2, -0.5]):
            obs, *_ = env.step(np.array(action, np.float32))
            overlay.observe_action(action)
            frames.append(overlay.update(obs, np.tile([0.2, 0.5], (6, 1))))
    finally:
        env.close()
    for frame in frames:
        assert 1 <= len(frame.points) <= SLOTS and frame.points.shape[1] == 3
        assert len(frame.trajectories) == len(frame.points) == len(frame.labels)
        for track, point in zip(frame.trajectories, frame.points):
            assert track.shape == (4, 3) and np.isfinite(track).all()
            np.testing.assert_allclose(track[:, 2], point[2])  # drawn at the slot's height
    # the history: 3 frames 2 steps apart, with the executed commands between them
    hist = overlay.history()
    assert hist["features"].shape == (1, 3, SLOTS, SLOT_DIM + 5)
    torch.testing.assert_close(hist["past_actions"][0], torch.tensor([[[0.1, 0.0], [0.1, 0.3]],
                                                                       [[0.2, 0.3], [0.2, -0.5]]]))
    # the plan is cut or extended to horizon x frameskip steps; with none, the last action is held
    np.testing.assert_allclose(overlay.plan_steps(np.tile([0.2, 0.5], (6, 1))), np.tile([0.2, 0.5], (8, 1)))
    np.testing.assert_allclose(overlay.plan_steps(None), np.tile([0.2, -0.5], (8, 1)))
    np.testing.assert_allclose(overlay.plan_steps(np.array([[9.0, 0.0]])), np.tile([0.25, 0.0], (8, 1)))

    # other planned actions, another forecast (same stream state: the same slots and history)
    state, frames_kept = overlay.state, list(overlay.frames)
    fwd = overlay.update(obs, np.tile([0.25, 0.0], (8, 1)))
    overlay.state, overlay.frames = state, list(frames_kept)
    turn = overlay.update(obs, np.tile([-0.25, 2.0], (8, 1)))
    np.testing.assert_allclose(fwd.points, turn.points)
    moved = max(np.abs(a - b).max() for a, b in zip(fwd.trajectories, turn.trajectories))
    assert moved > 1e-3, "the forecast does not depend on the planned actions"

    # the predicted overlay can leave the points to the `slots` overlay; a wrong encoder is a clear error
    quiet = PredictionOverlay(pred, points=False, min_height=-1.0, max_height=10.0)
    quiet.reset(obs, info)
    frame = quiet.update(obs, None)
    assert len(frame.points) == 0 and len(frame.trajectories) >= 1 and frame.trajectories[0].shape == (5, 3)
    with pytest.raises(ValueError, match="pass encoder="):
        PredictionOverlay(pred, encoder=str(pred.parent / "none"))


def test_latent_planner_hands_its_plan_to_the_viewer(world_model):
    """`make_latent_planner` as the viewer builds it (checkpoint=...), goal from info, and its
    planned_actions(): the rest of the executing chunk, then the rest of the plan."""
    _, pred = world_model
    ctrl = make_latent_planner(checkpoint=str(pred), samples=8, iterations=1, elites=2, horizon=3, execute=1)
    env = EgoPushEnv(**env_kwargs("single", "easy", 64, None, False))
    try:
        obs, info = env.reset(seed=1)
        torch.manual_seed(0)
        ctrl.reset(obs, info)
        assert ctrl.cost is not None and ctrl.planned_actions() is None  # a goal, no plan yet
        first = ctrl.act(obs, info)
        plan = ctrl.planned_actions()
        best = ctrl.last_plan.actions.numpy()
        assert plan.shape == (1 + 2 * 2, 2)  # 1 step left of the first frame, 2 more frames of 2 steps
        np.testing.assert_allclose(first, best[0])
        np.testing.assert_allclose(plan, np.repeat(best, 2, 0)[1:])
        np.testing.assert_allclose(planned_actions(ctrl, first), plan)  # what the viewer draws
    finally:
        env.close()
    with pytest.raises(ValueError, match="different checkpoints"):
        make_latent_planner(predictor=str(pred), checkpoint=str(pred.parent))


def count_colour(img: np.ndarray, rgb: tuple[int, int, int], tol: int) -> int:
    return int(np.all(np.abs(img.astype(int) - np.array(rgb)) <= tol, axis=-1).sum())


def test_headless_viewer_with_the_planner_and_predicted_tracks(world_model, tmp_path):
    """`ego-view --headless` with the default entries pointed at the checkpoints: the planner drives
    (its plan is the magenta path) and the predicted tracks are the only cyan in the video."""
    _, pred = world_model
    video = tmp_path / "view.mp4"
    args = ["--headless", "steps=8", f"video={video}", "progress=false",
            "controller=planner", f"controllers.planner.checkpoint={pred}", "controllers.planner.samples=8",
            "controllers.planner.iterations=1", "controllers.planner.elites=2", "+controllers.planner.horizon=3",
            "~overlays.slots", f"overlays.predicted.checkpoint={pred}", "+overlays.predicted.min_height=-1",
            "+overlays.predicted.max_height=10"]
    env = dict(os.environ, MUJOCO_GL="egl", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "sim.viewer", *args], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["steps"] == 8 and summary["controller"] == "planner" and summary["video"] == str(video)
    reader = imageio.get_reader(video, format="FFMPEG")
    frames = np.stack([frame for frame in reader])
    reader.close()
    assert frames.shape == (9, 480, 640, 3)
    cyan = [count_colour(f, (0, 255, 255), tol=45) for f in frames]
    assert sum(cyan) >= 100, f"predicted-track overlay: cyan pixels per frame {cyan}"
    assert sum(count_colour(f, (255, 0, 255), tol=45) for f in frames[1:]) >= 30, "the planner's path"


def test_viewer_session_picks_up_runs_wm_predictor(world_model, tmp_path, monkeypatch):
    """With `runs/wm_predictor` (and its encoder) in the working directory, the default entries join:
    F9 cycles expert -> teleop -> planner, the path is the planner's plan, and the predicted tracks
    are forecast along it from the executed actions."""
    import shutil

    from sim.viewer import ViewerSession

    _, pred = world_model
    monkeypatch.chdir(tmp_path)
    shutil.copytree(pred, tmp_path / "runs" / "wm_predictor")  # its config names the encoder's own directory
    lines: list[str] = []
    overlays = {"slots": None, "predicted": {"_target_": "worldmodel.overlay.PredictionOverlay",
                                             "checkpoint": "runs/wm_predictor", "min_height": -1.0,
                                             "max_height": 10.0}}
    session = ViewerSession(overlays=overlays, out=str(tmp_path / "d.zarr"), log=lines.append)
    try:
        assert list(session.controllers) == ["expert", "teleop", "planner"] and not any("off" in line for line in lines)
        session.step()
        session.switch_controller()
        session.switch_controller()
        assert session.active == "planner"
        for _ in range(3):
            session.step()
        planner, overlay = session.controller, session.overlays["predicted"]
        np.testing.assert_allclose(session.plan, planner.planned_actions())
        assert len(overlay.frames) == 5  # 4 steps: frames 0..4, all a history of 3 frames 2 steps apart needs
        past = overlay.history()["past_actions"]  # (1, 2, 2, 2): the commands into frames 1, 2 and 3, 4
        torch.testing.assert_close(past[0, -1, -1], torch.as_tensor(session.last_action))  # the last one executed
        frame = session.overlay_frames["predicted"]
        assert frame.trajectories and all(t.shape == (5, 3) and np.isfinite(t).all() for t in frame.trajectories)
        assert "planner" in session.frame().texts[0][2]
    finally:
        session.close()
