"""World-model predictor figures on held-out episodes (issue: world model part 2).

    python benchmarks/wm_predictor.py [--checkpoint DIR [DIR ...]] [--quick]
        [--match history|segment] [--eval-scale N] [--counterfactual-seeds N] [--planning-episodes N]
        [--planning-seed S] [--planner KEY=VALUE ...]

With no checkpoint it trains what is missing of the default chain, then measures: the encoder
(`ego-train-wm stage=encoder`, collecting its data) into runs/wm_encoder, its centre head refitted on
each frame's evidence (`stage=center`) into runs/wm_center, and the predictor on that into
runs/wm_predictor. Several checkpoints (an ablation) are measured on the same held-out segments; each
figure carries field `variant` (from the checkpoint's config: full, no_masking, no_physics, ...).

- `pos_err_m`, field `horizon` (env steps, 0.1 s each): for each held-out segment (the encoder's
  held-out episodes, seeds from 100 000) the predictor gets `history` frames of encoder features and
  rolls the recorded commands out open loop; each object seen at the last history frame is followed
  in the slot the encoder gave it on the history (masks against the simulator's segmentation,
  Hungarian over the history frames; `--match segment`, the protocol before 2026-12-07, matches over
  the whole segment, future included: an object then goes to whichever slot holds it in most of
  the next 3 s, which need not be the one the rollout starts from). Median over objects;
  `baseline_err_m`: the same objects predicted to stay where the slot's centre estimate put them (a
  model that knows nothing of motion). `--eval-scale N`: N times the held-out episodes. Fields
  `moved_err_m` / `moved_baseline_err_m` / `moved_objects`: the same over the objects the simulator
  moved at least `--moved-m` (2 cm) over the horizon, `static_*` over the rest (in random
  exploration most objects stand still, and there standing still is hard to beat).
- `counterfactual_err_m`, fields `intervention` (factual, move, swap) and `horizon`: EgoPush-Single
  scenes where the expert is about to push the box, changed in the simulator before the same
  commands are replayed in the simulator and in the model (`worldmodel.counterfactual`); the error
  is on the changed objects.
- `planning_success_rate` (Single easy, seeds from `--planning-seed`, 1000 by default, Wilson interval) and
  `planning_s_per_replan` (median wall time of a replan, one thread, the first evaluation episodes
  run in this process) of the `LatentPlanner` on the first checkpoint; `--planning-episodes 0`
  skips them. `--planner encoder=DIR` plans through another encoder checkpoint than the one the
  predictor was trained on (e.g. the same encoder with its centre head refitted, `stage=center`);
  the figures then carry `encoder` (the one planned with) and `predictor_encoder`.

`--pairs off` rolls every predictor out (and plans) with its slot-on-slot interactions switched off,
the same weights: only the robot moves objects (field `pairs`).

--quick: tiny models and data, 2 episodes: proves the path works, not the targets.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import emit, machine  # first: puts the repository on the import path

BENCH = "wm_predictor"
TARGETS = {("pos_err_m", 10): 0.03, ("pos_err_m", 30): 0.08}


def variant_name(cfg) -> str:
    """The ablation a predictor config is: full, or what it leaves out."""
    off = [name for name, on in (("masking", cfg.masking), ("physics", cfg.physics), ("contact", cfg.contact))
           if not on]
    return "full" if not off else "no_" + "_no_".join(off)


def default_checkpoints(quick: bool) -> list[str]:
    """Train what is missing: the encoder, then the predictor on it."""
    from worldmodel.train import train

    if quick:
        enc, pred = "runs/wm_encoder_quick", "runs/wm_predictor_quick"
        data = {"root": "data/wm_quick", "sources": [{"task": "formation", "level": "hard", "policy": "random",
                                                      "episodes": 4, "max_steps": 40}]}
        if not (Path(enc) / "model.safetensors").exists():
            train(out=enc, progress=False, data=data, train={"steps": 20, "log_every": 5, "ckpt_every": 10},
                  model={"layers": 2, "dim": 64, "slot_dim": 64, "decoder_hidden": 64})
        center = "runs/wm_center_quick"
        if not (Path(center) / "model.safetensors").exists():
            train(stage="center", out=center, encoder=enc, progress=False, data=data,
                  center={"steps": 10, "batch_size": 2, "clip_len": 4}, train={"log_every": 5, "ckpt_every": 10})
        if not (Path(pred) / "model.safetensors").exists():
            train(stage="predictor", out=pred, encoder=center, progress=False, data=data,
                  predictor={"steps": 20, "log_every": 5, "ckpt_every": 10, "batch_size": 4,
                             "model": {"dim": 32, "layers": 1, "heads": 2}})
        return [pred]
    enc, center, pred = "runs/wm_encoder", "runs/wm_center", "runs/wm_predictor"
    if not (Path(enc) / "model.safetensors").exists():
        train(out=enc)
    if not (Path(center) / "model.safetensors").exists():  # the centre head refitted on each frame's evidence
        train(stage="center", out=center, encoder=enc)
    if not (Path(pred) / "model.safetensors").exists():
        train(stage="predictor", out=pred, encoder=center)
    return [pred]


def parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--planner takes KEY=VALUE pairs (PlannerConfig fields); got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", nargs="+", default=None, help="predictor checkpoint directories")
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 episodes")
    parser.add_argument("--horizons", type=int, nargs="+", default=[2, 10, 30], help="env steps")
    parser.add_argument("--eval-root", default="data/wm_eval")
    parser.add_argument("--eval-scale", type=int, default=1,
                        help="held-out episodes of each source, times this (the same seeds onwards: a superset)")
    parser.add_argument("--min-pixels", type=int, default=20)
    parser.add_argument("--moved-m", type=float, default=0.02,
                        help="an object the simulator moved at least this far over a horizon counts in moved_*, "
                             "the rest in static_*")
    parser.add_argument("--counterfactual-seeds", type=int, default=300,
                        help="scenes tried (seeds from 300 000); about 1 in 3 has the expert pushing from view")
    parser.add_argument("--planning-episodes", type=int, default=50)
    parser.add_argument("--planning-seed", type=int, default=1000, help="first evaluation seed (episodes seed, seed+1, ...)")
    parser.add_argument("--planning-workers", type=int, default=2)
    parser.add_argument("--planner", nargs="*", default=[],
                        help="PlannerConfig overrides or make_latent_planner options, e.g. samples=128, encoder=DIR, "
                             "settle_steps=0 (defaults: the CPU defaults)")
    parser.add_argument("--match", choices=["history", "segment"], default="history",
                        help="frames the objects are matched to slots on: the history the rollout starts from, or "
                             "the whole segment (the protocol before 2026-12-07)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["open_loop", "counterfactual", "planning"])
    parser.add_argument("--pairs", choices=["as-trained", "off"], default="as-trained",
                        help="off: every predictor rolls out with its slot-on-slot interactions off (only the robot "
                             "moves objects), the planner too; field `pairs`")
    parser.add_argument("--figure", default=None,
                        help="write a PNG here: open-loop error against the horizon per checkpoint, moved and static objects")
    parser.add_argument("--patch", default=None,
                        help="also measure the patch-token JEPA ablation in this directory (open loop); trained there "
                             "first, on the first checkpoint's encoder and data, when it holds no model")
    parser.add_argument("--patch-minutes", type=float, default=13.5,
                        help="its training budget (wall clock; the slot predictor's 4 000 steps take about this)")
    args = parser.parse_args()
    if args.eval_scale < 1:
        parser.error(f"--eval-scale must be >= 1; got {args.eval_scale}")

    import numpy as np
    import torch

    from sim.evaluate import evaluate
    from worldmodel.counterfactual import encode_counterfactuals, record_counterfactuals, rollout_errors
    from worldmodel.evaluate import collect_eval_data, default_eval_sources
    from worldmodel.train import load_encoder
    from worldmodel.train_predictor import encode_segments, load_predictor

    checkpoints = args.checkpoint or default_checkpoints(args.quick)
    quick = args.quick
    cf_seeds = 12 if quick else args.counterfactual_seeds
    env = machine() | {"torch": torch.__version__, "quick": quick}
    planner_kw = parse_overrides(args.planner)
    model_overrides = {"pairs": False} if args.pairs == "off" else None
    if model_overrides:
        planner_kw = {"pairs": False} | planner_kw
    if quick:
        planner_kw = {"samples": 16, "iterations": 2, "elites": 4} | planner_kw

    open_cache: dict[str, dict] = {}  # per encoder
    curves: dict[str, tuple] = {}  # label -> (encoder, RolloutErrors at every frame), for --figure
    cf_cache: dict[str, dict] = {}
    record = None
    for ckpt_i, ckpt in enumerate(checkpoints):
        model, config = load_predictor(ckpt, with_config=True, overrides=model_overrides)
        cfg = model.cfg
        fs, th = cfg.frameskip, cfg.history
        horizons = sorted({max(fs, -(-h // fs) * fs) for h in args.horizons})  # whole predictor frames
        seg_len = (th - 1) * fs + horizons[-1] + 1
        encoder_dir = str(config.get("encoder"))
        match_frames = (th - 1) * fs + 1 if args.match == "history" else None
        common = env | {"variant": variant_name(cfg), "pairs": cfg.pairs, "match": args.match, "eval_scale": args.eval_scale,
                        "checkpoint": str(Path(ckpt)), "encoder": encoder_dir,
                        "history_frames": th, "frameskip": fs, "parameters": sum(p.numel() for p in model.parameters())}

        if "open_loop" not in args.skip:
            open_key = f"{encoder_dir}|{seg_len}|{match_frames}"  # predictors of other windows need other segments
            if open_key not in open_cache:
                paths = collect_eval_data(args.eval_root, default_eval_sources(quick, args.eval_scale))
                open_cache[open_key] = encode_segments(load_encoder(encoder_dir), paths, seg_len, batch=8, seed=0,
                                                       device=torch.device("cpu"), progress=False,
                                                       match_frames=match_frames)
            cache = open_cache[open_key]
            # --figure: at every predictor frame up to the last horizon (the horizons among them), in one pass
            frames = list(range(fs, horizons[-1] + 1, fs)) if args.figure else horizons
            errs = rollout_errors(model, cache, frames, args.min_pixels)
            if args.figure:
                curves[f"{variant_name(cfg)}{'' if cfg.pairs else ', pairs off'} ({Path(ckpt).name})"] = (encoder_dir, errs)
            for h in horizons:
                e, b = errs.model[h], errs.still[h]
                emit(BENCH, "pos_err_m", float(np.median(e)) if len(e) else None, "m", horizon=h,
                     mean_err_m=float(np.mean(e)) if len(e) else None,
                     baseline_err_m=float(np.median(b)) if len(b) else None, objects=len(e),
                     **split_fields(errs, h, args.moved_m),
                     segments=len(cache["features"]), target=TARGETS.get(("pos_err_m", h)), **common)

        if "counterfactual" not in args.skip:
            steps = (th - 1) * fs + horizons[-1]
            if record is None:
                record = record_counterfactuals(list(range(300_000, 300_000 + cf_seeds)), steps, (th - 1) * fs)
            cf_key = f"{encoder_dir}|{match_frames}"
            if cf_key not in cf_cache:
                cf_cache[cf_key] = encode_counterfactuals(load_encoder(encoder_dir), record, match_frames=match_frames)
            for name, cache in cf_cache[cf_key].items():
                errs = rollout_errors(model, cache, horizons, args.min_pixels, objects=record["changed"][name])
                for h in horizons:
                    e, b = errs.model[h], errs.still[h]
                    emit(BENCH, "counterfactual_err_m", float(np.median(e)) if len(e) else None, "m", horizon=h,
                         intervention=name, mean_err_m=float(np.mean(e)) if len(e) else None,
                         baseline_err_m=float(np.median(b)) if len(b) else None, objects=len(e),
                         **split_fields(errs, h, args.moved_m), scenes=len(record["seeds"]), scenes_tried=cf_seeds, **common)

        if args.patch and ckpt_i == 0 and "open_loop" not in args.skip:
            measure_patch(args, config, open_cache[open_key], horizons, env)

        if "planning" not in args.skip and ckpt_i == 0 and args.planning_episodes > 0:
            episodes = 2 if quick else args.planning_episodes
            target = {"_target_": "worldmodel.planner.make_latent_planner", "predictor": str(ckpt), "threads": 1,
                      **planner_kw}
            res = evaluate(target, "single", "easy", episodes=episodes, seed=args.planning_seed, workers=args.planning_workers,
                           max_steps=30 if quick else None)
            # `--planner encoder=DIR` plans through another encoder than the predictor was trained on
            plan_common = common | {"encoder": str(planner_kw.get("encoder", common["encoder"])),
                                    "predictor_encoder": common["encoder"]}
            emit(BENCH, "planning_success_rate", res["success_rate"], "fraction", ci95=[res["ci95_low"],
                 res["ci95_high"]], episodes=episodes, seed=args.planning_seed, mean_length=res["mean_length"],
                 wall_s=res["wall_s"],
                 target=0.80, planner=planner_kw, **plan_common)
            emit(BENCH, "planning_s_per_replan", replan_seconds(ckpt, planner_kw, 10 if quick else 60), "s",
                 threads=1, target=0.5, planner=planner_kw, **plan_common)
    if curves:
        print(f"# figure: {error_curves_figure(curves, args.moved_m, Path(args.figure))}", flush=True)


def error_curves_figure(curves: dict[str, tuple], moved_m: float, path: Path) -> Path:
    """A PNG of the open-loop median position error against the horizon, one line per checkpoint and a
    dashed "stay still" line per encoder; one panel for the objects the simulator moved at least
    `moved_m` over the horizon, one for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    encoders_drawn = set()
    for label, (encoder, errs) in curves.items():
        hs = sorted(errs.model)
        for ax, part in zip(axes, ("moved", "static")):
            parts = [errs.split(h, moved_m)[part] for h in hs]
            t = [h / 10 for h in hs]  # env steps are 0.1 s
            ax.plot(t, [p["err_m"] if p["err_m"] is not None else np.nan for p in parts], marker="o", ms=3, label=label)
            if encoder not in encoders_drawn:
                name = "stay still" if len({e for e, _ in curves.values()}) == 1 else f"stay still ({Path(encoder).name})"
                ax.plot(t, [p["baseline_err_m"] if p["baseline_err_m"] is not None else np.nan for p in parts], "k--",
                        lw=1, label=name)
        encoders_drawn.add(encoder)
    last = max(max(e.model) for _, e in curves.values())
    for ax, part in zip(axes, ("moved", "static")):
        n = next(iter(curves.values()))[1].split(last, moved_m)[part]["objects"]
        what = f">= {moved_m * 100:g} cm" if part == "moved" else f"< {moved_m * 100:g} cm"
        ax.set_title(f"objects the simulator moved {what} ({n} at {last / 10:g} s)")
        ax.set_xlabel("horizon (s)")
        ax.set_ylabel("median planar position error (m)")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("open loop, objects followed in the slot the encoder gave them on the history")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def split_fields(errs, h: int, moved_m: float) -> dict:
    """`moved_*` / `static_*` figure fields: the objects the simulator moved at least `moved_m` over the
    horizon, and the rest (`RolloutErrors.split`)."""
    return {f"{part}_{k}": v for part, d in errs.split(h, moved_m).items() for k, v in d.items()} | {"moved_m": moved_m}


def measure_patch(args, config: dict, cache: dict, horizons: list[int], env: dict) -> None:
    """Open-loop errors of the patch-token JEPA on the segments the slot predictors were measured on."""
    import numpy as np

    from sim.collect import to_config
    from worldmodel.evaluate import collect_eval_data, default_eval_sources
    from worldmodel.patch_jepa import PatchJEPAConfig, encode_patch_segments, patch_rollout_errors, train_patch_jepa
    from worldmodel.train import WorldModelTrainConfig, dataset_paths, load_encoder

    encoder_dir = str(config.get("encoder"))
    pm = config["predictor"]["model"]
    cfg = PatchJEPAConfig(history=pm["history"], future=pm["future"], frameskip=pm["frameskip"], dim=pm["dim"],
                          layers=pm["layers"], heads=pm["heads"], mlp_ratio=pm["mlp_ratio"])
    train_cfg = to_config(config, WorldModelTrainConfig, {})
    paths = dataset_paths(train_cfg.data, progress=False)
    model = train_patch_jepa(encoder_dir, paths, args.patch, minutes=0.2 if args.quick else args.patch_minutes,
                             batch=4 if args.quick else 16, cfg=cfg, progress=False)
    seg_len = cache["features"].shape[1]
    eval_paths = collect_eval_data(args.eval_root, default_eval_sources(args.quick, args.eval_scale))
    patch_cache = encode_patch_segments(load_encoder(encoder_dir), eval_paths, seg_len)
    err, base = patch_rollout_errors(model, patch_cache, horizons, args.min_pixels)
    n_params = sum(p.numel() for p in model.parameters())
    for h in horizons:
        e, b = err[h], base[h]
        emit(BENCH, "pos_err_m", float(np.median(e)) if len(e) else None, "m", horizon=h,
             mean_err_m=float(np.mean(e)) if len(e) else None,
             baseline_err_m=float(np.median(b)) if len(b) else None, objects=len(e), segments=len(patch_cache["tokens"]),
             target=TARGETS.get(("pos_err_m", h)), variant="patch_jepa", checkpoint=str(args.patch),
             encoder=encoder_dir, parameters=n_params, **env)


def replan_seconds(ckpt: str, planner_kw: dict, steps: int) -> float:
    """Median wall time of a replan over the first `steps` steps of Single easy seed 1000, one thread."""
    import numpy as np
    import torch

    from sim.env import EgoPushEnv
    from worldmodel.planner import make_latent_planner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctrl = make_latent_planner(ckpt, **planner_kw)
        env = EgoPushEnv(task="single", level="easy", image_size=64)
        obs, info = env.reset(seed=1000)
        ctrl.reset(obs, info)
        t0 = time.perf_counter()
        for _ in range(steps):
            obs, _, term, trunc, info = env.step(ctrl.act(obs, info))
            if term or trunc:
                break
        env.close()
        return float(np.median(ctrl.replan_seconds)) if ctrl.replan_seconds else time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
