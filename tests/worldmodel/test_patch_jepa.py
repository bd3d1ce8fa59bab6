"""The patch-token JEPA ablation (`worldmodel.patch_jepa`): the patch cache from a real dataset and a
(tiny) encoder, a short training run that lowers its loss and saves a checkpoint that reloads, and
open-loop errors of objects read from predicted patches."""

from __future__ import annotations

import numpy as np
import torch

from worldmodel.patch_jepa import (
    PatchJEPA,
    PatchJEPAConfig,
    _window,
    encode_patch_segments,
    load_patch_jepa,
    patch_loss,
    patch_rollout_errors,
    train_patch_jepa,
)
from worldmodel.train import load_encoder

TINY = dict(history=3, future=2, frameskip=2, dim=32, layers=1, heads=2)


def test_patch_cache_training_and_rollout_errors(wm_dataset, world_model, tmp_path):
    enc_dir, _ = world_model
    encoder = load_encoder(enc_dir)
    cache = encode_patch_segments(encoder, [wm_dataset], segment_len=20)
    g = len(cache["tokens"])
    assert g >= 2 and cache["tokens"].shape[1:] == (20, 64, encoder.cfg.dim)
    assert cache["patch_pixels"].shape[:2] == (g, 20) and cache["patch_pixels"].shape[-1] == 64
    assert cache["patch_pixels"].sum() > 0, "objects are seen in some patches"

    cfg = PatchJEPAConfig(token_dim=encoder.cfg.dim, num_patches=64, **TINY)
    torch.manual_seed(0)
    model = PatchJEPA(cfg)
    frames = np.arange(cfg.window)[None] * cfg.frameskip + np.array([[0], [3]])
    batch = _window(cache, np.array([0, 1]), frames, cfg.frameskip)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss, parts = patch_loss(model, batch)
        first = first if first is not None else parts
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["latent"] < first["latent"] and "probe" in parts

    err, base = patch_rollout_errors(model.eval(), cache, [2, 6], min_pixels=1)
    assert set(err) == {2, 6} and len(err[6]) == len(base[6]) > 0 and np.isfinite(err[6]).all()

    # the training entry point: a few seconds of training, saved, reloaded to identical outputs
    out = tmp_path / "patch"
    trained = train_patch_jepa(str(enc_dir), [wm_dataset], out, minutes=0.05, batch=2, segment_len=20,
                               cfg=PatchJEPAConfig(**TINY), progress=False)
    again = load_patch_jepa(out)
    tok = trained.normalise(batch["tokens"])
    from worldmodel.physics import robot_from_camera

    robot = robot_from_camera(batch["cam_pose"], batch["proprio"])
    torch.testing.assert_close(trained(tok, batch["actions"], robot), again(tok, batch["actions"], robot))
    # a finished run is loaded, not trained again
    loaded = train_patch_jepa(str(enc_dir), [wm_dataset], out, minutes=5.0, batch=2, segment_len=20,
                              cfg=PatchJEPAConfig(**TINY), progress=False)
    torch.testing.assert_close(loaded(tok, batch["actions"], robot), again(tok, batch["actions"], robot))
