"""Shared test setup.

MuJoCo fixes its OpenGL backend when `mujoco` is first imported, so the headless
EGL default must be in the environment before any test module imports it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

# Let `pytest` run from a plain checkout without PYTHONPATH or an install.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
