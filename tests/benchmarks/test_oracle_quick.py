"""The perfect-perception diagnostic's quick path runs end to end (collect, train on privileged tokens,
evaluate) and reports one success-rate figure with its failure causes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

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


def test_the_expert_plan_replays_formation_demonstrations_exactly(tmp_path):
    """--plan: the expert watched over a recorded noisy-expert Formation episode reproduces its recorded
    labels, so the plan column it writes is the plan the demonstrator followed; a box and a slot are marked."""
    from policies.task_tokens import token_demos
    from sim.collect import collect

    path = str(tmp_path / "formation.zarr")
    collect(out=path, task="formation", level="easy", policy="noisy_expert", episodes=1, max_steps=150, workers=0,
            progress=False)
    plain = token_demos([path])
    planned = token_demos([path], plan=True)  # raises if the replay disagrees with a label
    assert planned.tokens.shape[:-1] == plain.tokens.shape[:-1]
    assert planned.tokens.shape[-1] == plain.tokens.shape[-1] + 1
    np.testing.assert_array_equal(planned.tokens[..., :-1], plain.tokens)
    marks = planned.tokens[..., -1]  # (N, 6 objects + 3 slots)
    working = marks.sum(-1) > 0
    assert working.any(), "the expert chose no box in 150 steps"
    assert (marks[working, 1:4].sum(-1) == 1).all() and (marks[working, 6:].sum(-1) == 1).all()
    assert (marks[:, [0, 4, 5]] == 0).all()  # neither the anchor nor a distractor is ever the box to push
