"""Does an object keep its identity over an episode: as a slot index, and as a `SlotMemory` track?

    python benchmarks/policy_tracks.py --encoder runs/pipeline/wm_encoder            # 30 Single-easy episodes
    python benchmarks/policy_tracks.py --level hard --trackers objects legacy        # the trackers compared
    python benchmarks/policy_tracks.py --encoder runs/pipeline/wm_encoder --episodes 5 --quick

Collects noisy-expert episodes with the simulator's segmentation (seeds from 600, apart from the
demonstrations' and the evaluation's), streams the encoder over each as the controller does, and
on every frame where an object shows at least 10 pixels finds the slot that wins most of them and
the track that slot feeds. Metric `identity_consistency` per `object` (box, goal), `unit_of`
(`slot`, `track`) and `tracker` (the `observation.TRACKERS` preset): the fraction of those frames on
which it is the episode's most frequent one, averaged over episodes (episodes where the object shows
on fewer than 5 frames are skipped). What the policy reads of the tracks, per tracker, from the
simulator's privileged state: `goal_remembered`, the fraction of frames after the goal disc was
first in view on which some track remembers a centre within 0.15 m of it; `box_tracks_one`, the
fraction of frames after the box was first in view on which exactly one track lies within 0.15 m of
it; `spurious_tracks`, the mean number of tracks per frame that remember a centre over 0.2 m from
every object and the goal (the floor, walls, a copy left behind).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import emit, machine  # first: puts the repository on the import path

BENCH = "policy_tracks"
MIN_OBJECT_PIXELS = 10
MIN_FRAMES = 5


def identity_runs(encoder, episodes: list[dict[str, np.ndarray]], object_ids: dict[str, int],
                  tracker: str = "objects") -> tuple[dict, dict]:
    """-> ({(object, "slot" | "track"): [per-episode consistency]}, {what the policy reads: [per-frame values]})."""
    import torch

    from policies.observation import NEVER_SEEN_AGE, SlotMemory

    out: dict[tuple[str, str], list[float]] = {(o, u): [] for o in object_ids for u in ("slot", "track")}
    reads: dict[str, list[float]] = {"goal_remembered": [], "box_tracks_one": [], "spurious_tracks": []}
    for e, ep in enumerate(episodes):
        torch.manual_seed(e)  # the slots' random initialisation on the first frame
        state, memory = None, SlotMemory(tracker)
        seq: dict[str, list[tuple[int, int]]] = {o: [] for o in object_ids}
        box_seen = goal_seen = False
        for t in range(len(ep["rgb"])):
            f = {k: torch.from_numpy(ep[k][t:t + 1]) for k in ("rgb", "depth", "intrinsics", "cam_pose")}
            enc, state = encoder.step(f["rgb"], f["depth"].float(), f["intrinsics"].float(), f["cam_pose"].float(),
                                      state)
            k = enc.slots.shape[2]
            tag = torch.arange(k, dtype=torch.float32).view(1, k, 1)  # each slot's index, carried as its "vector"
            fed, _, centre, shown, age = memory(tag, enc.extras["colour"][:, 0], enc.extras["centroid"][:, 0, :, :3],
                                                enc.extras["pixels"][:, 0], enc.extras["spread"][:, 0])
            # a merged detection carries its largest slot's index; its other slots feed the same track
            track_of = {int(s): j for j, (s, p) in enumerate(zip(fed[0, :, 0].tolist(), shown[0].tolist())) if p > 0}
            won = enc.masks[0, 0].argmax(0).numpy()
            for name, sid in object_ids.items():
                px = won[ep["segmentation"][t] == sid]
                if px.size >= MIN_OBJECT_PIXELS:
                    s = int(np.bincount(px, minlength=k).argmax())
                    seq[name].append((s, track_of.get(s, -1)))
            known = age[0].numpy() < NEVER_SEEN_AGE
            where = centre[0, :, :2].numpy()
            box, goal = ep["object_poses"][t][0, :2], ep["goal"][t][0]
            to_box, to_goal = np.linalg.norm(where - box, axis=1), np.linalg.norm(where - goal, axis=1)
            things = np.concatenate([ep["object_poses"][t][:, :2], ep["goal"][t]])
            nearest = np.linalg.norm(where[:, None] - things[None], axis=-1).min(1)
            box_seen |= bool(ep["visible"][t][0])
            goal_seen |= bool(ep["goal_visible"][t][0])
            if box_seen:
                reads["box_tracks_one"].append(float((known & (to_box < 0.15)).sum() == 1))
            if goal_seen:
                reads["goal_remembered"].append(float((known & (to_goal < 0.15)).any()))
            reads["spurious_tracks"].append(float((known & (nearest > 0.2)).sum()))
        for name, pairs in seq.items():
            if len(pairs) < MIN_FRAMES:
                continue
            a = np.array(pairs)
            for j, unit in enumerate(("slot", "track")):
                ids = a[:, j]
                out[(name, unit)].append(float(np.mean(ids == np.bincount(ids + 1).argmax() - 1)))
    return out, reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="runs/pipeline/wm_encoder", help="world-model encoder checkpoint")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=600)
    ap.add_argument("--level", default="easy", choices=("easy", "hard"))
    ap.add_argument("--trackers", nargs="+", default=["objects"], help="observation.TRACKERS presets to compare")
    ap.add_argument("--quick", action="store_true", help="5 episodes: the path only")
    args = ap.parse_args()
    import torch

    from sim.collect import collect
    from sim.dataset import EpisodeDataset
    from sim.env import FIRST_OBJECT_SEG_ID, GOAL_SEG_ID
    from worldmodel.train import load_encoder

    torch.set_num_threads(2)
    n = 5 if args.quick else args.episodes
    encoder = load_encoder(args.encoder)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "tracks.zarr")
        collect(out=path, task="single", level=args.level, policy="noisy_expert", episodes=n, seed=args.seed,
                image_size=encoder.cfg.image_size[0], segmentation=True, workers=0, progress=False)
        ds = EpisodeDataset.open(path)
        keys = ("rgb", "depth", "intrinsics", "cam_pose", "segmentation", "object_poses", "goal", "visible",
                "goal_visible")
        episodes = [ds.episode(e, keys) for e in range(ds.n_episodes)]
    for tracker in args.trackers:
        runs, reads = identity_runs(encoder, episodes, {"box": FIRST_OBJECT_SEG_ID, "goal": GOAL_SEG_ID}, tracker)
        common = dict(tracker=tracker, task="single", level=args.level, encoder=args.encoder, quick=args.quick,
                      **machine())
        for (obj, unit), values in runs.items():
            emit(BENCH, "identity_consistency", round(float(np.mean(values)), 3) if values else None, "fraction",
                 object=obj, unit_of=unit, episodes=len(values), **common)
        for metric, values in reads.items():
            emit(BENCH, metric, round(float(np.mean(values)), 3) if values else None,
                 "tracks" if metric == "spurious_tracks" else "fraction", episodes=len(episodes), **common)


if __name__ == "__main__":
    main()
