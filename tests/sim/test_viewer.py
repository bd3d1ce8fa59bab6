"""ego-view: the real window under Xvfb (screenshot checked by pixels, teleop driven by synthetic key
events and read back from the dataset), the headless video, the world-model slot overlay, config errors.

The window tests need Debian's `xvfb`, ImageMagick's `import` and `xdotool` (scripts/bootstrap.sh
installs them); they are skipped, saying so, only where those programs are missing.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import sim  # noqa: F401  (first: picks the headless GL backend)

import imageio.v2 as imageio
import mujoco
import numpy as np
import pytest

from sim.collect import env_kwargs
from sim.dataset import EpisodeDataset, colorize_depth, resize_nearest
from sim.dataset_cli import info as dataset_info
from sim.env import EgoPushEnv
from sim.evaluate import DEPTH_RANGE_SHOWN
from sim.experts import PushExpert
from sim.overlays import OverlayFrame, integrate_unicycle, world_model_markers
from sim.viewer import INSET_BORDER, ViewerSession, init_camera, inset_layout, translate_flags, view

ROOT = Path(__file__).resolve().parents[2]
SCREEN = (1280, 800)


# ---------------------------------------------------------------------------- helpers


def _free_display() -> int:
    for n in range(91, 200):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display number in :91-:199")


@pytest.fixture(scope="module")
def display():
    """A private Xvfb server for this module: its DISPLAY string."""
    missing = [p for p in ("Xvfb", "import", "xdotool") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"window tests need {', '.join(missing)} (Debian: xvfb imagemagick xdotool; "
                    f"scripts/bootstrap.sh installs them)")
    n = _free_display()
    proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{n}").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"Xvfb :{n} did not start")
        time.sleep(0.05)
    yield f":{n}"
    proc.terminate()
    proc.wait(timeout=10)


class Viewer:
    """`python -m sim.viewer ARGS` in a subprocess, its stdout lines collected by a thread."""

    def __init__(self, args: list[str], cwd: Path, display: str | None = None) -> None:
        env = dict(os.environ, MUJOCO_GL="egl", PYTHONPATH=str(ROOT))
        if display is not None:
            env["DISPLAY"] = display
        self.display = display
        self.proc = subprocess.Popen([sys.executable, "-m", "sim.viewer", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.output)}")

    def x(self, *args: str) -> str:
        return subprocess.run(list(args), env=dict(os.environ, DISPLAY=self.display), check=True, text=True,
                              capture_output=True, timeout=30).stdout

    def window(self) -> tuple[str, dict[str, int]]:
        wid = self.x("xdotool", "search", "--sync", "--name", "MuJoCo").split()[0]
        geometry = dict(re.findall(r"(\w+)=(\d+)", self.x("xdotool", "getwindowgeometry", "--shell", wid)))
        return wid, {k: int(v) for k, v in geometry.items()}

    def screenshot(self, path: Path) -> np.ndarray:
        self.x("import", "-window", "root", str(path))
        return imageio.imread(path)[..., :3]

    def finish(self, timeout: float = 60.0) -> dict:
        self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the reader thread takes the last lines
        text = "".join(self.output)
        assert self.proc.returncode == 0, text
        return json.loads([line for line in self.output if line.startswith("{")][-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def count_colour(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 30) -> int:
    return int(np.all(np.abs(img.astype(int) - np.array(rgb)) <= tol, axis=-1).sum())


def expert_observation(steps: int, seed: int = 0) -> dict:
    """The robot's observation after `steps` expert steps on single/easy, as ego-view's defaults run."""
    env = EgoPushEnv(**env_kwargs("single", "easy", 64, None, False))
    try:
        obs, info = env.reset(seed=seed)
        expert = PushExpert()
        expert.reset(obs, info)
        for _ in range(steps):
            obs, _, _, _, info = env.step(expert.act(obs, info))
        return obs
    finally:
        env.close()


# ---------------------------------------------------------------------------- the window


def test_window_shows_scene_ego_inset_and_overlays(display, tmp_path):
    viewer = Viewer(["pause_at=20", "seconds=90"], tmp_path, display)
    try:
        viewer.wait_for(r"paused at step 20")
        wid, geo = viewer.window()
        time.sleep(0.5)  # the viewer's render thread shows the last synced state
        shot = viewer.screenshot(tmp_path / "shot.png")
        viewer.x("xdotool", "key", "--window", wid, "ctrl+q")  # MuJoCo's Quit shortcut
        summary = viewer.finish()
    finally:
        viewer.kill()
    assert summary["steps"] == 20 and summary["episode_steps"] == 20

    win = shot[geo["Y"]:geo["Y"] + geo["HEIGHT"], geo["X"]:geo["X"] + geo["WIDTH"]]
    h, w = win.shape[:2]
    # the scene: a lit arena, not a blank or single-colour window
    assert win.std() > 25 and len(np.unique(win.reshape(-1, 3), axis=0)) > 500

    # the robot's own view, top right: exactly the camera frames of step 20 (RGB, then depth)
    obs = expert_observation(20)
    expected = [obs["rgb"], colorize_depth(obs["depth"], *DEPTH_RANGE_SHOWN)]
    scene_mask = np.ones((h, w), bool)
    for (left, bottom, rw, rh), image in zip(inset_layout(w, h, 64, 64), expected):
        top = h - bottom - rh
        inner = win[top + INSET_BORDER: top + rh - INSET_BORDER, left + INSET_BORDER: left + rw - INSET_BORDER]
        want = resize_nearest(image, *inner.shape[:2])
        assert np.abs(inner.astype(int) - want.astype(int)).mean() < 3.0
        assert (win[top, left:left + rw] >= 200).all(), "the inset's light frame"
        scene_mask[top:top + rh, left:left + rw] = False

    # overlays in the 3D scene, in colours nothing else has: the goal (yellow), the base path (magenta)
    scene = win[scene_mask]
    assert count_colour(scene, (255, 255, 0), tol=25) >= 20, "goal overlay"
    assert count_colour(scene, (255, 0, 255), tol=25) >= 20, "base-path overlay"
    # the status text (light glyphs on the dark translucent box, top left)
    corner = win[:60, :220]
    assert (corner.min(-1) > 200).sum() > 50 and (corner.max(-1) < 90).sum() > 500


def test_teleop_keys_record_an_episode_into_the_dataset(display, tmp_path):
    out = tmp_path / "teleop.zarr"
    viewer = Viewer(["controller=teleop", f"out={out}", "pause_at=0", "seconds=90"], tmp_path, display)
    try:
        viewer.wait_for(r"paused at step 0")
        wid, _ = viewer.window()
        # record, command (v, w) = (0.10, 0.40) for three single steps, then (0.05, 0.0) for two
        keys = ["F10", "Up", "Up", "Left", "period", "period", "period", "Down", "Right", "period", "period",
                "F10"]
        viewer.x("xdotool", "key", "--window", wid, "--delay", "80", *keys)
        viewer.wait_for(r"recorded episode 0")
        viewer.x("xdotool", "key", "--window", wid, "ctrl+q")
        summary = viewer.finish()
    finally:
        viewer.kill()
    assert summary["steps"] == 5
    assert summary["recorded"] == [{"index": 0, "length": 5, "seed": 0, "success": False, "controllers": ["teleop"]}]

    ds = EpisodeDataset.open(out)
    assert len(ds) == 1 and ds.seeds() == [0]
    ep = ds.episode(0)
    want = np.array([[0.10, 0.40]] * 3 + [[0.05, 0.0]] * 2, np.float32)
    np.testing.assert_allclose(ep["action"], want, atol=1e-6)
    np.testing.assert_allclose(ep["executed_action"], want, atol=1e-6)
    assert ep["rgb"].shape == (5, 64, 64, 3) and ep["depth"].shape == (5, 64, 64)
    assert np.linalg.norm(ep["robot_pose"][-1, :2] - ep["robot_pose"][0, :2]) > 0.02, "the base moved"
    assert ds.episode_info(0)["controllers"] == ["teleop"] and ds.episode_info(0)["start_step"] == 0
    summary = dataset_info(str(out))  # what `ego-dataset info` prints
    assert summary["meta"]["task"] == "single" and summary["meta"]["policy"] == {"name": "ego-view"}
    assert summary["steps"] == 5


def window_pixel(point: np.ndarray, width: int, height: int) -> tuple[int, int]:
    """Where a world point appears in the viewer's window at its start camera (`init_camera`)."""
    env = EgoPushEnv()
    try:
        scene, cam = mujoco.MjvScene(env.model, 100), mujoco.MjvCamera()
        init_camera(cam)
        mujoco.mjv_updateScene(env.model, env.data, mujoco.MjvOption(), None, cam, mujoco.mjtCatBit.mjCAT_ALL, scene)
    finally:
        env.close()
    c = scene.camera[0]
    pos, forward, up = np.array(c.pos), np.array(c.forward), np.array(c.up)
    d = np.asarray(point, float) - pos
    depth = d @ forward
    x, y = c.frustum_near * (d @ np.cross(forward, up)) / depth, c.frustum_near * (d @ up) / depth
    half_h = 0.5 * (c.frustum_top - c.frustum_bottom)
    half_w = half_h * width / height  # the window's aspect ratio widens the frustum
    return (round((x - c.frustum_center + half_w) / (2 * half_w) * width),
            round((c.frustum_top - y) / (2 * half_h) * height))


def test_mouse_drag_moves_an_object_while_the_controller_runs(display, tmp_path):
    env = EgoPushEnv(**env_kwargs("single", "easy", 64, None, False))
    _, info = env.reset(seed=0)
    env.close()
    box, robot = info["object_poses"][0], info["robot_pose"]
    viewer = Viewer(["controller=teleop", "seconds=90"], tmp_path, display)  # teleop idles: the base stands
    try:
        wid, geo = viewer.window()
        time.sleep(0.5)
        u, v = window_pixel([box[0], box[1], 0.05], geo["WIDTH"], geo["HEIGHT"])
        # select the box (double-click), then drag it along the floor: Ctrl+Shift+right-drag, to the right
        viewer.x("xdotool", "mousemove", "--window", wid, str(u), str(v),
                 "click", "--repeat", "2", "--delay", "120", "1")
        time.sleep(0.3)
        viewer.x("xdotool", "keydown", "ctrl", "keydown", "shift", "mousedown", "3")
        for _ in range(15):
            viewer.x("xdotool", "mousemove_relative", "--", "6", "0")
            time.sleep(0.05)
        time.sleep(1.5)  # the physics keeps pulling the box towards the dragged point
        viewer.x("xdotool", "mouseup", "3", "keyup", "shift", "keyup", "ctrl")
        viewer.x("xdotool", "key", "--window", wid, "ctrl+q")
        summary = viewer.finish()
    finally:
        viewer.kill()
    moved = np.array(summary["object_poses"][0][:2]) - box[:2]
    assert summary["steps"] > 10 and summary["controller"] == "teleop"
    assert moved[0] > 0.1 and abs(moved[1]) < 0.15, moved  # to the right on screen is +x in the world
    assert np.linalg.norm(np.array(summary["robot_pose"][:2]) - robot[:2]) < 0.01  # the robot did not push it


def test_no_display_fails_with_advice(monkeypatch, tmp_path):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--headless.*xvfb-run"):
        view(steps=1)


# ---------------------------------------------------------------------------- headless


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A randomly initialised, tiny encoder checkpoint (the DESIGN checkpoint layout)."""
    torch = pytest.importorskip("torch")
    from dataclasses import asdict

    from worldmodel.checkpoint import save_checkpoint
    from worldmodel.encoder import EncoderConfig, ObjectCentricEncoder, default_stats

    torch.manual_seed(0)
    cfg = EncoderConfig(dim=32, layers=1, heads=2, slot_dim=32, decoder_hidden=32, num_slots=4)
    out = tmp_path_factory.mktemp("wm") / "tiny_encoder"
    save_checkpoint(out, ObjectCentricEncoder(cfg), {"stage": "encoder", "model": asdict(cfg)}, default_stats(), {})
    return out


def test_headless_writes_a_playable_video_with_overlays(tmp_path, tiny_encoder):
    video, data = tmp_path / "view.mp4", tmp_path / "headless.zarr"
    viewer = Viewer(["--headless", "steps=25", f"video={video}", "record=true", f"out={data}", "progress=false",
                     f"overlays.slots.checkpoint={tiny_encoder}", "+overlays.slots.min_height=-1"], tmp_path)
    try:
        summary = viewer.finish()
    finally:
        viewer.kill()
    assert summary["video"] == str(video) and summary["steps"] == 25
    reader = imageio.get_reader(video, format="FFMPEG")
    frames = np.stack([frame for frame in reader])  # list(reader) asks len(): infinite
    reader.close()
    assert frames.shape == (26, 480, 640, 3)  # the first state, then one frame per control step
    last = frames[-1]
    (left, bottom, _, rh), _ = inset_layout(640, 480, 64, 64)
    top = 480 - bottom - rh
    scene = last.copy()
    scene[top:top + rh, left:] = 0  # the insets
    assert count_colour(scene, (255, 255, 0), tol=45) >= 20, "goal overlay"
    assert sum(count_colour(f, (255, 0, 255), tol=45) for f in frames[1:]) >= 100, "base-path overlay"
    assert sum(count_colour(f, (0, 255, 255), tol=45) for f in frames[1:]) >= 100, "world-model slots"
    assert frames.std() > 25
    # record=true: the episode so far was committed when the run ended
    ds = EpisodeDataset.open(data)
    assert ds.episode_lengths.tolist() == [25] and ds.episode_info(0)["stopped_by"] == "closed"


def test_slot_overlay_reports_world_points(tiny_encoder):
    from worldmodel.overlay import SlotOverlay

    env = EgoPushEnv(**env_kwargs("single", "easy", 64, None, False))
    try:
        obs, info = env.reset(seed=3)
        overlay = SlotOverlay(tiny_encoder, min_height=-1.0, max_height=10.0)
        overlay.reset(obs, info)
        frames = [overlay.update(obs, None)]
        obs, *_ = env.step([0.1, 0.0])
        frames.append(overlay.update(obs, np.zeros((10, 2))))
    finally:
        env.close()
    for frame in frames:
        assert 1 <= len(frame.points) <= 4 and frame.points.shape[1] == 3
        assert len(frame.labels) == len(frame.points) and frame.trajectories == []
        # slot centroids are points the camera sees: inside the walled arena, near the floor
        assert np.all(np.abs(frame.points[:, :2]) < 1.3) and np.all(np.abs(frame.points[:, 2]) < 0.5)
    big = EgoPushEnv(**env_kwargs("single", "easy", 96, None, False))
    try:
        obs, info = big.reset(seed=0)
        with pytest.raises(ValueError, match="64x64.*image_size=64"):
            overlay.reset(obs, info)
    finally:
        big.close()


def test_trajectories_and_plans_become_markers(tmp_path, monkeypatch):
    """A provider's predicted trajectories are drawn; a controller's planned_actions() drives the path."""
    monkeypatch.chdir(tmp_path)  # no runs/wm_* checkpoints here: only the expert and teleop are built

    class Straight:
        def reset(self, obs, info):
            pass

        def update(self, obs, planned_actions):
            return OverlayFrame(points=np.array([[0.0, 0.0, 0.05]]), labels=["a"],
                                trajectories=[np.array([[0.0, 0.0, 0.05], [0.1, 0.0, 0.05], [0.2, 0.0, 0.05]])])

    markers = world_model_markers(Straight().update(None, None))
    assert len(markers) == 3 and markers[0].label == "a"

    session = ViewerSession(controller="teleop", overlays={"slots": None}, out=str(tmp_path / "d.zarr"),
                            log=lambda line: None)
    try:
        session.overlays = {"straight": Straight()}
        for key in (265, 265, 263):  # Up, Up, Left
            session.on_key(key)
        np.testing.assert_allclose(session.plan, [[0.1, 0.4]] * 10, atol=1e-6)
        session.step()
        frame = session.frame()
        assert len(frame.images) == 2 and frame.images[0].shape == (64, 64, 3)
        assert "teleop" in frame.texts[0][2] and "straight latency" in frame.texts[0][1]
    finally:
        session.close()


def test_yaml_defaults_match_the_dataclass():
    from hydra import compose, initialize_config_dir

    from sim.collect import to_config
    from sim.viewer import ViewConfig

    with initialize_config_dir(config_dir=str(ROOT / "sim" / "conf"), version_base="1.3"):
        cfg = compose(config_name="view", overrides=["controller=teleop", "~overlays.slots"])
    predicted = ViewConfig().overlays["predicted"]
    assert to_config(cfg, ViewConfig) == ViewConfig(controller="teleop", overlays={"predicted": predicted})
    # F9 order expert -> teleop -> planner; the planner and the predicted tracks join with runs/wm_predictor
    assert list(cfg.controllers) == ["expert", "teleop", "planner"]
    assert cfg.controllers.planner._target_ == "worldmodel.planner.make_latent_planner"
    assert cfg.controllers.planner.checkpoint == cfg.overlays.predicted.checkpoint == "runs/wm_predictor"


def test_unicycle_integration_is_exact():
    line = integrate_unicycle([0.0, 0.0, 0.0], np.array([[0.2, 0.0]] * 10))
    np.testing.assert_allclose(line[-1], [0.2, 0.0, 0.0], atol=1e-12)
    # a quarter circle of radius v / w = 0.5 m, turning left
    arc = integrate_unicycle([1.0, 0.0, np.pi / 2], np.array([[0.5 * np.pi / 2, np.pi / 2]]), dt=1.0)
    np.testing.assert_allclose(arc[-1], [0.5, 0.5, np.pi], atol=1e-12)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="task must be one of 'single', 'formation'; got 'push'"):
        ViewerSession(task="push", overlays={"slots": None})
    with pytest.raises(ValueError, match="controller must be one of 'expert', 'teleop', 'planner'; got 'policy'"):
        ViewerSession(controller="policy", overlays={"slots": None})
    with pytest.raises(ValueError, match="controller 'policy' is not available: its checkpoint .* does not exist"):
        ViewerSession(controller="policy", overlays={"slots": None},
                      controllers={"policy": {"_target_": "x.Policy", "checkpoint": str(tmp_path / "none")}})
    (tmp_path / "training" / "cache").mkdir(parents=True)  # a run before its first checkpoint
    with pytest.raises(ValueError, match="'policy' is not available: its checkpoint .* holds no model.safetensors"):
        ViewerSession(controller="policy", overlays={"slots": None},
                      controllers={"policy": {"_target_": "x.Policy", "checkpoint": str(tmp_path / "training")}})
    with pytest.raises(ValueError, match="controller 'broken' .*could not be built"):
        ViewerSession(controllers={"broken": {"_target_": "sim.nothing.Here"}}, controller="broken",
                      overlays={"slots": None})
    assert translate_flags(["--headless", "steps=3"]) == ["headless=true", "steps=3"]
