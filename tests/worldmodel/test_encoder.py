"""ObjectCentricEncoder on real rendered EgoPush frames: shapes, training signal, streaming, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldmodel.data import Clips
from worldmodel.encoder import EncoderConfig, ObjectCentricEncoder
from worldmodel.objectives import encoder_loss, mask_supervision_loss

TINY = {"dim": 32, "layers": 2, "heads": 2, "slot_dim": 32, "decoder_hidden": 32, "num_slots": 5}


@pytest.fixture(scope="module")
def clips(wm_dataset) -> Clips:
    return Clips.load([wm_dataset], need=("rgb", "depth", "intrinsics", "cam_pose", "segmentation"))


def batch(clips: Clips, n: int = 2, length: int = 3) -> dict[str, torch.Tensor]:
    return clips.batch(clips.clip_starts(length)[:n] + np.arange(n) * 5, length)


def tiny(rope: str = "3d-world", **kw) -> ObjectCentricEncoder:
    torch.manual_seed(0)
    return ObjectCentricEncoder(EncoderConfig(rope=rope, **TINY, **kw))


@pytest.mark.parametrize("rope", ["2d", "3d-world", "prope"])
def test_shapes_and_dtypes(clips, rope):
    b = batch(clips)
    out = tiny(rope)(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
    assert out.slots.shape == (2, 3, 5, 32) and out.slots.dtype == torch.float32
    assert out.geometry.shape == (2, 3, 5, 5)
    assert out.masks.shape == (2, 3, 5, 64, 64)
    assert out.recon.shape == (2, 3, 4, 64, 64)
    assert out.features.shape == (2, 3, 5, 37)
    torch.testing.assert_close(out.masks.sum(2), torch.ones(2, 3, 64, 64))
    assert all(torch.isfinite(t).all() for t in (out.slots, out.geometry, out.masks, out.recon))
    # the geometric part: a centroid inside the arena and a unit planar direction (or zero)
    assert out.geometry[..., :2].abs().max() < 1.3
    norms = out.geometry[..., 3:].norm(dim=-1)
    assert ((norms - 1).abs() < 1e-4).logical_or(norms < 1e-6).all()


def test_one_step_lowers_the_loss(clips):
    model = tiny()
    b = batch(clips, n=2, length=2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss_now() -> float:
        torch.manual_seed(1)  # same slot initialisation noise both times
        out = model(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
        return encoder_loss(out, b, 1.0, 1.0)[0]

    before = loss_now()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_now()
    assert after < before


def test_mask_supervision_is_low_for_the_true_segmentation(clips):
    """The loss is a real target: masks equal to the segmentation score far better than uniform ones."""
    seg_all = clips.arrays["segmentation"]
    start = next(s for s in clips.clip_starts(2) if len(np.unique(seg_all[s:s + 2][seg_all[s:s + 2] >= 3])) >= 2)
    b = clips.batch(np.array([start]), 2)
    out = tiny()(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
    seg = b["segmentation"].long()
    k = out.masks.shape[2]
    ids = torch.unique(seg)
    perfect = torch.zeros_like(out.masks)
    for i, v in enumerate(ids.tolist()):
        perfect[:, :, min(i, k - 1)][seg == v] = 1.0
    uniform = torch.full_like(out.masks, 1.0 / k)
    out.masks = perfect * 0.999 + 0.001 / k
    good = mask_supervision_loss(out, seg)
    out.masks = uniform
    bad = mask_supervision_loss(out, seg)
    assert good < 0.05 < bad


def test_streaming_matches_the_clip_forward(clips):
    model = tiny().eval()
    b = batch(clips, n=1, length=4)
    with torch.no_grad():
        torch.manual_seed(3)
        full = model(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
        torch.manual_seed(3)
        state, slots = None, []
        for t in range(4):
            out, state = model.step(b["rgb"][:, t], b["depth"][:, t], b["intrinsics"][:, t], b["cam_pose"][:, t], state)
            slots.append(out.slots[:, 0])
    torch.testing.assert_close(torch.stack(slots, 1), full.slots, atol=2e-4, rtol=1e-3)


def test_sparse_with_all_blocks_equals_dense(clips):
    model = tiny(topk=64).eval()
    b = batch(clips, n=1, length=2)
    with torch.no_grad():
        torch.manual_seed(0)
        dense = model(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"]).slots
        model.set_sparse(True)
        torch.manual_seed(0)
        sparse = model(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"]).slots
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)


def test_all_invalid_depth_uses_the_fallback_not_nan(clips):
    b = batch(clips, n=1, length=2)
    out = tiny()(b["rgb"], torch.zeros_like(b["depth"]), b["intrinsics"], b["cam_pose"])
    assert torch.isfinite(out.slots).all() and torch.isfinite(out.masks).all()
    # no valid pixel under any slot: its centroid falls back to the camera position
    cam = b["cam_pose"][:, :, None, :3, 3].expand_as(out.geometry[..., :3])
    torch.testing.assert_close(out.geometry[..., :3], cam)


def test_nan_depth_pixels_are_invalid_not_poison(clips):
    b = batch(clips, n=1, length=2)
    depth = b["depth"].clone()
    depth[:, :, :10] = float("nan")
    out = tiny()(b["rgb"], depth, b["intrinsics"], b["cam_pose"])
    assert torch.isfinite(out.recon).all() and torch.isfinite(out.geometry).all()


@pytest.mark.parametrize("case, match", [
    ("nan_pose", "non-finite"),
    ("non_rigid", "orthonormal"),
    ("image_size", "built for 64x64"),
    ("channels", r"rgb must be \(B, T, H, W, 3\)"),
    ("depth_shape", "depth must be"),
])
def test_bad_input_is_a_clear_error(clips, case, match):
    b = batch(clips, n=1, length=2)
    rgb, depth, k, pose = b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"].clone()
    if case == "nan_pose":
        pose[0, 1, 0, 3] = float("nan")
    elif case == "non_rigid":
        pose[0, 0, :3, :3] *= 1.5
    elif case == "image_size":
        rgb, depth = rgb[:, :, :48, :48], depth[:, :, :48, :48]
    elif case == "channels":
        rgb = torch.cat([rgb, rgb[..., :1]], -1)
    elif case == "depth_shape":
        depth = depth[:, :1]
    with pytest.raises(ValueError, match=match):
        tiny()(rgb, depth, k, pose)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rope must be one of"):
        EncoderConfig(rope="3d")
    with pytest.raises(ValueError, match="divisible by patch"):
        EncoderConfig(image_size=(60, 64))
