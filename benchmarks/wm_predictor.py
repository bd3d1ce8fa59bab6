"""World-model predictor figures on held-out episodes (issue: world model part 2). First part: open-loop
prediction error of object positions.

    python benchmarks/wm_predictor.py --checkpoint runs/wm_predictor [--quick]

For each held-out segment (the encoder's held-out episodes, seeds from 100 000), the predictor gets
`history` frames of encoder features and rolls the recorded commands out open loop; each object is
followed in the slot the encoder gave it (masks against the simulator's segmentation, Hungarian
over the segment), and its predicted planar position is compared with the simulator's. Metric
`pos_err_m` (median over objects seen at the last history frame) with field `horizon` in env
steps (0.1 s each); the predictor's frame is `frameskip` steps, so the shortest horizon is one
frame. Field `baseline_err_m`: the same objects predicted to stay where the slot's own centre
estimate put them at the last history frame (a model that knows nothing of motion).

Not measured here yet (the issue's other figures): counterfactual_err_m, planning_success_rate,
planning_s_per_replan and the ablation table. Without --checkpoint this script does not train:
`ego-train-wm stage=predictor encoder=DIR` first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import emit, machine  # first: puts the repository on the import path

BENCH = "wm_predictor"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="predictor checkpoint directory")
    parser.add_argument("--quick", action="store_true", help="smoke run on 2 episodes")
    parser.add_argument("--horizons", type=int, nargs="+", default=[2, 10, 30], help="env steps")
    parser.add_argument("--eval-root", default="data/wm_eval")
    parser.add_argument("--min-pixels", type=int, default=20)
    args = parser.parse_args()

    import numpy as np
    import torch

    from worldmodel.evaluate import collect_eval_data, default_eval_sources
    from worldmodel.train import load_encoder
    from worldmodel.train_predictor import encode_segments, load_predictor

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, config = load_predictor(args.checkpoint, with_config=True)
    cfg = model.cfg
    fs, th = cfg.frameskip, cfg.history
    horizons = sorted({max(fs, -(-h // fs) * fs) for h in args.horizons})  # whole predictor frames
    frames_out = horizons[-1] // fs
    hist_span = (th - 1) * fs
    seg_len = hist_span + horizons[-1] + 1
    encoder_dir = config.get("encoder")
    encoder = load_encoder(encoder_dir)
    paths = collect_eval_data(args.eval_root, default_eval_sources(args.quick))
    cache = encode_segments(encoder, paths, seg_len, batch=8, seed=0, device=torch.device("cpu"), progress=False)

    g = len(cache["features"])
    hist_steps = np.arange(th) * fs  # (Th,)
    last = hist_steps[-1]
    feats = torch.from_numpy(cache["features"][:, hist_steps])
    cam = torch.from_numpy(cache["cam_pose"][:, hist_steps])
    proprio = torch.from_numpy(cache["proprio"][:, hist_steps]) if "proprio" in cache else None
    acts = cache["actions"]
    past = np.stack([acts[:, hist_steps[t] - fs + np.arange(fs)] for t in range(1, th)], 1)  # (G, Th-1, s, 2)
    future = torch.from_numpy(np.ascontiguousarray(acts[:, last:last + frames_out * fs]))[:, None]  # (G, 1, L, 2)
    with torch.no_grad():
        roll = model.rollout(feats, future, cam_pose=cam, proprio=proprio,
                             past_actions=torch.from_numpy(np.ascontiguousarray(past)))
    pred = roll.positions[:, 0].numpy()  # (G, H, K, 2)
    still = cache["features"][:, last, :, -5:-3]  # the slot's centre estimate at the last history frame
    env = machine() | {"torch": torch.__version__, "quick": args.quick, "checkpoint": str(Path(args.checkpoint)),
                       "encoder": str(encoder_dir), "segments": g, "history_frames": th, "frameskip": fs}
    for h in horizons:
        f = h // fs - 1
        err, base = [], []
        for s in range(g):
            for k, o in enumerate(cache["slot_object"][s]):
                if o < 0 or cache["object_pixels"][s, last, o] < args.min_pixels:
                    continue
                true = cache["object_poses"][s, last + h, o, :2]
                if not np.isfinite(true).all():
                    continue
                err.append(np.linalg.norm(pred[s, f, k] - true))
                base.append(np.linalg.norm(still[s, k] - true))
        emit(BENCH, "pos_err_m", float(np.median(err)) if err else None, "m", horizon=h, variant="full",
             mean_err_m=float(np.mean(err)) if err else None, baseline_err_m=float(np.median(base)) if base else None,
             objects=len(err), target={10: 0.03, 30: 0.08}.get(h), **env)


if __name__ == "__main__":
    main()
