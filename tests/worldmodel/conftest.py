"""Shared by the world-model tests: a small real EgoPush dataset with segmentation, recorded once
per test session, and tiny random encoder and predictor checkpoints saved like real ones (one torch
thread per module comes from tests/conftest.py)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from worldmodel.checkpoint import save_checkpoint
from worldmodel.encoder import EncoderConfig, ObjectCentricEncoder, default_stats
from worldmodel.predictor import CausalJEPAPredictor, PredictorConfig

SLOTS, SLOT_DIM = 4, 16


@pytest.fixture(scope="session")
def wm_dataset(tmp_path_factory) -> str:
    from sim.collect import collect

    out = Path(tmp_path_factory.mktemp("wm")) / "formation_random.zarr"
    collect(out=str(out), task="formation", level="hard", policy="random", episodes=2, max_steps=24,
            segmentation=True, workers=0, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def world_model(tmp_path_factory) -> tuple[Path, Path]:
    """(encoder dir, predictor dir): tiny random checkpoints in the `ego-train-wm` layouts; the predictor's
    config records its encoder, and its interaction heads get weights so that objects move."""
    root = tmp_path_factory.mktemp("wm_overlay")
    torch.manual_seed(0)
    ecfg = EncoderConfig(dim=32, layers=1, heads=2, slot_dim=SLOT_DIM, decoder_hidden=32, num_slots=SLOTS,
                         pixel_embed=0)
    enc = root / "wm_encoder"
    save_checkpoint(enc, ObjectCentricEncoder(ecfg), {"stage": "encoder", "model": asdict(ecfg)}, default_stats(), {})
    pcfg = PredictorConfig(slot_dim=SLOT_DIM, num_slots=SLOTS, history=3, future=2, frameskip=2, dim=32, layers=1,
                           heads=2, interaction_hidden=16)
    model = CausalJEPAPredictor(pcfg)
    with torch.no_grad():  # the interaction heads start at zero (nothing moves)
        for p in model.dynamics.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    pred = root / "wm_predictor"
    stats = {"slot_mean": [0.0] * SLOT_DIM, "slot_std": [1.0] * SLOT_DIM, "encoder": str(enc)}
    save_checkpoint(pred, model, {"stage": "predictor", "encoder": str(enc), "predictor": {"model": asdict(pcfg)}},
                    stats, {})
    return enc, pred
