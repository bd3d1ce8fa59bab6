"""benchmarks/policy_tracks.py on a real Formation episode (four boxes, three markers) with a tiny
random encoder: every figure comes out, in range, for three trackers, and tracker specs parse."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import policy_tracks  # noqa: E402

from sim.collect import collect  # noqa: E402
from sim.dataset import EpisodeDataset  # noqa: E402
from worldmodel.encoder import EncoderConfig, ObjectCentricEncoder  # noqa: E402


def test_tracker_specs_parse_into_settings():
    assert policy_tracks.tracker_from_spec("objects").max_spread_m == 0.15
    mem = policy_tracks.tracker_from_spec("objects:max_spread_m=0.3,background_chroma=None")
    assert mem.max_spread_m == 0.3 and mem.background_chroma is None and mem.tracker == "objects"
    with pytest.raises(ValueError, match="unknown tracker settings"):
        policy_tracks.tracker_from_spec("objects:no_such=1")
    with pytest.raises(ValueError, match="tracker must be one of"):
        policy_tracks.tracker_from_spec("nonsense")


def test_formation_figures_for_both_trackers(tmp_path):
    torch.manual_seed(0)
    encoder = ObjectCentricEncoder(EncoderConfig(dim=32, layers=1, heads=2, slot_dim=16, decoder_hidden=32,
                                                 num_slots=4, pixel_embed=0)).eval()
    path = str(tmp_path / "formation.zarr")
    collect(out=path, task="formation", level="easy", policy="noisy_expert", episodes=1, max_steps=20,
            image_size=encoder.cfg.image_size[0], segmentation=True, workers=0, progress=False)
    ds = EpisodeDataset.open(path)
    episodes = [ds.episode(0, policy_tracks.EPISODE_KEYS)]
    assert episodes[0]["goal"].shape[1] == 3  # three formation markers
    slots = {}
    for tracker in ("objects", "legacy", "amodal"):
        runs, reads = policy_tracks.identity_runs(encoder, episodes, policy_tracks.N_BOXES["formation"], tracker)
        assert reads["pushing_box_lateral_err_m"] == []  # Single only
        assert set(runs) == {(o, u) for o in ("box", "goal") for u in ("slot", "track")}
        for values in runs.values():
            assert all(0.0 <= v <= 1.0 for v in values)
        fractions = ("goal_remembered", "box_tracks_one", "box_untracked", "goal_untracked")
        for metric in fractions:
            assert all(v in (0.0, 1.0) for v in reads[metric]), metric
        n = len(episodes[0]["rgb"])
        assert len(reads["spurious_tracks"]) == n
        assert len(reads["box_tracks_one"]) == 4 * n and len(reads["goal_remembered"]) == 3 * n  # all in view (easy)
        assert reads["box_untracked"] and len(reads["box_untracked"]) == len(reads["box_slot_spread_m"])
        assert all(0 <= v <= 4 for v in reads["spurious_tracks"])  # at most K tracks
        assert all(v >= 0 for v in reads["box_slot_spread_m"] + reads["goal_slot_spread_m"])
        slots[tracker] = (runs[("box", "slot")], reads["box_slot_spread_m"])
    # which slot wins an object is the encoder's alone: the same under either tracker
    assert slots["objects"] == slots["legacy"]
    assert np.isfinite(np.array(slots["objects"][1])).all()
