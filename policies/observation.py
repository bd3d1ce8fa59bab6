"""What a policy sees, built the same way from a dataset and from a live env.

Both policy variants read the egocentric RGB-D frames and the robot's own state, nothing privileged:

* `slots`: the frozen world-model encoder's object slots of each frame, streamed over the episode
  as on the robot, each turned into a token in the robot's frame (`slot_tokens`);
* `cnn`: the raw RGB-D frames (`rgbd_image`).

Both add `robot_state`: the `proprio` vector plus the camera's planar pose relative to where the
episode started (odometry, from `cam_pose`), so a policy knows how far it has turned while searching.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

ODOM_DIM = 4  # (dx, dy) m in the start frame, cos and sin of the turn since the start
SLOT_GEOMETRY_DIM = 6  # centre (forward, left, up) m, view direction (forward, left), log pixel share
DEPTH_SCALE_M = 3.0  # depth / 3 m: about [0, 1.3] over the sensor's range


def planar_pose(cam_pose: Tensor) -> tuple[Tensor, Tensor]:
    """cam_pose (..., 4, 4) world-from-optical -> camera position (..., 2) and heading (...): the yaw of
    its optical axis (z) in the world plane."""
    forward = cam_pose[..., :3, 2]
    return cam_pose[..., :2, 3], torch.atan2(forward[..., 1], forward[..., 0])


def _to_local(xy: Tensor, origin: Tensor, yaw: Tensor) -> Tensor:
    """World-plane vectors (..., K, 2) relative to `origin` (..., 2), expressed in a frame turned by `yaw`."""
    c, s = torch.cos(yaw).unsqueeze(-1), torch.sin(yaw).unsqueeze(-1)
    d = xy - origin.unsqueeze(-2)
    return torch.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], -1)


def slot_tokens(features: Tensor, pixels: Tensor, cam_pose: Tensor, image_pixels: int) -> Tensor:
    """Encoder features (..., K, S + 5) (slot vector, world centre x y z, planar view direction),
    pixels won (..., K), cam_pose (..., 4, 4) -> tokens (..., K, S + 6): the slot vector, then its
    centre in the camera's planar frame (forward, left, up), its view direction in that frame and
    log1p(pixels) / log1p(image pixels) (0 for a slot that sees nothing of its object now)."""
    s = features.shape[-1] - 5
    pos, yaw = planar_pose(cam_pose)
    centre = features[..., s:s + 3]
    planar = _to_local(centre[..., :2], pos, yaw)
    zero = torch.zeros_like(pos)
    direction = _to_local(features[..., s + 3:s + 5], zero, yaw)
    share = torch.log1p(pixels.float()) / math.log1p(image_pixels)
    return torch.cat([features[..., :s], planar, centre[..., 2:3], direction, share.unsqueeze(-1)], -1)


def odometry(cam_pose: Tensor, start_pose: Tensor) -> Tensor:
    """cam_pose (..., 4, 4) and the episode's first one (..., 4, 4) -> (..., 4): where the camera is
    in the start camera's planar frame, and the cos and sin of its turn since."""
    pos, yaw = planar_pose(cam_pose)
    pos0, yaw0 = planar_pose(start_pose)
    rel = _to_local(pos.unsqueeze(-2), pos0, yaw0).squeeze(-2)
    turn = yaw - yaw0
    return torch.cat([rel, torch.cos(turn).unsqueeze(-1), torch.sin(turn).unsqueeze(-1)], -1)


def robot_state(proprio: Tensor, cam_pose: Tensor, start_pose: Tensor) -> Tensor:
    """(..., P) proprio + (..., 4) odometry -> (..., P + 4)."""
    return torch.cat([proprio.float(), odometry(cam_pose.float(), start_pose.float())], -1)


def rgbd_image(rgb: Tensor | np.ndarray, depth: Tensor | np.ndarray) -> Tensor:
    """rgb uint8 (..., H, W, 3), depth m (..., H, W) -> float (..., 4, H, W): colour in [0, 1], depth / 3 m
    with invalid (0, NaN, inf) depth as 0."""
    rgb = torch.as_tensor(rgb)
    depth = torch.nan_to_num(torch.as_tensor(depth).float(), nan=0.0, posinf=0.0, neginf=0.0)
    x = torch.cat([rgb.float() / 255.0, (depth / DEPTH_SCALE_M).unsqueeze(-1)], -1)
    return x.movedim(-1, -3).contiguous()
