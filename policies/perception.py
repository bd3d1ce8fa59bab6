"""Scene perception for task-level control: which pixels show which object, and where in the world each
object and goal was last seen, from egocentric RGB-D and the camera pose alone.

`SceneSegmenter` labels every pixel with one of `SEG_CLASSES`; it is trained on the simulator's
segmentation (training-time supervision, as the encoder's centre head is trained on object positions).
`SceneMemory` turns its labels, the depth and `cam_pose` into the fields of the env's privileged `info`
(`robot_pose`, `object_poses`, `goal`, `visible`, `goal_visible`), so that what was written against
privileged state (the scripted expert's choice of the next push, the object-token policy) runs on
perception unchanged. A formation's slots are placed by fitting the formation's template (known from the
task: `sim.env.FORMATIONS`) to the anchor and the slot markers seen on the floor.

Why not the world-model slots: the encoder gives a flat floor marker the walls' slot and the trackers
drop it with the background, and a formation is defined by its markers (README, "Formation").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.observation import rgbd_image
from sim.env import (
    BOX_NAMES,
    DISTRACTOR_NAMES,
    FIRST_OBJECT_SEG_ID,
    FORMATIONS,
    GOAL_SEG_ID,
    MARKER_NAMES,
    PUSHER_OFFSET,
)
from sim.geometry import planar_pose_matrix, rot_z, unproject_depth

SEG_CLASSES = ("background", *BOX_NAMES, *DISTRACTOR_NAMES, "goal_marker")
GOAL_CLASS = len(SEG_CLASSES) - 1
BOX_HALF = {"box_anchor": 0.06, "box_red": 0.05, "box_green": 0.05, "box_blue": 0.05}  # m (sim/assets/egopush.xml)
HEAD_CAMERA_X = 0.032  # m, the head camera ahead of the wheel axle (sim/assets/robot.xml)
MARKER_RADIUS = 0.07  # m, a goal marker disc (sim/assets/egopush.xml)
# where an object against the pusher plate sits in the robot's frame: x from, x to, |y| below (m)
PUSH_ZONE = (PUSHER_OFFSET, PUSHER_OFFSET + 0.16, 0.12)
GRID_CELL, GRID_HALF = 0.01, 90  # the formation evidence grid: 1 cm cells, 0.9 m around the anchor each way
SLOT_SIGMA = 0.035  # m: how far from a slot's centre the evidence still counts for it (Gaussian)
SLOT_REFINE_M = 0.03  # m: how far from the template's place a slot's marker may be found


def class_targets(segmentation: np.ndarray, object_names: Sequence[str]) -> np.ndarray:
    """Simulator segmentation ids (..., H, W) -> `SEG_CLASSES` indices (..., H, W) int64: floor, walls and
    the robot are background, object i is its name's class, every goal marker is `goal_marker`."""
    lut = np.zeros(256, np.int64)
    for i, name in enumerate(object_names):
        lut[FIRST_OBJECT_SEG_ID + i] = SEG_CLASSES.index(name)
    lut[GOAL_SEG_ID:GOAL_SEG_ID + len(MARKER_NAMES)] = GOAL_CLASS
    return lut[np.asarray(segmentation, np.uint8)]


@dataclass
class SegmenterConfig:
    width: int = 16  # channels at full resolution; x2 at 1/2, x3 at 1/4
    n_classes: int = len(SEG_CLASSES)


def _block(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation),
                         nn.GroupNorm(4, c_out), nn.SiLU())


class SceneSegmenter(nn.Module):
    """A small U-Net over RGB-D: (B, 4, H, W) from `rgbd_image` -> class logits (B, C, H, W).

    Three scales (1, 1/2, 1/4); the 1/4 scale is dilated so that a pixel sees about a quarter of the
    frame, enough to tell a white floor marker from a pale wall by where it lies."""

    def __init__(self, cfg: SegmenterConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SegmenterConfig()
        w = cfg.width
        self.full = _block(4, w)
        self.down2 = nn.Sequential(_block(w, 2 * w, stride=2), _block(2 * w, 2 * w))
        self.down4 = nn.Sequential(_block(2 * w, 3 * w, stride=2), _block(3 * w, 3 * w, dilation=2),
                                     _block(3 * w, 3 * w, dilation=4))
        self.up_half = _block(5 * w, 2 * w)
        self.up_full = nn.Sequential(nn.Conv2d(3 * w, w, 1), nn.GroupNorm(4, w), nn.SiLU())
        self.head = nn.Conv2d(w, cfg.n_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        f1 = self.full(x)
        f2 = self.down2(f1)
        f4 = self.down4(f2)
        u2 = self.up_half(torch.cat([f2, F.interpolate(f4, size=f2.shape[-2:], mode="nearest")], 1))
        u1 = self.up_full(torch.cat([f1, F.interpolate(u2, size=f1.shape[-2:], mode="bilinear",
                                                        align_corners=False)], 1))
        return self.head(u1)

    @torch.no_grad()
    def labels(self, rgb: np.ndarray, depth: np.ndarray, batch: int = 64) -> np.ndarray:
        """rgb uint8 (..., H, W, 3), depth m (..., H, W) -> class index per pixel (..., H, W) int64."""
        x = rgbd_image(rgb, depth)
        flat = x.reshape(-1, *x.shape[-3:])
        out = torch.cat([self(flat[i:i + batch]).argmax(1) for i in range(0, len(flat), batch)])
        return out.reshape(x.shape[:-3] + x.shape[-2:]).numpy()


def load_segmenter(directory: str | Path) -> tuple[SceneSegmenter, dict[str, Any]]:
    """A trained `SceneSegmenter` (eval mode) and its stats (classes, centre offsets)."""
    from worldmodel.checkpoint import load_state_strict, read_checkpoint

    config, state, stats = read_checkpoint(directory)
    if tuple(stats.get("classes", ())) != SEG_CLASSES:
        raise ValueError(f"{directory}: segmenter classes {stats.get('classes')} differ from this code's "
                         f"{list(SEG_CLASSES)}")
    model = SceneSegmenter(SegmenterConfig(**config["model"]))
    load_state_strict(model, state, directory)
    return model.eval(), stats


def camera_robot_pose(cam_pose: np.ndarray) -> np.ndarray:
    """world-from-optical (4, 4) -> the robot's planar pose (x, y, yaw) at its wheel axle."""
    forward = cam_pose[:3, 2]
    yaw = math.atan2(forward[1], forward[0])
    x, y = cam_pose[:2, 3] - HEAD_CAMERA_X * np.array([math.cos(yaw), math.sin(yaw)])
    return np.array([x, y, yaw])


@dataclass
class MemoryConfig:
    min_pixels: int = 3  # an object covering fewer labelled pixels with valid depth is not seen
    # an object the frame's edge cuts keeps its remembered centre while its part's median is within this and
    # the class's centre offset of it
    cut_tolerance_m: float = 0.04
    fit_boxes: bool = True  # place a box by fitting its square footprint to its points (else: median + offset)
    yaw_step_deg: float = 1.0  # the formation fit's grid over the anchor's heading
    evidence_decay: float = 0.97  # per frame with the anchor in view: the floor evidence's half-life is 23 frames
    # a new heading more than 10 degrees from the current one must explain the floor better by this much
    # (the scores are in slots' worth of evidence, -3 to 3): a tie between two headings, one slot unseen, flips nothing
    yaw_switch_margin: float = 0.5


class SceneMemory:
    """Per-episode world-frame memory of the task's objects and goals, from segmented RGB-D frames.

    A box's position is the centre of the square footprint that best fits its pixels' world points
    (`fit_square`); any other object's is the median of its points pushed away from the camera by its
    class's `centre_offsets` (the visible faces are nearer than the centre; calibrated on held-out frames
    at training time). Objects get no heading, except the formation's anchor, whose heading is fitted
    with its slots; the anchor counts as seen only once its slots are placed, so that a controller
    looking for the formation keeps looking."""

    def __init__(self, segmenter: SceneSegmenter, stats: dict[str, Any], object_names: Sequence[str],
                 formation: str | None = None, n_goals: int = 1, cfg: MemoryConfig | None = None) -> None:
        unknown = [n for n in object_names if n not in SEG_CLASSES]
        if unknown:
            raise ValueError(f"objects {unknown} have no segmentation class; known: {list(SEG_CLASSES[1:-1])}")
        if formation and formation not in FORMATIONS:
            raise ValueError(f"formation must be one of {sorted(FORMATIONS)}; got {formation!r}")
        self.segmenter, self.cfg = segmenter, cfg or MemoryConfig()
        self.classes = [SEG_CLASSES.index(n) for n in object_names]
        offsets = stats.get("centre_offsets", {})
        self.offsets = np.array([float(offsets.get(n, 0.0)) for n in object_names])
        self.box_half = np.array([BOX_HALF.get(n, 0.0) for n in object_names])
        self.rng = np.random.default_rng(0)  # subsamples a near object's many pixels for the footprint fit
        self.template = FORMATIONS[formation] if formation else None
        self.n_goals = len(self.template) if formation else n_goals
        self.reset()

    @classmethod
    def for_episode(cls, segmenter: SceneSegmenter, stats: dict[str, Any], info: dict[str, Any]) -> SceneMemory:
        """A memory for the episode an env's reset `info` starts: its objects and formation are the task's
        definition, not its state."""
        return cls(segmenter, stats, info["object_names"], info.get("formation"), n_goals=len(info["goal"]))

    def reset(self) -> None:
        n = len(self.classes)
        self.poses = np.zeros((n, 3))
        self.goals = np.zeros((self.n_goals, 2))
        self.ever_seen = np.zeros(n, bool)
        self.anchor_yaw: float | None = None
        self.anchor_ref: np.ndarray | None = None
        self.prev_robot_inv: np.ndarray | None = None  # last frame's robot-from-world (4, 4)
        self.evidence = np.zeros((2, 2 * GRID_HALF, 2 * GRID_HALF))  # floor points with / without a marker
        self.last_labels: np.ndarray | None = None

    def __call__(self, obs: dict, labels: np.ndarray | None = None) -> dict[str, Any]:
        """One frame (`rgb`, `depth`, `intrinsics`, `cam_pose`) -> the privileged `info` fields, estimated.
        `labels` (H, W): the frame's segmentation when it was computed already (a batch over a recording)."""
        depth = np.nan_to_num(np.asarray(obs["depth"], np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        intr, cam = np.asarray(obs["intrinsics"], np.float64), np.asarray(obs["cam_pose"], np.float64)
        if labels is None:
            labels = self.segmenter.labels(obs["rgb"], depth)
        self.last_labels = labels
        points = unproject_depth(depth, intr, cam)
        valid = np.isfinite(points[..., 0])
        eye = cam[:2, 3]
        robot_pose = camera_robot_pose(cam)
        robot = planar_pose_matrix(*robot_pose)
        if self.prev_robot_inv is None:
            self.prev_robot_inv = np.linalg.inv(robot)
        visible = np.zeros(len(self.classes), bool)
        for i, c in enumerate(self.classes):
            mask = (labels == c) & valid
            if mask.sum() < self.cfg.min_pixels:
                continue
            part = points[mask]
            xy = np.median(part[:, :2], axis=0)
            cut = self.ever_seen[i] and _cut_by_frame(mask)
            if cut:
                # the frame cuts the object: its visible part's median is off its centre by up to a half size.
                # Start from the remembered centre, or, for one that was against the pusher, from where it
                # would be had it been pushed along, whichever the part is nearer
                local = self.prev_robot_inv @ np.array([*self.poses[i, :2], 0.0, 1.0])
                carried = (robot @ local)[:2]
                if (PUSH_ZONE[0] < local[0] < PUSH_ZONE[1] and abs(local[1]) < PUSH_ZONE[2]
                        and np.linalg.norm(xy - carried) < np.linalg.norm(xy - self.poses[i, :2])):
                    self.poses[i, :2] = carried
                guess = self.poses[i, :2].copy()
            else:
                ray = xy - eye
                guess = xy + self.offsets[i] * ray / max(float(np.linalg.norm(ray)), 1e-6)
            if self.box_half[i] > 0 and self.cfg.fit_boxes:
                self.poses[i, :2] = fit_square(part, self.box_half[i], guess, self.rng)
            elif cut:  # keep the remembered centre while the part fits it; follow the part when it has moved
                d, tolerance = xy - guess, self.cfg.cut_tolerance_m + self.offsets[i]
                gap = float(np.linalg.norm(d))
                self.poses[i, :2] = guess + (d * (1.0 - tolerance / gap) if gap > tolerance else 0.0)
            else:
                self.poses[i, :2] = guess
            visible[i] = True
        goal_visible = np.zeros(self.n_goals, bool)
        if self.template is None:  # one goal disc: where its pixels are
            mask = (labels == GOAL_CLASS) & valid
            if mask.sum() >= self.cfg.min_pixels:
                self.goals[0] = np.median(points[mask][:, :2], axis=0)
                goal_visible[0] = True
        else:
            if visible[0]:
                self._fit_formation(labels, points, valid)
            if self.anchor_yaw is None:
                visible[0] = False  # an anchor without its slots tells a controller nothing yet
            else:
                self.poses[0, 2] = self.anchor_yaw
                self.goals = self.poses[0, :2] + self.slot_offsets
                goal_visible = self._in_plain_view(self.goals, points, valid, intr, cam)
        self.ever_seen |= visible
        self.prev_robot_inv = np.linalg.inv(robot)
        return {"robot_pose": robot_pose, "object_poses": self.poses.copy(), "goal": self.goals.copy(),
                "visible": visible, "goal_visible": goal_visible}

    def _fit_formation(self, labels: np.ndarray, points: np.ndarray, valid: np.ndarray) -> None:
        """Add this frame's floor to the evidence around the anchor, then take the anchor heading whose
        slots fall on the most marker and the least bare floor.

        The evidence is a grid in the anchor's translated frame (cells of `GRID_CELL`): per cell, floor
        points seen with a marker and without one, summed over the frames in which the anchor was seen, so
        a slot hidden now (behind the anchor, out of view) still counts where it was seen before."""
        anchor = self.poses[0, :2]
        if self.anchor_ref is None or np.linalg.norm(anchor - self.anchor_ref) > 0.1:
            self.evidence[:] = 0.0  # the anchor was moved: what was seen around it no longer holds
            self.anchor_ref = anchor.copy()
        self.evidence *= self.cfg.evidence_decay  # a bumped anchor turns: what was seen long ago counts less
        floor = valid & (np.abs(points[..., 2]) < 0.02)
        for channel, mask in ((0, floor & (labels == GOAL_CLASS)), (1, floor & (labels == 0))):
            cells = np.floor((points[mask][:, :2] - anchor) / GRID_CELL).astype(np.int64) + GRID_HALF
            keep = ((cells >= 0) & (cells < 2 * GRID_HALF)).all(-1)
            np.add.at(self.evidence[channel], (cells[keep, 0], cells[keep, 1]), 1.0)
        marker, bare = self.evidence
        if marker.sum() < self.cfg.min_pixels:
            return
        seen = marker + bare
        score = _blur(np.where(seen > 0, (marker - bare) / np.maximum(seen, 1.0), 0.0), SLOT_SIGMA / GRID_CELL)
        yaws = np.deg2rad(np.arange(0.0, 360.0, self.cfg.yaw_step_deg))
        c, s = np.cos(yaws), np.sin(yaws)
        rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # (Y, 2, 2)
        slots = np.einsum("yij,kj->yki", rot, self.template)  # (Y, K, 2) in the anchor's translated frame
        cells = np.clip(np.round(slots / GRID_CELL - 0.5).astype(np.int64) + GRID_HALF, 0, 2 * GRID_HALF - 1)
        total = score[cells[..., 0], cells[..., 1]].sum(-1)
        best = int(np.argmax(total))
        if self.anchor_yaw is not None:
            now = round(math.degrees(self.anchor_yaw) / self.cfg.yaw_step_deg) % len(yaws)
            turn = abs((best - now + len(yaws) / 2) % len(yaws) - len(yaws) / 2) * self.cfg.yaw_step_deg
            if turn > 10.0 and total[best] - total[now] < self.cfg.yaw_switch_margin:
                best = now
        self.anchor_yaw = float(yaws[best])
        self._refine_slots(score)

    def _refine_slots(self, score: np.ndarray) -> None:
        """Each slot where the marker evidence peaks near the template's place for it: the heading grid's
        step is 1.1 cm at the line's far slot, and each marker is where it was drawn, not where the
        template says."""
        offsets = self.template @ rot_z(self.anchor_yaw)[:2, :2].T
        r = round(SLOT_REFINE_M / GRID_CELL)
        for k, rel in enumerate(offsets):
            c = np.floor(rel / GRID_CELL).astype(np.int64) + GRID_HALF
            lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, 2 * GRID_HALF)
            window = np.maximum(score[lo[0]:hi[0], lo[1]:hi[1]], 0.0)
            if window.max() < 0.2:  # too little of this marker seen: the template's place
                continue
            ii, jj = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
            w = window / window.sum()
            offsets[k] = (np.array([(ii * w).sum(), (jj * w).sum()]) - GRID_HALF + 0.5) * GRID_CELL
        self.slot_offsets = offsets

    @staticmethod
    def _in_plain_view(goals: np.ndarray, points: np.ndarray, valid: np.ndarray, intr: np.ndarray,
                       cam: np.ndarray) -> np.ndarray:
        """Whether each goal on the floor projects into the frame with nothing nearer in front of it; `points`
        (H, W, 3) and `valid` are the frame's world points, as `__call__` unprojected them."""
        uv, rng, ok = _project(np.concatenate([goals, np.zeros((len(goals), 1))], -1), intr, cam, valid.shape)
        out = np.zeros(len(goals), bool)
        if ok.any():
            dist = np.where(valid, np.linalg.norm(points - cam[:3, 3], axis=-1), np.inf)
            out[ok] = dist[uv[ok, 1], uv[ok, 0]] > rng[ok] - 0.05
        return out


def _project(world: np.ndarray, intr: np.ndarray, cam: np.ndarray,
             shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points (N, 3) -> integer pixels (N, 2: u, v), distance from the camera (N,), and whether each
    lands in the image in front of the camera."""
    local = (world - cam[:3, 3]) @ cam[:3, :3]
    z = local[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.round(intr[0, 0] * local[:, 0] / z + intr[0, 2])
        v = np.round(intr[1, 1] * local[:, 1] / z + intr[1, 2])
    ok = (z > 0.05) & (u >= 0) & (u < shape[1]) & (v >= 0) & (v < shape[0])
    uv = np.stack([np.where(ok, u, 0), np.where(ok, v, 0)], -1).astype(np.int64)
    return uv, np.linalg.norm(local, axis=-1), ok


def fit_square(points: np.ndarray, half: float, guess: np.ndarray, rng: np.random.Generator,
               max_points: int = 150) -> np.ndarray:
    """The centre (2,) of the square footprint (half-size `half`, any heading) that best explains a box's
    world points (N, 3): a point on a side face lies on the square's edge, a point on the top face inside
    it. Searched coarse to fine around `guess`, which also breaks ties (a face seen without its ends fixes
    the centre across the face, not along it)."""
    if len(points) > max_points:
        points = points[rng.choice(len(points), max_points, replace=False)]
    xy, top = points[:, :2], points[:, 2] > 2 * half - 0.01
    best, best_yaw = np.asarray(guess, float), 0.0
    for span, step, yaw_span, yaw_step in ((0.06, 0.02, 45.0, 10.0), (0.01, 0.005, 5.0, 2.5)):
        offs = np.arange(-span, span + 1e-9, step)
        centres = best + np.stack(np.meshgrid(offs, offs), -1).reshape(-1, 2)  # (C, 2)
        yaws = np.deg2rad(best_yaw + np.arange(-yaw_span, yaw_span + 1e-9, yaw_step))  # (Y,)
        d = xy[None] - centres[:, None]  # (C, N, 2)
        c, s = np.cos(yaws)[:, None, None], np.sin(yaws)[:, None, None]
        u = c * d[None, ..., 0] + s * d[None, ..., 1]  # (Y, C, N)
        v = -s * d[None, ..., 0] + c * d[None, ..., 1]
        m = np.maximum(np.abs(u), np.abs(v)) - half
        r = np.where(top, np.maximum(m, 0.0), np.abs(m))
        cost = (r ** 2).mean(-1) + 0.01 * ((centres - guess) ** 2).sum(-1)  # (Y, C)
        y, k = np.unravel_index(int(np.argmin(cost)), cost.shape)
        best, best_yaw = centres[k], float(np.rad2deg(yaws[y]))
    return best


def _cut_by_frame(mask: np.ndarray) -> bool:
    """Whether the frame's top or sides cut the object. A cut by the bottom edge does not count: it takes
    the lower rows of the faces in view, whose points lie above the same floor footprint as the rows kept."""
    return bool(mask[0].any() or mask[:, 0].any() or mask[:, -1].any())


def _blur(grid: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur of a 2D grid (sigma in cells), zero beyond the edges."""
    r = math.ceil(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    rows = np.apply_along_axis(np.convolve, 0, grid, k, mode="same")
    return np.apply_along_axis(np.convolve, 1, rows, k, mode="same")


# ---------------------------------------------------------------------------- training


@dataclass
class SegmenterTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    stride: int = 2  # every stride-th frame of each episode
    val_fraction: float = 0.15  # the last episodes of each dataset, held out
    seed: int = 0


def load_frames(paths: Sequence[str], stride: int) -> list[dict[str, np.ndarray]]:
    """Per episode: rgb, depth, class targets and the privileged state of every stride-th frame, from
    datasets recorded with `segmentation=true`."""
    from sim.dataset import EpisodeDataset
    from sim.env import task_objects

    episodes = []
    for p in paths:
        ds = EpisodeDataset.open(p)
        env = ds.meta.get("env_config", {})
        names = task_objects(env.get("task", ds.meta.get("task", "single")), int(env.get("n_distractors", 2)))
        if "segmentation" not in ds.keys:
            raise ValueError(f"{p} has no segmentation: record it with `ego-collect ... segmentation=true`")
        for e in range(ds.n_episodes):
            ep = ds.episode(e, ["rgb", "depth", "segmentation", "intrinsics", "cam_pose", "object_poses", "visible"])
            ep = {k: v[::stride] for k, v in ep.items()}
            ep["target"] = class_targets(ep.pop("segmentation"), names)
            ep["names"] = names
            episodes.append(ep)
    return episodes


def train_segmenter(paths: Sequence[str], out: str | Path, cfg: SegmenterTrainConfig | None = None,
                    model_cfg: SegmenterConfig | None = None, progress: bool = True) -> Path:
    """Train a `SceneSegmenter` on segmented demonstrations, calibrate the centre offsets on held-out
    episodes, and write a checkpoint directory (config.yaml, model.safetensors, stats.json, metrics.json)."""
    from tqdm import tqdm

    from worldmodel.checkpoint import save_checkpoint

    cfg, model_cfg = cfg or SegmenterTrainConfig(), model_cfg or SegmenterConfig()
    episodes = load_frames(paths, cfg.stride)
    n_val = min(round(cfg.val_fraction * len(episodes)), len(episodes) - 1)
    # with nothing held out, the IoU and the centre offsets come from the training episodes (said in metrics)
    train_eps, val_eps = (episodes[:-n_val], episodes[-n_val:]) if n_val > 0 else (episodes, episodes)
    x = torch.cat([rgbd_image(e["rgb"], e["depth"]) for e in train_eps])
    y = torch.from_numpy(np.concatenate([e["target"] for e in train_eps]))
    counts = torch.bincount(y.flatten(), minlength=model_cfg.n_classes).float()
    # rare classes (a far marker is a handful of pixels) weigh more, by the inverse square root of frequency
    weight = (counts.sum() / counts.clamp(min=1)).sqrt()
    weight = (weight / weight[0]).clamp(max=30.0)
    torch.manual_seed(cfg.seed)
    model = SceneSegmenter(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="segmenter", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        xb, yb = x[idx], y[idx]
        if torch.rand((), generator=gen) < 0.5:  # the scene mirrored is as plausible as the scene
            xb, yb = xb.flip(-1), yb.flip(-1)
        loss = F.cross_entropy(model(xb), yb, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    metrics, offsets = _validate(model, val_eps)
    stats = {"classes": list(SEG_CLASSES), "centre_offsets": offsets, "class_weight": weight.tolist()}
    metrics.update(train_frames=len(x), val_episodes=n_val, steps=cfg.steps, final_loss=float(loss.detach()))
    config = {"model": asdict(model_cfg), "train": asdict(cfg), "data": [str(p) for p in paths]}
    return save_checkpoint(out, model, config, stats, metrics)


@torch.no_grad()
def _validate(model: SceneSegmenter, episodes: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Per-class IoU on held-out frames, and each object class's centre offset: the median distance, along
    the camera's ray, from its pixels' median world point to the object's true centre."""
    inter = np.zeros(len(SEG_CLASSES))
    union = np.zeros(len(SEG_CLASSES))
    residual: dict[str, list[float]] = {}
    for ep in episodes:
        pred = model.labels(ep["rgb"], ep["depth"])
        for c in range(len(SEG_CLASSES)):
            inter[c] += ((pred == c) & (ep["target"] == c)).sum()
            union[c] += ((pred == c) | (ep["target"] == c)).sum()
        for t in range(len(pred)):
            cam = ep["cam_pose"][t].astype(np.float64)
            pts = unproject_depth(ep["depth"][t], ep["intrinsics"][t].astype(np.float64), cam)
            for i, name in enumerate(ep["names"]):
                mask = (pred[t] == SEG_CLASSES.index(name)) & np.isfinite(pts[..., 0])
                if mask.sum() < 3:
                    continue
                xy = np.median(pts[mask][:, :2], axis=0)
                ray = xy - cam[:2, 3]
                ray /= max(float(np.linalg.norm(ray)), 1e-6)
                residual.setdefault(name, []).append(float((ep["object_poses"][t, i, :2] - xy) @ ray))
    iou = {n: float(inter[c] / union[c]) if union[c] else None for c, n in enumerate(SEG_CLASSES)}
    offsets = {n: float(np.median(r)) for n, r in residual.items()}
    return {"val_iou": iou}, offsets
