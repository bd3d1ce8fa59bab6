"""Where a predictor moves objects that stay put: open loop over the held-out segments (4x the episodes,
as `benchmarks/wm_predictor.py --eval-scale 4`), the objects the simulator moved less than 2 cm over
3 s, bucketed by how close the robot came to them over those 3 s (and whether another box stood near).
Per bucket: the model's and stay-still's median error, and the model's median / 90th-percentile drift
from the slot's start (what it moved an object that did not move).

    python scripts/predictor_static_drift.py runs/wm_predictor_it1 runs/wm_predictor_it1_nomask [--pairs off]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from worldmodel.counterfactual import open_loop_positions
from worldmodel.evaluate import collect_eval_data, default_eval_sources
from worldmodel.train import load_encoder
from worldmodel.train_predictor import encode_segments, load_predictor

HORIZON, MOVED_M, MIN_PIXELS = 30, 0.02, 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--pairs", choices=["as-trained", "off"], default="as-trained")
    parser.add_argument("--eval-root", default="data/wm_eval")
    args = parser.parse_args()
    torch.set_num_threads(2)
    overrides = {"pairs": False} if args.pairs == "off" else None
    first, config = load_predictor(args.checkpoints[0], with_config=True)
    fs = first.cfg.frameskip
    last = (first.cfg.history - 1) * fs
    paths = collect_eval_data(args.eval_root, default_eval_sources(False, 4))
    cache = encode_segments(load_encoder(str(config["encoder"])), paths, last + HORIZON + 1, batch=8, seed=0,
                            device=torch.device("cpu"), progress=False, match_frames=last + 1)
    poses = cache["object_poses"]
    camera_xy = cache["cam_pose"][:, :, :2, 3]
    for ckpt in args.checkpoints:
        model = load_predictor(ckpt, overrides=overrides)
        pred = open_loop_positions(model, cache, HORIZON)[0][:, HORIZON // fs - 1]  # (G, K, 2)
        start_est = cache["features"][:, last, :, -5:-3]
        rows = []
        for g in range(len(pred)):
            for k, o in enumerate(cache["slot_object"][g]):
                if o < 0 or cache["object_pixels"][g, last, o] < MIN_PIXELS:
                    continue
                start, end = poses[g, last, o, :2], poses[g, last + HORIZON, o, :2]
                if not np.isfinite(end).all() or np.linalg.norm(end - start) >= MOVED_M:
                    continue
                robot = np.linalg.norm(camera_xy[g, last:last + HORIZON + 1] - start, axis=-1).min()
                others = [np.linalg.norm(poses[g, last, j, :2] - start) for j in range(poses.shape[2])
                          if j != o and np.isfinite(poses[g, last, j, :2]).all()]
                rows.append((robot, min(others, default=np.inf), np.linalg.norm(pred[g, k] - end),
                             np.linalg.norm(start_est[g, k] - end), np.linalg.norm(pred[g, k] - start_est[g, k])))
        r = np.array(rows)
        buckets = {"robot within 0.3 m": r[:, 0] < 0.3, "robot beyond 0.3 m, a box within 0.25 m": (r[:, 0] >= 0.3) & (r[:, 1] < 0.25),
                   "nothing near": (r[:, 0] >= 0.3) & (r[:, 1] >= 0.25)}
        out = {"checkpoint": ckpt, "pairs": model.cfg.pairs, "static_objects": len(r)}
        for name, m in buckets.items():
            out[name] = {"objects": int(m.sum())} | ({
                "model_err_m": round(float(np.median(r[m, 2])), 4), "still_err_m": round(float(np.median(r[m, 3])), 4),
                "drift_median_m": round(float(np.median(r[m, 4])), 4),
                "drift_p90_m": round(float(np.percentile(r[m, 4], 90)), 4)} if m.any() else {})
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
