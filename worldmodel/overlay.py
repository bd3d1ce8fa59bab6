"""World-model overlays for `ego-view` (the torch side of `sim.overlays.OverlayProvider`).

`SlotOverlay` streams the robot's RGB-D frames through a trained `ObjectCentricEncoder` and
reports where its slots put the objects: each slot's world-frame centre estimate (`geometry[..., :3]`),
for the slots that win enough pixels with valid depth. The viewer draws them as cyan balls,
labelled with the slot index, so that a slot keeping its object keeps its label.

`PredictionOverlay` does the same with the encoder a C-JEPA predictor checkpoint was trained on,
and also keeps a short history of the stream (slot features, camera poses, proprio and the actions
the robot executed) from which it rolls the predictor out over the controller's planned actions
(what `update` receives, the magenta base path): one predicted (H, 3) track per shown slot, drawn
as cyan capsules. A batch of one, one candidate: some tens of milliseconds a step on one CPU core.

    ego-view overlays.slots.checkpoint=runs/wm_encoder         # the default entries in view.yaml
    ego-view overlays.predicted.checkpoint=runs/wm_predictor
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sim.env import ACTION_HIGH, ACTION_LOW
from sim.overlays import OverlayFrame
from worldmodel.train import load_encoder


class SlotOverlay:
    """Object positions decoded from an encoder checkpoint's slots, one streamed frame per step.

    checkpoint: an `ego-train-wm stage=encoder` run directory. min_pixels: a slot is shown when it
    wins at least this many pixels with valid depth. max_height: slots whose centroid is higher
    than this (m) are not objects (walls) and are left out; slots under `min_height` (the floor)
    likewise. threads: torch's CPU threads (process-wide; None keeps torch's default). One is the
    default: a batch-1 frame is too small to share, and on a 2-core machine torch's worker threads
    and the renderer's threads stall each other (about 0.9 s a frame with 2 threads, 10 ms with 1).
    """

    def __init__(self, checkpoint: str | Path, device: str = "cpu", min_pixels: int = 6, min_height: float = 0.01,
                 max_height: float = 0.3, threads: int | None = 1) -> None:
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.encoder = load_encoder(checkpoint, device=self.device)
        self.min_pixels, self.min_height, self.max_height = int(min_pixels), float(min_height), float(max_height)
        self.state: Any = None

    def reset(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        h, w = self.encoder.cfg.image_size
        if obs["rgb"].shape[:2] != (h, w):
            raise ValueError(f"this encoder was trained on {h}x{w} images; the env renders "
                             f"{obs['rgb'].shape[0]}x{obs['rgb'].shape[1]}: set image_size={h}")
        self.state = None  # a new episode is a new stream

    def _batch(self, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.ascontiguousarray(obs[k]))[None].to(self.device)
                     for k in ("rgb", "depth", "intrinsics", "cam_pose"))

    @torch.no_grad()
    def _encode(self, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, np.ndarray, list[int]]:
        """One streamed frame: slot features (K, S + 5), world centres (K, 3), the slots that hold something."""
        rgb, depth, intrinsics, cam_pose = self._batch(obs)
        out, self.state = self.encoder.step(rgb, depth, intrinsics, cam_pose, self.state)
        centres = out.geometry[0, 0, :, :3].float().cpu().numpy()  # (K, 3)
        pixels = out.extras["pixels"][0, 0].cpu().numpy()  # valid-depth pixels each slot wins
        keep = [k for k in range(len(centres))
                if pixels[k] >= self.min_pixels and self.min_height <= centres[k, 2] <= self.max_height]
        return out.features[0, 0].float(), centres, keep

    def update(self, obs: dict[str, np.ndarray], planned_actions: np.ndarray | None) -> OverlayFrame:
        """points (K', 3): world centres of the slots that hold something; labels: their slot indices."""
        _, centres, keep = self._encode(obs)
        return OverlayFrame(points=centres[keep], labels=[f"s{k}" for k in keep])


class PredictionOverlay(SlotOverlay):
    """The C-JEPA predictor's forecast of every shown slot under the controller's planned actions.

    checkpoint: an `ego-train-wm stage=predictor` run directory; encoder: the encoder checkpoint
    (default: the one the predictor was trained on, as its config.yaml records it). horizon:
    predictor frames forecast (frameskip env steps each; 5 x 2 x 0.1 s = 1 s by default). The
    planned actions are cut or extended (the last one held) to horizon x frameskip env steps; with
    none, the last executed action is held. points: also report the slots' positions (as
    `SlotOverlay`; false when a `slots` overlay already draws them). The other options are
    `SlotOverlay`'s, and the tracks are those of the slots it shows, at each slot's height.

    The history is the last `history` frames, `frameskip` steps apart, as the planner reads it; the
    commands between them are the ones the viewer reports through `observe_action` (clipped to the
    action bounds, as the env executes them), else the measured base velocity (the rollout's default).
    """

    def __init__(self, checkpoint: str | Path, encoder: str | Path | None = None, horizon: int = 5,
                 points: bool = True, device: str = "cpu", min_pixels: int = 6, min_height: float = 0.01,
                 max_height: float = 0.3, threads: int | None = 1) -> None:
        from worldmodel.train_predictor import load_predictor

        if threads is not None:
            torch.set_num_threads(int(threads))
        if int(horizon) < 1:
            raise ValueError(f"horizon must be >= 1 predictor frames; got {horizon}")
        self.predictor, config = load_predictor(checkpoint, device, with_config=True)
        encoder = encoder or config.get("encoder")
        if not encoder or not Path(encoder).exists():
            raise ValueError(f"the predictor {checkpoint} was trained on the encoder {encoder!r}, which does not "
                             f"exist here; pass encoder=<encoder checkpoint directory>")
        super().__init__(encoder, device=device, min_pixels=min_pixels, min_height=min_height,
                         max_height=max_height, threads=threads)
        pc = self.predictor.cfg
        if (self.encoder.cfg.num_slots, self.encoder.cfg.slot_dim) != (pc.num_slots, pc.slot_dim):
            raise ValueError(f"the encoder {encoder} has {self.encoder.cfg.num_slots} slots of "
                             f"{self.encoder.cfg.slot_dim}; the predictor {checkpoint} reads "
                             f"{pc.num_slots} of {pc.slot_dim}")
        self.horizon, self.points = int(horizon), bool(points)
        self.low, self.high = ACTION_LOW.astype(np.float32), ACTION_HIGH.astype(np.float32)
        self._clear()

    def _clear(self) -> None:
        # per frame: features (K, F), cam_pose (4, 4), proprio (P,), the action that led into it (None: unknown)
        self.frames: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray | None]] = []
        self._pending: np.ndarray | None = None
        self.last_action = np.zeros(2, np.float32)
        self.last_rollout: Any = None

    def reset(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        super().reset(obs, info)
        self._clear()

    def observe_action(self, action: np.ndarray) -> None:
        """The action the robot executed from the last observation (the viewer calls this each step)."""
        self._pending = np.clip(np.asarray(action, np.float32).reshape(2), self.low, self.high)
        self.last_action = self._pending

    def history(self) -> dict[str, torch.Tensor]:
        """The rollout's history: up to `history` frames `frameskip` steps apart, ending now."""
        pc = self.predictor.cfg
        fs = pc.frameskip
        now = len(self.frames) - 1
        idx = list(range(now, -1, -fs))[:pc.history][::-1]
        out = {key: torch.stack([self.frames[i][j] for i in idx])[None].to(self.device)
               for j, key in enumerate(("features", "cam_pose", "proprio"))}
        led_in = [[self.frames[j][3] for j in range(i + 1, i + fs + 1)] for i in idx[:-1]]
        if led_in and all(a is not None for group in led_in for a in group):
            out["past_actions"] = torch.from_numpy(np.array(led_in, np.float32))[None].to(self.device)
        return out

    def plan_steps(self, planned_actions: np.ndarray | None) -> np.ndarray:
        """(horizon x frameskip, 2) env-step commands to forecast: the plan cut or extended by its last
        action, or the last executed action held when there is no plan; clipped to the action bounds."""
        steps = self.horizon * self.predictor.cfg.frameskip
        plan = np.zeros((0, 2), np.float32) if planned_actions is None else \
            np.asarray(planned_actions, np.float32).reshape(-1, 2)
        if len(plan) == 0:
            plan = self.last_action.reshape(1, 2)
        plan = np.concatenate([plan[:steps], np.repeat(plan[-1:], max(0, steps - len(plan)), 0)])
        return np.clip(plan, self.low, self.high)

    @torch.no_grad()
    def update(self, obs: dict[str, np.ndarray], planned_actions: np.ndarray | None) -> OverlayFrame:
        """points (K', 3) and labels as `SlotOverlay` (unless points=false); trajectories: per shown slot,
        its predicted world positions (horizon, 3) over the planned actions, at the slot's height."""
        features, centres, keep = self._encode(obs)
        proprio = obs.get("proprio")
        proprio = torch.zeros(4) if proprio is None else torch.as_tensor(np.asarray(proprio, np.float32))
        cam_pose = torch.as_tensor(np.asarray(obs["cam_pose"], np.float32))
        self.frames.append((features.cpu(), cam_pose, proprio, self._pending))
        self._pending = None
        pc = self.predictor.cfg
        del self.frames[:max(0, len(self.frames) - ((pc.history - 1) * pc.frameskip + 1))]
        hist = self.history()
        actions = torch.from_numpy(self.plan_steps(planned_actions))[None, None].to(self.device)  # (1, 1, L, 2)
        rollout = self.predictor.rollout(hist["features"], actions, cam_pose=hist["cam_pose"],
                                         proprio=hist["proprio"], past_actions=hist.get("past_actions"))
        self.last_rollout = rollout
        positions = rollout.positions[0, 0].float().cpu().numpy()  # (H, K, 2)
        tracks = [np.column_stack([positions[:, k], np.full(len(positions), centres[k, 2])]) for k in keep]
        tracks = [t for t in tracks if np.isfinite(t).all()]
        shown = keep if self.points else []
        return OverlayFrame(points=centres[shown].reshape(-1, 3), labels=[f"s{k}" for k in shown],
                            trajectories=tracks)
