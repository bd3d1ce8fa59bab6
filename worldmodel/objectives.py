"""Training losses of the object-centric encoder.

- Reconstruction: MSE between the slot-mixture reconstruction and the normalised RGB-D input
  (depth weighted by `depth_weight`). This alone is SAVi's unsupervised objective.
- Mask supervision (weight `mask_weight`, 0 = unsupervised): the simulator's per-pixel object ids
  are free in training data, so the alpha masks may be told which pixels belong together. Each
  object is matched to one slot for the WHOLE clip (Hungarian, on the clip's summed
  log-likelihood), which also teaches a slot to keep its object over time; its pixels are then a
  cross-entropy target for that slot, and every non-object pixel a target for "any unmatched slot",
  so background may split over the free slots however reconstruction prefers. Pixels on an edge
  between two ids weigh `boundary_weight` times more: they are few, but one of them in the wrong
  slot splits an object.
- Centre supervision (weight `center_weight`): the matched slot's centre estimate
  (`EncoderOutput.geometry[..., :2]`) against the object's true planar position, Huber in units of
  `CENTER_HUBER_M`, on frames where the object shows at least `MIN_CENTER_PIXELS` pixels; goal
  markers (segmentation ids from `GOAL_SEG_ID`) against the goal positions when the batch has them.
Segmentation and object poses are training signals only: the encoder never sees them as input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sim.env import GOAL_SEG_ID
from worldmodel.encoder import EncoderOutput
from worldmodel.metrics import FIRST_OBJECT_ID

MIN_CENTER_PIXELS = 20
MIN_GOAL_CENTER_PIXELS = 4  # a goal disc is small and flat: its visible centroid is good from a few pixels
MIN_BALANCE_PIXELS = 16  # object_balance: fewer pixels than this weigh as this many
CENTER_HUBER_M = 0.05

Matches = list[tuple[np.ndarray, np.ndarray]]


def reconstruction_loss(out: EncoderOutput, depth_weight: float = 1.0) -> Tensor:
    target = out.extras["target"]
    err = (out.recon - target) ** 2  # (B, T, 4, H, W)
    return err[:, :, :3].mean() * 3 / (3 + depth_weight) + err[:, :, 3].mean() * depth_weight / (3 + depth_weight)


def object_onehot(segmentation: Tensor) -> Tensor:
    """(B, T, H, W) ids -> (B, T, O, H, W) float one-hot of objects 0..O-1 (O from the largest id)."""
    seg = segmentation.long()
    n_obj = max(int(seg.max().item()) - FIRST_OBJECT_ID + 1, 0)
    ids = torch.arange(n_obj, device=seg.device) + FIRST_OBJECT_ID
    return (seg.unsqueeze(2) == ids.view(1, 1, -1, 1, 1)).float()


def match_objects_to_slots(log_masks: Tensor, onehot: Tensor) -> Matches:
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


def edge_pixels(segmentation: Tensor) -> Tensor:
    """(B, T, H, W) ids -> bool (B, T, H, W): pixels with a 4-neighbour of another id."""
    seg = segmentation.long()
    padded = F.pad(seg.flatten(0, 1).unsqueeze(1).float(), (1, 1, 1, 1), mode="replicate").squeeze(1).long()
    centre = padded[:, 1:-1, 1:-1]
    edge = ((padded[:, :-2, 1:-1] != centre) | (padded[:, 2:, 1:-1] != centre)
            | (padded[:, 1:-1, :-2] != centre) | (padded[:, 1:-1, 2:] != centre))
    return edge.view_as(seg)


def mask_supervision_loss(out: EncoderOutput, segmentation: Tensor, boundary_weight: float = 1.0,
                          matches: Matches | None = None, object_balance: bool = False,
                          onehot: Tensor | None = None) -> Tensor:
    """Cross-entropy of the alpha masks against clip-consistently matched object ids.
    segmentation (B, T, H, W) integer ids; `onehot` its `object_onehot`, if already at hand."""
    masks = out.masks
    b, t, k, h, w = masks.shape
    log_masks = torch.log(masks.clamp(min=1e-6))
    seg = segmentation.long()
    if not (seg >= FIRST_OBJECT_ID).any():
        return masks.sum() * 0.0
    if onehot is None and (matches is None or object_balance):
        onehot = object_onehot(seg)  # (B, T, O, H, W)
    if matches is None:
        matches = match_objects_to_slots(log_masks, onehot)
    # per-pixel target slot for object pixels; a "matched" flag per slot for the background term
    target = torch.full((b, t, h, w), -1, dtype=torch.long, device=seg.device)
    matched = torch.zeros(b, k, dtype=torch.bool, device=seg.device)
    for i, (objs, slots) in enumerate(matches):
        for o, s in zip(objs, slots):
            target[i][seg[i] == FIRST_OBJECT_ID + int(o)] = int(s)
            matched[i, int(s)] = True
    weight = 1.0 + (boundary_weight - 1.0) * edge_pixels(seg).float()
    if object_balance:  # each object of each frame weighs as one (mean) object, whatever its size
        count = onehot.sum((-1, -2))  # (B, T, O)
        mean_count = count.sum() / (count > 0).sum().clamp(min=1)
        scale = mean_count / count.clamp(min=MIN_BALANCE_PIXELS)
        weight = weight * ((onehot * scale[..., None, None]).sum(2) + (onehot.sum(2) == 0).float())
    fg = target >= 0
    losses = []
    if fg.any():
        picked = log_masks.permute(0, 1, 3, 4, 2)[fg]  # (P, K)
        nll = -picked.gather(1, target[fg].unsqueeze(1)).squeeze(1)
        losses.append((nll * weight[fg]).sum() / weight[fg].sum())
    bg = (~fg) & (~matched.all(1)).view(b, 1, 1, 1)
    if bg.any():
        free = masks * (~matched).view(b, 1, k, 1, 1)
        nll = -torch.log(free.sum(2)[bg].clamp(min=1e-6))
        losses.append((nll * weight[bg]).sum() / weight[bg].sum())
    return sum(losses) / max(len(losses), 1) if losses else masks.sum() * 0.0


def center_loss(out: EncoderOutput, segmentation: Tensor, object_poses: Tensor, matches: Matches,
                goals: Tensor | None = None, onehot: Tensor | None = None) -> Tensor:
    """Huber (metres) between matched slots' planar centre estimates and the objects' true positions.
    object_poses (B, T, O, 3) x, y, yaw (NaN where an episode has fewer objects); goals (B, T, G, 2)
    the goal markers' positions (NaN where fewer), or None to leave goal markers out; `onehot` the
    segmentation's `object_onehot`, if already at hand."""
    counts = (object_onehot(segmentation) if onehot is None else onehot).sum((-1, -2))  # (B, T, O)
    first_goal = GOAL_SEG_ID - FIRST_OBJECT_ID  # object index of goal marker 0
    pred, true = [], []
    for i, (objs, slots) in enumerate(matches):
        for o, s in zip(objs, slots):
            o = int(o)
            if o < object_poses.shape[2]:
                xy, least = object_poses[i, :, o, :2], MIN_CENTER_PIXELS
            elif goals is not None and first_goal <= o < first_goal + goals.shape[2]:
                xy, least = goals[i, :, o - first_goal], MIN_GOAL_CENTER_PIXELS
            else:
                continue
            seen = (counts[i, :, o] >= least) & torch.isfinite(xy).all(-1)
            if seen.any():
                pred.append(out.geometry[i, seen, int(s), :2])
                true.append(xy[seen])
    if not pred:
        return out.geometry.sum() * 0.0
    # in units of CENTER_HUBER_M, so that the loss is about 1 at a few centimetres, like the others
    return F.huber_loss(torch.cat(pred) / CENTER_HUBER_M, torch.cat(true).to(out.geometry.dtype) / CENTER_HUBER_M)


def encoder_loss(out: EncoderOutput, batch: dict[str, Tensor], depth_weight: float = 1.0, mask_weight: float = 0.0,
                 boundary_weight: float = 1.0, center_weight: float = 0.0,
                 object_balance: bool = False) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging)."""
    rec = reconstruction_loss(out, depth_weight)
    parts = {"recon": float(rec.detach())}
    loss = rec
    if mask_weight > 0 or center_weight > 0:
        if "segmentation" not in batch:
            raise ValueError("mask_weight > 0 or center_weight > 0 needs datasets recorded with "
                             "`ego-collect segmentation=true`")
        seg = batch["segmentation"]
        onehot = object_onehot(seg)
        matches = match_objects_to_slots(torch.log(out.masks.clamp(min=1e-6)), onehot) if onehot.shape[2] else []
    if mask_weight > 0:
        sup = mask_supervision_loss(out, seg, boundary_weight, matches, object_balance, onehot)
        parts["mask_ce"] = float(sup.detach())
        loss = loss + mask_weight * sup
    if center_weight > 0:
        if "object_poses" not in batch:
            raise ValueError("center_weight > 0 needs datasets with object_poses")
        cen = center_loss(out, seg, batch["object_poses"], matches, batch.get("goal"), onehot)
        parts["center"] = float(cen.detach())
        loss = loss + center_weight * cen
    parts["loss"] = float(loss.detach())
    return loss, parts
