"""The predictor benchmark's open-loop path on a tiny saved chain: every figure names its horizon, and
splits its objects into those the simulator moved and those it did not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wm_predictor_bench_splits_moved_and_static_objects(world_model, tmp_path):
    _, pred_dir = world_model
    args = ["--quick", "--checkpoint", str(pred_dir), "--skip", "planning", "counterfactual", "--horizons", "2", "10",
            "--figure", str(tmp_path / "curves.png"), "--eval-root", str(tmp_path)]
    run = subprocess.run([sys.executable, "benchmarks/wm_predictor.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         check=False, env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    assert run.returncode == 0, run.stderr[-3000:]
    figures = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    open_loop = [f for f in figures if f["metric"] == "pos_err_m"]
    assert sorted(f["horizon"] for f in open_loop) == [2, 10]
    assert len(open_loop) == len(figures)
    for f in figures:
        assert f["moved_objects"] + f["static_objects"] == f["objects"] and f["moved_m"] == 0.02
        assert f["match"] == "history" and f["variant"]
    # random exploration: over 2 steps (0.2 s) most seen objects stand still
    assert open_loop[0]["objects"] > 0 and open_loop[0]["static_objects"] > 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert f"# figure: {tmp_path / 'curves.png'}" in run.stdout
