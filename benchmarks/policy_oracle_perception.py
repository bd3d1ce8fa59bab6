"""What perfect perception would give the slots policy: the same diffusion policy, data and budget,
with the world-model slots replaced by privileged object tokens.

    python benchmarks/policy_oracle_perception.py                       # on the pipeline's demonstrations
    python benchmarks/policy_oracle_perception.py --demos data/policy/single_easy.zarr --out runs/policy_oracle
    python benchmarks/policy_oracle_perception.py --quick               # a few steps and episodes: the path only

One token per object and goal marker, built as a perfect slot memory would: its one-hot identity,
its planar position in the robot's frame and the direction to it, and how long since the robot's
field of view last held it (the simulator's `visible` / `goal_visible`); out of view it keeps the
last position seen. Everything else is the slots policy's: `SlotSetEncoder`, the U-Net, DDPM then
consistency distillation, the robot state, the evaluation seeds. The gap between this figure and
`policy_success` is what the encoder's slots cost. Metric `success_rate` with `policy` =
`oracle-tokens` (a diagnostic upper bound, not a deployable policy: it reads privileged state).

`--plan` adds the expert's plan to the tokens (`policy` = `oracle-tokens+plan`): one more column that
marks the box the scripted expert is working on and the goal it is pushing it to (in Formation, which
of three boxes goes to which of three slots; nothing while it searches or backs away). In training the
plan comes from replaying the expert over each demonstration's recorded states (checked: the replay
reproduces at least 90% of each episode's recorded labels; the states are stored in float32); in
evaluation a noise-free copy of the expert watches the episode and its plan is read at every step.
It asks whether the policy can execute a task's pushes once told which push is due, apart from
choosing them.

`--perception DIR` (a segmenter from `benchmarks/scene_perception.py`) builds the tokens and the plan from
egocentric RGB-D through `policies.perception.SceneMemory` instead of privileged state, in training and in
evaluation (`policy` = `segmenter-tokens+plan`): the deployable controller. `--checkpoint DIR` evaluates a
trained token policy without training one; `--perceive tokens|plan` (a diagnostic) perceives only one half.
The policy and its controller live in `policies.task_tokens`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import emit, machine  # first: puts the repository on the import path

from policies.task_tokens import token_demos  # the token policy, its data and its controller

BENCH = "policy_oracle_perception"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demos", nargs="+", default=["runs/pipeline/data/demos.zarr"])
    parser.add_argument("--out", default="runs/policy_oracle")
    parser.add_argument("--task", default="single")
    parser.add_argument("--level", default="easy")
    parser.add_argument("--steps", type=int, default=8000, help="DDPM steps (as the pipeline's policy)")
    parser.add_argument("--distill-steps", type=int, default=600)
    parser.add_argument("--budget-min", type=float, default=12.0, help="per phase (the pipeline's diffusion phase)")
    parser.add_argument("--episodes", type=int, default=100, help="0: train only")
    parser.add_argument("--seed", type=int, default=1000, help="the first evaluation seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-action", type=int, default=None,
                        help="actions executed per chunk before re-planning (default: the trained 8)")
    parser.add_argument("--plan", action="store_true",
                        help="add the scripted expert's current task to the tokens (see the module docstring)")
    parser.add_argument("--checkpoint", default=None, help="evaluate this trained token policy (no training)")
    parser.add_argument("--perception", default=None,
                        help="a trained scene segmenter (benchmarks/scene_perception.py): build the tokens and the "
                             "plan from egocentric RGB-D through it instead of from privileged state (deployable)")
    parser.add_argument("--perceive", default="both", choices=("both", "tokens", "plan"),
                        help="with --perception, a diagnostic: only the tokens or only the plan from perception")
    parser.add_argument("--sampler", default=None, choices=("ddim", "consistency"),
                        help="the sampler at evaluation (default: the checkpoint's, the 1-step consistency student)")
    parser.add_argument("--sampler-steps", type=int, default=None, help="its steps (default: the checkpoint's)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    from policies.train import train
    from sim.evaluate import evaluate

    tmp = tempfile.TemporaryDirectory()
    out, demos, episodes = args.out, args.demos, args.episodes
    steps, distill = args.steps, args.distill_steps
    if args.quick:
        from sim.collect import collect

        demos = [str(Path(tmp.name) / "demos.zarr")]
        collect(out=demos[0], task=args.task, level=args.level, policy="expert", episodes=3, max_steps=40, workers=0,
                progress=False)
        out, episodes, steps, distill = str(Path(tmp.name) / "oracle"), 2, 5, 2
    if args.checkpoint:
        out = args.checkpoint
    elif not all(Path(p).exists() for p in demos):
        raise SystemExit(f"demonstrations {demos} not found: run ego-pipeline first, or pass --demos")
    if not args.checkpoint:
        train({"out": out, "encoder": "", "progress": not args.quick,
               "data": {"paths": demos, "task": args.task, "level": args.level},
               # an oracle token is read whole (the slots policy's token_tail keeps a track's colour and geometry)
               "policy": {"obs": "slots", "token_tail": 0} | ({"down_dims": [16, 32], "cond_dim": 32} if args.quick else {}),
               "train": {"steps": steps, "distill_steps": distill, "time_budget_min": args.budget_min}},
              # the one change: privileged (or segmented) object tokens instead of the slots
              demos=token_demos(demos, args.plan, args.perception, progress=not args.quick))
    if episodes == 0:
        return  # trained only
    r = evaluate({"_target_": "policies.task_tokens.TokenPolicyController", "checkpoint": out,
                  "n_action": args.n_action, "plan": args.plan, "perception": args.perception,
                  "perceive": args.perceive, "sampler": args.sampler, "steps": args.sampler_steps}, task=args.task,
                 level=args.level, episodes=episodes, seed=args.seed, workers=args.workers, progress=not args.quick)
    emit(BENCH, "success_rate", r["success_rate"], "fraction", task=args.task, level=args.level,
         policy=("segmenter-tokens" if args.perception else "oracle-tokens") + ("+plan" if args.plan else ""),
         perception=args.perception, perceive=args.perceive if args.perception else None, episodes=episodes,
         seed=args.seed,
         ci95=[round(r["ci95_low"], 3), round(r["ci95_high"], 3)],
         n_action=args.n_action, sampler=args.sampler, sampler_steps=args.sampler_steps,
         mean_length=round(r["mean_length"], 1), failures=r["failures"],
         goals_reached=r["goals_reached"], checkpoint=out,
         demos=demos, **machine())


if __name__ == "__main__":
    main()
