"""Scene perception from egocentric RGB-D (`policies.perception`): how well the segmenter and the scene
memory recover what the privileged `info` holds, and whether the scripted expert can do the task from it.

    python benchmarks/scene_perception.py                                  # collect, train, measure
    python benchmarks/scene_perception.py --checkpoint runs/seg_formation  # measure a trained segmenter
    python benchmarks/scene_perception.py --quick                          # the path only

Measured on live episodes (seeds from 1000, the policy benchmarks' seeds) driven by the scripted expert
on privileged state while `SceneMemory` watches the camera: per object, the planar error of the
perceived position on steps where the object is both truly in view and perceived (`object_pos_err_m`,
median and p90), how often an object in view is perceived (`detection_recall`) and how often a
perceived object is in view (`detection_precision`); for Formation, the error of the placed slots
(`slot_err_m`, the worst of the three, on steps where the anchor is placed). Then `expert_success_rate`
with `perception` = `privileged` and `segmenter`: the same expert deciding from the perceived `info`,
which tells whether perception is good enough for the task apart from any learning.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import emit, machine  # first: puts the repository on the import path

BENCH = "scene_perception"
TRAIN_DATA = (("easy", 30, 5000), ("hard", 20, 6000))  # level, episodes, first seed


class PerceivedExpert:
    """The scripted expert deciding from `SceneMemory`'s estimates instead of the privileged `info`."""

    def __init__(self, segmenter: str, threads: int = 1) -> None:
        import torch

        from policies.perception import load_segmenter
        from sim.experts import PushExpert

        torch.set_num_threads(threads)
        self.segmenter, self.stats = load_segmenter(segmenter)
        self.expert = PushExpert()

    def _info(self, obs: dict, info: dict) -> dict:
        return {"object_names": info["object_names"], "formation": info.get("formation"), **self.scene(obs)}

    def reset(self, obs: dict, info: dict) -> None:
        from policies.perception import SceneMemory

        self.scene = SceneMemory.for_episode(self.segmenter, self.stats, info)
        self.expert.reset(obs, self._info(obs, info))

    def act(self, obs: dict, info: dict | None = None) -> np.ndarray:
        return self.expert.act(obs, self._info(obs, info))


def measure_tracking(segmenter: str, task: str, level: str, episodes: int, max_steps: int | None) -> dict:
    """Perception errors over expert-driven episodes (see the module docstring)."""
    from policies.perception import SceneMemory, load_segmenter
    from sim.env import EgoPushEnv
    from sim.experts import PushExpert

    model, stats = load_segmenter(segmenter)
    err: dict[str, list[float]] = {}
    hits = np.zeros(3)  # truly visible & perceived, truly visible, perceived
    slot_err, placed, steps = [], 0, 0
    for e in range(episodes):
        env = EgoPushEnv(task=task, level=level, **({"max_steps": max_steps} if max_steps else {}))
        obs, info = env.reset(seed=1000 + e)
        expert = PushExpert()
        expert.reset(obs, info)
        scene = SceneMemory.for_episode(model, stats, info)
        done = False
        while not done:
            est = scene(obs)
            truth = np.asarray(info["visible"], bool)
            hits += [(truth & est["visible"]).sum(), truth.sum(), est["visible"].sum()]
            for i in np.flatnonzero(truth & est["visible"]):
                d = float(np.linalg.norm(est["object_poses"][i, :2] - info["object_poses"][i][:2]))
                err.setdefault(info["object_names"][i], []).append(d)
            if info.get("formation") and scene.anchor_yaw is not None:
                slot_err.append(float(np.linalg.norm(est["goal"] - info["goal"], axis=-1).max()))
                placed += 1
            steps += 1
            obs, _, term, trunc, info = env.step(expert.act(obs, info))
            done = term or trunc
        env.close()
    out = {"object_pos_err_m": {n: (float(np.median(v)), float(np.percentile(v, 90)), len(v)) for n, v in err.items()},
           "detection_recall": float(hits[0] / max(hits[1], 1)), "detection_precision": float(hits[0] / max(hits[2], 1)),
           "steps": steps}
    if slot_err:
        out["slot_err_m"] = (float(np.median(slot_err)), float(np.percentile(slot_err, 90)))
        out["slots_placed_fraction"] = placed / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a trained segmenter (default: collect and train one)")
    parser.add_argument("--out", default="runs/seg_formation")
    parser.add_argument("--task", default="formation")
    parser.add_argument("--level", default="easy")
    parser.add_argument("--episodes", type=int, default=10, help="episodes of perception errors")
    parser.add_argument("--expert-episodes", type=int, default=50, help="episodes of each expert variant")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    from policies.perception import SegmenterTrainConfig, train_segmenter
    from sim.collect import collect
    from sim.evaluate import evaluate

    tmp = tempfile.TemporaryDirectory()
    ckpt, episodes, expert_eps, max_steps = args.checkpoint, args.episodes, args.expert_episodes, None
    if args.quick:
        episodes, expert_eps, max_steps = 1, 2, 30
    if ckpt is None:
        root = Path(tmp.name) if args.quick else Path("data/seg")
        paths = []
        for level, n, seed in TRAIN_DATA:
            p = root / f"{args.task}_{level}.zarr"
            collect(out=str(p), task=args.task, level=level, episodes=2 if args.quick else n, seed=seed,
                    policy="noisy_expert", segmentation=True, workers=0 if args.quick else args.workers,
                    progress=not args.quick, **({"max_steps": 20} if args.quick else {}))
            paths.append(str(p))
        ckpt = str(Path(tmp.name) / "seg") if args.quick else args.out
        train_segmenter(paths, ckpt, SegmenterTrainConfig(steps=3 if args.quick else 3000),
                        progress=not args.quick)
    from worldmodel.checkpoint import read_json

    metrics = read_json(Path(ckpt) / "metrics.json")
    common = dict(task=args.task, level=args.level, checkpoint=ckpt, **machine())
    for name, iou in metrics["val_iou"].items():
        emit(BENCH, "val_iou", iou, "fraction", seg_class=name, **common)
    r = measure_tracking(ckpt, args.task, args.level, episodes, max_steps)
    for name, (med, p90, n) in r["object_pos_err_m"].items():
        emit(BENCH, "object_pos_err_m", round(med, 4), "m", object=name, p90=round(p90, 4), steps=n,
             episodes=episodes, **common)
    emit(BENCH, "detection_recall", round(r["detection_recall"], 4), "fraction", episodes=episodes, **common)
    emit(BENCH, "detection_precision", round(r["detection_precision"], 4), "fraction", episodes=episodes, **common)
    if "slot_err_m" in r:
        emit(BENCH, "slot_err_m", round(r["slot_err_m"][0], 4), "m", p90=round(r["slot_err_m"][1], 4),
             placed_fraction=round(r["slots_placed_fraction"], 3), episodes=episodes, **common)
    for perception, controller in (("segmenter", {"_target_": "scene_perception.PerceivedExpert", "segmenter": ckpt}),
                                   ("privileged", {"_target_": "sim.experts.PushExpert"})):
        ev = evaluate(controller, task=args.task, level=args.level, episodes=expert_eps, seed=1000,
                      workers=0 if args.quick else args.workers, progress=not args.quick,
                      **({"max_steps": max_steps} if max_steps else {}))
        emit(BENCH, "expert_success_rate", ev["success_rate"], "fraction", perception=perception,
             episodes=expert_eps, ci95=[round(ev["ci95_low"], 3), round(ev["ci95_high"], 3)],
             mean_length=round(ev["mean_length"], 1), **common)


if __name__ == "__main__":
    main()
