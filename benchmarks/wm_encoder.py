"""Object-centric encoder figures on held-out episodes (issue: world model part 1).

    python benchmarks/wm_encoder.py [--checkpoint DIR [DIR ...]] [--quick]

With no checkpoint, it trains the default encoder first (`ego-train-wm stage=encoder`, collecting its
data; within its 40-minute training budget) into runs/wm_encoder, then measures it. Several
checkpoints (e.g. the three RoPE variants) are measured on the same held-out clips. Metrics, each
with field `rope`:
- fg_ari: foreground adjusted Rand index of the slot masks against MuJoCo's segmentation.
- probe_median_err_m: linear probe from Hungarian-matched slots to object planar positions
  (fit on half of the held-out episodes, tested on the other half).
- slot_identity_consistency: over 20-step clips with a moving camera, the fraction of steps on which
  each object stays matched to its usual slot.
- encoder_ms_per_frame (field `attention`: dense / sparse) at batch 1 streaming on this CPU, and
  `sparse_over_dense_time` (ratio, measured interleaved in one process).
--quick: a tiny training run and 2 episodes: proves the path works, not the targets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import emit, machine  # first: puts the repository on the import path

BENCH = "wm_encoder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="+", default=None, help="encoder checkpoint directories")
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--clip-len", type=int, default=20)
    parser.add_argument("--eval-root", default="data/wm_eval")
    parser.add_argument("--sparse-quality", action="store_true",
                        help="also measure fg_ari / identity with block-sparse attention")
    args = parser.parse_args()

    import torch

    from worldmodel.data import Clips
    from worldmodel.evaluate import (collect_eval_data, default_eval_sources, encode_clips, slot_metrics,
                                     stream_latency)
    from worldmodel.train import load_encoder, train

    checkpoints = args.checkpoint
    if not checkpoints:
        if args.quick:
            out = "runs/wm_encoder_quick"
            train(out=out, progress=False,
                  data={"root": "data/wm_quick", "sources": [{"task": "formation", "level": "hard", "policy": "random",
                                                              "episodes": 4, "max_steps": 40}]},
                  train={"steps": 20, "log_every": 5, "ckpt_every": 10},
                  model={"layers": 2, "dim": 64, "slot_dim": 64, "decoder_hidden": 64})
        else:
            out = "runs/wm_encoder"
            train(out=out)
        checkpoints = [out]

    clip_len = 10 if args.quick else args.clip_len
    paths = collect_eval_data(args.eval_root, default_eval_sources(args.quick))
    clips = Clips.load(paths, need=("rgb", "depth", "intrinsics", "cam_pose", "segmentation", "object_poses"))
    env = machine() | {"torch": torch.__version__, "quick": args.quick, "eval_episodes": len(clips.starts),
                       "clip_len": clip_len}
    for ckpt in checkpoints:
        model = load_encoder(ckpt)
        cfg = model.cfg
        common = {"rope": cfg.rope, "checkpoint": str(Path(ckpt)), "slots": cfg.num_slots,
                  "image_size": list(cfg.image_size)} | env
        modes = ("dense", "sparse") if args.sparse_quality else ("dense",)
        for mode in modes:
            for blk in model.blocks:
                blk.attn.sparse = mode == "sparse"
            m = slot_metrics(encode_clips(model, clips, clip_len))
            emit(BENCH, "fg_ari", m["fg_ari"], "ari", attention=mode, frames=m["fg_ari_frames"], target=0.85, **common)
            emit(BENCH, "probe_median_err_m", m.get("probe_median_err_m"), "m", attention=mode,
                 mean_err_m=m.get("probe_mean_err_m"), test_samples=m.get("probe_test_samples"), target=0.03,
                 **common)
            emit(BENCH, "slot_identity_consistency", m["slot_identity_consistency"], "fraction", attention=mode,
                 object_steps=m["identity_object_steps"], target=0.95, **common)
        lat = stream_latency(model, clips, frames=10 if args.quick else 30, repeats=2 if args.quick else 5)
        for mode in ("dense", "sparse"):
            emit(BENCH, "encoder_ms_per_frame", lat[f"{mode}_ms"], "ms", attention=mode, batch=1,
                 threads=lat["threads"], frames_timed=lat["frames_timed"], topk=cfg.topk, block=cfg.block, **common)
        emit(BENCH, "sparse_over_dense_time", lat["sparse_over_dense"], "ratio", batch=1, **common)


if __name__ == "__main__":
    main()
