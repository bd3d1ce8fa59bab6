"""Small geometry helpers shared by the simulator, experts and (later) the world model.

Frames follow DESIGN.md: the world/odometry frame is REP-103 (x forward, y left,
z up); camera points are in the optical frame (x right, y down, z forward).
Numpy only, so `sim` stays importable without torch.
"""

from __future__ import annotations

import numpy as np

# MuJoCo cameras look along -z with y up; the optical frame looks along +z with y down.
MJCAM_FROM_OPTICAL = np.diag([1.0, -1.0, -1.0])


def wrap_angle(a: np.ndarray | float) -> np.ndarray | float:
    """Wrap angles to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2.0 * np.pi) - np.pi


def yaw_from_quat(q: np.ndarray) -> float:
    """Heading (rotation about world z) of a MuJoCo (w, x, y, z) quaternion."""
    w, x, y, z = q
    return float(np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z)))


def quat_from_yaw(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)])


def rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def planar_pose_matrix(x: float, y: float, yaw: float) -> np.ndarray:
    """World-from-base (4, 4) of a planar pose."""
    T = np.eye(4)
    T[:3, :3] = rot_z(yaw)
    T[:2, 3] = (x, y)
    return T


def to_local(points_xy: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World (..., 2) points into the frame of a planar pose (x, y, yaw): one pose (3,), or poses (..., 3)
    that broadcast against the points."""
    pose = np.asarray(pose, float)
    d = np.asarray(points_xy, float) - pose[..., :2]
    c, s = np.cos(pose[..., 2]), np.sin(pose[..., 2])
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)


def unproject_depth(depth: np.ndarray, intrinsics: np.ndarray, cam_pose: np.ndarray | None = None) -> np.ndarray:
    """Back-project a depth image (H, W) metres to 3D points (H, W, 3).

    Points are in the optical frame, or in the world frame when `cam_pose`
    (world-from-camera, (4, 4)) is given. Invalid pixels (depth 0) give NaN.
    """
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    z = depth.astype(np.float64)
    x = (u - intrinsics[0, 2]) * z / intrinsics[0, 0]
    y = (v - intrinsics[1, 2]) * z / intrinsics[1, 1]
    pts = np.stack([x, y, z], axis=-1)
    pts[z <= 0] = np.nan
    if cam_pose is not None:
        pts = pts @ cam_pose[:3, :3].T + cam_pose[:3, 3]
    return pts


def point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from point p to the segment a-b (any dimension)."""
    ab = b - a
    t = np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + t * ab)))
