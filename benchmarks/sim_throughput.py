"""Simulation throughput: one process stepping EgoPush-Single easy with 64x64 RGB-D rendering,
and `sim.collect.collect` with 2 worker processes writing a zarr dataset.

    python benchmarks/sim_throughput.py [--quick]

steps_per_s_1proc: uniformly random actions (seeded), so the figure is the env alone
(physics, rendering, privileged info) without a controller's cost; resets on episode
end are inside the timing, env construction is not.
steps_per_s_collect: random actions (the simulator and the writer alone) and the scripted
expert (its planning included), episodes written to a temporary dataset;
steps/s over the wall time after the first worker was up (writing included), and the
total wall time (process start-up included) as a condition.

Each figure is the median of --repeats runs (all listed in `runs`); `cpu_ms_per_step` (CPU
time of every process involved, start-up included, per step) is steadier than steps/s on a
shared machine.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
from _common import emit, machine  # first: puts the repository on the import path

BENCH = "sim_throughput"


def one_process(n_steps: int, image_size: int, seed: int = 0) -> tuple[float, float]:
    """(steps per wall-clock second, CPU milliseconds per step) of one process."""
    from sim.env import EgoPushEnv

    env = EgoPushEnv(task="single", level="easy", image_size=image_size)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    episode = seed
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n_steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            episode += 1
            env.reset(seed=episode)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    env.close()
    return n_steps / elapsed, 1e3 * cpu / n_steps


def collect_rate(policy: str, episodes: int, max_steps: int | None, image_size: int) -> dict:
    """`collect`'s summary plus cpu_ms_per_step: CPU time of the writer and its workers per step."""
    from sim.collect import collect

    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    with tempfile.TemporaryDirectory() as tmp:
        summary = collect(out=f"{tmp}/bench.zarr", task="single", level="easy", episodes=episodes, seed=0, workers=2,
                       policy=policy, image_size=image_size, max_steps=max_steps, progress=False)
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    return summary | {"cpu_ms_per_step": 1e3 * cpu / summary["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, well under a minute")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure, the median is reported (default 3)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    n_steps = 500 if args.quick else 3000
    episodes, max_steps = (6, 60) if args.quick else (100, None)  # 100 episodes: steady state, start-up amortised

    # this machine is shared and noisy: every figure is the median of `repeats` runs, all runs listed
    runs = [one_process(n_steps, args.image_size, seed=r) for r in range(repeats)]
    rates, cpu = [r[0] for r in runs], [r[1] for r in runs]
    emit(BENCH, "steps_per_s_1proc", round(float(np.median(rates)), 1), "steps/s", task="single", level="easy",
         image_size=args.image_size, n_steps=n_steps, actions="random", runs=[round(r, 1) for r in rates],
         cpu_ms_per_step=round(float(np.median(cpu)), 3), **machine())

    # "random" measures the simulator and the writer alone (the headline figure, like steps_per_s_1proc);
    # "expert" adds the scripted expert's own cost, as when collecting demonstrations.
    for policy in ("random", "expert"):
        runs = [collect_rate(policy, episodes, max_steps, args.image_size) for _ in range(repeats)]
        rates = [r["steps_per_s"] for r in runs]
        s = runs[int(np.argsort(rates)[len(rates) // 2])]
        emit(BENCH, "steps_per_s_collect", round(s["steps_per_s"], 1), "steps/s", task="single", level="easy",
             image_size=args.image_size, n_steps=s["steps"], episodes=s["episodes"], workers=2, policy=policy,
             runs=[round(r, 1) for r in rates], cpu_ms_per_step=round(s["cpu_ms_per_step"], 3),
             wall_s=round(s["wall_s"], 2), startup_s=round(s["startup_s"], 2), **machine())


if __name__ == "__main__":
    main()
