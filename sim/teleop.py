"""Keyboard teleoperation of the differential-drive base, and the key codes `ego-view` uses.

The passive MuJoCo viewer reports key presses only (no releases), so commands are latched,
as in TurtleBot3's `teleop_keyboard`: each arrow press changes the commanded speed or turn
rate by one increment and the base keeps that command until the next press; End (or Delete)
stops it. Every letter key and the digits 0-5 are MuJoCo viewer shortcuts, so none is used.

Key codes are GLFW's (what `mujoco.viewer`'s key callback receives); they are spelled out here
so that this module needs no window library.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.env import ACTION_HIGH, ACTION_LOW

KEY_SPACE = 32
KEY_PERIOD = 46
KEY_ENTER = 257
KEY_DELETE = 261
KEY_RIGHT = 262
KEY_LEFT = 263
KEY_DOWN = 264
KEY_UP = 265
KEY_END = 269
KEY_F9 = 298
KEY_F10 = 299
KEY_KP_ENTER = 335

KEY_NAMES = {
    KEY_SPACE: "Space", KEY_PERIOD: ".", KEY_ENTER: "Enter", KEY_KP_ENTER: "Enter", KEY_DELETE: "Delete",
    KEY_RIGHT: "Right", KEY_LEFT: "Left", KEY_DOWN: "Down", KEY_UP: "Up", KEY_END: "End", KEY_F9: "F9",
    KEY_F10: "F10",
}


class KeyboardTeleop:
    """Controller driven by key presses: Up/Down change v by `dv`, Left/Right change omega by `dw`
    (Left turns counter-clockwise), End/Delete stop. Commands stay within the action bounds.

    `on_key(key) -> bool` is the viewer's hook (True when the key was used); `act` returns the
    latched command; `planned_actions()` says the base keeps it for the next second.
    """

    def __init__(self, dv: float = 0.05, dw: float = 0.4, horizon_steps: int = 10) -> None:
        if dv <= 0 or dw <= 0 or horizon_steps < 1:
            raise ValueError(f"dv and dw must be positive and horizon_steps >= 1; got {dv}, {dw}, {horizon_steps}")
        self.dv, self.dw, self.horizon_steps = float(dv), float(dw), int(horizon_steps)
        self.command = np.zeros(2, np.float32)

    def reset(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        self.command = np.zeros(2, np.float32)

    def act(self, obs: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> np.ndarray:
        return self.command.copy()

    def planned_actions(self) -> np.ndarray:
        return np.repeat(self.command[None], self.horizon_steps, axis=0)

    def on_key(self, key: int) -> bool:
        step = {KEY_UP: (self.dv, 0.0), KEY_DOWN: (-self.dv, 0.0), KEY_LEFT: (0.0, self.dw),
                KEY_RIGHT: (0.0, -self.dw)}.get(key)
        if step is not None:
            # round to the increment so that repeated presses land exactly on 0 again
            v = round((self.command[0] + step[0]) / self.dv) * self.dv
            w = round((self.command[1] + step[1]) / self.dw) * self.dw
            self.command = np.clip(np.array([v, w], np.float32), ACTION_LOW, ACTION_HIGH)
            return True
        if key in (KEY_END, KEY_DELETE):
            self.command = np.zeros(2, np.float32)
            return True
        return False

    def status(self) -> str:
        return f"v {self.command[0]:+.2f} m/s, w {self.command[1]:+.2f} rad/s"
