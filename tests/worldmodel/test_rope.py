"""patch_geometry and GeometryRoPE: geometry against the numpy unprojection, and the invariances each mode claims."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sim.geometry import unproject_depth
from worldmodel.rope import GeometryRoPE, TokenGeometry, patch_geometry, rigid_inverse


def rotation(axis: str, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    mats = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
            "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}
    return torch.tensor(mats[axis], dtype=torch.float64)


def rigid(rot: torch.Tensor, trans) -> torch.Tensor:
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = rot
    m[:3, 3] = torch.as_tensor(trans, dtype=torch.float64)
    return m


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def make_clip(b: int = 2, t: int = 3, h: int = 8, w: int = 16, seed: int = 0, invalid: float = 0.2):
    """Random depth (with invalid pixels), intrinsics and arbitrary camera poses, float32."""
    gen = torch.Generator().manual_seed(seed)
    depth = 0.5 + 3.0 * torch.rand(b, t, h, w, generator=gen)
    depth[torch.rand(b, t, h, w, generator=gen) < invalid] = 0.0
    k = torch.zeros(b, t, 3, 3)
    k[..., 0, 0] = 20 + 10 * torch.rand(b, t, generator=gen)
    k[..., 1, 1] = 20 + 10 * torch.rand(b, t, generator=gen)
    k[..., 0, 2], k[..., 1, 2], k[..., 2, 2] = w / 2, h / 2, 1.0
    pose = torch.stack([rigid(random_rotation(gen), 2 * torch.randn(3, generator=gen, dtype=torch.float64))
                        for _ in range(b * t)]).view(b, t, 4, 4)
    return depth, k, pose.float()


def logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q @ k.transpose(-1, -2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# -- patch_geometry ----------------------------------------------------------------------------------------------


def test_points_match_numpy_unprojection_mean_per_patch():
    depth, k, pose = make_clip(b=2, t=2, h=8, w=12, invalid=0.3)
    depth[0, 1, 4:8, 0:4] = 0.0  # one patch with no valid pixel -> fallback, checked elsewhere
    geom = patch_geometry(depth, k, pose, patch=4)
    assert geom.points.shape == (2, 2 * 2 * 3, 3) and geom.points.dtype == torch.float32
    pts = geom.points.view(2, 2, 2, 3, 3)
    valid = geom.valid.view(2, 2, 2, 3)
    assert not valid[0, 1, 1, 0] and valid.sum() == valid.numel() - 1
    for b in range(2):
        for t in range(2):
            world = unproject_depth(depth[b, t].numpy(), k[b, t].double().numpy(), pose[b, t].double().numpy())
            for r in range(2):
                for c in range(3):
                    if valid[b, t, r, c]:
                        want = np.nanmean(world[4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(-1, 3), axis=0)
                        np.testing.assert_allclose(pts[b, t, r, c].numpy(), want, atol=1e-5)


def test_invalid_pixels_fall_back_to_patch_centre_ray_and_project_to_the_centre():
    depth, k, pose = make_clip(b=1, t=2, h=8, w=16)
    depth[0, 0] = 0.0
    depth[0, 1, :, :8] = float("nan")
    depth[0, 1, :4, 8:] = float("inf")
    depth[0, 1, 4:, 8:] = -1.0
    geom = patch_geometry(depth, k, pose, patch=4, fallback_depth=4.0)
    assert not geom.valid.any() and torch.isfinite(geom.points).all()

    rows, cols = geom.grid[0, :, 0].double(), geom.grid[0, :, 1].double()
    u, v = cols * 4 + 1.5, rows * 4 + 1.5  # patch centre pixels
    frame = torch.arange(2).repeat_interleave(8)
    kk, pp = k[0, frame].double(), pose[0, frame].double()
    cam = torch.stack([(u - kk[:, 0, 2]) / kk[:, 0, 0], (v - kk[:, 1, 2]) / kk[:, 1, 1], torch.ones_like(u)], -1) * 4
    world = (pp[:, :3, :3] @ cam.unsqueeze(-1)).squeeze(-1) + pp[:, :3, 3]
    torch.testing.assert_close(geom.points[0].double(), world, atol=1e-5, rtol=0)

    # P maps the world point to normalised pixel coordinates 2u/W - 1, 2v/H - 1 of the patch centre
    hom = torch.cat([geom.points[0].double(), torch.ones(16, 1, dtype=torch.float64)], -1)
    img = (geom.proj[0].double() @ hom.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(img[:, 0] / img[:, 2], 2 * u / 16 - 1, atol=1e-5, rtol=0)
    torch.testing.assert_close(img[:, 1] / img[:, 2], 2 * v / 8 - 1, atol=1e-5, rtol=0)
    torch.testing.assert_close(img[:, 2], torch.full_like(u, 4.0), atol=1e-5, rtol=0)  # z-depth in the camera


def test_token_order_time_and_anchor():
    depth, k, pose = make_clip(b=2, t=3, h=8, w=12)
    yaw = 0.7
    # first camera: level, looking along world heading yaw (optical z = world x rotated by yaw)
    base_from_optical = torch.tensor([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=torch.float64)
    pose[0, 0] = rigid(rotation("z", yaw) @ base_from_optical @ rotation("x", -0.3), [1.0, 2.0, 0.5]).float()
    # looking straight down: heading from the image's up direction
    looking_down = torch.tensor([[0, -1, 0], [-1, 0, 0], [0, 0, -1]], dtype=torch.float64)  # image up = world x
    pose[1, 0] = rigid(rotation("z", yaw) @ looking_down, [0.0, 0.0, 1.0]).float()
    geom = patch_geometry(depth, k, pose, patch=4)
    assert geom.grid.shape == (2, 18, 2) and geom.time.shape == (2, 18) and geom.proj.shape == (2, 18, 4, 4)
    assert geom.grid[0, :6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert torch.equal(geom.grid[0, 6:12], geom.grid[0, :6])
    assert geom.time[1].tolist() == [0.0] * 6 + [1.0] * 6 + [2.0] * 6
    custom = patch_geometry(depth, k, pose, patch=4, time=torch.tensor([[5.0, 6.0, 8.0]] * 2))
    assert custom.time[0, ::6].tolist() == [5.0, 6.0, 8.0]

    anchor = geom.anchor.double()
    for b in range(2):
        torch.testing.assert_close(anchor[b, :3, 3], pose[b, 0, :3, 3].double())
        torch.testing.assert_close(anchor[b, :3, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        torch.testing.assert_close(anchor[b, :3, :3], rotation("z", yaw), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change, match", [
    (lambda d, k, p: (d[0], k, p), "depth must be"),
    (lambda d, k, p: (d.long(), k, p), "float metres"),
    (lambda d, k, p: (d, k[:, :1], p), "intrinsics must be"),
    (lambda d, k, p: (d, k, p[..., :3, :]), "cam_pose must be"),
    (lambda d, k, p: (d[..., :6], k, p), "divisible by patch"),
    (lambda d, k, p: (d, k.index_put((torch.tensor(0),), torch.tensor(float("nan"))), p), "intrinsics have non"),
    (lambda d, k, p: (d, k * torch.tensor([-1.0, 1, 1]).view(3, 1), p), "fx, fy > 0"),
    (lambda d, k, p: (d, k, p.index_put((torch.tensor(0), torch.tensor(1)), torch.tensor(float("inf")))),
     "cam_pose has non"),
    (lambda d, k, p: (d, k, p * torch.tensor([1.1, 1, 1, 1]).view(4, 1)), "orthonormal"),
    (lambda d, k, p: (d, k, p @ torch.diag(torch.tensor([-1.0, 1, 1, 1]))), "orthonormal"),
    (lambda d, k, p: (d, k, p + torch.tensor([0, 0, 0, 0.5]).view(4, 1) * torch.tensor([0, 0, 0, 1.0])),
     "last row"),
])
def test_bad_inputs_raise_clear_errors(change, match):
    depth, k, pose = make_clip(b=1, t=2, h=8, w=8)
    with pytest.raises(ValueError, match=match):
        patch_geometry(*change(depth, k, pose), patch=4)
    with pytest.raises(ValueError, match="time must be"):
        patch_geometry(depth, k, pose, patch=4, time=torch.zeros(2))
    with pytest.raises(ValueError, match="patch must be"):
        patch_geometry(depth, k, pose, patch=0)


# -- GeometryRoPE ------------------------------------------------------------------------------------------------


def grid_geometry(grid: torch.Tensor) -> TokenGeometry:
    """Geometry with only a grid (the 2D mode reads nothing else)."""
    b, n = grid.shape[:2]
    eye = torch.eye(4).expand(b, n, 4, 4)
    return TokenGeometry(grid=grid.float(), points=torch.zeros(b, n, 3), valid=torch.ones(b, n, dtype=torch.bool),
                         time=torch.zeros(b, n), proj=eye, anchor=torch.eye(4).expand(b, 4, 4))


def rope_1d_reference(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """RoFormer: rotate (x_2i, x_2i+1) by pos * base^(-2i/d), one pair at a time."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = pos * base ** (-2 * i / d)
        c, s = torch.cos(angle), torch.sin(angle)
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * c - b * s
        out[..., 2 * i + 1] = a * s + b * c
    return out


@pytest.mark.parametrize("axis", [0, 1])
def test_2d_rope_on_a_line_is_standard_1d_rope(axis):
    torch.manual_seed(0)
    n, d = 11, 16
    grid = torch.zeros(1, n, 2)
    grid[0, :, axis] = torch.arange(n)
    rope = GeometryRoPE(d, "2d", grid_base=100.0)
    x = torch.randn(1, 2, n, d, dtype=torch.float64)
    out, _, _ = rope(x, x, x, grid_geometry(grid))
    moving = slice(0, d // 2) if axis == 0 else slice(d // 2, d)
    still = slice(d // 2, d) if axis == 0 else slice(0, d // 2)
    torch.testing.assert_close(out[..., moving], rope_1d_reference(x[..., moving], grid[0, :, axis].double(), 100.0))
    torch.testing.assert_close(out[..., still], x[..., still])


def test_2d_rope_logits_depend_only_on_grid_differences():
    torch.manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), indexing="ij")
    grid = torch.stack([rows, cols], -1).view(1, 20, 2)
    rope = GeometryRoPE(32, "2d")
    q, k, v = torch.randn(3, 1, 2, 20, 32).unbind(0)
    q1, k1, v1 = rope(q, k, v, grid_geometry(grid))
    q2, k2, _ = rope(q, k, v, grid_geometry(grid + torch.tensor([7.0, -3.0])))
    assert rel_err(logits(q2, k2), logits(q1, k1)) < 1e-5
    assert torch.equal(v1, v) and torch.equal(rope.output(v, grid_geometry(grid)), v)
    assert rel_err(logits(q1, k1), logits(q, k)) > 1e-2  # the encoding does something


def world_rope_logits(rope: GeometryRoPE, depth, k, pose, q, kk) -> torch.Tensor:
    geom = patch_geometry(depth, k, pose, patch=4)
    q2, k2, _ = rope(q, kk, kk, geom)
    return logits(q2, k2)


def test_3d_world_logits_unchanged_when_scene_and_cameras_move_together():
    depth, k, pose = make_clip(b=2, t=3, h=8, w=16, invalid=0.3)
    depth[1, 2] = 0.0  # a whole frame of fallback points moves with its camera too
    rope = GeometryRoPE(32, "3d-world")
    assert rope.axis_pairs == (5, 5, 3, 3)
    gen = torch.Generator().manual_seed(1)
    q, kk = torch.randn(2, 2, 4, 24, 32, generator=gen).unbind(0)
    base = world_rope_logits(rope, depth, k, pose, q, kk)
    motions = [(math.pi, torch.zeros(3))] + [(float(2 * math.pi * torch.rand(1, generator=gen) - math.pi),
                                               3 * torch.randn(3, generator=gen)) for _ in range(3)]
    for yaw, trans in motions:  # any heading change about gravity, any 3D translation
        g = rigid(rotation("z", yaw), trans)
        moved = (g @ pose.double()).float()
        assert rel_err(world_rope_logits(rope, depth, k, moved, q, kk), base) < 1e-4
    # translation alone, by any 3D vector, and the points shifted while the anchor stays: RoPE is relative
    geom = patch_geometry(depth, k, pose, patch=4)
    shifted = TokenGeometry(geom.grid, geom.points + torch.tensor([0.3, -1.2, 0.7]), geom.valid, geom.time, geom.proj,
                            geom.anchor)
    q2, k2, _ = rope(q, kk, kk, shifted)
    assert rel_err(logits(q2, k2), base) < 1e-4


def test_3d_world_logits_change_when_geometry_does():
    depth, k, pose = make_clip(b=2, t=3, h=8, w=16)
    rope = GeometryRoPE(32, "3d-world")
    gen = torch.Generator().manual_seed(2)
    q, kk = torch.randn(2, 2, 4, 24, 32, generator=gen).unbind(0)
    base = world_rope_logits(rope, depth, k, pose, q, kk)

    # later cameras move but the images stay: a different scene, so cross-frame logits must change
    moved = pose.clone()
    moved[:, 1:] = (rigid(rotation("z", 0.5), [0.4, 0.2, 0.0]) @ pose[:, 1:].double()).float()
    changed = world_rope_logits(rope, depth, k, moved, q, kk)
    assert rel_err(changed[..., :8, 8:], base[..., :8, 8:]) > 1e-2
    assert rel_err(changed[..., :8, :8], base[..., :8, :8]) < 1e-4  # frame 0 itself is untouched

    # half the tokens' points moved
    geom = patch_geometry(depth, k, pose, patch=4)
    points = geom.points.clone()
    points[:, ::2] += 0.25
    q2, k2, _ = rope(q, kk, kk, TokenGeometry(geom.grid, points, geom.valid, geom.time, geom.proj, geom.anchor))
    assert rel_err(logits(q2, k2), base) > 1e-2

    # tilting scene and cameras together is not a symmetry for a gravity-aligned encoding
    tilted = (rigid(rotation("x", 0.4), [0.0, 0.0, 0.0]) @ pose.double()).float()
    assert rel_err(world_rope_logits(rope, depth, k, tilted, q, kk), base) > 1e-2


def prope_attention(rope: GeometryRoPE, geom: TokenGeometry, q, k, v):
    q2, k2, v2 = rope(q, k, v, geom)
    a = logits(q2, k2) * q.shape[-1] ** -0.5
    return a, rope.output(a.softmax(-1) @ v2, geom)


def test_prope_within_one_frame_only_the_2d_part_acts():
    depth, k, pose = make_clip(b=2, t=1, h=8, w=16)
    geom = patch_geometry(depth, k, pose, patch=4)
    rope = GeometryRoPE(32, "prope")
    gen = torch.Generator().manual_seed(3)
    q, kk, v = torch.randn(3, 2, 4, 8, 32, generator=gen).unbind(0)
    a, out = prope_attention(rope, geom, q, kk, v)
    # reference: identity on the projective half, plain 2D RoPE on the other half
    rope2d = GeometryRoPE(16, "2d")
    q_r, k_r, _ = rope2d(q[..., 16:], kk[..., 16:], v[..., 16:], geom)
    want = (logits(q[..., :16], kk[..., :16]) + logits(q_r, k_r)) * 32 ** -0.5
    assert rel_err(a, want) < 1e-4
    torch.testing.assert_close(out, want.softmax(-1) @ v, atol=1e-4, rtol=1e-4)


def test_prope_depends_only_on_relative_cameras():
    depth, k, pose = make_clip(b=2, t=3, h=8, w=16)
    geom = patch_geometry(depth, k, pose, patch=4)
    rope = GeometryRoPE(32, "prope")
    gen = torch.Generator().manual_seed(4)
    q, kk, v = torch.randn(3, 2, 4, 24, 32, generator=gen).unbind(0)
    a, out = prope_attention(rope, geom, q, kk, v)
    g = rigid(random_rotation(gen), [1.5, -2.0, 0.7])  # any rigid motion, not only gravity-preserving
    moved = patch_geometry(depth, k, (g @ pose.double()).float(), patch=4)
    a2, out2 = prope_attention(rope, moved, q, kk, v)
    assert rel_err(a2, a) < 1e-4
    assert rel_err(out2, out) < 1e-4
    # one frame's camera moved on its own: the relative cameras change, and so do the logits
    pose[:, 1] = (rigid(rotation("y", 0.3), [0.2, 0.0, 0.1]) @ pose[:, 1].double()).float()
    a3, _ = prope_attention(rope, patch_geometry(depth, k, pose, patch=4), q, kk, v)
    assert rel_err(a3[..., :8, 8:16], a[..., :8, 8:16]) > 1e-2


def test_cross_attention_geometry_and_shape_checks():
    depth, k, pose = make_clip(b=1, t=2, h=8, w=8)
    geom = patch_geometry(depth, k, pose, patch=4)
    first = TokenGeometry(geom.grid[:, :4], geom.points[:, :4], geom.valid[:, :4], geom.time[:, :4],
                          geom.proj[:, :4], geom.anchor)
    for mode in GeometryRoPE.MODES:
        rope = GeometryRoPE(16, mode)
        q, kk = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 8, 16)
        q2, k2, v2 = rope(q, kk, kk, first, kv_geom=geom)
        assert q2.shape == q.shape and k2.shape == kk.shape and v2.shape == kk.shape
        with pytest.raises(ValueError, match="geometry for k"):
            rope(q, kk, kk, first)
        with pytest.raises(ValueError, match="q must be"):
            rope(q[..., :8], kk, kk, first, kv_geom=geom)


def test_bad_rope_configs():
    with pytest.raises(ValueError, match="2d.*3d-world.*prope"):
        GeometryRoPE(32, "3d")
    with pytest.raises(ValueError, match="divisible by 4"):
        GeometryRoPE(18, "2d")
    with pytest.raises(ValueError, match=">= 8"):
        GeometryRoPE(6, "3d-world")
    with pytest.raises(ValueError, match="divisible by 8"):
        GeometryRoPE(20, "prope")
    with pytest.raises(ValueError, match="axis_pairs"):
        GeometryRoPE(32, "3d-world", axis_pairs=(4, 4, 4, 3))
    assert GeometryRoPE(64, "3d-world").axis_pairs == (10, 10, 6, 6)
    assert GeometryRoPE(8, "3d-world").axis_pairs == (1, 1, 1, 1)


def test_rigid_inverse():
    gen = torch.Generator().manual_seed(5)
    m = rigid(random_rotation(gen), [1.0, 2.0, 3.0])
    torch.testing.assert_close(rigid_inverse(m) @ m, torch.eye(4, dtype=torch.float64))
