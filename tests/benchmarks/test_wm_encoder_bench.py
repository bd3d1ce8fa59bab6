"""The encoder benchmark's quick path: every quality figure, the probe fitted on episodes of its own,
and a test-time override of the slot-attention iterations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wm_encoder_quick_fits_the_probe_on_its_own_episodes(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/wm_encoder.py", "--quick", "--quality-only", "--slot-iters", "3", "1",
                          "--eval-root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         check=False, env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    figures = {f["metric"]: f for f in map(json.loads, lines)}
    assert set(figures) == {"fg_ari", "probe_median_err_m", "slot_identity_consistency"}
    for f in figures.values():
        assert f["slot_iters"] == [3, 1] and f["probe_fit_episodes"] == 8 and f["eval_episodes"] == 2
    assert 0.0 <= figures["slot_identity_consistency"]["value"] <= 1.0
    probe = figures["probe_median_err_m"]
    # fitted on the 8 probe-fit episodes, tested on every held-out sample; the half split is its own figure
    assert probe["fit_samples"] > probe["test_samples"] > 0 and probe["value"] > 0
    assert probe["half_split_probe_median_err_m"] > 0
    # the probe-fit episodes come from seeds of their own, beside the held-out ones
    assert any("seed200000_" in p.name for p in tmp_path.iterdir())
