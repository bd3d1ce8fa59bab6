"""The scene-perception benchmark's quick path (collect segmented frames, train the segmenter, measure it,
run the scripted expert on it), and the token policy's data built through a segmenter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_scene_perception_quick_reports_every_figure():
    run = subprocess.run([sys.executable, "benchmarks/scene_perception.py", "--quick"], cwd=ROOT, capture_output=True,
                         check=False, text=True, timeout=600,
                         env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    assert run.returncode == 0, run.stderr[-3000:]
    figures = [json.loads(line) for line in run.stdout.strip().splitlines()]
    metrics = {f["metric"] for f in figures}
    assert {"val_iou", "detection_recall", "detection_precision", "expert_success_rate"} <= metrics
    experts = {f["perception"]: f for f in figures if f["metric"] == "expert_success_rate"}
    assert set(experts) == {"segmenter", "privileged"} and all(f["episodes"] == 2 for f in experts.values())
    assert all(0.0 <= f["value"] <= 1.0 for f in figures if f["metric"] in ("val_iou", "detection_recall")
               and f["value"] is not None)


@pytest.fixture(scope="module")
def formation_segmenter(tmp_path_factory):
    """One short segmented noisy-expert Formation episode and a segmenter trained two steps on it."""
    from policies.perception import SegmenterTrainConfig, train_segmenter
    from sim.collect import collect

    tmp = tmp_path_factory.mktemp("formation_seg")
    path = str(tmp / "formation.zarr")
    collect(out=path, task="formation", level="easy", policy="noisy_expert", episodes=1, max_steps=60, workers=0,
            progress=False, segmentation=True)
    seg = train_segmenter([path], tmp / "seg", SegmenterTrainConfig(steps=2, batch_size=2, val_fraction=0.0),
                          progress=False)
    return path, str(seg)


def test_token_demonstrations_through_a_segmenter(formation_segmenter):
    """Tokens built from segmented RGB-D have the privileged tokens' layout, and the plan column (the
    demonstrator's own plan) is the same either way."""
    from policies.task_tokens import token_demos

    path, seg = formation_segmenter
    privileged = token_demos([path], plan=True, progress=False)
    perceived = token_demos([path], plan=True, perception=seg, progress=False)
    assert perceived.tokens.shape == privileged.tokens.shape
    assert (perceived.tokens[..., -1] == privileged.tokens[..., -1]).all()
    assert (perceived.action == privileged.action).all()


def test_the_deployable_token_controller_reads_no_privileged_state(formation_segmenter, tmp_path):
    """With a segmenter the controller acts from the observation alone (`info` only at reset: the task's
    definition), with either sampler, and its actions stay in the demonstrations' range."""
    from policies.task_tokens import TokenPolicyController, token_demos
    from policies.train import train
    from sim.env import EgoPushEnv

    path, seg = formation_segmenter
    out = str(tmp_path / "policy")
    train({"out": out, "encoder": "", "progress": False, "data": {"paths": [path], "task": "formation"},
           "policy": {"obs": "slots", "token_tail": 0, "down_dims": [16, 32], "cond_dim": 32},
           "train": {"steps": 3, "distill_steps": 2}}, demos=token_demos([path], plan=True, perception=seg,
                                                                    progress=False))
    env = EgoPushEnv(task="formation", level="easy")
    obs, info = env.reset(seed=3)
    for sampler, steps in (("ddim", 2), ("consistency", 1)):
        c = TokenPolicyController(out, plan=True, perception=seg, n_action=1, sampler=sampler, steps=steps)
        c.reset(obs, info)
        for _ in range(3):
            a = c.act(obs, None)
            assert a.shape == (2,) and np.isfinite(a).all()
            lo, hi = c.policy.action_min.numpy(), c.policy.action_max.numpy()  # the demonstrations' range
            assert (lo - 1e-5 <= a).all() and (a <= hi + 1e-5).all()
    env.close()
