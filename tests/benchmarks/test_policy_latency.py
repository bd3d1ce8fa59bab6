"""The latency benchmark's quick path times every sampler of the slots, CNN and Formation token controllers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_policy_latency_quick_times_every_controller_and_sampler():
    run = subprocess.run([sys.executable, "benchmarks/policy_latency.py", "--quick", "--threads", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    assert run.returncode == 0, run.stderr[-3000:]
    figures = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert {f["metric"] for f in figures} == {"ms_per_chunk"}
    samplers = {(f["policy"], f["sampler"], f["steps"]) for f in figures if not f["coherence"] and not f["select"]}
    for policy in ("slots", "cnn", "tokens"):
        assert {(policy, "ddim", 8), (policy, "ddim", 2), (policy, "consistency", 1)} <= samplers, policy
    for f in figures:
        assert 0 < f["p50"] <= f["p99"] and f["calls"] == 10
        if (f["sampler"], f["steps"]) == ("ddim", 8):
            assert f["speedup_vs_ddim8"] == 1.0
