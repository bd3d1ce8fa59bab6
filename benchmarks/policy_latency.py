"""Policy latency on this CPU: observation in, action chunk out, world-model encoder included.

    python benchmarks/policy_latency.py --checkpoint runs/pipeline/policy [--checkpoint runs/policy_cnn ...]
    python benchmarks/policy_latency.py --quick

For each policy and sampler (DDIM at 8 and 2 steps, the consistency student at 1 and 2 steps, and
the student at 1 step with coherent re-planning over `--coherence` samples, field `coherence`, and
with `--predictor DIR` the student at 1 step with world-model-guided selection over `--select`
samples, field `select`),
metric `ms_per_chunk` with fields `policy` (slots | cnn), `sampler`, `steps`, `p50`, `p99`, batch 1:
the controller takes a real observation (an expert episode's frames), runs it through its
observation path (the slots policy: one streaming step of the frozen encoder) and samples one
chunk. Variants are interleaved call by call in one process, so they share the machine's load;
the ratio to DDIM-8 of the same policy is reported as `speedup_vs_ddim8`.

With `--token-checkpoint DIR --perception SEG` it also times the deployable Formation controller
(`policies.task_tokens.TokenPolicyController` with the plan: segmenter, scene memory, the expert's
choice of push and the token policy) on a Formation-easy expert episode's frames, `policy` = `tokens`.

Without --checkpoint it measures `runs/pipeline/policy`, running `ego-pipeline` (default profile)
first when that does not exist; `--quick` builds an untrained policy of the default shape (timings
of the same architecture, no training; the token controller's policy and segmenter trained a few steps).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import emit, machine  # first: puts the repository on the import path

BENCH = "policy_latency"
SAMPLERS = (("ddim", 8), ("ddim", 2), ("consistency", 1), ("consistency", 2))


def _untrained(out: Path, obs: str) -> str:
    """A policy directory of the default shape with random weights (and a random encoder)."""
    import numpy as np
    import torch

    from policies.observation import TOKEN_EXTRA_DIM
    from policies.policy import DiffusionPolicy, PolicyConfig, policy_config_dict
    from worldmodel.checkpoint import save_checkpoint
    from worldmodel.encoder import EncoderConfig, ObjectCentricEncoder, config_dict

    torch.manual_seed(0)
    enc = ObjectCentricEncoder(EncoderConfig())
    save_checkpoint(out / "encoder", enc, {"stage": "encoder", "model": config_dict(enc.cfg)}, {}, {})
    cfg = PolicyConfig(obs=obs, token_dim=enc.cfg.slot_dim + TOKEN_EXTRA_DIM, num_slots=enc.cfg.num_slots, state_dim=8)
    stats = {"action_min": [-0.25, -2.0], "action_max": [0.25, 2.0], "state_mean": [0.0] * 8, "state_std": [1.0] * 8,
             "token_mean": np.zeros(cfg.token_dim).tolist(), "token_std": np.ones(cfg.token_dim).tolist()}
    model = DiffusionPolicy(cfg, stats)
    model.distilled.fill_(True)
    save_checkpoint(out, model, {"stage": "policy", "policy": policy_config_dict(cfg), "data": {"task": "single"}},
                    stats, {})
    return str(out)


def _quick_tokens(out: Path) -> tuple[str, str]:
    """A Formation token policy and scene segmenter of the default shapes, trained a few steps on one short
    segmented episode (timings of the same architecture, not of a useful policy)."""
    from policies.perception import SegmenterTrainConfig, train_segmenter
    from policies.task_tokens import token_demos
    from policies.train import train
    from sim.collect import collect

    demos = str(out / "formation.zarr")
    collect(out=demos, task="formation", level="easy", policy="expert", episodes=1, max_steps=30, workers=0,
            progress=False, segmentation=True)
    seg = str(train_segmenter([demos], out / "seg", SegmenterTrainConfig(steps=2, batch_size=2, val_fraction=0.0),
                              progress=False))
    policy = str(out / "tokens")
    train({"out": policy, "encoder": "", "progress": False, "data": {"paths": [demos], "task": "formation"},
           "policy": {"obs": "slots", "token_tail": 0}, "train": {"steps": 2, "distill_steps": 1}},
          demos=token_demos([demos], plan=True, perception=seg, progress=False))
    return policy, seg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="*", default=None, help="policy directories")
    parser.add_argument("--quick", action="store_true", help="untrained default-shape policies, few calls")
    parser.add_argument("--calls", type=int, default=200, help="chunks per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores)")
    parser.add_argument("--coherence", type=int, default=16, help="samples of the coherent re-planning variant")
    parser.add_argument("--predictor", default=None,
                        help="also time world-model-guided selection with this predictor checkpoint")
    parser.add_argument("--select", type=int, default=16, help="samples of the world-model-guided variant")
    parser.add_argument("--token-checkpoint", default=None,
                        help="also time this token policy (benchmarks/policy_oracle_perception.py, --plan) ...")
    parser.add_argument("--perception", default=None, help="... reading RGB-D through this scene segmenter")
    args = parser.parse_args()
    if bool(args.token_checkpoint) != bool(args.perception):
        parser.error("--token-checkpoint and --perception go together")

    import tempfile

    import numpy as np
    import torch

    from policies.controller import DiffusionPolicyController
    from sim.env import EgoPushEnv
    from sim.experts import PushExpert

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        ckpts = [_untrained(Path(tmp.name) / "slots", "slots"), _untrained(Path(tmp.name) / "cnn", "cnn")]
        args.token_checkpoint, args.perception = _quick_tokens(Path(tmp.name))
        calls = 10
    else:
        ckpts = args.checkpoint or ["runs/pipeline/policy"]
        calls = args.calls
        if not args.checkpoint and not Path(ckpts[0], "model.safetensors").exists():
            from policies.pipeline import run_pipeline

            run_pipeline({})
    def expert_frames(task: str) -> tuple[list[dict], list[dict]]:
        """Real observations of an expert episode, and its `info` (the controllers read the task's definition from
        it at reset)."""
        env = EgoPushEnv(task=task, level="easy")
        obs, info = env.reset(seed=1000)
        expert = PushExpert()
        expert.reset(obs, info)
        frames, infos = [obs], [info]
        while len(frames) < 64:
            obs, _, term, trunc, info = env.step(expert.act(obs, info))
            frames.append(obs)
            infos.append(info)
            if term or trunc:
                break
        env.close()
        return frames, infos

    frames, infos = expert_frames("single")
    start_info = infos[0]
    controllers = {}
    for ck in ckpts:
        # (sampler, steps, coherence, select): each sampler alone, then the 1-step student choosing among samples
        variants = [(s, n, 0, 0) for s, n in SAMPLERS] + [("consistency", 1, args.coherence, 0)]
        if args.predictor:
            variants.append(("consistency", 1, 0, args.select))
        for sampler, steps, coherence, select in variants:
            c = DiffusionPolicyController(ck, sampler=sampler, steps=steps, threads=args.threads, coherence=coherence,
                                          select=select, predictor=args.predictor if select else None)
            if sampler == "consistency" and not bool(c.policy.distilled):
                continue
            c.reset(frames[0], start_info)
            controllers[(ck, c.policy.cfg.obs, sampler, steps, coherence, select)] = c
    token_controllers = {}
    if args.token_checkpoint:
        from policies.task_tokens import TokenPolicyController

        token_frames, token_infos = expert_frames("formation")
        for sampler, steps in SAMPLERS:
            c = TokenPolicyController(args.token_checkpoint, threads=args.threads, plan=True,
                                      perception=args.perception, sampler=sampler, steps=steps)
            c.reset(token_frames[0], token_infos[0])
            token_controllers[(args.token_checkpoint, "tokens", sampler, steps, 0, 0)] = c
    times = {k: [] for k in controllers | token_controllers}
    groups = [(controllers, frames)] + ([(token_controllers, token_frames)] if token_controllers else [])
    for i in range(calls + 3):  # 3 warm-up rounds
        for group, group_frames in groups:
            frame = group_frames[i % len(group_frames)]
            for key, c in group.items():
                t0 = time.perf_counter()
                # a chunk is due: observation in (no `info`: the token controller reads it through its segmenter),
                # chunk sampled (and chosen), first action out
                c._buffer.clear()
                c.act(frame)
                if i >= 3:
                    times[key].append((time.perf_counter() - t0) * 1e3)
    for key, ms in times.items():
        ck, obs_kind, sampler, steps, coherence, select = key
        base = np.median(times.get((ck, obs_kind, "ddim", 8, 0, 0), ms))
        emit(BENCH, "ms_per_chunk", float(np.median(ms)), "ms", policy=obs_kind, sampler=sampler, steps=steps,
             coherence=coherence, select=select,
             p50=round(float(np.percentile(ms, 50)), 2), p99=round(float(np.percentile(ms, 99)), 2),
             speedup_vs_ddim8=round(float(base / np.median(ms)), 2), batch=1, threads=args.threads,
             calls=len(ms), checkpoint=ck if not args.quick else "untrained", quick=args.quick, **machine())
    tmp.cleanup()


if __name__ == "__main__":
    main()
