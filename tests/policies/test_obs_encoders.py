"""Observation encoders: slot-order invariance, masking, spatial-softmax orientation, the image
encoder's layout, and that both learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from policies.obs_encoders import RGBDResNetEncoder, SlotSetEncoder, SpatialSoftmax

B, TO, K, SLOT_F, P = 3, 2, 6, 12, 5


def slot_encoder(**kw) -> SlotSetEncoder:
    torch.manual_seed(0)
    return SlotSetEncoder(slot_dim=SLOT_F, n_obs=TO, proprio_dim=P, out_dim=32, hidden=32, **kw).eval()


def slot_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    slots = torch.randn(B, TO, K, SLOT_F, generator=g)
    proprio = torch.randn(B, TO, P, generator=g)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0, [1, 4]] = False
    mask[2, 0] = False
    return slots, proprio, mask


# ---------------------------------------------------------------------------- SlotSetEncoder


def test_slot_encoder_shape():
    enc = slot_encoder()
    slots, proprio, mask = slot_inputs()
    assert enc(slots, proprio).shape == (B, 32)
    assert enc(slots, proprio, mask).shape == (B, 32)


@pytest.mark.parametrize("masked", [False, True])
def test_slot_encoder_is_invariant_to_slot_order(masked):
    enc = slot_encoder()
    slots, proprio, mask = slot_inputs()
    mask = mask if masked else None
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(perm, torch.arange(K))
    with torch.no_grad():
        out = enc(slots, proprio, mask)
        # The same permutation on every frame: slot k stays one object through time.
        out_perm = enc(slots[:, :, perm], proprio, None if mask is None else mask[:, perm])
    torch.testing.assert_close(out_perm, out, atol=1e-5, rtol=1e-5)


def test_slot_encoder_is_not_invariant_to_reordering_slots_per_frame():
    # Shuffling slots differently in each frame breaks the identities the tokens rely on, so the
    # output must change: the encoder really reads a slot's history as one token.
    enc = slot_encoder()
    slots, proprio, _ = slot_inputs()
    shuffled = slots.clone()
    shuffled[:, 1] = slots[:, 1, torch.roll(torch.arange(K), 1)]
    with torch.no_grad():
        assert not torch.allclose(enc(slots, proprio), enc(shuffled, proprio), atol=1e-4)


def test_changing_one_slot_changes_the_output():
    enc = slot_encoder()
    slots, proprio, _ = slot_inputs()
    moved = slots.clone()
    moved[1, 1, 3] += 1.0  # one slot, one frame, one sample
    with torch.no_grad():
        out, out_moved = enc(slots, proprio), enc(moved, proprio)
    assert not torch.allclose(out[1], out_moved[1], atol=1e-4)
    torch.testing.assert_close(out[[0, 2]], out_moved[[0, 2]])  # the other samples are untouched


def test_masked_slot_does_not_affect_the_output():
    enc = slot_encoder()
    slots, proprio, mask = slot_inputs()
    garbage = slots.clone()
    garbage[0, :, 1] = 1e3 * torch.randn(TO, SLOT_F)
    garbage[0, :, 4] = float("nan")  # a lost track may well be NaN
    garbage[2, :, 0] = -50.0
    with torch.no_grad():
        out = enc(garbage, proprio, mask)
        assert torch.isfinite(out).all()
        # A masked slot is as good as absent: each sample matches a run on its present slots alone.
        for i in range(B):
            alone = enc(slots[i:i + 1, :, mask[i]], proprio[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        # ...and the mask is used: without it the same slots do change the output.
        garbage[0, :, 4] = 0.0
        assert not torch.allclose(enc(slots, proprio), enc(garbage, proprio), atol=1e-4)


def test_all_slots_masked_is_finite():
    enc = slot_encoder()
    slots, proprio, mask = slot_inputs()
    mask[1] = False
    with torch.no_grad():
        assert torch.isfinite(enc(slots, proprio, mask)).all()


@pytest.mark.parametrize("case, message", [
    ("rank", "must be \\(B, To, K, F\\)"),
    ("frames", "frames"),
    ("features", "features"),
    ("proprio_dim", "proprio has"),
    ("proprio_frames", "does not match"),
    ("nan", "slots contain NaN"),
    ("nan_present", "slots contain NaN"),
    ("mask_shape", "mask must be"),
    ("mask_dtype", "mask must be bool"),
])
def test_slot_encoder_rejects_bad_inputs(case, message):
    enc = slot_encoder()
    slots, proprio, mask = slot_inputs()
    args = {"slots": slots, "proprio": proprio, "mask": None}
    if case == "rank":
        args["slots"] = slots[:, 0]
    elif case == "frames":
        args["slots"], args["proprio"] = torch.cat([slots, slots], 1), torch.cat([proprio, proprio], 1)
    elif case == "features":
        args["slots"] = slots[..., :-1]
    elif case == "proprio_dim":
        args["proprio"] = proprio[..., :-1]
    elif case == "proprio_frames":
        args["proprio"] = proprio[:, :1]
    elif case == "nan":
        slots[1, 0, 2, 0] = float("nan")
    elif case == "nan_present":
        slots[0, 0, 0, 0] = float("nan")  # slot 0 of sample 0 is present
        args["mask"] = mask
    elif case == "mask_shape":
        args["mask"] = mask[:, :-1]
    elif case == "mask_dtype":
        args["mask"] = mask.float()
    with pytest.raises(ValueError, match=message):
        enc(**args)


# ---------------------------------------------------------------------------- SpatialSoftmax


def test_spatial_softmax_finds_a_sharp_peak():
    h, w = 12, 16  # not square, so swapped axes would show
    peaks = [(0, 0), (3, 10), (11, 15), (6, 2)]  # (row, col)
    features = torch.zeros(1, len(peaks), h, w)
    for c, (row, col) in enumerate(peaks):
        features[0, c, row, col] = 100.0
    kp = SpatialSoftmax(temperature=1.0, learnable=False)(features)
    assert kp.shape == (1, len(peaks), 2)
    expected = torch.tensor([[-1 + 2 * col / (w - 1), -1 + 2 * row / (h - 1)] for row, col in peaks])
    torch.testing.assert_close(kp[0], expected, atol=1e-4, rtol=0)
    # the top-left pixel is (-1, -1): x grows to the right, y grows downwards
    torch.testing.assert_close(kp[0, 0], torch.tensor([-1.0, -1.0]), atol=1e-4, rtol=0)


def test_spatial_softmax_temperature():
    uniform = SpatialSoftmax()(torch.zeros(2, 3, 5, 7))
    torch.testing.assert_close(uniform, torch.zeros(2, 3, 2), atol=1e-6, rtol=0)
    assert isinstance(SpatialSoftmax(learnable=True).log_temperature, nn.Parameter)
    assert not isinstance(SpatialSoftmax(learnable=False).log_temperature, nn.Parameter)
    # a hot softmax spreads the mass: the mean drifts from a corner peak towards the centre
    features = torch.zeros(1, 1, 8, 8)
    features[0, 0, 0, 0] = 5.0
    sharp, soft = SpatialSoftmax(0.1, False)(features), SpatialSoftmax(10.0, False)(features)
    assert sharp[0, 0, 0] < soft[0, 0, 0] and sharp[0, 0, 1] < soft[0, 0, 1]


# ---------------------------------------------------------------------------- RGBDResNetEncoder


@pytest.mark.parametrize("size", [64, 96])
def test_rgbd_encoder_shape(size):
    torch.manual_seed(0)
    enc = RGBDResNetEncoder(n_obs=TO, proprio_dim=P, out_dim=48)
    with torch.no_grad():
        out = enc(torch.randn(2, TO, 4, size, size), torch.randn(2, TO, P))
    assert out.shape == (2, 48) and torch.isfinite(out).all()


def test_rgbd_encoder_small_and_odd_sizes():
    enc = RGBDResNetEncoder(n_obs=1, proprio_dim=P, base_width=8, keypoints=4)
    with torch.no_grad():
        assert enc(torch.randn(1, 1, 4, 16, 16), torch.randn(1, 1, P)).shape == (1, 256)
        assert enc(torch.randn(1, 1, 4, 17, 23), torch.randn(1, 1, P)).shape == (1, 256)
    with pytest.raises(ValueError, match="at least 16x16"):
        enc(torch.randn(1, 1, 4, 15, 32), torch.randn(1, 1, P))
    with pytest.raises(ValueError, match="channels"):
        enc(torch.randn(1, 1, 3, 32, 32), torch.randn(1, 1, P))
    with pytest.raises(ValueError, match="frames"):
        enc(torch.randn(1, 2, 4, 32, 32), torch.randn(1, 2, P))
    with pytest.raises(ValueError, match="images contain NaN"):
        enc(torch.full((1, 1, 4, 32, 32), float("nan")), torch.randn(1, 1, P))


def test_rgbd_encoder_has_no_batchnorm_and_is_resnet18_sized():
    enc = RGBDResNetEncoder(n_obs=TO, proprio_dim=P)
    norms = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert not norms, f"batch statistics found: {norms}"
    assert sum(isinstance(m, nn.GroupNorm) for m in enc.modules()) > 0
    convs = [m for m in enc.stages.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 16  # 4 stages x 2 blocks x 2 convs, as ResNet-18 (+ the stem)
    n_params = sum(p.numel() for p in enc.parameters())
    # ResNet-18 at width 64 holds 11.2M; at base_width 32 about a quarter of that.
    assert 2_000_000 < n_params < 4_000_000, n_params


def test_rgbd_gradients_reach_the_stem():
    torch.manual_seed(0)
    enc = RGBDResNetEncoder(n_obs=TO, proprio_dim=P, base_width=8, keypoints=8)
    enc(torch.randn(2, TO, 4, 32, 32), torch.randn(2, TO, P)).square().sum().backward()
    grad = enc.stem[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert enc.spatial_softmax.log_temperature.grad is not None


# ---------------------------------------------------------------------------- both learn


def one_adam_step_lowers_loss(enc: nn.Module, inputs: tuple, out_dim: int) -> None:
    target = torch.randn(inputs[0].shape[0], out_dim, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    loss = (enc(*inputs) - target).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = (enc(*inputs) - target).square().mean()
    assert after < loss.detach(), (loss.item(), after.item())


def test_slot_encoder_learns():
    enc = slot_encoder().train()
    slots, proprio, mask = slot_inputs()
    one_adam_step_lowers_loss(enc, (slots, proprio, mask), 32)


def test_rgbd_encoder_learns():
    torch.manual_seed(0)
    enc = RGBDResNetEncoder(n_obs=TO, proprio_dim=P, out_dim=16, base_width=8, keypoints=8)
    g = torch.Generator().manual_seed(2)
    one_adam_step_lowers_loss(enc, (torch.randn(4, TO, 4, 32, 32, generator=g), torch.randn(4, TO, P, generator=g)), 16)
