"""Clips of consecutive frames from `ego-collect` episode datasets, held in memory, as torch batches.

The world model trains on short clips (T frames of one episode). Datasets of different tasks can
be mixed: object arrays are padded to the largest object count with NaN poses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sim.dataset import EpisodeDataset

FRAME_KEYS = ("rgb", "depth", "intrinsics", "cam_pose")
OPTIONAL_KEYS = ("segmentation", "object_poses", "goal", "visible", "action", "executed_action", "proprio", "robot_pose")


@dataclass
class Clips:
    """Every step of some episodes, concatenated: key -> (S, ...), plus where each episode starts/ends."""

    arrays: dict[str, np.ndarray]
    starts: np.ndarray  # int64 (E,)
    ends: np.ndarray  # int64 (E,)
    image_size: tuple[int, int]

    @classmethod
    def load(cls, paths: Sequence[str | Path], need: Sequence[str] = FRAME_KEYS,
             episodes: slice | None = None) -> Clips:
        """Read datasets into memory. `need` lists keys every dataset must have."""
        if not paths:
            raise ValueError("no datasets given")
        parts: dict[str, list[np.ndarray]] = {}
        starts, ends, offset, size = [], [], 0, None
        n_obj = n_goal = 0
        sets = []
        for p in paths:
            ds = EpisodeDataset.open(p)
            missing = [k for k in need if k not in ds.keys]
            if missing:
                raise ValueError(f"{p}: dataset lacks {missing} (has {list(ds.keys)}); "
                                 "collect it with `ego-collect segmentation=true` for world-model training")
            if ds.n_episodes == 0:
                raise ValueError(f"{p}: dataset has no episodes")
            hw = tuple(ds.schema["rgb"][1][:2])
            if size is not None and hw != size:
                raise ValueError(f"{p}: images are {hw}, other datasets {size}; mix datasets of one image size")
            size = hw
            if "object_poses" in ds.keys:
                n_obj = max(n_obj, ds.schema["object_poses"][1][0])
            if "goal" in ds.keys:
                n_goal = max(n_goal, ds.schema["goal"][1][0])
            sets.append(ds)
        keys = [k for k in (*FRAME_KEYS, *OPTIONAL_KEYS) if all(k in ds.keys for ds in sets)]
        for ds in sets:
            idx = range(ds.n_episodes)[episodes] if episodes is not None else range(ds.n_episodes)
            for e in idx:
                ep = ds.episode(e, keys)
                length = len(ep["rgb"])
                starts.append(offset)
                ends.append(offset + length)
                offset += length
                for k in keys:
                    a = ep[k]
                    if k == "depth":
                        a = a.astype(np.float16)  # 2 mm at 4 m, half the memory
                    n = n_goal if k == "goal" else n_obj
                    if k in ("object_poses", "visible", "goal") and a.shape[1] < n:
                        fill = np.full((length, n - a.shape[1], *a.shape[2:]), False if k == "visible" else np.nan,
                                       a.dtype)
                        a = np.concatenate([a, fill], 1)
                    parts.setdefault(k, []).append(a)
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        return cls(arrays, np.asarray(starts), np.asarray(ends), size)

    @property
    def n_steps(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def clip_starts(self, length: int, stride: int = 1) -> np.ndarray:
        """Global indices where a clip of `length` frames, `stride` steps apart, fits in one episode."""
        span = (length - 1) * stride
        out = [np.arange(s, e - span) for s, e in zip(self.starts, self.ends) if e - s > span]
        if not out:
            raise ValueError(f"no episode is long enough for clips of {length} frames at stride {stride}")
        return np.concatenate(out)

    def batch(self, starts: np.ndarray, length: int, stride: int = 1, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """Clips starting at `starts` (B,) -> key -> (B, T, ...) tensors."""
        idx = starts[:, None] + np.arange(length)[None] * stride
        out = {}
        for k, a in self.arrays.items():
            v = torch.from_numpy(np.ascontiguousarray(a[idx]))
            if k == "depth":
                v = v.float()
            out[k] = v.to(device)
        return out

    def rgbd_stats(self, max_frames: int = 2000, seed: int = 0) -> dict[str, list[float]]:
        """Per-channel mean/std of the network input (RGB in [0, 1], depth / 4 m), for stats.json."""
        from worldmodel.encoder import DEPTH_SCALE_M

        rng = np.random.default_rng(seed)
        pick = rng.choice(self.n_steps, size=min(max_frames, self.n_steps), replace=False)
        rgb = self.arrays["rgb"][pick].astype(np.float32) / 255.0
        depth = self.arrays["depth"][pick].astype(np.float32) / DEPTH_SCALE_M
        x = np.concatenate([rgb.reshape(-1, 3), depth.reshape(-1, 1)], 1)
        return {"rgbd_mean": x.mean(0).tolist(), "rgbd_std": np.maximum(x.std(0), 1e-3).tolist()}
