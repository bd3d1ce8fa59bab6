"""benchmarks/expert_success.py runs the expert with the settings it is given, reports them with the figure,
and refuses a setting the expert does not have before starting anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}


def test_expert_success_reports_the_experts_settings():
    run = subprocess.run([sys.executable, "benchmarks/expert_success.py", "--quick", "--tasks", "single", "--levels",
                          "hard", "--episodes", "2", "--expert", "goal_range_m=1.2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    figure = json.loads(run.stdout.strip().splitlines()[-1])
    assert figure["expert"] == {"goal_range_m": 1.2} and figure["episodes"] == 2 and figure["level"] == "hard"
    assert 0.0 <= figure["value"] <= 1.0


def test_expert_success_refuses_an_unknown_setting():
    run = subprocess.run([sys.executable, "benchmarks/expert_success.py", "--expert", "goal_rang=1.2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=ENV)
    assert run.returncode == 2 and "unknown expert settings" in run.stderr and not run.stdout
