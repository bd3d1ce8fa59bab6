"""ObjectCentricEncoder on real rendered EgoPush frames: shapes, training signal, streaming, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldmodel.data import Clips
from worldmodel.encoder import (CenterHead, EncoderConfig, EncoderOutput, ObjectCentricEncoder, camera_planar, mask_geometry,
                                mask_shape)
from worldmodel.objectives import center_loss, edge_pixels, encoder_loss, mask_supervision_loss

TINY = {"dim": 32, "layers": 2, "heads": 2, "slot_dim": 32, "decoder_hidden": 32, "num_slots": 5}


@pytest.fixture(scope="module")
def clips(wm_dataset) -> Clips:
    return Clips.load([wm_dataset], need=("rgb", "depth", "intrinsics", "cam_pose", "segmentation", "object_poses"))


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
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)

    def loss_now() -> float:
        torch.manual_seed(1)  # same slot initialisation noise both times
        out = model(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
        loss, parts = encoder_loss(out, b, 1.0, 1.0, boundary_weight=3.0, center_weight=0.5)
        assert set(parts) == {"recon", "mask_ce", "center", "loss"}
        return loss

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


def test_edge_pixels_by_hand():
    seg = torch.zeros(1, 1, 5, 6, dtype=torch.long)
    seg[0, 0, 1:3, 2:4] = 4  # a 2x2 object
    edge = edge_pixels(seg)[0, 0]
    expect = torch.zeros(5, 6, dtype=torch.bool)
    expect[1:3, 2:4] = True  # every pixel of a 2x2 block touches the outside
    expect[0, 2:4] = expect[3, 2:4] = expect[1:3, 1] = expect[1:3, 4] = True  # its 4-neighbours outside
    assert torch.equal(edge, expect)


def test_boundary_weight_counts_edge_errors_more(clips):
    """The same masks, wrong only on object edges, cost more when edges weigh more."""
    start = next(s for s in clips.clip_starts(1) if (clips.arrays["segmentation"][s] >= 3).sum() > 50)
    b = clips.batch(np.array([start]), 1)
    seg = b["segmentation"].long()
    out = tiny()(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
    k = out.masks.shape[2]
    truth = torch.zeros_like(out.masks)
    for i, v in enumerate(torch.unique(seg).tolist()):
        truth[:, :, min(i, k - 1)][seg == v] = 1.0
    wrong_on_edges = torch.where(edge_pixels(seg).unsqueeze(2), truth.roll(1, dims=2), truth)
    out.masks = wrong_on_edges * 0.98 + 0.02 / k
    assert mask_supervision_loss(out, seg, boundary_weight=4.0) > 1.05 * mask_supervision_loss(out, seg)


def test_center_head_moves_the_centroid_along_and_across_the_view_direction():
    head = CenterHead(4)  # reads 4 features per slot
    slots = torch.zeros(1, 2, 4)
    d = torch.tensor([0.6, 0.8])
    geometry = torch.tensor([[[1.0, 2.0, 0.05, *d], [0.5, 0.5, 0.0, 0.0, 0.0]]])
    pixels = torch.tensor([[30.0, 0.0]])
    torch.testing.assert_close(head(slots, geometry, pixels), geometry)  # zero-initialised: the centroid
    with torch.no_grad():
        head.mlp[-1].bias.copy_(torch.tensor([0.1, 0.02, -0.01]))  # 10 cm along, 2 cm across (left), 1 cm down
    out = head(slots, geometry, pixels)
    expect = torch.tensor([1.0 + 0.1 * 0.6 - 0.02 * 0.8, 2.0 + 0.1 * 0.8 + 0.02 * 0.6, 0.04, *d])
    torch.testing.assert_close(out[0, 0], expect)
    torch.testing.assert_close(out[0, 1], geometry[0, 1])  # a slot with no pixels stays where it was


def test_mask_shape_and_camera_planar_by_hand():
    won = torch.zeros(1, 1, 3, 8, 8)
    won[0, 0, 0, 6:8, 2:6] = 1  # 8 pixels on the bottom edge's two rows: 4 of them in the bottom row
    won[0, 0, 1, 0:2, 0:1] = 1  # 2 pixels in the top-left corner: both in the left column, one in the top row
    shape = mask_shape(won)[0, 0]
    torch.testing.assert_close(shape[0], torch.tensor([0.5, 0.0, 0.0, 0.0, 6 / 7, 1.0, 2 / 7, 5 / 7]))
    torch.testing.assert_close(shape[1], torch.tensor([0.0, 0.5, 1.0, 0.0, 0.0, 1 / 7, 0.0, 0.0]))
    torch.testing.assert_close(shape[2], torch.zeros(8))  # wins nothing
    a = 0.5  # the camera looks along (cos a, sin a) on the floor, tilted down
    c, s_, tilt = np.cos(a), np.sin(a), 0.3
    z = torch.tensor([c * np.cos(tilt), s_ * np.cos(tilt), -np.sin(tilt)], dtype=torch.float32)  # optical axis
    x = torch.tensor([s_, -c, 0.0], dtype=torch.float32)  # image right
    cam = torch.eye(4)
    cam[:3, :3] = torch.stack([x, torch.linalg.cross(z, x), z], 1)
    cam[:3, 3] = torch.tensor([1.0, 2.0, 0.3])
    fwd = cam[:2, 2] / cam[:2, 2].norm()
    left = torch.stack([-fwd[1], fwd[0]])
    p = torch.tensor([1.0, 2.0, 0.3]) + torch.cat([0.4 * fwd + 0.1 * left, torch.tensor([-0.2])])
    torch.testing.assert_close(camera_planar(p.view(1, 1, 1, 3), cam.view(1, 1, 4, 4))[0, 0, 0],
                               torch.tensor([0.4, 0.1, -0.2]))


def test_mask_geometry_spread_by_hand():
    """A camera at the origin looking along world +x (image right = world -y) sees a wall 2 m ahead. Slot 0
    wins two 2-pixel columns 20 pixels apart: its points lie 20 px * 2 m / f apart across the view, so
    their planar spread (standard deviation) is half that; slot 1 wins one pixel (spread 0), slot 2
    nothing (0, not NaN)."""
    f, h, w = 40.0, 8, 32
    cam = torch.eye(4)
    cam[:3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    intr = torch.tensor([[f, 0, 15.5], [0, f, 3.5], [0, 0, 1]])
    won = torch.zeros(1, 1, 3, h, w)
    won[0, 0, 0, 2:4, 5] = 1
    won[0, 0, 0, 2:4, 25] = 1
    won[0, 0, 1, 6, 10] = 1
    geometry, pixels, spread, _ = mask_geometry(won, torch.full((1, 1, h, w), 2.0), intr.view(1, 1, 3, 3),
                                                cam.view(1, 1, 4, 4))
    torch.testing.assert_close(pixels[0, 0], torch.tensor([4.0, 1.0, 0.0]))
    torch.testing.assert_close(spread[0, 0], torch.tensor([20 * 2.0 / f / 2, 0.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(geometry[0, 0, 0, :2], torch.tensor([2.0, -(15.0 - 15.5) * 2.0 / f]), atol=1e-5,
                               rtol=0)


def test_center_head_on_frame_evidence_streams_as_the_clip_forward(clips):
    model = tiny(center_inputs="frame").eval()
    with torch.no_grad():  # a head that moves the centroid, so that its inputs matter
        for p in model.center.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    b = batch(clips, n=1, length=3)
    with torch.no_grad():
        torch.manual_seed(3)
        full = model(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
        torch.manual_seed(3)
        state, geometry = None, []
        for t in range(3):
            out, state = model.step(b["rgb"][:, t], b["depth"][:, t], b["intrinsics"][:, t], b["cam_pose"][:, t], state)
            geometry.append(out.geometry[:, 0])
    assert (full.geometry[..., :3] - full.extras["centroid"][..., :3]).abs().max() > 1e-3  # the head moved it
    torch.testing.assert_close(torch.stack(geometry, 1), full.geometry, atol=1e-3, rtol=1e-3)


def test_center_loss_is_zero_at_the_true_positions(clips):
    start = next(s for s in clips.clip_starts(2) if (clips.arrays["segmentation"][s:s + 2] >= 3).sum() > 200)
    b = clips.batch(np.array([start]), 2)
    seg = b["segmentation"].long()
    objs = [int(o) - 3 for o in torch.unique(seg[seg >= 3])]  # goal markers (no pose) included
    matches = [(np.array(objs), np.arange(len(objs)))]
    k = max(len(objs), 2)
    geometry = torch.zeros(1, 2, k, 5)
    for s, o in enumerate(objs):
        if o < b["object_poses"].shape[2]:  # a goal marker's slot stays at 0: the loss must skip it
            geometry[0, :, s, :2] = b["object_poses"][0, :, o, :2]
    out = EncoderOutput(slots=torch.zeros(1, 2, k, 4), geometry=geometry.clone(), masks=torch.zeros(1, 2, k, 64, 64),
                        recon=torch.zeros(1, 2, 4, 64, 64))
    assert center_loss(out, seg, b["object_poses"], matches) == 0
    out.geometry[..., 0] += 0.1  # x 10 cm off: 2 Huber units (1.5, linear part), y exact (0): mean 0.75
    torch.testing.assert_close(center_loss(out, seg, b["object_poses"], matches), torch.tensor(0.75))


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


def test_streaming_without_the_reconstruction_decodes_the_same_masks(clips):
    model = tiny().eval()
    b = batch(clips, n=2, length=3)
    outs = {}
    with torch.no_grad():
        for recon in (False, True):
            torch.manual_seed(5)
            state, outs[recon] = None, []
            for t in range(3):
                out, state = model.step(b["rgb"][:, t], b["depth"][:, t], b["intrinsics"][:, t], b["cam_pose"][:, t],
                                        state, recon=recon)
                outs[recon].append(out)
        torch.manual_seed(5)
        full = model(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
    for light, whole in zip(outs[False], outs[True]):
        assert light.recon is None and whole.recon.shape == (2, 1, 4, 64, 64)
        for a, c in ((light.slots, whole.slots), (light.masks, whole.masks), (light.geometry, whole.geometry),
                     *((light.extras[k], whole.extras[k]) for k in ("pixels", "centroid", "colour", "spread"))):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([o.recon for o in outs[True]], 1), full.recon, atol=2e-4, rtol=1e-3)


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
    with pytest.raises(ValueError, match="slot_iters must be >= 1"):
        EncoderConfig(slot_iters=0)


def test_object_balance_makes_a_small_goal_disc_count_as_much_as_a_box():
    """One frame: a 400-pixel box and a 16-pixel goal disc. Masks that put the disc in the floor's
    slot cost little per pixel, but as much as losing half the box once every object counts the same."""
    seg = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    seg[0, 0, 4:24, 4:24] = 3  # the box: 400 pixels
    seg[0, 0, 26:30, 26:30] = 10  # the goal disc (sim.env.GOAL_SEG_ID): 16 pixels
    k = 3
    right = torch.zeros(1, 1, k, 32, 32)
    right[:, :, 0][seg == 3] = 1
    right[:, :, 1][seg == 10] = 1
    right[:, :, 2][seg == 0] = 1
    disc_lost = right.clone()
    disc_lost[:, :, 1][seg == 10], disc_lost[:, :, 2][seg == 10] = 0, 1
    matches = [(np.array([0, 7]), np.array([0, 1]))]

    def loss(masks: torch.Tensor, balance: bool) -> torch.Tensor:
        out = EncoderOutput(slots=torch.zeros(1, 1, k, 4), geometry=torch.zeros(1, 1, k, 5),
                            masks=masks * 0.98 + 0.02 / k, recon=torch.zeros(1, 1, 4, 32, 32))
        return mask_supervision_loss(out, seg, matches=matches, object_balance=balance)

    base = loss(right, False)
    assert loss(disc_lost, False) - base < 0.2  # 16 of 416 object pixels wrong: a small change
    assert loss(disc_lost, True) - loss(right, True) > 1.0  # one of two objects wrong: half the worst case


def test_center_loss_reaches_goal_markers_when_the_batch_has_goals(clips):
    seg = torch.zeros(1, 2, 16, 16, dtype=torch.long)
    seg[..., 2:6, 2:6] = 10  # goal marker 0 in view on both frames (16 pixels)
    poses = torch.full((1, 2, 3, 3), float("nan"))
    goals = torch.tensor([[[[0.4, -0.2]], [[0.4, -0.2]]]])
    geometry = torch.zeros(1, 2, 2, 5)
    geometry[..., 0, :2] = goals[:, :, 0]
    out = EncoderOutput(slots=torch.zeros(1, 2, 2, 4), geometry=geometry, masks=torch.zeros(1, 2, 2, 16, 16),
                        recon=torch.zeros(1, 2, 4, 16, 16))
    matches = [(np.array([7]), np.array([0]))]
    assert center_loss(out, seg, poses, matches) == 0  # without goals: nothing to score
    assert center_loss(out, seg, poses, matches, goals) == 0
    out.geometry[..., 0, 1] += 0.1  # 10 cm off across: 2 Huber units on y (1.5), x exact: mean 0.75
    torch.testing.assert_close(center_loss(out, seg, poses, matches, goals), torch.tensor(0.75))
