"""Measure an object-centric encoder on held-out episodes: FG-ARI, a linear position probe, slot identity
over moving-camera clips, and streaming latency (dense vs block-sparse attention).

Used by `benchmarks/wm_encoder.py`; the held-out episodes use seeds far from any training seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldmodel.data import Clips
from worldmodel.encoder import ObjectCentricEncoder
from worldmodel.metrics import (
    FIRST_OBJECT_ID,
    adjusted_rand_index,
    apply_linear_probe,
    fg_ari,
    fit_linear_probe_cv,
    identity_consistency,
    identity_losses,
    match_objects,
)

EVAL_SEED = 100_000  # training data uses seeds from 0
# episodes on which the position probe is fitted: neither training data nor the held-out episodes it is tested on
PROBE_FIT_SEED = 200_000


@dataclass
class EvalSource:
    task: str
    level: str
    policy: str
    episodes: int
    max_steps: int


def default_eval_sources(quick: bool = False, scale: int = 1) -> list[EvalSource]:
    """Random exploration (a camera that turns and drives) and noisy-expert pushing, both tasks;
    `scale` times as many episodes of each."""
    if quick:
        return [EvalSource("formation", "hard", "random", 2 * scale, 40)]
    return [
        EvalSource("formation", "hard", "random", 12 * scale, 100),
        EvalSource("formation", "hard", "noisy_expert", 6 * scale, 100),
        EvalSource("single", "hard", "random", 6 * scale, 100),
    ]


def collect_eval_data(root: str | Path, sources: list[EvalSource], image_size: int = 64,
                      progress: bool = False, seed: int = EVAL_SEED) -> list[str]:
    """Collect (once: an existing dataset is reused) each source's episodes from `seed` with
    segmentation; returns the dataset paths."""
    from sim.collect import collect

    tag = "eval" if seed == EVAL_SEED else f"seed{seed}_"
    paths = []
    for s in sources:
        path = str(Path(root) / f"{s.task}_{s.level}_{s.policy}_{image_size}px_{tag}{s.episodes}x{s.max_steps}.zarr")
        collect(out=path, task=s.task, level=s.level, policy=s.policy, episodes=s.episodes, seed=seed,
                max_steps=s.max_steps, image_size=image_size, segmentation=True, workers=2, progress=progress)
        paths.append(path)
    return paths


@torch.no_grad()
def encode_clips(model: ObjectCentricEncoder, clips: Clips, clip_len: int, batch_size: int = 8,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Non-overlapping clips of `clip_len` frames from every episode, encoded; per clip: masks
    (T, K, H, W), features (T, K, F), segmentation (T, H, W), object_poses (T, O, 3), episode."""
    starts, episodes = [], []
    for e, (s, t) in enumerate(zip(clips.starts, clips.ends)):
        for c in range(s, t - clip_len + 1, clip_len):
            starts.append(c)
            episodes.append(e)
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(starts), batch_size):
        idx = np.asarray(starts[i:i + batch_size])
        b = clips.batch(idx, clip_len)
        enc = model(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
        for j in range(len(idx)):
            out.append({"masks": enc.masks[j].numpy(), "features": enc.features[j].numpy(),
                        "segmentation": b["segmentation"][j].numpy(), "object_poses": b["object_poses"][j].numpy(),
                        "episode": episodes[i + j]})
    return out


def matched_samples(encoded: list[dict[str, Any]], min_pixels: int = 20,
                    matches: list[list[dict[int, int]]] | None = None) -> dict[str, np.ndarray]:
    """The position probe's samples: for every frame and every object Hungarian-matched to a slot (IoU
    of the slot's argmax region with the object's pixels), that slot's feature vector (`x`), the
    object's planar position (`y`) and the clip's episode (`group`). `matches`: per clip, per frame,
    the matches already made (`match_objects`)."""
    feats, targets, groups = [], [], []
    for c, clip in enumerate(encoded):
        n_obj = clip["object_poses"].shape[1]
        for t in range(len(clip["masks"])):
            m = matches[c][t] if matches is not None else match_objects(clip["masks"][t], clip["segmentation"][t],
                                                                         n_obj, min_pixels)
            for o, s in m.items():
                pose = clip["object_poses"][t, o]
                if np.isfinite(pose).all():
                    feats.append(clip["features"][t, s])
                    targets.append(pose[:2])
                    groups.append(clip["episode"])
    f = encoded[0]["features"].shape[-1] if encoded else 0
    return {"x": np.asarray(feats, np.float64).reshape(-1, f), "y": np.asarray(targets, np.float64).reshape(-1, 2),
            "group": np.asarray(groups, np.int64)}


def probe_metrics(test: dict[str, np.ndarray], fit: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Linear position probes from matched slot features (`matched_samples`) to object positions.

    With `fit` (samples of episodes of their own), the probe is fitted there (Huber, ridge chosen by
    cross-validation over its episodes) and tested on every sample of `test`: `probe_median_err_m`.
    Without, or in addition (`half_probe_median_err_m`), the older protocol: fitted on the even
    episodes of `test`, tested on the odd ones (few fitting samples for 100+ features: variance).
    `probe_geometry_*`: the same on the slot's geometric part alone (its last 5 features);
    `center_median_err_m`: the slot's own centre estimate (geometry[:2]), no probe."""
    x, y, g = test["x"], test["y"], test["group"]
    if not len(x):
        return {}

    def probe(fx, fy, fg, tx, ty, prefix: str) -> dict[str, Any]:
        """Fitted on (fx, fy; episodes fg), scored on (tx, ty): on every feature and on the geometric part."""
        w, ridge = fit_linear_probe_cv(fx, fy, fg)
        err = np.linalg.norm(apply_linear_probe(w, tx) - ty, axis=1)
        w_geo, _ = fit_linear_probe_cv(fx[:, -5:], fy, fg)
        geo = np.linalg.norm(apply_linear_probe(w_geo, tx[:, -5:]) - ty, axis=1)
        return {f"{prefix}probe_median_err_m": float(np.median(err)), f"{prefix}probe_mean_err_m": float(err.mean()),
                f"{prefix}probe_ridge": ridge, f"{prefix}probe_train_samples": len(fx),
                f"{prefix}probe_test_samples": len(tx), f"{prefix}probe_geometry_median_err_m": float(np.median(geo))}

    out: dict[str, Any] = {"center_median_err_m": float(np.median(np.linalg.norm(x[:, -5:-3] - y, axis=1)))}
    half = g % 2 == 0
    if half.any() and (~half).any():
        out |= probe(x[half], y[half], g[half], x[~half], y[~half], "half_")
    if fit is not None and len(fit["x"]):
        out |= probe(fit["x"], fit["y"], fit["group"], x, y, "")
    elif "half_probe_median_err_m" in out:
        out |= {k[len("half_"):]: v for k, v in out.items() if k.startswith("half_")}
    return out


def slot_metrics(encoded: list[dict[str, Any]], min_pixels: int = 20,
                 probe_fit: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """fg_ari, slot_identity_consistency and the position probes (`probe_metrics`) from encoded clips;
    `probe_fit`: encoded clips of other episodes to fit the probe on."""
    aris, multi, purity, video, same, total = [], [], [], [], 0, 0
    clip_matches, lost = [], {"off": 0, "small": 0, "start": 0}
    for clip in encoded:
        n_obj = clip["object_poses"].shape[1]
        seg_clip = clip["segmentation"]
        if (seg_clip >= FIRST_OBJECT_ID).any():  # SAVi's video FG-ARI: one labelling of the whole clip
            fg_clip = seg_clip >= FIRST_OBJECT_ID
            video.append(adjusted_rand_index(seg_clip[fg_clip], clip["masks"].argmax(1)[fg_clip]))
        matches, pixels = [], []
        for t in range(len(clip["masks"])):
            seg = clip["segmentation"][t]
            ids, counts = np.unique(seg[seg >= FIRST_OBJECT_ID], return_counts=True)
            pixels.append({int(i) - FIRST_OBJECT_ID: int(c) for i, c in zip(ids, counts)})
            a = fg_ari(clip["masks"][t], seg)
            if a is not None:
                aris.append(a)
                if len(ids) > 1:
                    multi.append(a)
                won = clip["masks"][t].argmax(0)
                purity += [np.bincount(won[seg == o]).max() / c for o, c in zip(ids, counts)]
            matches.append(match_objects(clip["masks"][t], seg, n_obj, min_pixels))
        clip_matches.append(matches)
        s_, t_ = identity_consistency(matches)
        same, total = same + s_, total + t_
        clip_lost = identity_losses(matches, pixels)
        lost = {k: v + clip_lost[k] for k, v in lost.items()}
    result: dict[str, Any] = {
        "fg_ari": float(np.mean(aris)) if aris else None,
        "fg_ari_frames": len(aris),
        # ARI is 0 for a one-object frame whenever any pixel of it is split off; these two say more
        "fg_ari_multi_object": float(np.mean(multi)) if multi else None,
        # over each whole clip at once: also counts an object that changes slot as an error
        "fg_ari_video": float(np.mean(video)) if video else None,
        "object_purity": float(np.mean(purity)) if purity else None,
        "slot_identity_consistency": same / total if total else None,
        "identity_object_steps": total,
        # of the steps off an object's most frequent slot: the share on objects under 60 pixels, and the
        # share before the object first sits in that slot (the clip's cold start)
        "identity_lost_small_share": lost["small"] / lost["off"] if lost["off"] else None,
        "identity_lost_clip_start_share": lost["start"] / lost["off"] if lost["off"] else None,
    }
    fit = matched_samples(probe_fit, min_pixels) if probe_fit else None
    return result | probe_metrics(matched_samples(encoded, min_pixels, clip_matches), fit)


@torch.no_grad()
def stream_latency(model: ObjectCentricEncoder, clips: Clips, frames: int = 30, repeats: int = 3) -> dict[str, Any]:
    """Per-frame latency of `ObjectCentricEncoder.step` at batch 1 (a robot's stream), dense and
    block-sparse interleaved in one process; medians in ms and their ratio."""
    b = clips.batch(np.asarray([int(clips.starts[0])]), min(frames, int(clips.ends[0] - clips.starts[0])))
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(repeats):
        for mode in ("dense", "sparse"):
            model.set_sparse(mode == "sparse")
            state = None
            for t in range(b["rgb"].shape[1]):
                t0 = time.perf_counter()
                _, state = model.step(b["rgb"][:, t], b["depth"][:, t], b["intrinsics"][:, t], b["cam_pose"][:, t],
                                      state)
                if t > 0:  # the first frame of a stream builds its window
                    times[mode].append((time.perf_counter() - t0) * 1000)
    model.set_sparse(model.cfg.sparse)
    dense, sparse = float(np.median(times["dense"])), float(np.median(times["sparse"]))
    return {"dense_ms": dense, "sparse_ms": sparse, "sparse_over_dense": sparse / dense,
            "frames_timed": len(times["dense"]), "threads": torch.get_num_threads()}


PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
                   np.uint8)


@torch.no_grad()
def slot_figure(model: ObjectCentricEncoder, clips: Clips, path: str | Path, start: int | None = None,
                frames: int = 6, stride: int = 3) -> Path:
    """A PNG of one held-out clip: RGB | depth | true objects | slot masks | reconstruction, one row
    per frame. Slot colours are per slot, so a slot that keeps its object keeps its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sim.dataset import colorize_depth

    length = (frames - 1) * stride + 1
    if start is None:  # a clip that shows several objects
        seg = clips.arrays["segmentation"]
        counts = [len(np.unique(seg[s][seg[s] >= FIRST_OBJECT_ID])) for s in clips.clip_starts(length)]
        start = int(clips.clip_starts(length)[int(np.argmax(counts))])
    b = clips.batch(np.array([start]), length)
    torch.manual_seed(0)
    out = model(b["rgb"], b["depth"], b["intrinsics"], b["cam_pose"])
    recon = (out.recon[0, :, :3] * model.in_std[:3] + model.in_mean[:3]).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(frames, 5, figsize=(7.5, 1.6 * frames))
    titles = ["RGB", "depth", "objects (sim)", "slot masks", "reconstruction"]
    for r, t in enumerate(range(0, length, stride)):
        seg = b["segmentation"][0, t].numpy()
        obj = seg.astype(int) - FIRST_OBJECT_ID
        true = np.where(obj[..., None] >= 0, PALETTE[obj % len(PALETTE)], 40).astype(np.uint8)
        slots = PALETTE[out.masks[0, t].argmax(0).numpy() % len(PALETTE)]
        images = [b["rgb"][0, t].numpy(), colorize_depth(b["depth"][0, t].numpy()), true, slots, recon[t]]
        for c, img in enumerate(images):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        axes[r, 0].set_ylabel(f"t={t}", fontsize=8)
    fig.suptitle(f"held-out clip, rope={model.cfg.rope}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
