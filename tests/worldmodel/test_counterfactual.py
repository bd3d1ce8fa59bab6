"""Counterfactual segments (`worldmodel.counterfactual`): the interventions change the real scene as
they say, the commands are replayed unchanged, `EgoPushEnv.place_object` refuses bad input, and the
open-loop error measure follows the right objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.env import EgoPushEnv
from worldmodel.counterfactual import (
    VARIANTS,
    RolloutErrors,
    encode_counterfactuals,
    record_counterfactuals,
    rollout_errors,
)
from worldmodel.train import load_encoder
from worldmodel.train_predictor import load_predictor

STEPS, PUSH_AFTER = 30, 4


@pytest.fixture(scope="module")
def record():
    return record_counterfactuals(list(range(300_000, 300_012)), STEPS, PUSH_AFTER)


def test_interventions_change_the_scene_and_replay_the_same_commands(record):
    g = len(record["seeds"])
    assert g >= 2, "some of the 12 scenes have the expert pushing the box"
    assert record["actions"].shape == (g, STEPS + 1, 2) and not record["actions"][:, -1].any()
    for v in VARIANTS:
        assert record[v]["rgb"].shape == (g, STEPS + 1, 64, 64, 3) and record[v]["object_poses"].shape[:2] == (g, STEPS + 1)
    box = {v: record[v]["object_poses"][:, :, 0, :2] for v in VARIANTS}
    pushed = np.linalg.norm(box["factual"][:, -1] - box["factual"][:, PUSH_AFTER], axis=-1)
    assert (pushed >= 0.03).all(), "the factual segments push the box after the history"
    # move: the box starts 0.25 m to the side of where it was, out of the path
    np.testing.assert_allclose(np.linalg.norm(box["move"][:, 0] - box["factual"][:, 0], axis=-1), 0.25, atol=1e-3)
    # swap: the distractor starts where the box was and the box where the distractor was
    other = record["changed"]["swap"][:, 1]
    idx = np.arange(g)
    np.testing.assert_allclose(record["swap"]["object_poses"][idx, 0, other, :2], box["factual"][:, 0], atol=1e-6)
    np.testing.assert_allclose(box["swap"][:, 0], record["factual"]["object_poses"][idx, 0, other, :2], atol=1e-6)
    # the same robot motion in every variant until something different is touched: the first steps agree
    cam = {v: record[v]["cam_pose"][:, :3] for v in VARIANTS}
    np.testing.assert_allclose(cam["move"], cam["factual"], atol=1e-4)
    np.testing.assert_allclose(cam["swap"], cam["factual"], atol=1e-4)


def test_place_object_refuses_bad_input():
    env = EgoPushEnv(task="single", level="easy", image_size=32)
    try:
        env.reset(seed=0)
        with pytest.raises(ValueError, match="object index"):
            env.place_object(7, 0.0, 0.0)
        with pytest.raises(ValueError, match="inside the arena"):
            env.place_object(0, 2.0, 0.0)
        with pytest.raises(ValueError, match="inside the arena"):
            env.place_object(0, float("nan"), 0.0)
        obs, info = env.place_object(0, 0.5, -0.4, 0.3)
        np.testing.assert_allclose(info["object_poses"][0], [0.5, -0.4, 0.3], atol=1e-6)
        assert obs["rgb"].shape == (32, 32, 3)
    finally:
        env.close()


def test_rollout_errors_follow_the_chosen_objects(record, world_model):
    enc_dir, pred_dir = world_model
    model = load_predictor(pred_dir)
    caches = encode_counterfactuals(load_encoder(enc_dir), record)
    assert set(caches) == set(VARIANTS)
    cache = caches["swap"]
    g = len(record["seeds"])
    assert cache["features"].shape[:2] == (g, STEPS + 1) and cache["slot_object"].shape == (g, model.cfg.num_slots)
    everything = rollout_errors(model, cache, [2, 8], min_pixels=0)
    chosen = rollout_errors(model, cache, [2, 8], min_pixels=0, objects=record["changed"]["swap"])
    none = rollout_errors(model, cache, [2, 8], min_pixels=0, objects=np.full((g, 2), -1))
    assert len(none.model[8]) == 0 and 0 < len(chosen.model[8]) <= len(everything.model[8])
    assert len(chosen.model[2]) == len(chosen.still[2]) and np.isfinite(chosen.model[8]).all()
    assert len(everything.moved[8]) == len(everything.model[8]) and (everything.moved[8] >= 0).all()
    parts = everything.split(8, 0.02)
    assert parts["moved"]["objects"] + parts["static"]["objects"] == len(everything.model[8])
    with pytest.raises(ValueError, match="whole predictor frames"):
        rollout_errors(model, cache, [3])
    with pytest.raises(ValueError, match="too short"):
        rollout_errors(model, cache, [40])
    torch.manual_seed(0)


def test_rollout_errors_split_by_how_far_the_simulator_moved_each_object():
    errs = RolloutErrors(model={10: np.array([0.01, 0.02, 0.10, 0.30])}, still={10: np.array([0.00, 0.01, 0.20, 0.50])},
                         moved={10: np.array([0.0, 0.019, 0.02, 0.4])})
    parts = errs.split(10, 0.02)
    assert parts["moved"] == {"objects": 2, "err_m": pytest.approx(0.20), "baseline_err_m": pytest.approx(0.35)}
    assert parts["static"] == {"objects": 2, "err_m": pytest.approx(0.015), "baseline_err_m": pytest.approx(0.005)}
    assert errs.split(10, 1.0)["moved"] == {"objects": 0, "err_m": None, "baseline_err_m": None}


class _ScriptedSlots(torch.nn.Module):
    """Slot masks fixed in advance (a stand-in for an encoder's output, to test the matching alone):
    object 0 sits in slot 0 for the first `switch` frames of a clip, in slot 1 after; slot 2 holds the rest."""

    def __init__(self, switch: int) -> None:
        super().__init__()
        self.cfg = type("Cfg", (), {"num_slots": 3})()
        self.switch = switch

    def forward(self, rgb, depth, intrinsics, cam_pose):
        b, length, h, w = rgb.shape[:4]
        masks = torch.full((b, length, 3, h, w), 0.01)
        masks[:, :, 2] = 0.98
        obj = torch.zeros(h, w, dtype=torch.bool)
        obj[:4, :4] = True
        masks[:, : self.switch, 0][..., obj] = 0.98
        masks[:, self.switch:, 1][..., obj] = 0.98
        masks[:, :, 2][..., obj] = 0.01
        return type("Out", (), {"masks": masks, "features": torch.zeros(b, length, 3, 8)})()


def test_objects_are_matched_to_slots_on_the_frames_asked_for():
    """Matched over the whole clip, the object goes to the slot that holds it most of the time (slot 1);
    matched on the first frames (an open-loop test's history), to the slot that holds it there (slot 0)."""
    from sim.env import FIRST_OBJECT_SEG_ID
    from worldmodel.train_predictor import encode_clip_arrays

    g, length, size = 2, 10, 8
    seg = torch.zeros(g, length, size, size, dtype=torch.uint8)
    seg[:, :, :4, :4] = FIRST_OBJECT_SEG_ID

    def frames(i, j):
        return {"rgb": torch.zeros(j - i, length, size, size, 3), "depth": torch.ones(j - i, length, size, size),
                "intrinsics": torch.zeros(j - i, length, 3, 3), "cam_pose": torch.eye(4).expand(j - i, length, 4, 4),
                "segmentation": seg[i:j]}

    per_step = {"actions": np.zeros((g, length, 2)), "cam_pose": np.zeros((g, length, 4, 4)),
                "object_poses": np.zeros((g, length, 1, 3))}
    enc = _ScriptedSlots(switch=3)
    whole = encode_clip_arrays(enc, frames, g, per_step, batch=1, seed=0)
    history = encode_clip_arrays(enc, frames, g, per_step, batch=1, seed=0, match_frames=3)
    np.testing.assert_array_equal(whole["slot_object"], [[-1, 0, -1]] * g)
    np.testing.assert_array_equal(history["slot_object"], [[0, -1, -1]] * g)
    with pytest.raises(ValueError, match="match_frames"):
        encode_clip_arrays(enc, frames, g, per_step, batch=1, seed=0, match_frames=0)
