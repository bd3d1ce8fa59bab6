"""Shared by the world-model tests: one torch thread, and a small real EgoPush dataset with
segmentation, recorded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def wm_dataset(tmp_path_factory) -> str:
    from sim.collect import collect

    out = Path(tmp_path_factory.mktemp("wm")) / "formation_random.zarr"
    collect(out=str(out), task="formation", level="hard", policy="random", episodes=2, max_steps=24,
            segmentation=True, workers=0, progress=False)
    return str(out)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test tensors are tiny: on a shared 2-core machine, thread hand-offs cost more than the maths.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
