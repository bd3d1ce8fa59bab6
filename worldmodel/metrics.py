"""Object-discovery metrics of slot masks against the simulator's segmentation (numpy, no torch).

Segmentation ids: 0 floor/sky, 1 walls, 2 robot, 3 + i object i (`FIRST_OBJECT_ID`). The foreground
is the objects' pixels.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from sim.env import FIRST_OBJECT_SEG_ID as FIRST_OBJECT_ID


def adjusted_rand_index(true: np.ndarray, pred: np.ndarray) -> float:
    """ARI (Hubert & Arabie) of two labelings of the same items (any integer labels).
    1 = identical partitions; about 0 = chance. Both single-cluster: 1 by convention."""
    true, pred = np.asarray(true).ravel(), np.asarray(pred).ravel()
    if true.size != pred.size:
        raise ValueError(f"labelings differ in size: {true.size} vs {pred.size}")
    n = true.size
    if n < 2:
        return 1.0
    _, t = np.unique(true, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    table = np.zeros((t.max() + 1, p.max() + 1), np.int64)
    np.add.at(table, (t, p), 1)
    comb = lambda x: x * (x - 1) / 2.0
    index = comb(table).sum()
    rows, cols = comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
    expected = rows * cols / comb(n)
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def fg_ari(masks: np.ndarray, segmentation: np.ndarray) -> float | None:
    """Foreground ARI of one frame: masks (K, H, W) alphas (argmax = a pixel's slot), segmentation (H, W).
    None when the frame shows no object."""
    fg = segmentation >= FIRST_OBJECT_ID
    if not fg.any():
        return None
    return adjusted_rand_index(segmentation[fg], masks.argmax(0)[fg])


def match_objects(masks: np.ndarray, segmentation: np.ndarray, n_objects: int, min_pixels: int = 20) -> dict[int, int]:
    """Object index -> slot, by Hungarian matching on IoU between each object's pixels and each slot's
    argmax region; only objects with at least `min_pixels` visible pixels take part."""
    assign = masks.argmax(0)
    k = masks.shape[0]
    objs = [o for o in range(n_objects) if (segmentation == FIRST_OBJECT_ID + o).sum() >= min_pixels]
    if not objs:
        return {}
    iou = np.zeros((len(objs), k))
    for i, o in enumerate(objs):
        obj = segmentation == FIRST_OBJECT_ID + o
        for s in range(k):
            region = assign == s
            union = (obj | region).sum()
            iou[i, s] = (obj & region).sum() / union if union else 0.0
    rows, cols = linear_sum_assignment(-iou)
    return {objs[r]: int(c) for r, c in zip(rows, cols)}


def _slots_per_object(matches: list[dict[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """Per-frame matches (object -> slot) regrouped per object: [(frame, slot), ...] in frame order."""
    per_obj: dict[int, list[tuple[int, int]]] = {}
    for t, m in enumerate(matches):
        for o, s in m.items():
            per_obj.setdefault(o, []).append((t, s))
    return per_obj


def identity_consistency(matches: list[dict[int, int]]) -> tuple[int, int]:
    """Over one clip's per-frame matches: (steps on which each object sits in its most frequent slot,
    steps on which it was matched at all), summed over objects."""
    same = total = 0
    for steps in _slots_per_object(matches).values():
        same += np.bincount([s for _, s in steps]).max()
        total += len(steps)
    return int(same), int(total)


def identity_losses(matches: list[dict[int, int]], pixels: list[dict[int, int]], small_px: int = 60) -> dict[str, int]:
    """Where one clip's identity is lost: the object steps off the object's most frequent slot
    (`identity_consistency`'s complement), how many of them show the object with fewer than
    `small_px` pixels, and how many come before the object first sits in its most frequent slot
    (the clip's cold start: slots begin from noise on its first frame, and the object is handed on
    once). matches: per frame, object -> slot; pixels: per frame, object -> its visible pixels."""
    off = small = start = 0
    for o, steps in _slots_per_object(matches).items():
        major = np.bincount([s for _, s in steps]).argmax()
        settled = False
        for t, s in steps:
            settled = settled or s == major
            if s != major:
                off += 1
                small += pixels[t].get(o, 0) < small_px
                start += not settled
    return {"off": off, "small": small, "start": start}


def fit_linear_probe(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, huber_m: float | None = None,
                     iters: int = 20) -> np.ndarray:
    """Ridge regression weights W (D + 1, C) with a bias row: y ~ [x, 1] @ W. Features are standardised
    inside (the returned W works on raw x). With `huber_m`, a Huber fit (iteratively reweighted least
    squares, residual norms beyond `huber_m` count linearly), so that a few samples whose slot holds
    another object do not tilt the map for all others."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], 1)
    weight = np.ones(len(x))
    for _ in range(iters if huber_m else 1):
        a = xs.T @ (xs * weight[:, None]) + ridge * weight.sum() * np.eye(xs.shape[1])
        w = np.linalg.solve(a, xs.T @ (y * weight[:, None]))
        if huber_m:
            residual = np.linalg.norm(xs @ w - y, axis=1)
            weight = np.minimum(1.0, huber_m / np.maximum(residual, 1e-12))
    # fold the standardisation into the weights
    w_raw = w[:-1] / sd[:, None]
    b = w[-1] - (mu / sd) @ w[:-1]
    return np.concatenate([w_raw, b[None]], 0)


def fit_linear_probe_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                        ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0), huber_m: float | None = 0.05,
                        folds: int = 4) -> tuple[np.ndarray, float]:
    """`fit_linear_probe` with its ridge chosen by cross-validation over `groups` (episodes: no
    episode is in both the fitting and the scoring part of a fold), scored by the median error.
    Returns (W fitted on all of x, the chosen ridge)."""
    ids = np.unique(groups)
    fold_of = {g: i % folds for i, g in enumerate(ids)}
    fold = np.array([fold_of[g] for g in groups])
    best, best_err = ridges[0], np.inf
    for r in ridges:
        errs = []
        for f in range(min(folds, len(ids))):
            fit, score = fold != f, fold == f
            if fit.any() and score.any():
                w = fit_linear_probe(x[fit], y[fit], r, huber_m)
                errs.append(np.linalg.norm(apply_linear_probe(w, x[score]) - y[score], axis=1))
        err = float(np.median(np.concatenate(errs))) if errs else np.inf
        if err < best_err:
            best, best_err = r, err
    return fit_linear_probe(x, y, best, huber_m), best


def apply_linear_probe(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x @ w[:-1] + w[-1]
