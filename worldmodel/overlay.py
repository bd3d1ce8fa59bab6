"""World-model overlays for `ego-view` (the torch side of `sim.overlays.OverlayProvider`).

`SlotOverlay` streams the robot's RGB-D frames through a trained `ObjectCentricEncoder` and
reports where its slots put the objects: each slot's world-frame centre estimate (`geometry[..., :3]`),
for the slots that win enough pixels with valid depth. The viewer draws them as cyan balls,
labelled with the slot index, so that a slot keeping its object keeps its label.

Predicted object trajectories need the C-JEPA predictor, which does not exist yet. The
provider interface already carries them (`OverlayFrame.trajectories`, one (H, 3) array per
object, conditioned on the controller's planned actions, which `update` receives): a predictor
overlay fills them once a predictor checkpoint exists, and the viewer draws them. This one
reports none.

    ego-view overlays.slots.checkpoint=runs/wm_encoder         # the default entry in view.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

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

    def update(self, obs: dict[str, np.ndarray], planned_actions: np.ndarray | None) -> OverlayFrame:
        """points (K', 3): world centres of the slots that hold something; labels: their slot indices."""
        rgb, depth, intrinsics, cam_pose = self._batch(obs)
        out, self.state = self.encoder.step(rgb, depth, intrinsics, cam_pose, self.state)
        centres = out.geometry[0, 0, :, :3].cpu().numpy()  # (K, 3)
        masks = out.masks[0, 0]  # (K, H, W)
        won = torch.nn.functional.one_hot(masks.argmax(0), masks.shape[0]).permute(2, 0, 1)
        pixels = (won * (depth[0] > 0)).sum((1, 2)).cpu().numpy()
        keep = [k for k in range(len(centres))
                if pixels[k] >= self.min_pixels and self.min_height <= centres[k, 2] <= self.max_height]
        return OverlayFrame(points=centres[keep], labels=[f"s{k}" for k in keep])
