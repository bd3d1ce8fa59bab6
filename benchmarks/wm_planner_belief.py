"""Where does the latent planner's belief about the box go wrong? Its error against the simulator, by
how far the box is from the head camera.

    python benchmarks/wm_planner_belief.py --checkpoint runs/wmp_full                 # 20 Single-easy episodes
    python benchmarks/wm_planner_belief.py --checkpoint runs/wmp_full --episodes 2 --quick

Runs the `LatentPlanner` (its defaults, one thread per worker) on Single easy from `--seed` (1000), as
`wm_predictor.py` evaluates it, and on every step compares the box's position in the planner's
history (the tracked slot's centre estimate, or where it was last seen) with the simulator's.
Metric `belief_err_m` (median) with fields `camera_range_m` (a bin of the camera-to-box distance)
and `seen` (whether the tracker matched the box on that step), and `planning_success_rate` of the
same episodes. Privileged simulator state is read only to score; the planner never sees it.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise

import numpy as np
from _common import emit, machine  # first: puts the repository on the import path

BENCH = "wm_planner_belief"
RANGE_BINS_M = (0.0, 0.2, 0.3, 0.45, 0.7, 3.0)


def run_episode(job: tuple[str, str | None, int, int | None]) -> dict:
    """One episode -> per-step (camera range, belief error, seen) and success."""
    from sim.env import EgoPushEnv
    from worldmodel.planner import make_latent_planner

    checkpoint, encoder, seed, max_steps = job
    ctrl = make_latent_planner(checkpoint, encoder=encoder, threads=1)
    env = EgoPushEnv(task="single", level="easy", image_size=64, max_steps=max_steps)
    obs, info = env.reset(seed=seed)
    ctrl.reset(obs, info)
    rows = []
    while True:
        action = ctrl.act(obs, info)
        slot = ctrl.tracker.slots[0]
        belief = ctrl.features[-1][slot, -5:-3].numpy()
        box = np.asarray(info["object_poses"])[0, :2]
        camera = np.asarray(obs["cam_pose"])[:2, 3]
        rows.append((np.linalg.norm(box - camera), np.linalg.norm(belief - box), ctrl.tracker.seen[0]))
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return {"rows": rows, "success": bool(info["is_success"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="predictor checkpoint directory")
    parser.add_argument("--encoder", default=None,
                        help="encoder checkpoint (default: the one the predictor was trained on)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000, help="first episode seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="30-step episodes (a smoke test)")
    args = parser.parse_args()
    from tqdm import tqdm

    jobs = [(args.checkpoint, args.encoder, args.seed + i, 30 if args.quick else None) for i in range(args.episodes)]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(tqdm(pool.map(run_episode, jobs), total=len(jobs), unit="ep", desc="episodes"))
    rows = np.array([r for res in results for r in res["rows"]], dtype=np.float64).reshape(-1, 3)
    common = dict(episodes=args.episodes, seed=args.seed, checkpoint=args.checkpoint, encoder=args.encoder,
                  quick=args.quick, **machine())
    for lo, hi in pairwise(RANGE_BINS_M):
        for seen in (True, False):
            m = (rows[:, 0] >= lo) & (rows[:, 0] < hi) & (rows[:, 2] == seen)
            emit(BENCH, "belief_err_m", float(np.median(rows[m, 1])) if m.any() else None, "m",
                 camera_range_m=[lo, hi], seen=seen, steps=int(m.sum()),
                 p90_m=float(np.percentile(rows[m, 1], 90)) if m.any() else None, **common)
    emit(BENCH, "planning_success_rate", float(np.mean([r["success"] for r in results])), "fraction", **common)


if __name__ == "__main__":
    main()
