"""Shared test setup.

MuJoCo fixes its OpenGL backend when `mujoco` is first imported, so the headless
EGL default must be in the environment before any test module imports it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

# Let `pytest` run from a plain checkout without PYTHONPATH or an install.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Torch tests use tiny tensors: on a shared 2-core machine, thread hand-offs cost more than the
    maths, so modules that use torch run on one thread. Modules that never import torch (most of
    tests/sim: `sim` must work without it) are left alone."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
