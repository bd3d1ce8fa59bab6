"""Policy success rate on seeded EgoPush episodes (egocentric RGB-D and proprio in, nothing privileged).

    python benchmarks/policy_success.py --checkpoint runs/policy_slots runs/policy_cnn --suites single:easy single:hard
    python benchmarks/policy_success.py            # measures runs/pipeline/policy, running ego-pipeline first if needed
    python benchmarks/policy_success.py --quick    # the tiny pipeline profile and 2 episodes: proves the path only

Metric `success_rate` with fields `task`, `level`, `policy` (`slots` or `cnn`, from the checkpoint;
`slots+wm-select` with `--select K --predictor DIR`, `slots+coherence` with `--coherence K`),
`sampler`, `steps`, `episodes`, the Wilson 95% interval, the mean episode length and the failed
episodes by cause (`failures`: never saw a box, never saw a goal, no box moved, pushed but not placed),
the episodes by goals filled at the end (`goals_reached`) and how near each failure came
(`failed_min_goal_error_m`, the first 20, with `failed_seeds`). Episode i uses reset seed 1000 + i (the
demonstrations use seeds from 0), in `--workers` processes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import emit, machine  # first: puts the repository on the import path

BENCH = "policy_success"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="*", default=None, help="policy directories")
    parser.add_argument("--suites", nargs="+", default=["single:easy", "single:hard"], help="task:level ...")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sampler", default=None, help="ddim | consistency (default: the checkpoint's)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--n-action", type=int, default=None,
                        help="actions executed per chunk before re-planning (default: the checkpoint's)")
    parser.add_argument("--same-noise", action="store_true",
                        help="sample every chunk of an episode from the same starting noise")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--select", type=int, default=0, help="world-model-guided selection over K chunks")
    parser.add_argument("--predictor", default=None, help="with --select: the predictor checkpoint")
    parser.add_argument("--coherence", type=int, default=0,
                        help="sample K chunks, execute the one that best continues the current chunk")
    parser.add_argument("--coherence-decay", type=float, default=0.9,
                        help="with --coherence: the weight of each further step of agreement")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--videos", default=None, help="save failure videos under this directory")
    args = parser.parse_args()

    from policies.evaluate import CONTROLLER
    from policies.train import load_policy
    from sim.evaluate import evaluate

    tmp = tempfile.TemporaryDirectory()
    ckpts = args.checkpoint
    episodes, suites = args.episodes, [tuple(s.split(":")) for s in args.suites]
    if args.quick:
        from policies.pipeline import load_config, run_pipeline

        out = Path(tmp.name) / "pipe"
        run_pipeline(load_config(["profile=tiny", f"out_dir={out}", "progress=false"]))
        ckpts, episodes, suites = [str(out / "policy")], 2, [("single", "easy")]
    elif not ckpts:
        ckpts = ["runs/pipeline/policy"]
        if not Path(ckpts[0], "model.safetensors").exists():
            from policies.pipeline import run_pipeline

            run_pipeline({})
    for ck in ckpts:
        model, config = load_policy(ck)
        kind = model.cfg.obs
        sampler = args.sampler or model.cfg.sampler
        if sampler == "consistency" and not bool(model.distilled):
            sampler = "ddim"
        steps = args.steps or (model.cfg.ddim_steps if sampler == "ddim" else model.cfg.consistency_steps)
        for task, level in suites:
            target = {"_target_": CONTROLLER, "checkpoint": ck, "task": task, "sampler": sampler, "steps": steps,
                      "n_action": args.n_action, "same_noise": args.same_noise}
            label = kind
            if args.select > 0:
                target |= {"select": args.select, "predictor": args.predictor}
                label = f"{kind}+wm-select"
            if args.coherence > 0:
                target |= {"coherence": args.coherence, "coherence_decay": args.coherence_decay}
                label = f"{kind}+coherence"
            video_dir = None if not args.videos else Path(args.videos) / f"{Path(ck).name}_{task}_{level}"
            r = evaluate(target, task, level, episodes, seed=args.seed, workers=args.workers,
                         max_steps=30 if args.quick else None, video_dir=video_dir, progress=True)
            failed = [x for x in r["results"] if not x["success"]][:20]
            emit(BENCH, "success_rate", r["success_rate"], "fraction", task=task, level=level, policy=label, select=args.select,
                 coherence=args.coherence, coherence_decay=args.coherence_decay if args.coherence else None,
                 sampler=sampler, steps=steps, n_action=args.n_action or model.cfg.n_action, same_noise=args.same_noise,
                 episodes=episodes, ci95_low=round(r["ci95_low"], 3),
                 ci95_high=round(r["ci95_high"], 3), mean_length=round(r["mean_length"], 1),
                 failed_seeds=[x["seed"] for x in failed], failures=r["failures"],
                 # how near the failures came: the smallest box-to-goal error each reached (Formation: worst slot)
                 failed_min_goal_error_m=[x["min_goal_error"] for x in failed],
                 goals_reached=r["goals_reached"], trained_on=json.dumps(config.get("data", {}).get("paths", [])),
                 checkpoint=ck,
                 quick=args.quick, **machine())
    tmp.cleanup()


if __name__ == "__main__":
    main()
