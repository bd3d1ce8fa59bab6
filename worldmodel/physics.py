"""The physical part of a slot and the physics-aware transition prior of `CausalJEPAPredictor`.

Every slot carries, next to its appearance vector, an explicit planar physical state

    (x, y, phi, vx, vy, omega)    world (odometry) frame, metres, radians, per second

read from the encoder's slot features by `PhysicalProbe` (trained on the simulator's object poses)
and advanced by the predictor with a semi-implicit (symplectic) Euler step from predicted
accelerations:

    v_{t+1} = keep * v_t + a_t * dt          keep = how much the slot is touched (1 without the prior)
    p_{t+1} = p_t + v_{t+1} * dt

`phi` is HEADING_SYMMETRY x yaw: the boxes are cubes, so only yaw modulo 90 degrees can be seen.

Pushing is quasi-static: a box that nothing touches stops within one control step (sliding
friction decelerates it by about mu g = 5 m/s^2; at the robot's top speed of 0.25 m/s it stops in
0.05 s, less than one 0.1 s step). So the prior is not Newton's first law (an untouched slot keeps
its velocity) but "an untouched slot keeps its position and loses its velocity": the velocity kept
is scaled by the slot's touch probability, 1 - prod(1 - gate) over the robot and every other slot.
Contact is local: a gate can only open within reach, where the robot's body or another object
can touch the slot (`contact_range`, a soft cut-off on the distance from the slot's centre to the
robot's footprint, and between slot centres), so an object out of reach keeps its place exactly,
whatever the network says (a planner searching the model's actions would otherwise find pushes
from a distance). Accelerations are a gate-weighted sum of pairwise effects (slot j on
slot k, robot on slot k), bounded by a scaled tanh; the gates are pushed towards 0 by a sparsity penalty, the accelerations
towards smooth sequences by a penalty on their change over time.

Shapes: B batch (may fold candidates), K slots, D predictor width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEADING_SYMMETRY = 4  # the boxes are cubes: yaw is seen modulo 2 pi / 4
POSITION_SCALE_M = 1.2  # positions are divided by this (the arena's half-width) before entering a network
SPEED_SCALE = 0.25  # m/s: the robot's top speed (sim.env.ACTION_HIGH[0])
TURN_SCALE = 2.0 * HEADING_SYMMETRY  # rad/s of phi at the robot's top turn rate
CAMERA_AHEAD_M = 0.032  # the head camera is this far ahead of the wheel axle (sim/assets/robot.xml)
PHYS_DIM = 6  # x, y, phi, vx, vy, omega
# Reach of a contact. The robot's footprint in its own frame (x forward from the wheel axle, y left):
# the chassis and the pusher plate span x in [-0.09, 0.108] m, y in [-0.10, 0.10] m
# (sim/assets/robot.xml). The robot can touch an object whose centre is within ROBOT_CONTACT_M of
# that rectangle (a box's half-diagonal, 0.07 m, plus 1 cm), and two objects whose centres are within
# PAIR_REACH_M (two half-diagonals plus 6 cm). With 3 cm of slack instead of 1, the planner found
# pushes by a robot turning beside a box, and open-loop errors at 3 s were 0.057 m instead of 0.041.
ROBOT_FOOTPRINT_M = (-0.09, 0.108, 0.10)  # x min, x max, half width
ROBOT_CONTACT_M = 0.08
PAIR_REACH_M = 0.20
REACH_SOFTNESS_M = 0.01  # width of the sigmoid cut-off
ROBOT_DIM = 6  # x, y, cos yaw, sin yaw, v, omega of the robot's axle


def wrap_angle(a: Tensor) -> Tensor:
    """Angles to [-pi, pi)."""
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def symplectic_euler(pos: Tensor, vel: Tensor, acc: Tensor, dt: float, keep: Tensor | float = 1.0
                     ) -> tuple[Tensor, Tensor]:
    """One semi-implicit Euler step: the new velocity first, then the position moves by it.
    pos, vel, acc (..., C); keep (...) or (..., 1) or a float: the share of the old velocity kept.
    -> (pos', vel')."""
    if isinstance(keep, Tensor) and keep.dim() == vel.dim() - 1:
        keep = keep.unsqueeze(-1)
    vel = keep * vel + acc * dt
    return pos + vel * dt, vel


def finite_difference_states(pos: Tensor, phi: Tensor, dt: float) -> Tensor:
    """Physical states from positions (B, T, K, 2) and headings phi (B, T, K): velocities are backward
    differences (the first frame's is 0: nothing before it is known) -> (B, T, K, 6).
    With these velocities the symplectic step reproduces the observed positions exactly."""
    vel = torch.zeros_like(pos)
    omega = torch.zeros_like(phi)
    if pos.shape[1] > 1:
        vel[:, 1:] = (pos[:, 1:] - pos[:, :-1]) / dt
        omega[:, 1:] = wrap_angle(phi[:, 1:] - phi[:, :-1]) / dt
    return torch.cat([pos, phi.unsqueeze(-1), vel, omega.unsqueeze(-1)], -1)


def physical_features(phys: Tensor) -> Tensor:
    """(..., 6) physical state -> (..., 7) network input of order 1: x, y, cos phi, sin phi, vx, vy, omega."""
    x, y, phi, vx, vy, om = phys.unbind(-1)
    return torch.stack([x / POSITION_SCALE_M, y / POSITION_SCALE_M, phi.cos(), phi.sin(), vx / SPEED_SCALE,
                        vy / SPEED_SCALE, om / TURN_SCALE], -1)


class PhysicalProbe(nn.Module):
    """Slot features (encoder slot vector + geometry: centre x, y, z, view direction dx, dy) -> planar
    position and heading. The position is the encoder's centre estimate moved by a learned offset
    (zero at initialisation, so an untrained probe reads the encoder's own estimate); the heading is
    a unit vector (cos phi, sin phi), phi = HEADING_SYMMETRY x yaw. With `offset` False the position
    is the encoder's centre estimate as it is (the encoder's `CenterHead` is itself trained on the
    objects' positions) and only the heading is learned."""

    def __init__(self, feature_dim: int, hidden: int = 128, offset: bool = True) -> None:
        super().__init__()
        self.offset = offset
        self.net = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 4))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(..., S + 5) -> position (..., 2) metres, heading unit vector (..., 2)."""
        out = self.net(features)
        pos = features[..., -5:-3] + out[..., :2] if self.offset else features[..., -5:-3]
        heading = out[..., 2:] + torch.tensor([1e-3, 0.0], device=out.device, dtype=out.dtype)  # never exactly 0
        return pos, F.normalize(heading, dim=-1)


# ---------------------------------------------------------------------------- the robot


def robot_from_camera(cam_pose: Tensor, proprio: Tensor | None) -> Tensor:
    """Planar robot state (..., 6) = axle x, y, cos yaw, sin yaw, v, omega from the camera pose
    (..., 4, 4) (an observation: world-from-optical-camera) and proprio (..., P) (v, omega first; None
    = unknown, 0)."""
    forward = cam_pose[..., :2, 2]  # optical axis on the floor plane: the robot's heading
    heading = forward / forward.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    axle = cam_pose[..., :2, 3] - CAMERA_AHEAD_M * heading
    vel = (proprio[..., :2].to(cam_pose.dtype) if proprio is not None
           else torch.zeros(*cam_pose.shape[:-2], 2, device=cam_pose.device, dtype=cam_pose.dtype))
    return torch.cat([axle, heading, vel], -1)


def to_robot_frame(points: Tensor, robot: Tensor) -> Tensor:
    """World points (..., 2) -> (forward, left) in the frame of robot states (..., 6) that broadcast."""
    rel = points - robot[..., :2]
    c, s = robot[..., 2], robot[..., 3]
    return torch.stack([rel[..., 0] * c + rel[..., 1] * s, -rel[..., 0] * s + rel[..., 1] * c], -1)


def to_world(local: Tensor, robot: Tensor) -> Tensor:
    """The inverse of `to_robot_frame`."""
    c, s = robot[..., 2], robot[..., 3]
    return robot[..., :2] + torch.stack([local[..., 0] * c - local[..., 1] * s, local[..., 0] * s + local[..., 1] * c],
                                        -1)


def integrate_robot(start: Tensor, actions: Tensor, dt_env: float, frameskip: int) -> Tensor:
    """The robot's states after each group of `frameskip` commanded actions, by unicycle kinematics
    (the base tracks its (v, omega) command closely). start (..., 6), actions (..., L, 2) with L a
    multiple of frameskip -> (..., L / frameskip, 6); v, omega are the last command of each group."""
    x, y = start[..., 0], start[..., 1]
    yaw = torch.atan2(start[..., 3], start[..., 2])
    out = []
    for i in range(actions.shape[-2]):
        v, om = actions[..., i, 0], actions[..., i, 1]
        # exact arc for a constant (v, omega) over dt (the straight line as omega -> 0)
        turn = om * dt_env
        small = turn.abs() < 1e-4
        safe = torch.where(small, torch.ones_like(om), om)
        mid = yaw + turn / 2
        dx = torch.where(small, v * dt_env * torch.cos(mid), v / safe * (torch.sin(yaw + turn) - torch.sin(yaw)))
        dy = torch.where(small, v * dt_env * torch.sin(mid), -v / safe * (torch.cos(yaw + turn) - torch.cos(yaw)))
        x, y, yaw = x + dx, y + dy, yaw + turn
        if (i + 1) % frameskip == 0:
            out.append(torch.stack([x, y, yaw.cos(), yaw.sin(), v, om], -1))
    return torch.stack(out, -2)


# ---------------------------------------------------------------------------- transitions


class InteractionDynamics(nn.Module):
    """Accelerations of every slot from gated pairwise interactions, and the symplectic step.

    For slot k with context h_k (the predictor's output at the frame being predicted):
        a_k = bound( sum_j g_kj f_kj + g_kr f_kr )
    g_kj = sigmoid(.) is the gate "slot j acts on slot k" (from h_k, h_j and their relative position
    and velocity), g_kr the gate "the robot acts on slot k" (from h_k and the slot's position in the
    robot's frame, and the robot's command). Effects are given in the frame of the interaction (along
    and across the line from j to k; the robot's forward and left) and rotated to the world, so the
    same push gives the same result wherever it happens. With `gates` off, every gate is 1.
    `contact_range` (robot contact margin, pair reach in metres; None = no cut-off) multiplies each
    gate by sigmoid((reach - distance) / REACH_SOFTNESS_M), the robot's distance measured from the
    slot's centre to its footprint `ROBOT_FOOTPRINT_M`: out of reach, nothing acts. With `pairs` off
    every g_kj is 0: only the robot acts (one pushable object; a switch that keeps the weights).
    """

    def __init__(self, dim: int, hidden: int, dt: float, *, gates: bool = True, quasi_static: bool = True,
                 accel_max: tuple[float, float] = (2.0, 40.0),
                 contact_range: tuple[float, float] | None = (ROBOT_CONTACT_M, PAIR_REACH_M), pairs: bool = True) -> None:
        super().__init__()
        self.dt, self.gates, self.quasi_static, self.pairs = dt, gates, quasi_static, pairs
        self.contact_range = contact_range
        self.accel_max = accel_max
        self.pair_k = nn.Linear(dim, hidden)
        self.pair_j = nn.Linear(dim, hidden, bias=False)
        self.pair_geo = nn.Linear(6, hidden, bias=False)
        self.pair_out = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 4))
        self.robot_slot = nn.Linear(dim, hidden)
        self.robot_geo = nn.Linear(6, hidden, bias=False)
        self.robot_out = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 4))
        for head in (self.pair_out, self.robot_out):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
            with torch.no_grad():
                head[-1].bias[0] = -3.0  # gates start nearly closed: at first nothing touches anything

    def _pair_effects(self, phys: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Slot-on-slot part: accelerations (B, K, 3) summed over the acting slots, gates (B, K, K)."""
        b, k, _ = phys.shape
        pos, vel = phys[..., :2], phys[..., 3:5]
        d = pos.unsqueeze(1) - pos.unsqueeze(2)  # (B, K, K, 2) [k, j] = p_j - p_k
        dist = d.norm(dim=-1, keepdim=True)
        u = d / dist.clamp(min=1e-3)  # unit vector k -> j
        u_perp = torch.stack([-u[..., 1], u[..., 0]], -1)
        dv = vel.unsqueeze(1) - vel.unsqueeze(2)
        geo = torch.cat([dist / 0.2, (dv * u).sum(-1, keepdim=True) / SPEED_SCALE,
                         (dv * u_perp).sum(-1, keepdim=True) / SPEED_SCALE, torch.exp(-dist / 0.1),
                         phys[..., 2].cos().unsqueeze(1).expand(b, k, k).unsqueeze(-1),
                         phys[..., 2].sin().unsqueeze(1).expand(b, k, k).unsqueeze(-1)], -1)
        z = self.pair_k(h).unsqueeze(2) + self.pair_j(h).unsqueeze(1) + self.pair_geo(geo)
        out = self.pair_out(z)  # (B, K, K, 4): gate logit, along, across, angular
        eye = torch.eye(k, dtype=torch.bool, device=h.device)
        gate = torch.sigmoid(out[..., 0]) if self.gates else torch.ones_like(out[..., 0])
        if self.contact_range is not None:
            gate = gate * torch.sigmoid((self.contact_range[1] - dist[..., 0]) / REACH_SOFTNESS_M)
        gate = gate.masked_fill(eye, 0.0)
        # an effect "along" pushes k away from j (negative u), like a contact force
        pair_acc = torch.cat([-out[..., 1:2] * u + out[..., 2:3] * u_perp, out[..., 3:4]], -1)
        return (gate.unsqueeze(-1) * pair_acc).sum(2), gate

    def interactions(self, phys: Tensor, h: Tensor, robot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """phys (B, K, 6), h (B, K, D), robot (B, 6) where the robot is and its command
        -> raw accelerations (B, K, 3), pair gates (B, K, K) (diagonal 0), robot gates (B, K)."""
        b, k, _ = phys.shape
        pos, vel = phys[..., :2], phys[..., 3:5]
        if self.pairs:
            acc, gate = self._pair_effects(phys, h)
        else:  # only the robot acts on slots (the pair weights are kept: a switch at rollout time)
            acc, gate = phys.new_zeros(b, k, 3), phys.new_zeros(b, k, k)

        # the robot on each slot, in the robot's frame (x forward, y left)
        c, s = robot[:, 2:3], robot[:, 3:4]
        rel = pos - robot[:, None, :2]
        fwd, left = to_robot_frame(pos, robot[:, None]).unbind(-1)
        rgeo = torch.stack([fwd / 0.3, left / 0.3, torch.exp(-rel.norm(dim=-1) / 0.1),
                            robot[:, None, 4].expand(b, k) / SPEED_SCALE, robot[:, None, 5].expand(b, k) / 2.0,
                            vel.norm(dim=-1) / SPEED_SCALE], -1)
        rout = self.robot_out(self.robot_slot(h) + self.robot_geo(rgeo))
        rgate = torch.sigmoid(rout[..., 0]) if self.gates else torch.ones_like(rout[..., 0])
        if self.contact_range is not None:
            x_min, x_max, half = ROBOT_FOOTPRINT_M
            out_x = torch.clamp(torch.maximum(x_min - fwd, fwd - x_max), min=0.0)
            out_y = torch.clamp(left.abs() - half, min=0.0)
            gap = torch.sqrt(out_x ** 2 + out_y ** 2 + 1e-12)  # to the footprint, 0 inside it
            rgate = rgate * torch.sigmoid((self.contact_range[0] - gap) / REACH_SOFTNESS_M)
        r_lin = rout[..., 1:2] * torch.stack([c, s], -1) + rout[..., 2:3] * torch.stack([-s, c], -1)
        acc = acc + rgate.unsqueeze(-1) * torch.cat([r_lin, rout[..., 3:4]], -1)
        return acc, gate, rgate

    def bound(self, acc: Tensor) -> Tensor:
        """Scaled tanh: about the identity for small accelerations, never beyond accel_max."""
        lin, ang = self.accel_max
        if lin <= 0:
            return acc
        scale = torch.tensor([lin, lin, ang], device=acc.device, dtype=acc.dtype)
        return scale * torch.tanh(acc / scale)

    def forward(self, phys: Tensor, h: Tensor, robot: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One step: phys (B, K, 6) at t, h (B, K, D) context of t+1, robot (B, 6) at t with the
        command of the step -> phys at t+1 (B, K, 6), and what the priors penalise."""
        raw, gate, rgate = self.interactions(phys, h, robot)
        acc = self.bound(raw)
        if self.quasi_static and self.gates:
            untouched = torch.prod(1.0 - gate, dim=2) * (1.0 - rgate)
            keep = 1.0 - untouched
        else:
            keep = torch.ones_like(rgate)
        pos, vel = symplectic_euler(phys[..., :3], phys[..., 3:6], acc, self.dt, keep)  # (x, y, phi), rates
        pos = torch.cat([pos[..., :2], wrap_angle(pos[..., 2:3])], -1)
        return torch.cat([pos, vel], -1), {"acc": acc, "gate": gate, "robot_gate": rgate}


class FreeDynamics(nn.Module):
    """The ablation without the physics prior: the next physical state is predicted freely (as a
    residual of the current one) from the predictor's context."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 7, hidden), nn.GELU(), nn.Linear(hidden, PHYS_DIM))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, phys: Tensor, h: Tensor, robot: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        delta = self.net(torch.cat([h, physical_features(phys)], -1))
        scale = torch.tensor([0.1, 0.1, 1.0, SPEED_SCALE, SPEED_SCALE, TURN_SCALE], device=h.device, dtype=h.dtype)
        return phys + delta * scale, {}


# ---------------------------------------------------------------------------- prior penalties


def gate_sparsity(gate: Tensor, robot_gate: Tensor) -> Tensor:
    """L1 on the gates (they are >= 0): mean over slot pairs and over slots' robot gates."""
    k = gate.shape[-1]
    pair = gate.sum((-1, -2)) / max(k * (k - 1), 1)
    return (pair + robot_gate.mean(-1)).mean()


def acceleration_smoothness(acc: Tensor) -> Tensor:
    """acc (B, T, K, 3) over consecutive steps -> mean squared change, in units of the bound-free
    scale (1 m/s^2, HEADING_SYMMETRY rad/s^2)."""
    if acc.shape[1] < 2:
        return acc.sum() * 0.0
    scale = torch.tensor([1.0, 1.0, float(HEADING_SYMMETRY)], device=acc.device, dtype=acc.dtype)
    return (((acc[:, 1:] - acc[:, :-1]) / scale) ** 2).mean()
