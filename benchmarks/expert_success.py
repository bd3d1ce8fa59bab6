"""Success rate of the scripted expert (`sim.experts.PushExpert`) per task and level.

    python benchmarks/expert_success.py [--quick] [--episodes N] [--tasks single formation] [--levels easy hard]
                                        [--randomize] [--expert SETTING=VALUE ...]
    python benchmarks/expert_success.py --tasks single --levels hard --episodes 50 --expert goal_range_m=1.2

One JSON line per (task, level): success rate over seeded episodes 1000.. (evaluation
seeds, apart from the training-data seeds 0..), its Wilson 95% interval and the mean
episode length (steps, time-limit episodes included). --quick: 10 episodes each with
time limits capped at 150 steps, a smoke run whose rates are not the expert's.
"""

from __future__ import annotations

import argparse

from _common import emit, machine  # first: puts the repository on the import path

from sim.collect import LEVELS, TASKS
from sim.env import DEFAULT_MAX_STEPS

BENCH = "expert_success"
EVAL_SEED = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, about a minute")
    parser.add_argument("--episodes", type=int, default=None, help="episodes per task and level (default 200)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--randomize", action="store_true", help="every domain-randomisation switch on")
    parser.add_argument("--expert", nargs="+", default=[], metavar="SETTING=VALUE",
                        help="sim.experts.ExpertConfig settings (numbers), e.g. goal_range_m=1.2")
    args = parser.parse_args()
    try:
        settings = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.expert)}
        from sim.collect import expert_config

        expert_config(settings)  # an unknown or bad setting fails here, not in a worker
    except ValueError as exc:
        parser.error(f"--expert: {exc}")
    controller = {"_target_": "sim.experts.PushExpert", **settings}
    episodes = args.episodes or (10 if args.quick else 200)

    from sim.evaluate import evaluate

    for task in args.tasks:
        for level in args.levels:
            max_steps = min(150, DEFAULT_MAX_STEPS[(task, level)]) if args.quick else None
            r = evaluate(controller, task=task, level=level, episodes=episodes, seed=EVAL_SEED, workers=args.workers,
                         max_steps=max_steps, randomize=args.randomize, progress=False)
            emit(BENCH, "success_rate", round(r["success_rate"], 4), "fraction", task=task, level=level,
                 episodes=episodes, seeds=f"{EVAL_SEED}..{EVAL_SEED + episodes - 1}", randomize=args.randomize,
                 expert=settings, ci95_low=round(r["ci95_low"], 4), ci95_high=round(r["ci95_high"], 4),
                 mean_length=round(r["mean_length"], 1), max_steps=max_steps or DEFAULT_MAX_STEPS[(task, level)],
                 workers=args.workers, wall_s=round(r["wall_s"], 1), **machine())


if __name__ == "__main__":
    main()
