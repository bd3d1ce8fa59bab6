"""Object-centric encoder figures on held-out episodes (issue: world model part 1).

    python benchmarks/wm_encoder.py [--checkpoint DIR [DIR ...]] [--quick]

With no checkpoint, it trains the default encoder first (`ego-train-wm stage=encoder`, collecting its
data; 3000 steps, within its 45-minute training budget) into runs/wm_encoder, then measures it. Several
checkpoints (e.g. the three RoPE variants) are measured on the same held-out clips. Metrics, each
with field `rope`:
- fg_ari: foreground adjusted Rand index of the slot masks against MuJoCo's segmentation, per frame
  (field video_fg_ari: SAVi's per-clip convention, which also counts slot switches).
- probe_median_err_m: linear probe from Hungarian-matched slots to object planar positions
  (Huber fit, ridge by cross-validation over episodes), fitted on probe-fit episodes of their own
  (seeds from 200 000, `--probe-fit-scale` times the held-out sources; 0: none) and tested on every
  held-out episode; fields: geometry_probe_median_err_m, the same probe on the slot's 5 geometric
  features alone, slot_center_median_err_m, the slots' own centre estimate with no probe, and
  half_split_probe_median_err_m, the earlier protocol (fitted on half of the held-out episodes,
  tested on the other half).
- slot_identity_consistency: over 20-step clips with a moving camera, the fraction of steps on which
  each object stays matched to its usual slot.
- encoder_ms_per_frame (field `attention`: dense / sparse) at batch 1 streaming on this CPU, and
  `sparse_over_dense_time` (ratio, measured interleaved in one process).
--quick: a tiny training run and 2 episodes: proves the path works, not the targets.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from _common import emit, machine  # first: puts the repository on the import path

BENCH = "wm_encoder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="+", default=None, help="encoder checkpoint directories")
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--clip-len", type=int, default=20)
    parser.add_argument("--eval-root", default="data/wm_eval")
    parser.add_argument("--probe-fit-scale", type=int, default=4,
                        help="the position probe is fitted on this many times the held-out sources' episodes, "
                             "from seeds of their own (0: on half of the held-out episodes, the earlier protocol)")
    parser.add_argument("--slot-iters", type=int, nargs=2, metavar=("FIRST", "LATER"), default=None,
                        help="evaluate with this many slot-attention iterations on a clip's first frame and on "
                             "later frames instead of the checkpoint's own (a test-time setting)")
    parser.add_argument("--sparse-quality", action="store_true",
                        help="also measure fg_ari / identity with block-sparse attention")
    parser.add_argument("--latency-sizes", type=int, nargs="*", default=[128],
                        help="also time the same architecture on larger images (untrained weights: "
                             "latency does not depend on them), where block-sparse attention has more to skip")
    parser.add_argument("--attention-tokens", type=int, nargs="*", default=[128, 512, 2048],
                        help="time the attention op alone, dense vs block-sparse, at these token counts")
    parser.add_argument("--quality-only", action="store_true",
                        help="measure fg_ari / probe / identity only, no timing (e.g. an ablation's checkpoints)")
    parser.add_argument("--figure", default=None, help="write a PNG of slot masks on a held-out clip per checkpoint "
                        "(DIR/<rope>.png)")
    args = parser.parse_args()

    import torch

    from worldmodel.data import Clips
    from worldmodel.encoder import EncoderConfig, ObjectCentricEncoder, config_dict
    from worldmodel.evaluate import (
        PROBE_FIT_SEED,
        collect_eval_data,
        default_eval_sources,
        encode_clips,
        slot_figure,
        slot_metrics,
        stream_latency,
    )
    from worldmodel.runtime import keep_freed_memory
    from worldmodel.train import load_encoder, train

    tuned = keep_freed_memory()  # as an inference process would; applies to dense and sparse alike
    if not args.quality_only:
        attention_timing(args.attention_tokens if not args.quick else [128, 512], repeats=5 if args.quick else 30,
                         malloc_keep_freed=tuned)
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
    need = ("rgb", "depth", "intrinsics", "cam_pose", "segmentation", "object_poses")  # what encoding and scoring read
    paths = collect_eval_data(args.eval_root, default_eval_sources(args.quick))
    clips = Clips.load(paths, need=need)
    fit_clips = None
    if args.probe_fit_scale > 0:
        fit_paths = collect_eval_data(args.eval_root, default_eval_sources(args.quick, args.probe_fit_scale),
                                      seed=PROBE_FIT_SEED)
        fit_clips = Clips.load(fit_paths, need=need)
    env = machine() | {"torch": torch.__version__, "quick": args.quick, "malloc_keep_freed": tuned, "eval_episodes": len(clips.starts),
                       "clip_len": clip_len, "probe_fit_episodes": len(fit_clips.starts) if fit_clips else 0}
    for i, ckpt in enumerate(checkpoints):
        model = load_encoder(ckpt)
        cfg = model.cfg
        if args.slot_iters:  # validated like any config
            model.cfg = cfg = replace(cfg, slot_iters_first=args.slot_iters[0], slot_iters=args.slot_iters[1])
        common = {"rope": cfg.rope, "checkpoint": str(Path(ckpt)), "slots": cfg.num_slots,
                  "slot_iters": [cfg.slot_iters_first, cfg.slot_iters],
                  "image_size": list(cfg.image_size)} | env
        modes = ("dense", "sparse") if args.sparse_quality else ("dense",)
        for mode in modes:
            model.set_sparse(mode == "sparse")
            fit = encode_clips(model, fit_clips, clip_len) if fit_clips else None
            m = slot_metrics(encode_clips(model, clips, clip_len), probe_fit=fit)
            emit(BENCH, "fg_ari", m["fg_ari"], "ari", attention=mode, frames=m["fg_ari_frames"], target=0.85,
                 multi_object_frames_ari=m["fg_ari_multi_object"], object_purity=m["object_purity"],
                 video_fg_ari=m["fg_ari_video"], **common)
            emit(BENCH, "probe_median_err_m", m.get("probe_median_err_m"), "m", attention=mode,
                 mean_err_m=m.get("probe_mean_err_m"), test_samples=m.get("probe_test_samples"), target=0.03,
                 fit_samples=m.get("probe_train_samples"),
                 half_split_probe_median_err_m=m.get("half_probe_median_err_m"),
                 half_split_geometry_probe_median_err_m=m.get("half_probe_geometry_median_err_m"),
                 slot_center_median_err_m=m.get("center_median_err_m"),
                 geometry_probe_median_err_m=m.get("probe_geometry_median_err_m"), ridge=m.get("probe_ridge"),
                 **common)
            emit(BENCH, "slot_identity_consistency", m["slot_identity_consistency"], "fraction", attention=mode,
                 object_steps=m["identity_object_steps"], target=0.95,
                 lost_small_share=m["identity_lost_small_share"],
                 lost_clip_start_share=m["identity_lost_clip_start_share"], **common)
        if args.quality_only:
            if args.figure:
                print(f"# figure: {slot_figure(model, clips, Path(args.figure) / f'{cfg.rope}.png')}", flush=True)
            continue
        lat = stream_latency(model, clips, frames=10 if args.quick else 30, repeats=2 if args.quick else 5)
        for mode in ("dense", "sparse"):
            emit(BENCH, "encoder_ms_per_frame", lat[f"{mode}_ms"], "ms", attention=mode, batch=1,
                 threads=lat["threads"], frames_timed=lat["frames_timed"], topk=cfg.topk, block=cfg.block, **common)
        emit(BENCH, "sparse_over_dense_time", lat["sparse_over_dense"], "ratio", batch=1, **common)
        if args.figure:
            print(f"# figure: {slot_figure(model, clips, Path(args.figure) / f'{cfg.rope}.png')}", flush=True)
        for size in [] if args.quick or i > 0 else args.latency_sizes:  # architecture-only: once
            big = ObjectCentricEncoder(EncoderConfig(**(config_dict(cfg) | {"image_size": [size, size]})),
                                       {"rgbd_mean": model.in_mean.flatten().tolist(),
                                        "rgbd_std": model.in_std.flatten().tolist()}).eval()
            big_clips = _resized(clips, size)
            lat = stream_latency(big, big_clips, frames=20, repeats=3)
            extra = common | {"image_size": [size, size], "weights": "untrained"}
            for mode in ("dense", "sparse"):
                emit(BENCH, "encoder_ms_per_frame", lat[f"{mode}_ms"], "ms", attention=mode, batch=1,
                     threads=lat["threads"], frames_timed=lat["frames_timed"], topk=cfg.topk, block=cfg.block,
                     tokens_per_frame=(size // cfg.patch) ** 2, **extra)
            emit(BENCH, "sparse_over_dense_time", lat["sparse_over_dense"], "ratio", batch=1, **extra)


def attention_timing(tokens: list[int], repeats: int, **extra) -> None:
    """The attention op alone, dense vs block-sparse, interleaved: B=8 frames, 4 heads of 32, blocks
    of 16 (N <= 128), 32 (N <= 512) or 64, top-4 key blocks. Medians in ms and their ratio."""
    import statistics
    import time
    from functools import partial

    import torch

    from worldmodel.attention import block_sparse_attention, dense_attention

    torch.manual_seed(0)
    for n in tokens:
        block = 16 if n <= 128 else 32 if n <= 512 else 64
        q, k, v = (torch.randn(8, 4, n, 32) for _ in range(3))
        fns = {"dense": partial(dense_attention, q, k, v),
               "sparse": partial(block_sparse_attention, q, k, v, block_q=block, block_k=block, topk=4)}
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        with torch.inference_mode():
            for fn in fns.values():
                fn()
            for _ in range(repeats):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1000)
        med = {name: statistics.median(t) for name, t in times.items()}
        cond = {"tokens": n, "block": block, "topk": 4, "key_blocks": -(-n // block), "batch": 8, "heads": 4,
                "head_dim": 32, "threads": torch.get_num_threads(), "repeats": repeats} | extra
        for name in ("dense", "sparse"):
            emit(BENCH, "attention_ms", med[name], "ms", attention=name, **cond)
        emit(BENCH, "attention_sparse_over_dense_time", med["sparse"] / med["dense"], "ratio", **cond)


def _resized(clips, size: int):
    """The held-out frames at size x size (nearest neighbour; intrinsics scaled), for latency only."""
    import numpy as np

    from sim.dataset import resize_nearest
    from worldmodel.data import Clips

    n = int(min(clips.ends[0], 40))
    h, w = clips.image_size
    arrays = {"rgb": resize_nearest(clips.arrays["rgb"][:n], size, size),
              "depth": resize_nearest(clips.arrays["depth"][:n, ..., None].astype(np.float32), size, size)[..., 0],
              "cam_pose": clips.arrays["cam_pose"][:n]}
    k = clips.arrays["intrinsics"][:n].copy()
    k[:, 0] *= size / w
    k[:, 1] *= size / h
    arrays["intrinsics"] = k
    return Clips(arrays, np.array([0]), np.array([n]), (size, size))


if __name__ == "__main__":
    main()
