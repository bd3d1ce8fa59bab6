"""The perfect-perception diagnostic's quick path runs end to end (collect, train on privileged tokens,
evaluate) and reports one success-rate figure with its failure causes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_policy_oracle_perception_quick_reports_a_success_rate():
    run = subprocess.run([sys.executable, "benchmarks/policy_oracle_perception.py", "--quick", "--n-action", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    assert run.returncode == 0, run.stderr[-3000:]
    figure = json.loads(run.stdout.strip().splitlines()[-1])
    assert figure["metric"] == "success_rate" and figure["policy"] == "oracle-tokens" and figure["episodes"] == 2
    assert 0.0 <= figure["value"] <= 1.0 and figure["n_action"] == 2
    assert sum(figure["failures"].values()) == round(2 * (1 - figure["value"]))
