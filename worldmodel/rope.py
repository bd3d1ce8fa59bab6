"""Where tokens are, and rotary position encodings that use it.

`patch_geometry` turns a clip of depth images with their cameras into one 3D point, one grid position, one time and
one camera matrix per patch token. `GeometryRoPE` then encodes those positions into q, k (and, for PRoPE, v and the
attention output) so that attention logits depend on relative positions only:

    "2d"        axial RoPE on the patch grid (row, col); the image-only baseline.
    "3d-world"  RoPE on the token's 3D point in a gravity-aligned frame anchored at the clip's first camera, plus time.
    "prope"     projective positional encoding (Li et al. 2025, "Cameras as Relative Positional Encoding"): half of
                each head is multiplied by the token's 4x4 camera matrix, the other half gets 2D RoPE on the grid.

Conventions follow docs/DESIGN: depth is z-depth in metres (0 = invalid), K is a pinhole matrix in pixels with pixel
centres at integer coordinates, cam_pose is world-from-camera with the OpenCV optical frame, the world is z-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

RIGID_TOL = 1e-3  # how far a pose's rotation may be from orthonormal (float32 poses chained over a clip drift a bit)


@dataclass
class TokenGeometry:
    """Where each token is. B batch, N tokens (all frames of a clip flattened, frame-major then row-major)."""

    grid: Tensor  # float (B, N, 2): patch row, col in patch units (integers for a patch grid)
    points: Tensor  # float (B, N, 3): token's 3D point in the world frame, metres (fallback already applied)
    valid: Tensor  # bool (B, N): the patch had at least one valid depth pixel
    time: Tensor  # float (B, N): frame index within the clip (0 for single images)
    proj: Tensor  # float (B, N, 4, 4): camera matrix of the token's frame, P = lift(K_norm) @ cam_from_world
    anchor: Tensor  # float (B, 4, 4): world-from-anchor, gravity-aligned frame at the clip's first camera
    # GeometryRoPE's cos and sin tables for these tokens, computed by the first layer that needs them and reused
    # by the others (a ViT's layers all see the same geometry). Treat a TokenGeometry as immutable: build a new
    # one rather than change its tensors in place, or the tables go stale.
    rotations: dict = field(default_factory=dict, repr=False, compare=False)


def _work_dtype(device: torch.device) -> torch.dtype:
    # Geometry is cheap next to attention, so do it in float64 where the device has it: RoPE phases reach
    # hundreds of radians and float32 would leave ~1e-4 rad of noise in them.
    return torch.float32 if device.type == "mps" else torch.float64


def rigid_inverse(m: Tensor) -> Tensor:
    """Inverse of rigid transforms (..., 4, 4): [R t; 0 1]^-1 = [R^T -R^T t; 0 1] (exact, unlike a general inverse)."""
    r_t = m[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(m)
    out[..., :3, :3] = r_t
    out[..., :3, 3] = -(r_t @ m[..., :3, 3:]).squeeze(-1)
    out[..., 3, 3] = 1.0
    return out


def to_anchor_frame(points: Tensor, anchor: Tensor) -> Tensor:
    """World points (B, ..., 3) -> the same points in the frame anchor (B, 4, 4) = world-from-anchor."""
    inv = rigid_inverse(anchor)
    b = points.shape[0]
    flat = points.reshape(b, -1, 3)
    return (flat @ inv[:, :3, :3].transpose(1, 2) + inv[:, None, :3, 3]).view(points.shape)


def gravity_anchor(cam_pose: Tensor) -> Tensor:
    """World-from-anchor (B, 4, 4) for camera poses (B, 4, 4): at the camera, z up, x along its heading.

    The heading is the optical axis projected on the floor; for a camera looking straight down (no horizontal part)
    it is the image's up direction (-y of the optical frame) projected instead, which is horizontal then.
    """
    rot = cam_pose[..., :3, :3]
    forward = rot[..., :2, 2]  # optical axis (z of the camera) in the world, x and y only
    up_in_image = -rot[..., :2, 1]
    degenerate = forward.norm(dim=-1, keepdim=True) < 1e-6
    heading = torch.where(degenerate, up_in_image, forward)
    heading = heading / heading.norm(dim=-1, keepdim=True)
    c, s = heading[..., 0], heading[..., 1]
    anchor = torch.zeros_like(cam_pose)
    anchor[..., 0, 0], anchor[..., 0, 1] = c, -s
    anchor[..., 1, 0], anchor[..., 1, 1] = s, c
    anchor[..., 2, 2] = 1.0
    anchor[..., :3, 3] = cam_pose[..., :3, 3]
    anchor[..., 3, 3] = 1.0
    return anchor


def _check_inputs(depth: Tensor, intrinsics: Tensor, cam_pose: Tensor, patch: int, time: Tensor | None,
                  fallback_depth: float) -> None:
    if not isinstance(depth, Tensor) or depth.dim() != 4:
        raise ValueError(f"depth must be a tensor (B, T, H, W); got shape {tuple(getattr(depth, 'shape', ()))}")
    if not depth.is_floating_point():
        raise ValueError(f"depth must be float metres; got dtype {depth.dtype}")
    b, t, h, w = depth.shape
    if tuple(intrinsics.shape) != (b, t, 3, 3):
        raise ValueError(f"intrinsics must be (B, T, 3, 3) = {(b, t, 3, 3)}; got {tuple(intrinsics.shape)}")
    if tuple(cam_pose.shape) != (b, t, 4, 4):
        raise ValueError(f"cam_pose must be (B, T, 4, 4) = {(b, t, 4, 4)}; got {tuple(cam_pose.shape)}")
    if time is not None and tuple(time.shape) != (b, t):
        raise ValueError(f"time must be (B, T) = {(b, t)} or None; got {tuple(time.shape)}")
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a positive int; got {patch!r}")
    if h % patch or w % patch:
        raise ValueError(f"image size (H, W) = {(h, w)} must be divisible by patch = {patch}")
    if not (math.isfinite(fallback_depth) and fallback_depth > 0):
        raise ValueError(f"fallback_depth must be a positive number of metres; got {fallback_depth!r}")
    if time is not None and not torch.isfinite(time).all():
        raise ValueError("time has non-finite values")

    if not torch.isfinite(intrinsics).all():
        raise ValueError("intrinsics have non-finite values (NaN or inf)")
    last_row = intrinsics.new_tensor([0.0, 0.0, 1.0])
    if not torch.allclose(intrinsics[..., 2, :], last_row.expand_as(intrinsics[..., 2, :]), atol=1e-6):
        bad = intrinsics[..., 2, :].reshape(-1, 3)[0].tolist()
        raise ValueError(f"intrinsics must be pinhole K with last row [0, 0, 1]; got e.g. {bad}")
    fx, fy = intrinsics[..., 0, 0], intrinsics[..., 1, 1]
    if (fx <= 0).any() or (fy <= 0).any():
        raise ValueError(f"intrinsics need fx, fy > 0; got fx min {fx.min().item():.4g}, fy min {fy.min().item():.4g}")

    if not torch.isfinite(cam_pose).all():
        raise ValueError("cam_pose has non-finite values (NaN or inf)")
    pose = cam_pose.double()
    last = pose.new_tensor([0.0, 0.0, 0.0, 1.0])
    if not torch.allclose(pose[..., 3, :], last.expand_as(pose[..., 3, :]), atol=1e-6):
        bad = pose[..., 3, :].reshape(-1, 4)[0].tolist()
        raise ValueError(f"cam_pose must be rigid with last row [0, 0, 0, 1]; got e.g. {bad}")
    rot = pose[..., :3, :3]
    ortho_err = (rot.transpose(-1, -2) @ rot - torch.eye(3, dtype=pose.dtype, device=pose.device)).abs().amax()
    det = torch.linalg.det(rot)
    det_err = (det - 1).abs().amax()
    if ortho_err > RIGID_TOL or det_err > RIGID_TOL:
        raise ValueError(f"cam_pose rotation must be orthonormal with det +1 (tol {RIGID_TOL}); got max |R^T R - I| "
                         f"= {ortho_err.item():.3g}, det range [{det.min().item():.4g}, {det.max().item():.4g}]")


def patch_geometry(depth: Tensor, intrinsics: Tensor, cam_pose: Tensor, patch: int, time: Tensor | None = None,
                   fallback_depth: float = 4.0) -> TokenGeometry:
    """Per-token geometry of a clip cut into patch x patch tokens.

    depth (B, T, H, W) metres, intrinsics (B, T, 3, 3), cam_pose (B, T, 4, 4) world-from-camera, time (B, T) or None
    (= 0, 1, .., T-1) -> TokenGeometry with N = T * (H / patch) * (W / patch) tokens, frame-major then row-major.

    A token's point is the mean of its patch's valid pixels, each unprojected along its ray to its z-depth, moved to
    the world by cam_pose. Depth 0, negative, NaN or inf marks an invalid pixel (a real sensor reports "no return" in
    all of these ways), so such pixels are skipped, not rejected. A patch with no valid pixel (valid False) gets the
    point at z-depth `fallback_depth` on the ray through the patch centre (default 4 m, the far end of the sim's
    depth range), moved by the same cam_pose: the fallback is a point rigidly attached to its camera, so moving
    scene and camera together still moves it consistently. All-invalid depth therefore works and never gives NaN.

    Outputs are float32 (float64 if the inputs are); the arithmetic runs in float64.
    """
    _check_inputs(depth, intrinsics, cam_pose, patch, time, fallback_depth)
    b, t, h, w = depth.shape
    hp, wp = h // patch, w // patch
    device = depth.device
    out_dtype = torch.promote_types(torch.promote_types(depth.dtype, cam_pose.dtype), torch.float32)
    work = _work_dtype(device)
    k_mat, pose = intrinsics.to(work), cam_pose.to(work)

    # Mean point of a patch: the unprojection K^-1 [u z, v z, z] is linear in (u z, v z, z), so average those
    # per patch first and unproject once per token instead of once per pixel.
    z = depth.to(work)
    valid_px = torch.isfinite(z) & (z > 0)
    z = torch.where(valid_px, z, torch.zeros_like(z))
    u = torch.arange(w, device=device, dtype=work)
    v = torch.arange(h, device=device, dtype=work).unsqueeze(-1)
    pix = torch.stack([u * z, v * z, z], dim=-1)  # (B, T, H, W, 3)
    pix = pix.view(b, t, hp, patch, wp, patch, 3).sum(dim=(3, 5))  # (B, T, Hp, Wp, 3)
    count = valid_px.view(b, t, hp, patch, wp, patch).sum(dim=(3, 5))  # (B, T, Hp, Wp)
    valid = count > 0
    mean_pix = pix / count.clamp(min=1).unsqueeze(-1).to(work)

    # fallback: the patch centre pixel (pixel centres sit at integer coordinates) at z = fallback_depth
    rows = torch.arange(hp, device=device, dtype=work)
    cols = torch.arange(wp, device=device, dtype=work)
    centre_u = (cols * patch + (patch - 1) / 2).view(1, wp).expand(hp, wp)
    centre_v = (rows * patch + (patch - 1) / 2).view(hp, 1).expand(hp, wp)
    centre = torch.stack([centre_u, centre_v, torch.ones_like(centre_u)], dim=-1) * fallback_depth  # (Hp, Wp, 3)
    mean_pix = torch.where(valid.unsqueeze(-1), mean_pix, centre)

    k_inv = torch.linalg.inv(k_mat)  # (B, T, 3, 3)
    p_cam = torch.einsum("btij,btyxj->btyxi", k_inv, mean_pix)
    rot, trans = pose[..., :3, :3], pose[..., :3, 3]
    p_world = torch.einsum("btij,btyxj->btyxi", rot, p_cam) + trans[:, :, None, None, :]

    # PRoPE camera matrix. Normalising pixels to about [-1, 1] keeps P's entries O(1) instead of O(focal length),
    # so q and k keep their scale and P^-1 stays well conditioned.
    to_ndc = torch.tensor([[2.0 / w, 0.0, -1.0], [0.0, 2.0 / h, -1.0], [0.0, 0.0, 1.0]], device=device, dtype=work)
    lifted = torch.zeros(b, t, 4, 4, device=device, dtype=work)
    lifted[..., :3, :3] = to_ndc @ k_mat
    lifted[..., 3, 3] = 1.0
    proj = lifted @ rigid_inverse(pose)  # (B, T, 4, 4)

    tokens = hp * wp
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(1, 1, tokens, 2)
    if time is None:
        time = torch.arange(t, device=device, dtype=work).expand(b, t)
    n = t * tokens
    return TokenGeometry(
        grid=grid.expand(b, t, tokens, 2).reshape(b, n, 2).to(out_dtype),
        points=p_world.reshape(b, n, 3).to(out_dtype),
        valid=valid.reshape(b, n),
        time=time.to(work).unsqueeze(-1).expand(b, t, tokens).reshape(b, n).to(out_dtype),
        proj=proj.unsqueeze(2).expand(b, t, tokens, 4, 4).reshape(b, n, 4, 4).to(out_dtype),
        anchor=gravity_anchor(pose[:, 0]).to(out_dtype),
    )


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoFormer rotation: pair (x_2i, x_2i+1) turns by angle i. x (B, heads, N, D), the angles' cos and sin
    (B, 1, N, D/2) each (`GeometryRoPE._table`)."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1).flatten(-2)


def project_blocks(x: Tensor, mat: Tensor) -> Tensor:
    """Multiply every 4-dim block of each token by that token's matrix. x (B, heads, N, 4m), mat (B, N, 4, 4)."""
    blocks = x.unflatten(-1, (-1, 4))  # (B, heads, N, m, 4)
    return torch.einsum("bnrc,bhnmc->bhnmr", mat.to(x.dtype), blocks).flatten(-2)


def axial_grid_freqs(head_dim: int, base: float) -> Tensor:
    """(2, head_dim/2) frequencies: first half of the pairs listen to the row, second half to the column.

    Each axis is standard RoPE over head_dim/2 dims: theta_i = base^(-2i / (head_dim/2)).
    """
    d_axis = head_dim // 2
    theta = base ** (-2.0 * torch.arange(d_axis // 2, dtype=torch.float64) / d_axis)
    freqs = torch.zeros(2, head_dim // 2, dtype=torch.float64)
    freqs[0, : d_axis // 2] = theta
    freqs[1, d_axis // 2:] = theta
    return freqs


def default_axis_pairs(head_dim: int) -> tuple[int, int, int, int]:
    """Rotary pairs for (x, y, z, t) in "3d-world": z and t get ~3/16 each, x and y share the rest (x the odd one).

    A floor robot's scene spreads mostly in x, y, so those get the most frequencies. head_dim 32 -> (5, 5, 3, 3).
    """
    pairs = head_dim // 2
    z = t = max(1, 3 * pairs // 16)
    rest = pairs - z - t
    x = (rest + 1) // 2
    return x, rest - x, z, t


def world_freqs(axis_pairs: tuple[int, int, int, int], min_wavelength_m: float, max_wavelength_m: float,
                time_base: float) -> Tensor:
    """(4, sum(axis_pairs)) frequencies for coordinates (x, y, z, t); each pair listens to one coordinate.

    Spatial wavelengths are log-spaced from min to max (a pair of wavelength L turns by 2 pi per L metres), so the
    encoding resolves both a few centimetres and the whole room; time uses standard RoPE frequencies.
    """
    total = sum(axis_pairs)
    freqs = torch.zeros(4, total, dtype=torch.float64)
    start = 0
    for axis, n in enumerate(axis_pairs):
        if n == 0:
            continue
        if axis < 3:
            if n == 1:
                wavelengths = torch.tensor([math.sqrt(min_wavelength_m * max_wavelength_m)], dtype=torch.float64)
            else:
                steps = torch.arange(n, dtype=torch.float64) / (n - 1)
                wavelengths = min_wavelength_m * (max_wavelength_m / min_wavelength_m) ** steps
            freqs[axis, start:start + n] = 2 * math.pi / wavelengths
        else:
            freqs[axis, start:start + n] = time_base ** (-torch.arange(n, dtype=torch.float64) / n)
        start += n
    return freqs


class GeometryRoPE(nn.Module):
    """Geometry-aware rotary encoding for attention heads; mode in {"2d", "3d-world", "prope"}.

    "2d": axial RoPE on the patch grid; head_dim % 4 == 0.
    "3d-world": RoPE on (x, y, z, t) with the points expressed in the query clip's anchor frame (gravity-aligned, at
        the first frame's camera, x along its heading). Logits then depend only on anchored point differences and
        time differences, and are exactly unchanged when scene and cameras move together by any rigid motion that
        keeps gravity (a rotation about z and any translation). A tilt or roll of the whole scene does change them:
        gravity is real information for a floor robot. Pairs per axis: `axis_pairs` or `default_axis_pairs`.
    "prope": the first head_dim/2 dims, in blocks of 4, get q <- P^T q, k <- P^-1 k, v <- P^-1 v and output
        o <- P o, so q_i . k_j sees only P_i P_j^-1 (the relative camera); the other half gets 2D RoPE on the grid.
        head_dim % 8 == 0.
    """

    MODES = ("2d", "3d-world", "prope")

    def __init__(self, head_dim: int, mode: str = "3d-world", *, grid_base: float = 100.0,
                 min_wavelength_m: float = 0.05, max_wavelength_m: float = 10.0, time_base: float = 100.0,
                 axis_pairs: tuple[int, int, int, int] | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}; got {mode!r}")
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int; got {head_dim!r}")
        if not (0 < min_wavelength_m <= max_wavelength_m):
            raise ValueError(f"need 0 < min_wavelength_m <= max_wavelength_m; got {min_wavelength_m}, "
                             f"{max_wavelength_m}")
        if grid_base <= 1 or time_base <= 1:
            raise ValueError(f"grid_base and time_base must be > 1; got {grid_base}, {time_base}")
        self.head_dim, self.mode = head_dim, mode
        # what the rotation tables depend on besides the tokens: layers built alike share tables (`rotations`)
        self.signature = (mode, head_dim, grid_base, min_wavelength_m, max_wavelength_m, time_base, axis_pairs)
        self.axis_pairs: tuple[int, int, int, int] | None = None
        self.prope_dim = 0
        if mode == "2d":
            if head_dim % 4:
                raise ValueError(f'"2d" RoPE needs head_dim divisible by 4 (pairs for row and col); got {head_dim}')
            freqs = axial_grid_freqs(head_dim, grid_base)
        elif mode == "3d-world":
            if head_dim % 2 or head_dim < 8:
                raise ValueError(f'"3d-world" RoPE needs an even head_dim >= 8 (a pair for each of x, y, z, t); '
                                 f"got {head_dim}")
            pairs = default_axis_pairs(head_dim) if axis_pairs is None else tuple(int(a) for a in axis_pairs)
            if len(pairs) != 4 or min(pairs) < 0 or sum(pairs) != head_dim // 2:
                raise ValueError(f"axis_pairs must be 4 counts >= 0 for (x, y, z, t) summing to head_dim/2 = "
                                 f"{head_dim // 2}; got {axis_pairs}")
            self.axis_pairs = pairs
            freqs = world_freqs(pairs, min_wavelength_m, max_wavelength_m, time_base)
        else:
            if head_dim % 8:
                raise ValueError(f'"prope" needs head_dim divisible by 8 (4x4 blocks on one half, 2D RoPE on the '
                                 f"other); got {head_dim}")
            self.prope_dim = head_dim // 2
            freqs = axial_grid_freqs(head_dim - self.prope_dim, grid_base)
        self.register_buffer("freqs", freqs, persistent=False)  # (axes, pairs), float64

    def extra_repr(self) -> str:
        extra = f", axis_pairs={self.axis_pairs}" if self.axis_pairs else ""
        return f"head_dim={self.head_dim}, mode={self.mode!r}{extra}"

    def _check(self, x: Tensor, geom: TokenGeometry, name: str) -> None:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"{name} must be (B, heads, N, {self.head_dim}); got {tuple(x.shape)}")
        b, n = x.shape[0], x.shape[2]
        if tuple(geom.grid.shape) != (b, n, 2) or tuple(geom.points.shape) != (b, n, 3):
            raise ValueError(f"geometry for {name} {tuple(x.shape)} must have grid (B, N, 2) = {(b, n, 2)} and points "
                             f"(B, N, 3); got grid {tuple(geom.grid.shape)}, points {tuple(geom.points.shape)}")
        if self.mode == "3d-world" and (tuple(geom.time.shape) != (b, n) or tuple(geom.anchor.shape) != (b, 4, 4)):
            raise ValueError(f"geometry for {name} must have time (B, N) = {(b, n)} and anchor (B, 4, 4); got time "
                             f"{tuple(geom.time.shape)}, anchor {tuple(geom.anchor.shape)}")
        if self.mode == "prope" and tuple(geom.proj.shape) != (b, n, 4, 4):
            raise ValueError(f"geometry for {name} must have proj (B, N, 4, 4) = {(b, n, 4, 4)}; got "
                             f"{tuple(geom.proj.shape)}")

    def _phases(self, coords: Tensor) -> Tensor:
        """coords (B, N, axes) -> angles (B, N, pairs): each pair turns by its axis coordinate times its frequency."""
        work = _work_dtype(coords.device)
        return coords.to(work) @ self.freqs.to(work)

    def _table(self, geom: TokenGeometry, dtype: torch.dtype, anchor: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin (B, 1, N, pairs) of geom's phases: of its grid, or (with `anchor`) of its points in the anchor
        frame and its time. Kept in `geom.rotations` for the next layer with the same signature, anchor and dtype."""
        key = (self.signature, dtype, None if anchor is None else id(anchor))
        hit = geom.rotations.get(key)
        if hit is not None and hit[0] is anchor:  # the anchor itself is kept, so its id cannot have been reused
            return hit[1]
        angles = self._phases(geom.grid if anchor is None else self._world_coords(geom, anchor))
        table = (angles.cos().unsqueeze(1).to(dtype), angles.sin().unsqueeze(1).to(dtype))
        geom.rotations[key] = (anchor, table)
        return table

    def _world_coords(self, geom: TokenGeometry, anchor: Tensor) -> Tensor:
        """(B, N, 4): x, y, z in the anchor frame and time."""
        work = _work_dtype(geom.points.device)
        local = to_anchor_frame(geom.points.to(work), anchor.to(work))
        return torch.cat([local, geom.time.to(work).unsqueeze(-1)], dim=-1)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, geom: TokenGeometry, *,
                kv_geom: TokenGeometry | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, heads, Nq, D), k, v (B, heads, Nk, D) -> encoded q, k, v (v changes only in "prope").

        geom places the queries, kv_geom the keys/values (default geom, i.e. self-attention). In "3d-world" both
        sides use geom's anchor, so cross attention compares points in one frame of reference.
        """
        kv_geom = geom if kv_geom is None else kv_geom
        self._check(q, geom, "q")
        self._check(k, kv_geom, "k")
        if v.shape[:3] != k.shape[:3] or v.shape[-1] != self.head_dim:
            raise ValueError(f"v must be (B, heads, Nk, {self.head_dim}) like k {tuple(k.shape)}; got {tuple(v.shape)}")
        if self.mode == "2d":
            return _rotate(q, *self._table(geom, q.dtype)), _rotate(k, *self._table(kv_geom, k.dtype)), v
        if self.mode == "3d-world":
            q_rot = self._table(geom, q.dtype, geom.anchor)
            return _rotate(q, *q_rot), _rotate(k, *self._table(kv_geom, k.dtype, geom.anchor)), v
        h = self.prope_dim
        work = _work_dtype(k.device)
        k_proj_inv = torch.linalg.inv(kv_geom.proj.to(work))
        q = torch.cat([project_blocks(q[..., :h], geom.proj.transpose(-1, -2)),
                       _rotate(q[..., h:], *self._table(geom, q.dtype))], dim=-1)
        k = torch.cat([project_blocks(k[..., :h], k_proj_inv),
                       _rotate(k[..., h:], *self._table(kv_geom, k.dtype))], dim=-1)
        v = torch.cat([project_blocks(v[..., :h], k_proj_inv), v[..., h:]], dim=-1)
        return q, k, v

    def output(self, o: Tensor, geom: TokenGeometry) -> Tensor:
        """Attention output o (B, heads, Nq, D) -> same shape; "prope" maps its half back with the query's P."""
        if self.mode != "prope":
            return o
        self._check(o, geom, "o")
        h = self.prope_dim
        return torch.cat([project_blocks(o[..., :h], geom.proj), o[..., h:]], dim=-1)
