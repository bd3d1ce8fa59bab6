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
SLOT_GEOMETRY_DIM = 7  # centre (forward, left, up) m, view direction (forward, left), log pixel share, age
MIN_SEEN_PIXELS = 4  # a slot holding fewer valid-depth pixels does not see its object now
NEVER_SEEN_AGE = 1000  # steps; what the age feature says of a slot that has never held an object
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


class SlotMemory:
    """Object permanence over one stream: each slot's last seen world centre, and how many steps ago.

    A slot whose object leaves the view (or hides behind the box being pushed, as the goal disc
    does) wins no pixels and its centre estimate says nothing; the policy reads the remembered
    centre instead, moved into the robot's current frame by odometry, as the expert remembers
    what it has seen. Streams are batched: one memory per batch of streams, reset per episode."""

    def __init__(self) -> None:
        self.centre: Tensor | None = None  # (B, K, 3) world
        self.age: Tensor | None = None  # (B, K) steps since seen

    def __call__(self, centre: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """centre (B, K, 3) this frame's estimates, pixels (B, K) -> remembered centre (B, K, 3), age (B, K)."""
        seen = pixels >= MIN_SEEN_PIXELS
        if self.centre is None:
            self.centre = centre.clone()
            self.age = torch.where(seen, 0.0, float(NEVER_SEEN_AGE)).to(centre.dtype)
        else:
            self.centre = torch.where(seen.unsqueeze(-1), centre, self.centre)
            self.age = torch.where(seen, torch.zeros_like(self.age), (self.age + 1).clamp(max=NEVER_SEEN_AGE))
        return self.centre, self.age


def frame_tokens(out, cam_pose: Tensor, memory: SlotMemory | None = None) -> Tensor:
    """One streamed frame's `EncoderOutput` (T = 1), cam_pose (B, 4, 4) -> slot tokens (B, K, S + 7): what
    the policy reads, built by this one function offline (`policies.data`) and on the robot
    (`policies.controller`). Each slot's centre is the visible centroid of its pixels (depth under
    its mask), not `CenterHead`'s estimate: the learned move behind the surface is left to the
    probe, since a policy learns a constant offset itself and an offset that goes wrong moves the box
    it must push."""
    features = torch.cat([out.slots, out.extras["centroid"]], dim=-1)[:, 0]
    h, w = out.masks.shape[-2:]
    return slot_tokens(features, out.extras["pixels"][:, 0], cam_pose, h * w, memory)


def slot_tokens(features: Tensor, pixels: Tensor, cam_pose: Tensor, image_pixels: int,
                memory: SlotMemory | None = None) -> Tensor:
    """Encoder features (B, K, S + 5) (slot vector, world centre x y z, planar view direction),
    pixels won (B, K), cam_pose (B, 4, 4) -> tokens (B, K, S + 7): the slot vector, then its centre in
    the camera's planar frame (forward, left, up), the planar direction to it in that frame,
    log1p(pixels) / log1p(image pixels) (0 for a slot that sees nothing of its object now) and
    log1p(age) / log1p(NEVER_SEEN_AGE), age = steps since the slot last saw its object. With a
    `memory`, a slot that sees nothing now keeps its last seen centre."""
    s = features.shape[-1] - 5
    pos, yaw = planar_pose(cam_pose)
    centre, age = (memory if memory is not None else SlotMemory())(features[..., s:s + 3], pixels)
    planar = _to_local(centre[..., :2], pos, yaw)
    direction = planar / planar.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    share = torch.log1p(pixels.float()) / math.log1p(image_pixels)
    age = torch.log1p(age) / math.log1p(NEVER_SEEN_AGE)
    return torch.cat([features[..., :s], planar, centre[..., 2:3], direction, share.unsqueeze(-1),
                      age.unsqueeze(-1)], -1)


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
