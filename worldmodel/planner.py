"""Planning in the predictor's slot space, separate from the model it plans with (as DINO-WM).

`CEMPlanner` and `MPPIPlanner` search action sequences (H, A) for the lowest cost of
`cost_fn(rollout_fn(actions (N, H, A)))`, N candidates at once. They know nothing about world
models: any batched rollout and cost will do. `LatentPlanner` is the `Controller` that drives the
robot with them: it encodes each observation with the encoder, rolls candidates out with the
`CausalJEPAPredictor` (one action per predictor frame, held for `frameskip` env steps), executes the
first `execute` frames of the best plan and replans (receding horizon), warm-starting from the rest.

Goals: a goal observation (encoded; cost on the slots, matched to the current ones by Hungarian
assignment because two encodings order their slots differently) or a goal state (target positions
of chosen objects; cost on the slots' probed positions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sim.env import ACTION_HIGH, ACTION_LOW, PUSHER_OFFSET
from worldmodel.physics import robot_from_camera
from worldmodel.predictor import POSITION_HUBER_M, CausalJEPAPredictor, Rollout

METHODS = ("cem", "mppi")
COS_30 = 0.8660254


@dataclass
class PlannerConfig:
    """Sampling-based planning. C-JEPA's PushT planner uses CEM with 300 samples, 30 iterations, top
    30, horizon 9, receding 3; the defaults here fit a replan in about 0.4 s on one CPU core: a horizon
    of one predictor chunk (`future` frames, whose history is computed once for all candidates),
    replanning after every frame, warm-started from the rest of the last plan."""

    method: str = "cem"  # cem | mppi
    samples: int = 64  # candidates per iteration
    iterations: int = 4
    elites: int = 8  # CEM: candidates the distribution is refitted to
    horizon: int = 3  # predictor frames planned
    execute: int = 1  # predictor frames executed before replanning
    init_std: float = 0.6  # initial standard deviation, as a fraction of half the action range
    min_std: float = 0.05  # (same units) floor, so that the search never stops exploring
    momentum: float = 0.1  # CEM: share of the old mean / std kept at each refit
    temperature: float = 0.5  # MPPI: weights exp(-(cost - min) / (temperature * std of the costs))
    seed: int = 0
    action_low: list[float] = field(default_factory=lambda: ACTION_LOW.tolist())
    action_high: list[float] = field(default_factory=lambda: ACTION_HIGH.tolist())

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        for name in ("samples", "iterations", "elites", "horizon", "execute"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.elites > self.samples:
            raise ValueError(f"elites ({self.elites}) must be <= samples ({self.samples})")
        if self.execute > self.horizon:
            raise ValueError(f"execute ({self.execute}) must be <= horizon ({self.horizon})")
        if len(self.action_low) != len(self.action_high) or any(
                lo >= hi for lo, hi in zip(self.action_low, self.action_high)):
            raise ValueError(f"action bounds must be equally long with low < high; got {self.action_low}, "
                             f"{self.action_high}")
        if self.temperature <= 0 or self.init_std <= 0 or self.min_std < 0:
            raise ValueError("temperature and init_std must be > 0, min_std >= 0")


@dataclass
class PlanResult:
    actions: Tensor  # (H, A) the best sequence found
    cost: float  # its cost
    best_costs: list[float]  # lowest cost seen after each iteration (non-increasing)
    mean: Tensor  # (H, A) the sampling distribution's final mean (for warm starts)


RolloutFn = Callable[[Tensor], Any]
CostFn = Callable[[Any], Tensor]


class SamplingPlanner:
    """Shared loop of CEM and MPPI: sample around a mean, score, refit. The current mean is always
    one of the candidates, so the best cost never rises and a warm start is never lost."""

    def __init__(self, cfg: PlannerConfig | None = None) -> None:
        self.cfg = cfg = cfg or PlannerConfig()
        self.low = torch.tensor(cfg.action_low, dtype=torch.float32)
        self.high = torch.tensor(cfg.action_high, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def reset(self) -> None:
        """Back to the seed: the same problem is then planned identically."""
        self.generator.manual_seed(self.cfg.seed)

    def plan(self, rollout_fn: RolloutFn, cost_fn: CostFn, warm_start: Tensor | None = None) -> PlanResult:
        cfg = self.cfg
        h, a = cfg.horizon, len(cfg.action_low)
        half = (self.high - self.low) / 2
        mean = (self.high + self.low).expand(h, a) / 2 if warm_start is None else warm_start.float().clone()
        if tuple(mean.shape) != (h, a) or not torch.isfinite(mean).all():
            raise ValueError(f"warm_start must be a finite (horizon, action_dim) = {(h, a)} tensor; got "
                             f"{tuple(mean.shape)}")
        mean = mean.clamp(self.low, self.high)
        std = (cfg.init_std * half).expand(h, a).clone()
        best, best_cost, history = mean.clone(), float("inf"), []
        for _ in range(cfg.iterations):
            noise = torch.randn(cfg.samples, h, a, generator=self.generator)
            cand = (mean + std * noise).clamp(self.low, self.high)
            cand[0] = mean
            cost = self.score(rollout_fn, cost_fn, cand)
            i = int(torch.argmin(cost))
            if float(cost[i]) < best_cost:
                best, best_cost = cand[i].clone(), float(cost[i])
            history.append(best_cost)
            mean, std = self.refit(cand, cost, mean, std)
            std = std.clamp(min=cfg.min_std * half)
        return PlanResult(actions=best, cost=best_cost, best_costs=history, mean=mean)

    def score(self, rollout_fn: RolloutFn, cost_fn: CostFn, cand: Tensor) -> Tensor:
        cost = cost_fn(rollout_fn(cand))
        if not isinstance(cost, Tensor) or cost.shape != (cand.shape[0],):
            raise ValueError(f"cost_fn must return one cost per candidate, shape ({cand.shape[0]},); got "
                             f"{getattr(cost, 'shape', type(cost))}")
        cost = cost.detach().float().cpu()
        return torch.where(torch.isnan(cost), torch.full_like(cost, float("inf")), cost)

    def refit(self, cand: Tensor, cost: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class CEMPlanner(SamplingPlanner):
    """Cross-entropy method: refit a diagonal Gaussian to the `elites` cheapest candidates."""

    def refit(self, cand: Tensor, cost: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        elite = cand[torch.topk(cost, self.cfg.elites, largest=False).indices]
        m = self.cfg.momentum
        return m * mean + (1 - m) * elite.mean(0), m * std + (1 - m) * elite.std(0, unbiased=False)


class MPPIPlanner(SamplingPlanner):
    """Model-predictive path integral: the new mean is the candidates' average weighted by
    exp(-cost / lambda); lambda = temperature x the spread of this iteration's costs, so that the
    temperature does not depend on the cost's units. The sampling spread stays fixed."""

    def refit(self, cand: Tensor, cost: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        finite = torch.isfinite(cost)
        if not finite.any():
            return mean, std
        c = torch.where(finite, cost, cost[finite].max())
        lam = self.cfg.temperature * c.std().clamp(min=1e-9)
        w = torch.softmax(-(c - c.min()) / lam, 0)
        return (w[:, None, None] * cand).sum(0), std


def make_planner(cfg: PlannerConfig) -> SamplingPlanner:
    return CEMPlanner(cfg) if cfg.method == "cem" else MPPIPlanner(cfg)


# ---------------------------------------------------------------------------- costs


def _horizon_weights(h: int, running: float, device: torch.device) -> Tensor:
    """Weight of each predicted frame: `running` on every frame, 1 more on the last."""
    w = torch.full((h,), running, device=device)
    w[-1] += 1.0
    return w


class SlotGoalCost:
    """Distance of predicted slots to a goal's slots: the normalised appearance part and the planar
    position (in POSITION_HUBER_M), per slot, averaged over slots and weighted over the horizon.
    goal_states (K, Z) in the predictor's state space; `order` (K,) the goal slot matched to each
    predicted slot (identity by default)."""

    def __init__(self, goal_states: Tensor, model: CausalJEPAPredictor, order: Tensor | None = None,
                 appearance_weight: float = 1.0, position_weight: float = 1.0, running_weight: float = 0.1) -> None:
        cfg = model.cfg
        want = (cfg.num_slots, cfg.state_dim)
        if not isinstance(goal_states, Tensor) or tuple(goal_states.shape) != want:
            raise ValueError(f"goal slots must be (K, S + 6) = {want} predictor states (see "
                             f"CausalJEPAPredictor.encode_states); got {tuple(getattr(goal_states, 'shape', ()))}")
        if not torch.isfinite(goal_states).all():
            raise ValueError("goal slots contain NaN or inf")
        if order is not None:
            goal_states = goal_states[order]
        self.goal, self.s = goal_states, cfg.slot_dim
        self.std = model.slot_std.to(goal_states.device)
        self.w_app, self.w_pos, self.running = appearance_weight, position_weight, running_weight

    def __call__(self, rollout: Rollout | Tensor) -> Tensor:
        """rollout states (..., H, K, Z) -> cost (...)."""
        states = rollout.states if isinstance(rollout, Rollout) else rollout
        s = self.s
        app = (((states[..., :s] - self.goal[:, :s]) / self.std) ** 2).mean(-1)
        pos = (states[..., s:s + 2] - self.goal[:, s:s + 2]).norm(dim=-1) / POSITION_HUBER_M
        per_frame = (self.w_app * app + self.w_pos * pos).mean(-1)  # (..., H)
        return (per_frame * _horizon_weights(per_frame.shape[-1], self.running, per_frame.device)).sum(-1)


def around_disc(p: Tensor, q: Tensor, centre: Tensor, radius: float) -> Tensor:
    """Length (...) of the shortest planar path from p to q (..., 2) that stays out of the disc of
    `radius` around `centre` (..., 2); q is taken on the disc's rim or outside it. A point inside the
    disc first leaves it radially (that leg is counted)."""
    rel = p - centre
    d = rel.norm(dim=-1).clamp(min=1e-6)
    out = (radius - d).clamp(min=0)  # radial way out of the disc
    p = centre + rel / d.unsqueeze(-1) * d.clamp(min=radius).unsqueeze(-1)
    dp = d.clamp(min=radius)
    qr = q - centre
    dq = qr.norm(dim=-1).clamp(min=radius)
    cos = ((p - centre) * qr).sum(-1) / (dp * qr.norm(dim=-1).clamp(min=1e-6))
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    alpha_p, alpha_q = torch.acos(radius / dp), torch.acos(radius / dq)
    wrapped = (dp ** 2 - radius ** 2).sqrt() + (dq ** 2 - radius ** 2).sqrt() + radius * (theta - alpha_p - alpha_q)
    straight = (p - q).norm(dim=-1)
    return out + torch.where(theta > alpha_p + alpha_q, wrapped, straight)


class PositionGoalCost:
    """Distance (m) of chosen slots' probed positions to target positions, weighted over the horizon,
    plus `approach_weight` x the robot's distance to where it must be to push (a short horizon sees a
    box move only once the robot touches it, so the plan needs a pull towards contact first):

        approach = "behind": the axle's distance to where it stands to push: `standoff` m behind the
            box's centre on the line from its goal, plus the pusher's reach (the pusher then touches
            the face opposite the goal), measured along the shortest way round the box at `clearance`
            m from its centre (0: straight; in place of the way round, straight in once within the
            clearance and 30 degrees of the line), plus `heading_weight` x (1 - cos) of the robot's
            heading against that line within `heading_range` m of the spot (measured at the axle,
            turning in place costs no distance, so the plan can line up);
        approach = "nearest": the box itself (the pusher's distance to `standoff` m from the nearest box
            not yet at its target; any heading).

    Both terms drop for a box within `done_m` of its target. Once every box is (as far as the robot
    can tell: a box close under the camera is seen worst), the approach term becomes a look term: the
    robot's distance to `look_m` m from each box, facing it (0: none), so that a box believed done is
    seen again from where its estimate is good. targets (G, 2) world frame; slots (G,) the slot of
    each target's object.

    Phases: once `update_phase` is called (the `LatentPlanner` calls it before each replan), the cost
    has two. Approaching (until the axle is within `engage_m` of its spot, heading within
    acos(`engage_cos`) of the line): the approach term alone, plus any forecast *increase* of a box's
    distance to its target; a forecast decrease earns nothing, so a plan cannot profit from a push the
    model imagines from the side. Pushing: the full cost, until the axle is `release_m` from the spot.
    Without `update_phase` the cost is always the full one."""

    APPROACHES = ("behind", "nearest")

    def __init__(self, targets: Tensor, slots: Tensor | list[int], num_slots: int, running_weight: float = 0.1,
                 approach_weight: float = 0.5, approach: str = "behind", standoff: float = 0.07,
                 heading_weight: float = 0.1, done_m: float = 0.03, clearance: float = 0.18,
                 heading_range: float = 0.15, engage_m: float = 0.04, engage_cos: float = 0.9,
                 release_m: float = 0.20, look_m: float = 0.4) -> None:
        targets = torch.as_tensor(targets, dtype=torch.float32)
        slots = torch.as_tensor(slots, dtype=torch.long).flatten()
        if targets.dim() != 2 or targets.shape[1] != 2 or targets.shape[0] < 1:
            raise ValueError(f"goal positions must be (G, 2) metres; got {tuple(targets.shape)}")
        if len(slots) != len(targets):
            raise ValueError(f"one slot per goal position: {len(targets)} positions, {len(slots)} slots")
        if len(slots) and (slots.min() < 0 or slots.max() >= num_slots):
            raise ValueError(f"slot indices must be in [0, {num_slots}); got {slots.tolist()}")
        if not torch.isfinite(targets).all():
            raise ValueError("goal positions contain NaN or inf")
        if approach not in self.APPROACHES:
            raise ValueError(f"approach must be one of {self.APPROACHES}; got {approach!r}")
        if min(standoff, clearance, heading_range, engage_m, release_m) < 0 or release_m < engage_m:
            raise ValueError("standoff, clearance, heading_range, engage_m must be >= 0 and release_m >= engage_m")
        self.targets, self.slots = targets, slots
        self.running, self.approach_weight, self.approach = running_weight, approach_weight, approach
        self.standoff, self.heading_weight, self.done_m = standoff, heading_weight, done_m
        self.clearance, self.heading_range = clearance, heading_range
        self.engage_m, self.engage_cos, self.release_m, self.look_m = engage_m, engage_cos, release_m, look_m
        self.pushing = True  # the full cost until update_phase says otherwise
        self.start_err: Tensor | None = None  # (G,) each box's distance to its target at the last update_phase

    def approach_gap(self, pos: Tensor, robot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Box positions (..., G, 2) and robot states (..., 6) -> the robot's way to where it pushes each
        box (..., G) (inf for a box at its target), the cosine of the robot's heading against each
        box's push line (..., G), and each box's distance to its target (..., G)."""
        to_goal = self.targets.to(pos.device) - pos
        err = to_goal.norm(dim=-1)
        if self.approach == "nearest":
            pusher = (robot[..., :2] + PUSHER_OFFSET * robot[..., 2:4]).unsqueeze(-2)  # (..., 1, 2)
            gap = ((pos - pusher).norm(dim=-1) - self.standoff).clamp(min=0)  # 0 with the pusher at a face
            cos = torch.ones_like(err)
        else:
            line = to_goal / err.unsqueeze(-1).clamp(min=1e-6)
            axle = robot[..., :2].unsqueeze(-2)  # (..., 1, 2): turning in place does not change the gap
            reach = self.standoff + PUSHER_OFFSET
            gap = (pos - reach * line - axle).norm(dim=-1)
            if self.clearance > 0:  # round the box at `clearance` to the rim point behind it, then straight in,
                # unless already within the clearance and within 30 degrees of the line behind the box
                rel = axle - pos
                d = rel.norm(dim=-1)
                behind = -(rel * line).sum(-1) > COS_30 * d
                rim = max(self.clearance, reach)
                around = around_disc(axle, pos - rim * line, pos, self.clearance) + abs(rim - reach)
                gap = torch.where((d < self.clearance) & behind, gap, around)
            cos = (robot[..., 2:4].unsqueeze(-2) * line).sum(-1)
        gap = torch.where(err > self.done_m, gap, torch.full_like(gap, float("inf")))
        return gap, cos, err

    def update_phase(self, positions: Tensor, robot: Tensor) -> bool:
        """Set the phase from the boxes' current positions (G, 2) and the robot's state (6,); True when pushing."""
        gap, cos, err = self.approach_gap(torch.as_tensor(positions, dtype=torch.float32),
                                          torch.as_tensor(robot, dtype=torch.float32))
        i = int(torch.argmin(gap))
        if self.pushing and self.start_err is not None:
            self.pushing = bool(gap[i] < self.release_m)
        else:
            self.pushing = bool(gap[i] < self.engage_m and cos[i] > self.engage_cos)
        self.start_err = err
        return self.pushing

    def __call__(self, rollout: Rollout) -> Tensor:
        pos = rollout.positions[..., self.slots, :]  # (..., H, G, 2)
        gap, cos, err = self.approach_gap(pos, rollout.robot)
        w = _horizon_weights(err.shape[-2], self.running, err.device)
        approaching = not self.pushing and self.start_err is not None
        if approaching:
            progress = (err - self.start_err.to(err.device)).clamp(min=0)
        else:
            progress = err
        cost = (progress.sum(-1) * w).sum(-1)
        if self.approach_weight <= 0:
            return cost
        if self.approach == "behind" and self.heading_weight > 0:
            near = (1.0 - gap / max(self.heading_range, 1e-6)).clamp(min=0)
            gap = gap + self.heading_weight * near * (1.0 - cos)
        gap = gap.min(-1).values  # the nearest open box
        if self.look_m > 0:  # every box at its target: stand back and look (a close box's estimate is poor)
            ahead = pos - rollout.robot[..., :2].unsqueeze(-2)
            dist = ahead.norm(dim=-1)
            facing = (rollout.robot[..., 2:4].unsqueeze(-2) * ahead).sum(-1) / dist.clamp(min=1e-6)
            look = ((dist - self.look_m).abs() + self.heading_weight * (1.0 - facing)).mean(-1)
        else:
            look = torch.zeros_like(gap)
        gap = torch.where(torch.isinf(gap), look, gap)
        return cost + (1.0 if approaching else self.approach_weight) * gap.mean(-1)


def match_slots(current: Tensor, goal: Tensor, slot_std: Tensor, slot_dim: int) -> Tensor:
    """The goal slot for each current slot (K,), by Hungarian assignment on normalised appearance
    distance (positions change on the way to a goal; what an object looks like does not)."""
    a = current[:, :slot_dim] / slot_std
    b = goal[:, :slot_dim] / slot_std
    cost = torch.cdist(a[None], b[None])[0].cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(rows), np.int64)
    order[rows] = cols
    return torch.from_numpy(order)


def chromaticity(colour: Tensor) -> Tensor:
    """RGB (..., 3) -> its share of each channel (..., 3): the same under brighter or darker light."""
    return colour / colour.sum(-1, keepdim=True).clamp(min=1e-3)


class SlotTracker:
    """Keeps chosen objects in fixed slots of the planner's history, however the encoder hands them
    from slot to slot, and remembers them while out of view.

    Each frame, for each tracked object, the slots that see something (`min_pixels` valid-depth
    pixels) are candidates; the one with the lowest planar distance to the track's last seen position
    over `pos_scale_m` plus chromaticity distance to the object's (taken when tracking starts, so
    that it cannot drift to a neighbour's) over `colour_scale`, if below `gate`, is the object, and its
    features are swapped into the track's slot. Unseen, the track's slot holds the object's last seen
    features, where it was last seen: on EgoPush every push that succeeded kept the box in view, and
    moving an unseen box as the plan forecast it let the planner's belief run ahead to the goal on
    pushes that never happened. Features are (K, S + 5): slot vector, then centre x, y, z and view
    direction."""

    def __init__(self, pos_scale_m: float = 0.15, colour_scale: float = 0.05, gate: float = 3.0,
                 min_pixels: int = 4) -> None:
        self.pos_scale_m, self.colour_scale, self.gate, self.min_pixels = pos_scale_m, colour_scale, gate, min_pixels
        self.slots: list[int] = []
        self.memory: Tensor | None = None  # (G, F) last seen features of each track
        self.chroma: Tensor | None = None  # (G, 3)
        self.seen: list[bool] = []

    def start(self, features: Tensor, colour: Tensor, slots: list[int]) -> None:
        """Track the objects now in `slots` (G,), from this frame's features (K, F) and colours (K, 3)."""
        self.slots = [int(k) for k in slots]
        self.memory = features[self.slots].clone()
        self.chroma = chromaticity(colour[self.slots])
        self.seen = [True] * len(self.slots)

    def retarget(self, features: Tensor, colour: Tensor, slots: list[int | None]) -> None:
        """Point each track (G,) at this frame's slot `slots[g]` (None: leave it), keeping its home slot:
        the next call then matches exactly that slot (its position and colour) and moves it home."""
        for g, k in enumerate(slots):
            if k is None:
                continue
            self.memory[g] = features[k]
            self.chroma[g] = chromaticity(colour[k])

    def __call__(self, features: Tensor, colour: Tensor, pixels: Tensor) -> Tensor:
        """One frame's features (K, F), colours (K, 3), pixels (K,) -> features with each track in its slot."""
        if self.memory is None:
            return features.clone()
        centre, chroma = features[:, -5:-3], chromaticity(colour)
        order = torch.arange(len(features))  # the output is features[order]
        taken: set[int] = set()  # slots of this frame already matched to a track
        remembered: dict[int, Tensor] = {}  # home slot -> memory of an unseen track
        for g, home in enumerate(self.slots):
            score = ((centre - self.memory[g, -5:-3]).norm(dim=-1) / self.pos_scale_m
                     + (chroma - self.chroma[g]).norm(dim=-1) / self.colour_scale)
            score = torch.where(pixels >= self.min_pixels, score, torch.full_like(score, float("inf")))
            for k in taken:
                score[k] = float("inf")
            k = int(torch.argmin(score))
            self.seen[g] = bool(score[k] < self.gate)
            if self.seen[g]:
                taken.add(k)
                self.memory[g] = features[k]
                at = int((order == k).nonzero())  # where slot k's features are now
                order[[home, at]] = order[[at, home]]
            else:
                remembered[home] = self.memory[g].clone()
        out = features[order]
        for home, feats in remembered.items():
            out[home] = feats
        return out


# ---------------------------------------------------------------------------- the controller


class LatentPlanner:
    """A `Controller` that plans in slot space: reset(obs, info), act(obs, info) -> (2,) action.

    goal = "state": at reset the goal positions (info["goal"]) and the boxes to push are read from
        `info` as the task's specification (as a benchmark hands it over); the box's slot is the one
        whose probed position is nearest to the box, and from then on the slot is followed by its
        identity. Or call `set_goal_state(targets, slots)` yourself. With `track` (the default) a
        `SlotTracker` keeps each box in its slot when the encoder hands it to another, and remembers it
        where it was last seen while it is out of view. With `phases` (the default) the
        `PositionGoalCost` is told before each replan whether the robot is still approaching or pushing.
        For the first `settle_steps` frames after reset each box's track is re-pointed at the slot
        nearest to the box's given start position when that slot's centre is within `settle_m` of it:
        a stream's first frames segment worst (slots start from noise), and a track started on a floor
        slot beside the box follows the floor all episode. A box that no slot came near by then (out of
        view at reset, as on the hard level) is searched for in the same way on every later frame,
        and settled for `settle_steps` frames from the first on which a slot is within `settle_m`.
    goal = "observation": call `set_goal_observation(obs)` (an observation of the goal scene)."""

    def __init__(self, encoder: torch.nn.Module, predictor: CausalJEPAPredictor, cfg: PlannerConfig | None = None,
                 goal: str = "state", device: str | torch.device = "cpu", track: bool = True,
                 phases: bool = True, settle_steps: int = 8, settle_m: float = 0.10) -> None:
        if goal not in ("state", "observation"):
            raise ValueError(f"goal must be 'state' or 'observation'; got {goal!r}")
        self.encoder, self.predictor = encoder.eval(), predictor.eval()
        self.cfg = cfg or PlannerConfig()
        self.planner = make_planner(self.cfg)
        self.goal_mode, self.device = goal, torch.device(device)
        self.track, self.phases = track, phases
        if settle_steps < 0 or settle_m < 0:
            raise ValueError(f"settle_steps and settle_m must be >= 0; got {settle_steps}, {settle_m}")
        self.settle_steps, self.settle_m = settle_steps, settle_m
        self.cost: Callable[[Rollout], Tensor] | None = None
        self._goal_states: Tensor | None = None
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self.stream = None
        self.features: list[Tensor] = []  # per env step (K, F)
        self.cam_pose: list[Tensor] = []
        self.proprio: list[Tensor] = []
        self.executed: list[Tensor] = []  # (2,) per env step
        self.queue: list[np.ndarray] = []
        self.warm: Tensor | None = None
        self.last_plan: PlanResult | None = None
        self.replan_seconds: list[float] = []  # wall time of each replan of this episode
        self.tracker = SlotTracker() if self.track else None
        self._raw: tuple[Tensor, Tensor] | None = None  # the last frame's raw features and colours
        self._start_positions: np.ndarray | None = None  # (G, 2) the boxes' given start positions
        self._found_at: list[int | None] = []  # per box, the first frame a slot was within settle_m of its start

    # -- goals ---------------------------------------------------------------------

    def set_goal_state(self, targets: Tensor | np.ndarray, slots: list[int] | Tensor) -> None:
        self.cost = PositionGoalCost(torch.as_tensor(np.asarray(targets), dtype=torch.float32), slots,
                                     self.predictor.cfg.num_slots)
        self._goal_states = None
        if self.tracker is not None and self._raw is not None:
            self.tracker.start(*self._raw, [int(k) for k in torch.as_tensor(slots).flatten()])

    @torch.no_grad()
    def set_goal_observation(self, obs: dict[str, np.ndarray]) -> None:
        with self._seeded():
            out, _ = self.encoder.step(*self._frame(obs))
        self._goal_states = self.predictor.encode_states(out.features)[0, 0]  # (K, Z)
        self.cost = None

    def slots_near(self, positions: np.ndarray) -> list[int]:
        """The slot whose probed position is nearest to each of positions (G, 2), all different, in the
        last frame (as tracked)."""
        if not self.features:
            raise RuntimeError("no observation encoded yet: call reset(obs, info) first")
        return self._match_near(positions, self.features[-1])[0]

    def _match_near(self, positions: np.ndarray, features: Tensor) -> tuple[list[int], np.ndarray]:
        """`slots_near` and each matched slot's probed distance (G,) to its position."""
        with torch.no_grad():
            pos, _ = self.predictor.probe(features)
        d = torch.cdist(torch.as_tensor(np.asarray(positions, np.float32))[:, :2], pos.cpu()).numpy()
        rows, cols = linear_sum_assignment(d)
        slots = [int(c) for _, c in sorted(zip(rows, cols))]
        return slots, d[np.arange(len(slots)), slots]

    # -- the Controller interface ----------------------------------------------------

    def reset(self, obs: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> None:
        self._reset_buffers()
        self.planner.reset()
        with self._seeded():
            self._observe(obs)
        if self.goal_mode == "state" and info is not None and "goal" in info:
            goal = np.asarray(info["goal"], np.float32).reshape(-1, 2)
            pushable = [0] if len(goal) == 1 and not info.get("formation") else [1, 2, 3]
            boxes = np.asarray(info["object_poses"], np.float32)[pushable, :2]
            self.set_goal_state(goal, self.slots_near(boxes))
            self._start_positions = boxes
            self._found_at = [None] * len(boxes)

    def act(self, obs: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> np.ndarray:
        if len(self.features) == len(self.executed):  # reset() already encoded the first observation
            self._observe(obs)
        if not self.queue:
            self._replan()
        action = self.queue.pop(0)
        self.executed.append(torch.as_tensor(action))
        return action

    def planned_actions(self) -> np.ndarray | None:
        """(L, 2) the env-step actions this controller takes from now on if nothing changes: the rest
        of the chunk being executed, then the rest of the last plan (each predictor frame held
        `frameskip` steps, as they would be executed); None before the first plan. `ego-view` draws it
        as the base path and forecasts the objects along it."""
        if self.last_plan is None:
            return None
        rest = self.last_plan.actions[self.cfg.execute:].repeat_interleave(self.predictor.cfg.frameskip, 0)
        chunk = [np.asarray(a, np.float32).reshape(1, 2) for a in self.queue]
        return np.concatenate(chunk + [rest.cpu().numpy().astype(np.float32).reshape(-1, 2)])

    # -- planning ------------------------------------------------------------------------

    @torch.no_grad()
    def _observe(self, obs: dict[str, np.ndarray]) -> None:
        out, self.stream = self.encoder.step(*self._frame(obs), self.stream)
        features = out.features[0, 0].float()
        if self.tracker is not None:
            colour, pixels = out.extras["colour"][0, 0].float(), out.extras["pixels"][0, 0]
            self._raw = (features, colour)
            frame = len(self.features)
            if self._start_positions is not None and any(self._settling(g, frame) for g in range(len(self._found_at))):
                self._settle(features, colour, frame)
            features = self.tracker(features, colour, pixels)
        self.features.append(features)
        self.cam_pose.append(torch.as_tensor(obs["cam_pose"], dtype=torch.float32, device=self.device))
        proprio = obs.get("proprio")
        self.proprio.append(torch.zeros(4, device=self.device) if proprio is None
                            else torch.as_tensor(proprio, dtype=torch.float32, device=self.device))

    def _settle(self, features: Tensor, colour: Tensor, frame: int) -> None:
        """Re-point each box's track at this frame's slot nearest to the box's start position, if within
        `settle_m`: on frames 1..settle_steps, and for a box first found later, on its first settle_steps
        frames from then (see the class docstring)."""
        slots, dist = self._match_near(self._start_positions, features)
        targets = []
        for g, (k, d) in enumerate(zip(slots, dist)):
            near = bool(d < self.settle_m)
            settling = self._settling(g, frame)
            if near and self._found_at[g] is None:
                self._found_at[g] = frame
            targets.append(k if near and settling else None)
        if any(t is not None for t in targets):
            self.tracker.retarget(features, colour, targets)

    def _settling(self, g: int, frame: int) -> bool:
        """Whether box g's track may be re-pointed on `frame`: in the first window, while the box has not
        been found, and in the window of its own from a find after the first window."""
        found = self._found_at[g]
        return (frame <= self.settle_steps or found is None
                or (found > self.settle_steps and frame - found < self.settle_steps))

    @contextmanager
    def _seeded(self) -> Iterator[None]:
        """The encoder draws its slots' initialisation at a stream's first frame: from the planner's seed,
        so that an episode is planned the same way every time, leaving torch's global generator as it was."""
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.cfg.seed)
            yield

    def _frame(self, obs: dict[str, np.ndarray]) -> tuple[Tensor, ...]:
        return tuple(torch.as_tensor(np.asarray(obs[k]), device=self.device).unsqueeze(0)
                     for k in ("rgb", "depth", "intrinsics", "cam_pose"))

    def history(self) -> dict[str, Tensor]:
        """The rollout's history: up to `history` frames `frameskip` steps apart, ending now."""
        pc = self.predictor.cfg
        now = len(self.features) - 1
        idx = list(range(now, -1, -pc.frameskip))[:pc.history][::-1]
        out = {"features": torch.stack([self.features[i] for i in idx])[None],
               "cam_pose": torch.stack([self.cam_pose[i] for i in idx])[None],
               "proprio": torch.stack([self.proprio[i] for i in idx])[None]}
        if len(idx) > 1:
            out["past_actions"] = torch.stack([torch.stack(self.executed[i:i + pc.frameskip])
                                               for i in idx[:-1]])[None].to(self.device)
        return out

    def _prepare_cost(self, hist: dict[str, Tensor]) -> None:
        """Make `self.cost` ready for candidates rolled out from `hist`: the goal observation's slots
        matched to the current ones, or the goal-state cost's phase set from where things are now."""
        if self._goal_states is not None:
            current = self.predictor.encode_states(hist["features"][:, -1:])[0, 0]
            order = match_slots(current, self._goal_states, self.predictor.slot_std, self.predictor.cfg.slot_dim)
            self.cost = SlotGoalCost(self._goal_states, self.predictor, order)
        if self.cost is None:
            raise RuntimeError("no goal: reset with a goal in info, or call set_goal_state / set_goal_observation")
        if isinstance(self.cost, PositionGoalCost) and self.phases:
            pos, _ = self.predictor.probe(hist["features"][0, -1])
            robot = robot_from_camera(hist["cam_pose"][0, -1], hist["proprio"][0, -1])
            self.cost.update_phase(pos[self.cost.slots], robot)

    def _rollout(self, hist: dict[str, Tensor], env_actions: Tensor) -> Rollout:
        """Roll candidates (N, T, 2) of env-step actions (T a multiple of frameskip) out from `hist`."""
        r = self.predictor.rollout(hist["features"], env_actions.to(self.device)[None], cam_pose=hist["cam_pose"],
                                   proprio=hist["proprio"], past_actions=hist.get("past_actions"))
        return Rollout(states=r.states[0], robot=r.robot[0], slot_dim=r.slot_dim)

    @torch.no_grad()
    def score(self, env_actions: Tensor | np.ndarray) -> Tensor:
        """The goal cost (N,) of candidate env-step action sequences (N, T, 2) from now, as a replan
        would score them (the phase set first); T is cut to whole predictor frames. For choosing
        among proposals from elsewhere (a policy's sampled chunks)."""
        env_actions = torch.as_tensor(np.asarray(env_actions), dtype=torch.float32)
        fs = self.predictor.cfg.frameskip
        if env_actions.dim() != 3 or env_actions.shape[-1] != 2 or env_actions.shape[1] < fs:
            raise ValueError(f"candidates must be (N, T >= {fs}, 2) env-step actions; got {tuple(env_actions.shape)}")
        if not torch.isfinite(env_actions).all():
            raise ValueError("candidate actions contain NaN or inf")
        hist = self.history()
        self._prepare_cost(hist)
        return self.cost(self._rollout(hist, env_actions[:, :(env_actions.shape[1] // fs) * fs]))

    @torch.no_grad()
    def _replan(self) -> None:
        pc, cfg = self.predictor.cfg, self.cfg
        hist = self.history()

        def rollout_fn(cand: Tensor) -> Rollout:  # (N, H, A) per predictor frame -> held for frameskip steps
            return self._rollout(hist, cand.repeat_interleave(pc.frameskip, 1))

        t0 = time.perf_counter()
        self._prepare_cost(hist)
        result = self.planner.plan(rollout_fn, self.cost, self.warm)
        self.replan_seconds.append(time.perf_counter() - t0)
        self.last_plan = result
        ex = cfg.execute
        self.warm = torch.cat([result.actions[ex:], result.actions[-1:].expand(ex, -1)], 0)
        chunk = result.actions[:ex].repeat_interleave(pc.frameskip, 0)
        self.queue = [a.numpy().astype(np.float32) for a in chunk]


def make_latent_planner(predictor: str | None = None, encoder: str | None = None, goal: str = "state",
                        device: str = "cpu", checkpoint: str | None = None, threads: int = 0,
                        track: bool = True, phases: bool = True, settle_steps: int = 8,
                        settle_m: float = 0.10, pairs: bool | None = None, **planner: Any) -> LatentPlanner:
    """A `LatentPlanner` from checkpoint directories (a Hydra `_target_` for sim's evaluation and viewer);
    the encoder defaults to the one the predictor was trained on. `checkpoint` is another name for
    `predictor` (the key `ego-view` checks for existence before building a controller). `threads` > 0
    sets torch's threads (one per evaluation worker). `pairs=False` plans with the predictor's
    slot-on-slot interactions off (only the robot moves objects: one box, as in EgoPush-Single)."""
    from pathlib import Path

    from worldmodel.train import load_encoder
    from worldmodel.train_predictor import load_predictor

    if predictor is not None and checkpoint is not None and Path(predictor) != Path(checkpoint):
        raise ValueError(f"predictor={predictor!r} and checkpoint={checkpoint!r} name different checkpoints")
    predictor = predictor if predictor is not None else checkpoint
    if predictor is None:
        raise ValueError("make_latent_planner needs the predictor checkpoint directory (predictor=... or checkpoint=...)")
    if threads > 0:
        torch.set_num_threads(threads)
    model, config = load_predictor(predictor, device, with_config=True,
                                   overrides=None if pairs is None else {"pairs": bool(pairs)})
    encoder = encoder or config.get("encoder")
    if not encoder or not Path(encoder).exists():
        raise ValueError(f"the predictor {predictor} was trained on the encoder {encoder!r}, which does not exist "
                         f"here; pass encoder=<encoder checkpoint directory>")
    enc = load_encoder(encoder, device)
    return LatentPlanner(enc, model, PlannerConfig(**planner), goal=goal, device=device, track=track,
                         phases=phases, settle_steps=settle_steps, settle_m=settle_m)
