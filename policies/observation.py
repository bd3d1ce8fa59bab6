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
from typing import Any

import numpy as np
import torch
from torch import Tensor

ODOM_DIM = 4  # (dx, dy) m in the start frame, cos and sin of the turn since the start
# what a track's token adds to its slot vector: mean colour (3), centre (forward, left, up) m, view direction
# (forward, left), log pixel share, age
TOKEN_EXTRA_DIM = 10
MIN_SEEN_PIXELS = 4  # a slot holding fewer valid-depth pixels does not see its object now
NEVER_SEEN_AGE = 1000  # steps; what the age feature says of a slot that has never held an object
DEPTH_SCALE_M = 3.0  # depth / 3 m: about [0, 1.3] over the sensor's range
FORGET_STEPS = 50  # `SlotMemory.forget_steps` by default: what every policy before the option was trained with
DEFAULT_TRACKER = "amodal"  # the `TRACKERS` preset a new policy is trained with (`PolicyConfig.tracker`)


def planar_pose(cam_pose: Tensor) -> tuple[Tensor, Tensor]:
    """cam_pose (..., 4, 4) world-from-optical -> camera position (..., 2) and heading (...): the yaw of
    its optical axis (z) in the world plane."""
    forward = cam_pose[..., :3, 2]
    return cam_pose[..., :2, 3], torch.atan2(forward[..., 1], forward[..., 0])


def camera_right(cam_pose: Tensor) -> Tensor:
    """cam_pose (..., 4, 4) -> (..., 2): the unit vector on the floor plane to the right of the camera's
    optical axis (the sideways direction of `worldmodel.encoder.mask_geometry`'s sides)."""
    _, yaw = planar_pose(cam_pose)
    return torch.stack([torch.sin(yaw), -torch.cos(yaw)], -1)


def _to_local(xy: Tensor, origin: Tensor, yaw: Tensor) -> Tensor:
    """World-plane vectors (..., K, 2) relative to `origin` (..., 2), expressed in a frame turned by `yaw`."""
    c, s = torch.cos(yaw).unsqueeze(-1), torch.sin(yaw).unsqueeze(-1)
    d = xy - origin.unsqueeze(-2)
    return torch.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], -1)


# The object tracker's settings (`SlotMemory(tracker=...)`); a policy records the one its demonstrations were
# encoded with (`PolicyConfig.tracker`) and runs it on the robot.
TRACKERS: dict[str, dict[str, Any]] = {
    # what every policy trained before the option ran: any slot that sees something is an object, alike in RGB
    "legacy": dict(colour_space="rgb", colour_scale=0.15, merge_colour=0.15, max_spread_m=None,
                   background_chroma=None, hold_below=None, occluder_deg=None, cut_half_width_m=None),
    # objects only: slots spread over the floor plane (floor, walls) and slots of the floor's or a wall's
    # colour (scraps of them, the robot's grey pusher) are not detections; colour compared as chromaticity
    # (RGB over its sum, which shading leaves nearly unchanged: a box's lit top and dark side are 0.25 apart
    # in RGB and 0.01 in chromaticity). On 10 Single-hard episodes (`benchmarks/policy_tracks.py --level hard
    # --episodes 10 --trackers objects legacy`, the 2026-12-06 pipeline's encoder) exactly one track lies on
    # the box on 0.89 of the frames after it was first seen (legacy 0.49), one remembers the goal disc on
    # 0.90 (0.54), and 1.1 tracks per frame remember no object (5.0). A Single-hard policy trained on tokens
    # of this preset succeeds 50 times in 100, of the legacy one once (same encoder, demonstrations, steps)
    "objects": dict(colour_space="chroma", colour_scale=0.05, merge_colour=0.08, max_spread_m=0.15,
                    background_chroma=0.04, hold_below=None, occluder_deg=None, cut_half_width_m=None),
}
# "objects", and a track keeps its remembered centre while its object shows less than `hold_below` of
# the most it has shown (pixels times range squared, so distance does not count): the visible centroid
# of a half-hidden object is the centroid of its visible half. While the box is pushed onto the goal
# disc the disc is hidden by degrees, and under "objects" the goal's track follows its last sliver to
# 4.5 cm (median) from the disc's centre by the time the box is within 30 cm of it (2.0 cm before;
# the box's own track 1.6 cm), with a 7 cm tolerance to place the box in
TRACKERS["occlusion"] = dict(TRACKERS["objects"], hold_below=0.5, occluder_deg=30.0)
# "occlusion", and an object that the image's left or right side cuts is completed from its whole inner side
# and the half-width of the objects pushed (EgoPush's boxes are 10 cm cubes): a box pushed off the pusher
# plate's centre line leaves the frame sideways, and its visible centroid lies inward of its centre. On the
# 12 Single-easy failures of the 2026-12-07 job (seeds 1002-1093, every step) the box's visible centroid was
# a median 3.6 cm off its centre sideways on steps where the box sat over 4 cm off the line, completed 0.3 cm
TRACKERS["amodal"] = dict(TRACKERS["occlusion"], cut_half_width_m=0.05)


def chromaticity(rgb: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """RGB (..., 3) -> RGB over its sum (..., 3): colour without brightness (black counts as a dim grey)."""
    total = rgb.sum(-1, keepdims=True) if isinstance(rgb, np.ndarray) else rgb.sum(-1, keepdim=True)
    return rgb / total.clip(min=0.05)


class SlotMemory:
    """Object permanence over one stream, by object track rather than by slot index.

    Slot attention does not promise that an object keeps its slot: over Single-easy episodes the
    slot that holds most of the box is the same slot on only 62% of its frames, mostly because the
    box is handed from one slot to another over a few frames while the robot closes in (tracks: 93%,
    `benchmarks/policy_tracks.py`). So the
    memory keeps K object tracks, as a multi-object tracker does. Each frame:

    1. the slots that see something (`MIN_SEEN_PIXELS`) are detections, except the background (settings
       of the `tracker` preset, `TRACKERS`; off in "legacy"): a slot whose pixels spread wider than
       `max_spread_m` on the floor plane, and one whose chromaticity is within `background_chroma` of
       such a slot's (a scrap of floor or wall);
    2. detections closer than `merge_m` on the floor and `merge_colour` in colour (RGB or chromaticity:
       `colour_space`) are one object (a slot handing its object over to another), kept as the larger
       slot's vector with the pixel-weighted centre;
    3. detections are assigned to tracks by a Hungarian match on the planar distance from a track's
       last seen world centre over `pos_scale_m` plus the distance between their colours over
       `colour_scale`; a detection that costs more than `gate` against a track is not that object.
       A new object starts a track, on one never used, else on the one unseen longest if that has
       gone unseen for over `forget_steps` steps (`FORGET_STEPS`), else it goes untracked;
    4. a remembered track that matches (as in 2) one seen now is that object's old copy and is forgotten;
    5. with `hold_below` (the "occlusion" preset) a track keeps its remembered centre while its object is
       half-hidden: it shows less than `hold_below` of the most it has shown (pixels times range squared)
       and another detection lies nearer the camera within `occluder_deg` of its bearing. A box leaving
       the frame as it is pushed has nothing in front of it, so its track follows it;
    6. with `cut_half_width_m` (the "amodal" preset) an object that the image's left or right side cuts
       (the encoder's `sides`: its pixels above the floor reach the border column on one side only) is
       completed before it is assigned: its centre moves outward, sideways to the camera, until it
       lies `cut_half_width_m` beyond its inner side, never inward.

    A track whose object is out of view (or hidden behind the box being pushed, as the goal disc is)
    keeps its last seen centre, moved into the robot's current frame by odometry, its slot vector
    and colour: the policy reads tracks in a fixed order, so a window of frames lines up per object.
    Streams are batched: one memory per batch of streams, reset per episode."""

    def __init__(self, tracker: str = DEFAULT_TRACKER, forget_steps: int = FORGET_STEPS, pos_scale_m: float = 0.15,
                 gate: float = 3.0, merge_m: float = 0.15, **overrides: Any) -> None:
        if tracker not in TRACKERS:
            raise ValueError(f"tracker must be one of {sorted(TRACKERS)}; got {tracker!r}")
        if isinstance(forget_steps, bool) or not isinstance(forget_steps, int) or forget_steps < 1:
            raise ValueError(f"forget_steps must be a positive int; got {forget_steps!r}")
        unknown = sorted(set(overrides) - set(TRACKERS[tracker]))
        if unknown:
            raise ValueError(f"unknown tracker settings {unknown}; known: {sorted(TRACKERS[tracker])}")
        opts = {**TRACKERS[tracker], **overrides}
        self.tracker = tracker
        self.pos_scale_m, self.gate, self.merge_m, self.forget_steps = pos_scale_m, gate, merge_m, forget_steps
        self.colour_space: str = opts["colour_space"]
        self.colour_scale: float = opts["colour_scale"]
        self.merge_colour: float = opts["merge_colour"]
        self.max_spread_m: float | None = opts["max_spread_m"]
        self.background_chroma: float | None = opts["background_chroma"]
        self.hold_below: float | None = opts["hold_below"]
        self.occluder_deg: float | None = opts["occluder_deg"]  # read only with hold_below
        self.cut_half_width_m: float | None = opts["cut_half_width_m"]
        self.state: np.ndarray | None = None  # (B, K, S + 3 + 3): last seen slot vector, colour, world centre
        self.age: np.ndarray | None = None  # (B, K) steps since seen; NEVER_SEEN_AGE for an unused track
        self.area: np.ndarray | None = None  # (B, K) the most a track's object has shown: pixels x range^2

    def objects(self, colour: Tensor, pixels: Tensor, spread: Tensor | None = None) -> Tensor:
        """Step 1: pixels won (B, K) -> the same with 0 for a slot that is not an object. Colours (B, K, 3),
        planar spreads (B, K) m (None: every slot is compact)."""
        keep = pixels >= MIN_SEEN_PIXELS
        if spread is not None and self.max_spread_m is not None:
            background = keep & (spread > self.max_spread_m)
            if self.background_chroma is not None:
                ch = chromaticity(colour)
                like = ((ch.unsqueeze(-2) - ch.unsqueeze(-3)).norm(dim=-1) < self.background_chroma)
                background |= (like & background.unsqueeze(-2)).any(-1)
            keep &= ~background
        return torch.where(keep, pixels, torch.zeros_like(pixels))

    def __call__(self, slots: Tensor, colour: Tensor, centre: Tensor, pixels: Tensor, spread: Tensor | None = None,
                 camera: Tensor | None = None, sides: Tensor | None = None, axis: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """This frame's slot vectors (B, K, S), colours (B, K, 3), world centres (B, K, 3), pixels won (B, K),
        planar spreads (B, K) (None: every slot compact), the camera's world position (B, 3) (needed by
        `hold_below` and `cut_half_width_m`), the slots' sides (B, K, 5) (`worldmodel.encoder.mask_geometry`)
        and the camera's right on the floor plane (B, 2) (`camera_right`; both needed by `cut_half_width_m`) -> per track:
        slot vector, colour, remembered world centre, pixels its object shows now (0 if none) and age (B, K)."""
        s = slots.shape[-1]
        if (self.hold_below is not None or self.cut_half_width_m is not None) and camera is None:
            raise ValueError(f"the {self.tracker!r} tracker places objects from where the camera is: pass camera=")
        if self.cut_half_width_m is not None and (sides is None or axis is None):
            raise ValueError(f"the {self.tracker!r} tracker completes objects cut by the image's side: pass sides= "
                             "(the encoder's extras['sides']) and axis=")
        pixels = self.objects(colour, pixels, spread)
        now = torch.cat([slots, colour, centre], -1).detach().cpu().double().numpy()
        px = pixels.detach().cpu().double().numpy()
        cam = None if camera is None else camera.detach().cpu().double().numpy()
        if self.cut_half_width_m is not None:
            side, ax = sides.detach().cpu().double().numpy(), axis.detach().cpu().double().numpy()
        if self.state is None:  # tracks start as the slots; those that see nothing count as unused
            self.state = now.copy()
            self.age = np.full(px.shape, float(NEVER_SEEN_AGE))
            self.area = np.zeros(px.shape)
        shown = np.zeros_like(px)
        for b in range(now.shape[0]):
            det, det_px, members = self._detections(now[b], px[b], s)
            if self.cut_half_width_m is not None:
                self._complete(det, members, side[b], cam[b, :2], ax[b], s)
            behind = None if self.hold_below is None else self._behind(det, cam[b], s)
            partial = np.zeros(px.shape[1], bool)  # tracks whose object shows only a part of itself now
            for track, d, same in self._assign(self.state[b], self.age[b], det, s):
                hold = False
                if self.hold_below is not None:
                    area = det_px[d] * float(((det[d, s + 3:] - cam[b]) ** 2).sum())
                    partial[track] = behind[d]
                    # a part of it shows: its centroid is not its centre, so the remembered centre stays
                    hold = same and behind[d] and area < self.hold_below * self.area[b, track]
                    if not hold:
                        self.area[b, track] = max(self.area[b, track], area) if same else area
                upto = s + 3 if hold else None
                self.state[b, track, :upto], shown[b, track] = det[d, :upto], det_px[d]
            self.age[b] = np.where(shown[b] > 0, 0.0, np.minimum(self.age[b] + 1, NEVER_SEEN_AGE))
            self._forget_duplicates(b, shown[b] > 0, s, partial)
        out = [torch.from_numpy(a).to(slots.device, slots.dtype)
               for a in (self.state[..., :s], self.state[..., s:s + 3], self.state[..., s + 3:], shown, self.age)]
        return tuple(out)

    def _detections(self, now: np.ndarray, px: np.ndarray, s: int
                    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """One stream's slots (K, F), pixels (K,) -> its objects (D, F), their pixels (D,) and the slots of each."""
        seen = np.flatnonzero(px >= MIN_SEEN_PIXELS)
        group = {int(k): int(k) for k in seen}  # union-find over the seen slots

        def root(k: int) -> int:
            while group[k] != k:
                k = group[k]
            return k

        for i, j in zip(*np.nonzero(np.triu(self._same_object(now[seen], now[seen], s), 1))):
            group[root(int(seen[j]))] = root(int(seen[i]))
        det, det_px, slots_of = [], [], []
        for r in sorted({root(k) for k in group}):
            members = np.array([k for k in group if root(k) == r])
            w = px[members] / px[members].sum()
            obj = now[members[np.argmax(px[members])]].copy()
            obj[s:] = w @ now[members, s:]
            det.append(obj)
            det_px.append(px[members].sum())
            slots_of.append(members)
        return np.array(det).reshape(-1, now.shape[-1]), np.array(det_px), slots_of

    def _complete(self, det: np.ndarray, members: list[np.ndarray], sides: np.ndarray, camera: np.ndarray,
                  axis: np.ndarray, s: int) -> None:
        """Step 6, in place on the detections (D, F): one cut by the image's left or right side only (its
        slots' `sides` (K, 5)) has its centre moved outward along `axis` (the camera's right on the floor,
        (2,)) to `cut_half_width_m` beyond its inner side; one cut on both sides fills the frame's width and
        one with no pixel above the floor (a flat disc) is left as it is."""
        for d, m in enumerate(members):
            standing = m[sides[m, 4] > 0]
            if len(standing) == 0:
                continue
            cut_left, cut_right = sides[standing, 2].max() > 0.5, sides[standing, 3].max() > 0.5
            if cut_left == cut_right:
                continue
            lateral = float((det[d, s + 3:s + 5] - camera) @ axis)
            if cut_right:  # its left side is whole
                shift = max(0.0, sides[standing, 0].min() + self.cut_half_width_m - lateral)
            else:
                shift = min(0.0, sides[standing, 1].max() - self.cut_half_width_m - lateral)
            det[d, s + 3:s + 5] += shift * axis

    def _behind(self, det: np.ndarray, camera: np.ndarray, s: int) -> np.ndarray:
        """Detections (D, F), the camera's world position (3,) -> (D,) bool: another detection lies nearer
        the camera within `occluder_deg` of it as the camera sees them on the floor plane, so it may hide a
        part of it."""
        rel = det[:, s + 3:s + 5] - camera[:2]
        rng = np.linalg.norm(rel, axis=-1)
        unit = rel / np.maximum(rng, 1e-6)[:, None]
        near = unit @ unit.T > np.cos(np.radians(self.occluder_deg))
        return ((rng[None, :] < rng[:, None]) & near).any(1)

    def _forget_duplicates(self, b: int, seen: np.ndarray, s: int, partial: np.ndarray) -> None:
        """Step 4. A remembered track that lies where a track seen now is, with its colour, is that object's
        old track (its slot lost the object to another one before the merge caught it): forget it, so
        that no copy of an object stays behind in memory. With `hold_below`, a track seen now that shows
        only a part of what the old one saw (`partial`, below `hold_below` of its area) takes the old
        one's centre, as it would have kept it had it been the same track."""
        old = np.flatnonzero(~seen & (self.age[b] < NEVER_SEEN_AGE))
        now = np.flatnonzero(seen)
        same = self._same_object(self.state[b, old], self.state[b, now], s)
        if self.hold_below is not None:
            for i, j in zip(*np.nonzero(same)):
                o, n = old[i], now[j]
                if partial[n] and self.area[b, n] < self.hold_below * self.area[b, o]:
                    self.state[b, n, s + 3:], self.area[b, n] = self.state[b, o, s + 3:], self.area[b, o]
        self.age[b, old[same.any(1)]] = NEVER_SEEN_AGE

    def _distances(self, a: np.ndarray, b: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (A, F) and (B, F) of slot vector, colour, world centre -> (A, B) floor distances (m) and
        colour distances (RGB or chromaticity, `colour_space`)."""
        floor = np.linalg.norm(a[:, None, s + 3:s + 5] - b[None, :, s + 3:s + 5], axis=-1)
        ca, cb = a[:, s:s + 3], b[:, s:s + 3]
        if self.colour_space == "chroma":
            ca, cb = chromaticity(ca), chromaticity(cb)
        return floor, np.linalg.norm(ca[:, None] - cb[None], axis=-1)

    def _same_object(self, a: np.ndarray, b: np.ndarray, s: int) -> np.ndarray:
        """(A, B) bool: close on the floor and alike in colour, so one object."""
        floor, colour = self._distances(a, b, s)
        return (floor < self.merge_m) & (colour < self.merge_colour)

    def _assign(self, tracks: np.ndarray, age: np.ndarray, det: np.ndarray, s: int
                ) -> list[tuple[int, int, bool]]:
        """Tracks (K, F) and their ages (K,), detections (D, F) -> (track, detection, whether the detection is
        the track's own object rather than a new one) triples."""
        from scipy.optimize import linear_sum_assignment

        if len(det) == 0:
            return []
        known = age < NEVER_SEEN_AGE
        floor, colour = self._distances(tracks, det, s)
        cost = floor / self.pos_scale_m + colour / self.colour_scale
        # a detection beyond the gate is another object. It starts a track: on an unused one at the gate's
        # cost; on a used one, dropping its memory, at a cost falling from 3 to 2 gates as that goes
        # unseen. Past 2.5 gates it goes untracked instead (rows of their own), so only objects unseen
        # for over forget_steps are forgotten for a new one
        span = 2 * self.forget_steps
        fresh = self.gate * np.where(known, 3 - np.minimum(age, span) / span, 1.0)
        same = known[:, None] & (cost <= self.gate)
        cost = np.where(same, cost, fresh[:, None])
        cost = np.concatenate([cost, np.full((len(det), len(det)), 2.5 * self.gate)])
        rows, cols = linear_sum_assignment(cost)
        return [(r, c, bool(same[r, c])) for r, c in zip(rows.tolist(), cols.tolist()) if r < len(tracks)]


def frame_tokens(out, cam_pose: Tensor, memory: SlotMemory | None = None) -> Tensor:
    """One streamed frame's `EncoderOutput` (T = 1), cam_pose (B, 4, 4) -> tokens (B, K, S + TOKEN_EXTRA_DIM):
    what the policy reads, built by this one function offline (`policies.data`) and on the robot
    (`policies.controller`). Each slot's centre is the visible centroid of its pixels (depth under
    its mask), not `CenterHead`'s estimate: the learned move behind the surface is left to the
    probe, since a policy learns a constant offset itself and an offset that goes wrong moves the box
    it must push."""
    h, w = out.masks.shape[-2:]
    sides = out.extras.get("sides")
    return slot_tokens(out.slots[:, 0], out.extras["colour"][:, 0], out.extras["centroid"][:, 0, :, :3],
                       out.extras["pixels"][:, 0], cam_pose, h * w, memory, out.extras["spread"][:, 0],
                       None if sides is None else sides[:, 0])


def slot_tokens(slots: Tensor, colour: Tensor, centre: Tensor, pixels: Tensor, cam_pose: Tensor,
                image_pixels: int, memory: SlotMemory | None = None, spread: Tensor | None = None,
                sides: Tensor | None = None) -> Tensor:
    """Slot vectors (B, K, S), mean colours (B, K, 3), world centres (B, K, 3), pixels won (B, K),
    cam_pose (B, 4, 4), planar spreads (B, K) m (None: unknown, every slot compact), the slots' sides
    (B, K, 5) (`worldmodel.encoder.mask_geometry`; read by a tracker that completes cut objects) -> tokens
    (B, K, S + TOKEN_EXTRA_DIM), one per track of `memory` (a fresh one if None: then track k is the
    slot k, when it is an object): the slot vector, its colour, its centre in the camera's planar frame
    (forward, left, up), the planar direction to it in that frame, log1p(pixels) / log1p(image pixels)
    (0 for a track that sees nothing of its object now) and log1p(age) / log1p(NEVER_SEEN_AGE), age =
    steps since the track last saw its object. A track that sees nothing now keeps what it last saw."""
    pos, yaw = planar_pose(cam_pose)
    slots, colour, centre, pixels, age = (memory if memory is not None else SlotMemory())(
        slots, colour, centre, pixels, spread, cam_pose[..., :3, 3], sides, camera_right(cam_pose))
    planar = _to_local(centre[..., :2], pos, yaw)
    direction = planar / planar.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    share = torch.log1p(pixels.float()) / math.log1p(image_pixels)
    age = torch.log1p(age) / math.log1p(NEVER_SEEN_AGE)
    return torch.cat([slots, colour, planar, centre[..., 2:3], direction, share.unsqueeze(-1),
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
