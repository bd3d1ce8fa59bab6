"""Training losses of the object-centric encoder.

- Reconstruction: MSE between the slot-mixture reconstruction and the normalised RGB-D input
  (depth weighted by `depth_weight`). This alone is SAVi's unsupervised objective.
- Mask supervision (weight `mask_weight`, 0 = unsupervised): the simulator's per-pixel object ids
  are free in training data, so the alpha masks may be told which pixels belong together. Each
  object is matched to one slot for the WHOLE clip (Hungarian, on the clip's summed
  log-likelihood), which also teaches a slot to keep its object over time; its pixels are then a
  cross-entropy target for that slot, and every non-object pixel a target for "any unmatched slot",
  so background may split over the free slots however reconstruction prefers. Segmentation is a
  training signal only: the encoder never sees it as input.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from worldmodel.encoder import EncoderOutput
from worldmodel.metrics import FIRST_OBJECT_ID


def reconstruction_loss(out: EncoderOutput, depth_weight: float = 1.0) -> Tensor:
    target = out.extras["target"]
    err = (out.recon - target) ** 2  # (B, T, 4, H, W)
    return err[:, :, :3].mean() * 3 / (3 + depth_weight) + err[:, :, 3].mean() * depth_weight / (3 + depth_weight)


def match_objects_to_slots(log_masks: Tensor, onehot: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per clip, the slot of each present object maximising its mean log-likelihood over the clip.

    log_masks (B, T, K, H, W), onehot (B, T, O, H, W) -> per clip (object indices, slot indices)."""
    with torch.no_grad():
        count = onehot.sum((1, 3, 4))  # (B, O)
        score = torch.einsum("btohw,btkhw->bok", onehot, log_masks) / count.clamp(min=1).unsqueeze(-1)
    out = []
    for b in range(score.shape[0]):
        present = torch.nonzero(count[b] > 0).flatten().cpu().numpy()
        if present.size == 0:
            out.append((present, present))
            continue
        rows, cols = linear_sum_assignment(-score[b, present].cpu().numpy())
        out.append((present[rows], cols))
    return out


def mask_supervision_loss(out: EncoderOutput, segmentation: Tensor) -> Tensor:
    """Cross-entropy of the alpha masks against clip-consistently matched object ids.
    segmentation (B, T, H, W) integer ids."""
    masks = out.masks
    b, t, k, h, w = masks.shape
    log_masks = torch.log(masks.clamp(min=1e-6))
    seg = segmentation.long()
    n_obj = int(seg.max().item()) - FIRST_OBJECT_ID + 1
    if n_obj <= 0:
        return masks.sum() * 0.0
    ids = torch.arange(n_obj, device=seg.device) + FIRST_OBJECT_ID
    onehot = (seg.unsqueeze(2) == ids.view(1, 1, -1, 1, 1)).float()  # (B, T, O, H, W)
    matches = match_objects_to_slots(log_masks, onehot)
    # per-pixel target slot for object pixels; a "matched" flag per slot for the background term
    target = torch.full((b, t, h, w), -1, dtype=torch.long, device=seg.device)
    matched = torch.zeros(b, k, dtype=torch.bool, device=seg.device)
    for i, (objs, slots) in enumerate(matches):
        for o, s in zip(objs, slots):
            target[i][seg[i] == FIRST_OBJECT_ID + int(o)] = int(s)
            matched[i, int(s)] = True
    fg = target >= 0
    losses = []
    if fg.any():
        picked = log_masks.permute(0, 1, 3, 4, 2)[fg]  # (P, K)
        losses.append(-picked.gather(1, target[fg].unsqueeze(1)).mean())
    bg = (~fg) & (~matched.all(1)).view(b, 1, 1, 1)
    if bg.any():
        free = masks * (~matched).view(b, 1, k, 1, 1)
        p_free = free.sum(2)  # (B, T, H, W)
        losses.append(-torch.log(p_free[bg].clamp(min=1e-6)).mean())
    return sum(losses) / max(len(losses), 1) if losses else masks.sum() * 0.0


def encoder_loss(out: EncoderOutput, batch: dict[str, Tensor], depth_weight: float = 1.0,
                 mask_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging)."""
    rec = reconstruction_loss(out, depth_weight)
    parts = {"recon": float(rec.detach())}
    loss = rec
    if mask_weight > 0:
        if "segmentation" not in batch:
            raise ValueError("mask_weight > 0 needs datasets recorded with `ego-collect segmentation=true`")
        sup = mask_supervision_loss(out, batch["segmentation"])
        parts["mask_ce"] = float(sup.detach())
        loss = loss + mask_weight * sup
    parts["loss"] = float(loss.detach())
    return loss, parts
