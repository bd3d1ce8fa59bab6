"""Shared by the world-model tests: a small real EgoPush dataset with segmentation, recorded once
per test session (one torch thread per module comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def wm_dataset(tmp_path_factory) -> str:
    from sim.collect import collect

    out = Path(tmp_path_factory.mktemp("wm")) / "formation_random.zarr"
    collect(out=str(out), task="formation", level="hard", policy="random", episodes=2, max_steps=24,
            segmentation=True, workers=0, progress=False)
    return str(out)


