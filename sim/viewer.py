"""`ego-view`: watch, drive, perturb and record the robot in MuJoCo's interactive viewer.

One loop, `ViewerSession`, owns the env, the controllers, the overlays and the recorder; two
front ends drive it:

* the window: MuJoCo's passive viewer (`mujoco.viewer.launch_passive`); our loop steps the
  simulation at real time (10 Hz control, 5 physics steps each), the overlays are decor geoms
  in the viewer's `user_scn`, the robot's RGB and depth are images drawn into the window and
  the status is a text overlay. The viewer's own mouse perturbation works on the objects while
  the controller runs: `sync()` turns the perturbation into `xfrc_applied`, which the env's
  physics steps then apply.
* `--headless`: the same loop without a window, rendered offscreen with the same overlays,
  insets and text into an MP4 (one frame per control step, real-time frame rate).

GL contexts: the window is GLFW (the viewer's own thread and context); the env renders its head
camera through the backend MUJOCO_GL names (EGL by default) in its own context on this thread;
the headless video renders through another context of that backend. Both arrangements were
checked together in one process under Xvfb.

Keys (GLFW codes in `sim.teleop`; letters and the digits 0-5 are MuJoCo's own shortcuts):

  Space    pause / resume              .      one step (pauses)
  Enter    reset to the next seed      F9     next controller
  F10      start / stop recording      arrows teleop: Up/Down speed, Left/Right turn rate
  End/Del  teleop stop                 mouse  double-click an object, then Ctrl+Shift+right-drag
                                              drags it along the floor (Ctrl+right-drag: up/down)

A recording is committed to the dataset at `out` (the DESIGN layout, same keys and meta as
`ego-collect`) when it is stopped, and automatically at a reset, at the episode's end and when
the viewer closes (window closed, limits reached, Ctrl-C).

    ego-view                                       # expert, single task, easy level
    ego-view task=formation level=hard controller=teleop out=data/teleop.zarr
    ego-view --headless steps=300 video=runs/view/demo.mp4
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import mujoco
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from tqdm import tqdm

import sim.render
from sim.collect import OBS_KEYS, STATE_KEYS, CollectConfig, check_choice, dataset_meta, env_kwargs, run_cli, to_config
from sim.controllers import Controller, recorded_action
from sim.dataset import DatasetError, EpisodeWriter, VideoFile, colorize_depth, resize_nearest
from sim.env import CONTROL_HZ, EgoPushEnv
from sim.evaluate import DEPTH_RANGE_SHOWN, controller_config
from sim.overlays import (
    Marker,
    OverlayFrame,
    add_markers,
    goal_markers,
    path_markers,
    planned_actions,
    world_model_markers,
)
from sim.teleop import (
    KEY_ENTER,
    KEY_F9,
    KEY_F10,
    KEY_KP_ENTER,
    KEY_PERIOD,
    KEY_SPACE,
)

KEYS_HELP = (
    ("Space  .", "pause / one step"),
    ("Enter  F9", "next seed / controller"),
    ("F10", "record on / off"),
    ("arrows  End", "teleop / stop"),
    ("Ctrl+Shift+R-drag", "push (dbl-click object)"),
)
INSET_MARGIN, INSET_GAP, INSET_BORDER = 10, 6, 2
INSET_BORDER_RGB = (235, 235, 235)
END_HOLD_S = 1.0  # the window shows an episode's end this long before the next episode starts


def _default_controllers() -> dict[str, Any]:
    return {"expert": {"_target_": "sim.experts.PushExpert"},
            "teleop": {"_target_": "sim.teleop.KeyboardTeleop", "dv": 0.05, "dw": 0.4},
            "planner": {"_target_": "worldmodel.planner.make_latent_planner", "checkpoint": "runs/wm_predictor",
                        "samples": 64, "iterations": 4, "elites": 8}}


def _default_overlays() -> dict[str, Any]:
    return {"slots": {"_target_": "worldmodel.overlay.SlotOverlay", "checkpoint": "runs/wm_encoder"},
            "predicted": {"_target_": "worldmodel.overlay.PredictionOverlay", "checkpoint": "runs/wm_predictor",
                          "points": False}}


@dataclass
class ViewConfig:
    """Options of `ego-view` (defaults mirrored in sim/conf/view.yaml)."""

    task: str = "single"  # single | formation
    level: str = "easy"  # easy | hard
    seed: int = 0  # reset seed of the first episode; every reset takes the next one
    image_size: int = 64  # the robot's camera, as in ego-collect
    max_steps: int | None = None  # None: the task's default time limit
    randomize: bool = False  # all domain randomisation on
    # name -> Hydra `_target_` config; F9 cycles through them in this order. An entry with a
    # `checkpoint` that does not exist (or holds no model.safetensors yet) is left out (with a
    # notice), so defaults work from nothing; an entry set to None is off.
    controllers: dict[str, Any] = field(default_factory=_default_controllers)
    controller: str = "expert"  # the one driving at the start
    # name -> `_target_` of a world-model overlay provider (sim.overlays.OverlayProvider); same rule
    overlays: dict[str, Any] = field(default_factory=_default_overlays)
    out: str = "data/ego_view.zarr"  # recordings are committed to this dataset
    record: bool = False  # record every episode from its first step (F10 still toggles)
    headless: bool = False  # no window: write an MP4 (`ego-view --headless` is the same)
    video: str | None = None  # headless video path; None: runs/view/<task>_<level>_seed<seed>.mp4
    width: int = 640  # headless frame size (even numbers: H.264)
    height: int = 480
    steps: int | None = None  # stop after this many control steps (headless default: one episode)
    seconds: float | None = None  # stop after this much wall-clock time
    pause_at: int | None = None  # window: pause after this many steps (0: start paused), window stays open
    speed: float = 1.0  # window: 1 = real time, 2 = twice as fast, 0 = as fast as possible
    auto_reset: bool = True  # a finished episode is followed by the next seed (else: pause)
    show_ui: bool = False  # MuJoCo's side panels (settings, joints, controls)
    progress: bool = True  # headless: progress bar


ConfigStore.instance().store(name="view_schema", node=ViewConfig)


def _check(cfg: ViewConfig) -> None:
    env_kwargs(cfg.task, cfg.level, cfg.image_size, cfg.max_steps, cfg.randomize)  # checks task and level
    # an entry set to None is switched off (what `~controllers.NAME` does on the command line)
    cfg.controllers = {k: v for k, v in cfg.controllers.items() if v is not None}
    cfg.overlays = {k: v for k, v in cfg.overlays.items() if v is not None}
    if not cfg.controllers:
        raise ValueError("controllers must name at least one controller (name: {_target_: ...})")
    if cfg.controller not in cfg.controllers:
        allowed = ", ".join(map(repr, cfg.controllers))
        raise ValueError(f"controller must be one of {allowed}; got {cfg.controller!r} (another controller joins "
                         f"with +controllers.{cfg.controller}._target_=..., see sim/conf/view.yaml)")
    for name, entry in cfg.controllers.items():
        try:
            controller_config(entry)
        except ValueError as e:
            raise ValueError(f"controllers.{name}: {e}") from None
    for name, entry in cfg.overlays.items():
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise ValueError(f"overlays.{name} must be a mapping with a '_target_' key; got {entry!r}")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"steps must be >= 1 or null; got {cfg.steps}")
    if cfg.seconds is not None and not cfg.seconds > 0:
        raise ValueError(f"seconds must be positive or null; got {cfg.seconds}")
    if cfg.speed < 0:
        raise ValueError(f"speed must be >= 0 (0 = as fast as possible); got {cfg.speed}")
    if cfg.width < 64 or cfg.height < 64 or cfg.width % 2 or cfg.height % 2:
        raise ValueError(f"width and height must be even and >= 64; got {cfg.width}x{cfg.height}")


def _missing_checkpoint(entry: Mapping[str, Any]) -> str | None:
    """Why the entry's `checkpoint` is not there (None: it is, or the entry names none). A run directory
    without its weights yet (a training before its first checkpoint) counts as missing."""
    path = entry.get("checkpoint")
    if path is None:
        return None
    p = Path(str(path))
    if not p.exists():
        return f"{path} does not exist"
    if p.is_dir() and not (p / "model.safetensors").exists():
        return f"{path} holds no model.safetensors yet"
    return None


def _instantiate(kind: str, name: str, entry: Mapping[str, Any]) -> Any:
    from hydra.utils import instantiate

    try:
        return instantiate(dict(entry))
    except Exception as e:  # an unknown _target_, a bad argument, a checkpoint that does not load
        cause = e.__cause__ or e
        raise ValueError(f"{kind} {name!r} ({entry.get('_target_')}) could not be built: {cause}") from e


# ---------------------------------------------------------------------------- recording


class _Recording:
    """Steps of one episode being recorded, with the same per-step keys as `ego-collect`."""

    def __init__(self, seed: int, start_step: int) -> None:
        self.seed, self.start_step = seed, start_step
        self.columns: dict[str, list] = {}
        self.controllers: list[str] = []
        self.episode_return = 0.0
        self.final_info: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.columns.get("action", ()))

    def add(self, obs: dict, info: dict, label: np.ndarray, executed: np.ndarray, reward: float, next_info: dict,
            controller: str) -> None:
        row = {k: obs[k] for k in OBS_KEYS} | {k: info[k] for k in STATE_KEYS}
        row |= {"action": label, "executed_action": executed, "reward": reward, "is_success": next_info["is_success"]}
        for key, value in row.items():
            self.columns.setdefault(key, []).append(np.asarray(value))
        if not self.controllers or self.controllers[-1] != controller:
            self.controllers.append(controller)
        self.episode_return += reward
        self.final_info = next_info

    def steps(self) -> dict[str, np.ndarray]:
        out = {}
        for key, values in self.columns.items():
            arr = np.stack(values)
            out[key] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
        return out


# ---------------------------------------------------------------------------- the loop


@dataclass
class ViewFrame:
    """What both front ends draw for one moment: 3D markers, the robot's images, text blocks."""

    markers: list[Marker]
    images: list[np.ndarray]  # uint8 (H, W, 3) each, shown top right, left to right
    texts: list[tuple[int, str, str]]  # (mjtGridPos, left column, right column)


class ViewerSession:
    """Env, controllers, overlay providers and recorder, advanced one control step at a time.

    Key presses arrive on `keys` (any thread: the viewer's key callback puts GLFW key codes
    there) and are handled in order by `process_keys()` on the loop's thread. `log` receives
    one line per event (pause, reset, controller switch, recording committed, ...).
    """

    def __init__(self, config: ViewConfig | Mapping[str, Any] | DictConfig | None = None,
                 log: Callable[[str], None] | None = None, **overrides: Any) -> None:
        cfg: ViewConfig = to_config(config, ViewConfig, overrides)
        _check(cfg)
        self.cfg = cfg
        self.log = log or (lambda line: print(f"ego-view: {line}", flush=True))
        self.keys: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.controllers = self._build("controller", cfg.controllers, required=cfg.controller)
        self.overlays = self._build("overlay", cfg.overlays)
        self.env_args = env_kwargs(cfg.task, cfg.level, cfg.image_size, cfg.max_steps, cfg.randomize)
        self.env = EgoPushEnv(**self.env_args)
        self.active = cfg.controller
        self.paused = False
        self.total_steps = 0
        self.episodes = 0
        self.successes = 0
        self.next_seed = cfg.seed
        self.act_ms: dict[str, tuple[float, float]] = {}  # controller -> (last, average) ms
        self.overlay_ms: dict[str, float] = {}
        self.recording: _Recording | None = None
        self.committed: list[dict[str, Any]] = []
        self._writer: EpisodeWriter | None = None
        self._message = ""
        self.version = 0  # bumped whenever what is drawn changes
        try:
            self.reset()
        except BaseException:
            self.env.close()
            raise

    # -- building --------------------------------------------------------------

    def _build(self, kind: str, entries: Mapping[str, Any], required: str | None = None) -> dict[str, Any]:
        built = {}
        for name, entry in entries.items():
            entry = controller_config(entry)
            missing = _missing_checkpoint(entry)
            if missing is not None:
                if name == required:
                    raise ValueError(f"{kind} {name!r} is not available: its checkpoint {missing}")
                self.log(f"{kind} {name!r} is off: its checkpoint {missing}")
                continue
            built[name] = _instantiate(kind, name, {k: v for k, v in entry.items()})
        return built

    # -- episodes --------------------------------------------------------------

    @property
    def controller(self) -> Controller:
        return self.controllers[self.active]

    def reset(self) -> None:
        """Start a new episode on the next seed (a recording in progress is committed first)."""
        if self.recording is not None:
            self.stop_recording("reset")
        self.seed = self.next_seed
        self.next_seed += 1
        self.obs, self.info = self.env.reset(seed=self.seed)
        self.episodes += 1
        self.episode_steps = 0
        self.done = False
        self.outcome = ""
        self.done_time = 0.0
        self.last_action: np.ndarray | None = None
        self.controller.reset(self.obs, self.info)
        for provider in self.overlays.values():
            provider.reset(self.obs, self.info)
        self._after_change()
        self.sim_time = self.env.data.time
        if self.cfg.record:
            self.start_recording()

    def step(self) -> None:
        """One control step of the active controller (after a finished episode: the next one's first)."""
        if self.done:
            self.reset()
        ctrl, name = self.controller, self.active
        t0 = time.perf_counter()
        action = np.asarray(ctrl.act(self.obs, self.info), np.float32)
        ms = (time.perf_counter() - t0) * 1e3
        avg = self.act_ms.get(name, (ms, ms))[1]
        self.act_ms[name] = (ms, avg + 0.1 * (ms - avg))  # exponential average over ~10 steps
        label = recorded_action(ctrl, action)
        obs, reward, terminated, truncated, info = self.env.step(action)
        for provider in self.overlays.values():  # providers that keep a history see what was executed
            hook = getattr(provider, "observe_action", None)
            if callable(hook):
                hook(action)
        if self.recording is not None:
            self.recording.add(self.obs, self.info, label, action, float(reward), info, name)
        self.obs, self.info, self.last_action = obs, info, action
        self.episode_steps += 1
        self.total_steps += 1
        self.sim_time = self.env.data.time
        self._after_change()
        if terminated or truncated:
            self.done = True
            self.done_time = time.monotonic()
            self.successes += bool(terminated)
            self.outcome = "success" if terminated else "time limit"
            self.log(f"episode seed {self.seed}: {self.outcome} after {self.episode_steps} steps")
            if self.recording is not None:
                self.stop_recording(self.outcome)
            if not self.cfg.auto_reset:
                self.paused = True

    def _after_change(self) -> None:
        self.plan = planned_actions(self.controller, self.last_action)
        self.overlay_frames: dict[str, OverlayFrame] = {}
        for name, provider in self.overlays.items():
            t0 = time.perf_counter()
            self.overlay_frames[name] = provider.update(self.obs, self.plan)
            self.overlay_ms[name] = (time.perf_counter() - t0) * 1e3
        self.version += 1

    def check_physics(self) -> None:
        """MuJoCo's own reset (Backspace, or the Reset button) zeroes the physics under the env:
        start a proper episode instead."""
        if self.env.data.time < self.sim_time - 1e-9:
            self.log("the viewer reset the physics (Backspace): starting a new episode")
            self.reset()

    # -- keys ------------------------------------------------------------------

    def process_keys(self) -> bool:
        """Handle every key press waiting on `keys`, in order; True when any did something."""
        changed = False
        while True:
            try:
                key = self.keys.get_nowait()
            except queue.Empty:
                return changed
            changed |= self.on_key(key)

    def on_key(self, key: int) -> bool:
        if key == KEY_SPACE:
            self.paused = not self.paused
            self.log("paused" if self.paused else "resumed")
        elif key == KEY_PERIOD:
            self.paused = True
            self.step()
        elif key in (KEY_ENTER, KEY_KP_ENTER):
            self.reset()
            self.log(f"reset: seed {self.seed}")
        elif key == KEY_F9:
            self.switch_controller()
        elif key == KEY_F10:
            if self.recording is None:
                self.start_recording()
            else:
                self.stop_recording("stopped")
        else:
            hook = getattr(self.controller, "on_key", None)
            if not (callable(hook) and hook(key)):
                return False
            self.plan = planned_actions(self.controller, self.last_action)
        self.version += 1
        return True

    def switch_controller(self, name: str | None = None) -> None:
        """Hand the robot to `name` (default: the next configured controller) mid-episode."""
        names = list(self.controllers)
        name = names[(names.index(self.active) + 1) % len(names)] if name is None else name
        check_choice("controller", name, names)
        self.controllers[name].reset(self.obs, self.info)
        self.active = name
        self.plan = planned_actions(self.controller, None)
        self.log(f"controller: {name}")

    # -- recording -------------------------------------------------------------

    def start_recording(self) -> None:
        if self.recording is not None:
            return
        try:
            if self._writer is None:
                collect_cfg = CollectConfig(out=self.cfg.out, task=self.cfg.task, level=self.cfg.level,
                                            seed=self.cfg.seed, policy="ego-view", image_size=self.cfg.image_size,
                                            max_steps=self.cfg.max_steps, randomize=self.cfg.randomize)
                meta = dataset_meta(collect_cfg, self.env_args)
                Path(self.cfg.out).parent.mkdir(parents=True, exist_ok=True)
                self._writer = EpisodeWriter(self.cfg.out, meta=meta)
        except DatasetError as e:
            self._message = f"cannot record: {e}"
            self.log(self._message)
            return
        self.recording = _Recording(self.seed, self.episode_steps)
        self._message = ""
        self.log(f"recording seed {self.seed} from step {self.episode_steps}")

    def stop_recording(self, reason: str) -> dict[str, Any] | None:
        """Commit the recording (atomically) to the dataset; an empty one is dropped."""
        rec, self.recording = self.recording, None
        if rec is None:
            return None
        if len(rec) == 0:
            self.log("recording stopped before any step: nothing to commit")
            return None
        final = rec.final_info
        info = {
            "success": bool(final["is_success"]),
            "length": len(rec),
            "seed": rec.seed,
            "start_step": rec.start_step,
            "return": rec.episode_return,
            "n_clipped_actions": int(final["n_clipped_actions"]),
            "formation": final["formation"],
            "controllers": rec.controllers,
            "source": "ego-view",
            "stopped_by": reason,
        }
        # the reset seed reproduces the episode only when it was recorded from its first step
        seed = rec.seed if rec.start_step == 0 and not self._writer.has_seed(rec.seed) else None
        index = self._writer.add_episode(rec.steps(), seed=seed, info=info)
        entry = {"index": index, "length": len(rec), "seed": rec.seed, "success": info["success"],
                 "controllers": rec.controllers}
        self.committed.append(entry)
        self.log(f"recorded episode {index} ({len(rec)} steps, {reason}) -> {self.cfg.out}")
        return entry

    # -- drawing ---------------------------------------------------------------

    def frame(self) -> ViewFrame:
        markers = goal_markers(self.info["goal"]) + path_markers(self.info["robot_pose"], self.plan)
        for overlay in self.overlay_frames.values():
            markers += world_model_markers(overlay)
        depth = colorize_depth(self.obs["depth"], *DEPTH_RANGE_SHOWN)
        return ViewFrame(markers=markers, images=[self.obs["rgb"], depth], texts=self._texts())

    def _texts(self) -> list[tuple[int, str, str]]:
        cfg, info = self.cfg, self.info
        max_steps = self.env.max_steps
        error = float(np.max(info["goal_errors"])) if len(info["goal_errors"]) else 0.0
        state = "PAUSED" if self.paused else "running"
        if self.done:
            state = f"{self.outcome}" + ("" if self.paused else ": next episode")
        rows = [
            ("task", f"{cfg.task} / {cfg.level}, seed {self.seed}"),
            ("step", f"{self.episode_steps} / {max_steps}"),
            ("success", f"{'YES' if info['is_success'] else 'no'} (goal error {error:.3f} m)"),
            ("controller", f"{self.active}  [F9: {', '.join(self.controllers)}]"),
        ]
        last, mean = self.act_ms.get(self.active, (0.0, 0.0))
        rows.append(("act latency", f"{last:.2f} ms (avg {mean:.2f} ms)"))
        for name, ms in self.overlay_ms.items():
            rows.append((f"{name} latency", f"{ms:.1f} ms"))
        status = getattr(self.controller, "status", None)
        if callable(status):
            rows.append(("command", status()))
        rec = "off" if self.recording is None else f"REC {len(self.recording)} steps -> {Path(cfg.out).name}"
        rows.append(("recording", rec))
        rows.append(("state", state))
        if self._message:
            rows.append(("note", self._message))
        status_text = ("\n".join(r[0] for r in rows), "\n".join(r[1] for r in rows))
        keys_text = ("\n".join(k for k, _ in KEYS_HELP), "\n".join(v for _, v in KEYS_HELP))
        return [(int(mujoco.mjtGridPos.mjGRID_TOPLEFT), *status_text),
                (int(mujoco.mjtGridPos.mjGRID_BOTTOMLEFT), *keys_text)]

    # -- ending ----------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.total_steps,
            "episodes": self.episodes,
            "successes": self.successes,
            "controller": self.active,
            "recorded": self.committed,
            "dataset": self.cfg.out if self.committed else None,
            "seed": self.seed,
            "episode_steps": self.episode_steps,
            "robot_pose": np.asarray(self.info["robot_pose"]).round(4).tolist(),
            "object_poses": np.asarray(self.info["object_poses"]).round(4).tolist(),
        }

    def close(self) -> None:
        """Commit a recording in progress, release the dataset, close the env."""
        try:
            if self.recording is not None:
                self.stop_recording("closed")
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self.env.close()


# ---------------------------------------------------------------------------- drawing helpers


Rect = tuple[int, int, int, int]  # left, bottom, width, height (pixels, OpenGL's bottom-left origin)


def inset_layout(view_w: int, view_h: int, image_h: int, image_w: int, n: int = 2) -> list[Rect]:
    """Rectangles (left, bottom, width, height; OpenGL's bottom-left origin, border included) of
    `n` images of image_h x image_w, enlarged by a whole factor, side by side at the top right."""
    scale = max(1, min(int(0.4 * view_h) // image_h, int(0.45 * view_w / n) // image_w))
    w, h = image_w * scale + 2 * INSET_BORDER, image_h * scale + 2 * INSET_BORDER
    bottom = view_h - INSET_MARGIN - h
    rects = []
    for i in range(n):
        left = view_w - INSET_MARGIN - (n - i) * w - (n - 1 - i) * INSET_GAP
        rects.append((left, bottom, w, h))
    return rects


def inset_images(images: list[np.ndarray], view_w: int, view_h: int) -> list[tuple[Rect, np.ndarray]]:
    """(rect, uint8 image of the rect's size, top row first) for each image, enlarged and framed."""
    if not images:
        return []
    h, w = images[0].shape[:2]
    out = []
    for rect, img in zip(inset_layout(view_w, view_h, h, w, len(images)), images):
        inner = resize_nearest(img, rect[3] - 2 * INSET_BORDER, rect[2] - 2 * INSET_BORDER)
        framed = np.empty((rect[3], rect[2], 3), np.uint8)
        framed[:] = INSET_BORDER_RGB
        framed[INSET_BORDER:-INSET_BORDER, INSET_BORDER:-INSET_BORDER] = inner
        out.append((rect, framed))
    return out


def init_camera(cam: mujoco.MjvCamera) -> None:
    """The free camera both front ends start from: the arena from behind its -y wall, 55 deg down."""
    cam.type = mujoco.mjtCamera.mjCAMERA_FREE
    cam.lookat[:] = (0.0, 0.1, 0.0)
    cam.distance = 3.1
    cam.azimuth = 90.0
    cam.elevation = -55.0


# ---------------------------------------------------------------------------- front ends


def _check_display() -> None:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ValueError("no display (DISPLAY is not set): run `ego-view --headless` to write a video instead, "
                         "or give it a virtual display: `xvfb-run -a ego-view ...`")
    try:
        import glfw
    except Exception as e:  # noqa: BLE001  (libglfw ships with the wheel; it fails without X11 client libs)
        raise ValueError(f"the viewer window needs GLFW, which did not load ({e}); use `ego-view --headless`") from None
    if not glfw.init():
        raise ValueError(f"cannot open a window on display {os.environ.get('DISPLAY')!r}: run `ego-view --headless`, "
                         "or `xvfb-run -a ego-view ...`")


class WindowFrontEnd:
    """MuJoCo's passive viewer on the session's env; its render thread draws, our loop steps."""

    def __init__(self, session: ViewerSession, show_ui: bool = False) -> None:
        _check_display()
        import mujoco.viewer

        self.session = session
        env = session.env
        before = set(threading.enumerate())
        self.handle = mujoco.viewer.launch_passive(env.model, env.data, key_callback=session.keys.put,
                                                   show_left_ui=show_ui, show_right_ui=show_ui)
        self._threads = [t for t in threading.enumerate() if t not in before]
        with self.handle.lock():
            init_camera(self.handle.cam)
        self._drawn: tuple[int, tuple[int, int]] | None = None

    def running(self) -> bool:
        return self.handle.is_running()

    def draw(self) -> None:
        """Show the session's current state (markers, insets, text) if it changed; sync always,
        which also hands the mouse perturbation to the physics (as xfrc_applied)."""
        h, s = self.handle, self.session
        vp = h.viewport
        size = (vp.width, vp.height) if vp is not None else (0, 0)
        if (s.version, size) != self._drawn and min(size) > 0:  # new state, or the window was resized
            frame = s.frame()
            with h.lock():
                h.user_scn.ngeom = 0
                add_markers(h.user_scn, frame.markers)
            h.set_images([(mujoco.MjrRect(*rect), img) for rect, img in inset_images(frame.images, *size)])
            h.set_texts([(int(mujoco.mjtFont.mjFONT_NORMAL), pos, a, b) for pos, a, b in frame.texts])
            self._drawn = (s.version, size)
        h.sync()

    def close(self) -> None:
        self.handle.close()
        for t in self._threads:  # the viewer's thread must be gone before GL teardown at exit
            t.join(timeout=5.0)


class VideoFrontEnd:
    """Offscreen rendering of the same view (third-person free camera, overlays, insets, text)
    into an MP4, one frame per call to `draw`."""

    def __init__(self, session: ViewerSession, path: str | os.PathLike[str], width: int, height: int,
                 fps: float = CONTROL_HZ) -> None:
        model = session.env.model
        self.session, self.width, self.height = session, width, height
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, height)
        self._gl = sim.render._gl_context(width, height)
        self._make_current()
        self._con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._con)
        self._scene = mujoco.MjvScene(model, maxgeom=2000)
        self._option = mujoco.MjvOption()
        self._pert = mujoco.MjvPerturb()
        self._camera = mujoco.MjvCamera()
        init_camera(self._camera)
        self._rect = mujoco.MjrRect(0, 0, width, height)
        self._rgb = np.empty((height, width, 3), np.uint8)
        self.video = VideoFile(path, fps=fps)
        self.frames = 0

    def _make_current(self) -> None:
        # sim.render tracks the current context per process: tell it, so the env's camera
        # makes its own context current again before its next frame
        self._gl.make_current()
        sim.render._current_context = self._gl

    def render(self) -> np.ndarray:
        """The current view as uint8 (height, width, 3)."""
        s = self.session
        frame = s.frame()
        self._make_current()
        mujoco.mjv_updateScene(s.env.model, s.env.data, self._option, self._pert, self._camera,
                               mujoco.mjtCatBit.mjCAT_ALL, self._scene)
        add_markers(self._scene, frame.markers)
        mujoco.mjr_render(self._rect, self._scene, self._con)
        for (left, bottom, w, h), img in inset_images(frame.images, self.width, self.height):
            mujoco.mjr_drawPixels(np.ascontiguousarray(img[::-1]).ravel(), None, mujoco.MjrRect(left, bottom, w, h),
                                  self._con)
        for pos, a, b in frame.texts:
            mujoco.mjr_overlay(mujoco.mjtFont.mjFONT_NORMAL, pos, self._rect, a, b, self._con)
        mujoco.mjr_readPixels(self._rgb, None, self._rect, self._con)
        return self._rgb[::-1].copy()

    def draw(self) -> None:
        self.video.append(self.render())
        self.frames += 1

    def close(self, keep: bool = True) -> Path | None:
        path = self.video.commit() if keep and self.frames else None
        if path is None:
            self.video.discard()
        self._make_current()
        self._con.free()
        self._gl.free()
        sim.render._current_context = None
        return path


# ---------------------------------------------------------------------------- loops


def run_window(session: ViewerSession, front: WindowFrontEnd) -> None:
    """Real-time loop: keys at up to 60 Hz, a control step every 0.1 s / speed while running."""
    cfg = session.cfg
    period = 0.0 if cfg.speed == 0 else 1.0 / (CONTROL_HZ * cfg.speed)
    start = next_step = time.monotonic()
    if cfg.pause_at == 0:
        session.paused = True
        session.log("paused at step 0")
    front.draw()
    while front.running():
        now = time.monotonic()
        if cfg.seconds is not None and now - start >= cfg.seconds:
            break
        if cfg.steps is not None and session.total_steps >= cfg.steps:
            break
        session.process_keys()
        session.check_physics()
        holding = session.done and cfg.auto_reset and now - session.done_time < END_HOLD_S / max(cfg.speed, 1e-6)
        if not session.paused and not holding and now >= next_step:
            front.draw()  # sync first: the latest mouse perturbation acts during this step
            session.step()
            next_step = max(next_step + period, now) if period else now
            if cfg.pause_at is not None and session.total_steps == cfg.pause_at:
                session.paused = True
                session.log(f"paused at step {session.total_steps}")
        front.draw()
        wait = min(next_step, time.monotonic() + 1 / 60) - time.monotonic()
        if session.paused or holding:
            wait = 1 / 60
        if wait > 0:
            time.sleep(wait)
    session.process_keys()  # keys pressed before the window closed still count (a last F10, say)


def run_headless(session: ViewerSession, front: VideoFrontEnd) -> None:
    """As fast as it goes, one video frame per control step; without steps or seconds, one episode."""
    cfg = session.cfg
    one_episode = cfg.steps is None and cfg.seconds is None
    start = time.monotonic()
    front.draw()
    bar = tqdm(total=cfg.steps, unit="step", desc=f"ego-view {cfg.task}/{cfg.level}", dynamic_ncols=True,
               disable=not cfg.progress)
    with bar:
        while True:
            if cfg.steps is not None and session.total_steps >= cfg.steps:
                break
            if cfg.seconds is not None and time.monotonic() - start >= cfg.seconds:
                break
            if one_episode and session.done:
                break
            session.step()
            front.draw()
            bar.update(1)


def view(config: ViewConfig | Mapping[str, Any] | DictConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Run `ego-view` (window or headless) and return its summary (steps, episodes, recordings, ...).

    Ctrl-C (or SIGTERM) ends it like closing the window: the open recording is committed;
    the summary then has `interrupted: true`."""
    cfg: ViewConfig = to_config(config, ViewConfig, overrides)
    if not cfg.headless:
        _check_display()  # before anything is built: fail fast, with the way out
    session = ViewerSession(cfg)
    front: WindowFrontEnd | VideoFrontEnd | None = None
    interrupted = False
    video = None
    try:
        if cfg.headless:
            path = cfg.video or f"runs/view/{cfg.task}_{cfg.level}_seed{cfg.seed}.mp4"
            front = VideoFrontEnd(session, path, cfg.width, cfg.height)
            try:
                run_headless(session, front)
            except KeyboardInterrupt:
                interrupted = True
            video = front.close()
            front = None
        else:
            front = WindowFrontEnd(session, cfg.show_ui)
            try:
                run_window(session, front)
            except KeyboardInterrupt:
                interrupted = True
    finally:
        if front is not None:
            front.close() if isinstance(front, WindowFrontEnd) else front.close(keep=False)
        session.close()
    summary = session.summary() | {"video": None if video is None else str(video), "interrupted": interrupted}
    return summary


def translate_flags(argv: list[str]) -> list[str]:
    """`--headless` is `headless=true` (the issue's spelling); everything else goes to Hydra."""
    return ["headless=true" if a == "--headless" else a for a in argv]


@hydra.main(version_base="1.3", config_path="conf", config_name="view")
def _hydra_main(cfg: DictConfig) -> None:
    summary = run_cli("ego-view", lambda: view(cfg), f"recordings committed to {cfg.out}")
    print(json.dumps(summary), flush=True)
    if summary["interrupted"]:
        sys.exit(130)


def main() -> None:
    """`ego-view`: Hydra CLI around `view`."""
    sys.argv = [sys.argv[0], *translate_flags(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
