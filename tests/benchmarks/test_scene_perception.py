"""The scene-perception benchmark's quick path (collect segmented frames, train the segmenter, measure it,
run the scripted expert on it), and the token policy's data built through a segmenter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_token_demonstrations_through_a_segmenter(tmp_path):
    """Tokens built from segmented RGB-D have the privileged tokens' layout, and the plan column (the
    demonstrator's own plan) is the same either way."""
    from policies.perception import SegmenterTrainConfig, train_segmenter
    from policies.task_tokens import token_demos
    from sim.collect import collect

    path = str(tmp_path / "formation.zarr")
    collect(out=path, task="formation", level="easy", policy="noisy_expert", episodes=1, max_steps=60, workers=0,
            progress=False, segmentation=True)
    seg = train_segmenter([path], tmp_path / "seg", SegmenterTrainConfig(steps=2, batch_size=2, val_fraction=0.0),
                          progress=False)
    privileged = token_demos([path], plan=True, progress=False)
    perceived = token_demos([path], plan=True, perception=str(seg), progress=False)
    assert perceived.tokens.shape == privileged.tokens.shape
    assert (perceived.tokens[..., -1] == privileged.tokens[..., -1]).all()
    assert (perceived.action == privileged.action).all()
