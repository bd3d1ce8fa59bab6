"""Does an object keep its identity over an episode: as a slot index, and as a `SlotMemory` track?

    python benchmarks/policy_tracks.py --encoder runs/pipeline/wm_encoder            # 30 Single-easy episodes
    python benchmarks/policy_tracks.py --level hard --trackers objects legacy        # the trackers compared
    python benchmarks/policy_tracks.py --trackers objects occlusion                  # placing: the goal's track
    python benchmarks/policy_tracks.py --trackers occlusion amodal                   # pushing: a box cut by the frame
    python benchmarks/policy_tracks.py --task formation --episodes 10 --trackers objects legacy
    python benchmarks/policy_tracks.py --encoder runs/pipeline/wm_encoder --episodes 5 --quick

Collects noisy-expert episodes with the simulator's segmentation (seeds from 600, apart from the
demonstrations' and the evaluation's), streams the encoder over each as the controller does, and
on every frame where an object shows at least 10 pixels finds the slot that wins most of them and
the track that slot feeds. Metric `identity_consistency` per `object` (box: the boxes to push; goal:
the goal disc or formation markers), `unit_of` (`slot`, `track`) and `tracker` (the
`observation.TRACKERS` preset): the fraction of those frames on which it is the episode's most
frequent one (frames where its slot feeds no track count as misses), averaged over episodes and
objects (an object that shows on fewer than 5 frames of an episode is skipped). What the policy
reads of the tracks, per tracker, from the simulator's privileged state: `goal_remembered`, the
fraction of frames after a goal marker was first in view on which some track remembers a centre
within 0.15 m of it; `box_tracks_one`, the fraction of frames after a box was first in view on which
exactly one track lies within 0.15 m of it; `spurious_tracks`, the mean number of tracks per frame
that remember a centre over 0.2 m from every object and goal (the floor, walls, a copy left behind);
`box_untracked`, `goal_untracked`, the fraction of an object's frames on which the slot that wins it
feeds no track (the tracker took it for background, or had no track left); `placing_goal_err_m`,
`placing_box_err_m` (EgoPush-Single), on frames where the box is within 0.3 m of its goal (being placed, the goal disc
hidden behind it in part or whole), the median distance from the goal (the box) to the nearest
remembered track; `pushing_box_lateral_err_m` (EgoPush-Single), on frames where the box lies less than
0.45 m ahead of the camera and over 4 cm beside its optical axis (pushed off the plate's centre line,
where the frame's side cuts it) and a track lies within 0.15 m of it, the median distance from the box to
the nearest such track sideways to the camera. And of the encoder alone:
`box_slot_spread_m`, `goal_slot_spread_m`, the median planar spread of that slot's pixels (a few cm
when the slot holds just the object, over the tracker's 15 cm when it holds a wall or the floor too).
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
PLACING_M = 0.3  # a box this near its goal is being placed: the goal disc is behind it, in part or whole
PUSHING_AHEAD_M, OFF_LINE_M = 0.45, 0.04  # a box this near ahead and this far aside: pushed off the line
N_BOXES = {"single": 1, "formation": 4}  # the boxes to push (sim.env: the anchor and three in formation)
EPISODE_KEYS = ("rgb", "depth", "intrinsics", "cam_pose", "segmentation", "object_poses", "goal", "visible",
                "goal_visible")  # what identity_runs reads of an episode


def tracker_from_spec(spec: str):
    """"preset" or "preset:setting=value,..." (a float or None) -> a fresh `SlotMemory`."""
    from policies.observation import SlotMemory

    name, _, rest = spec.partition(":")
    settings = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return SlotMemory(name, **{k: None if v == "None" else float(v) for k, v in settings.items()})


def identity_runs(encoder, episodes: list[dict[str, np.ndarray]], n_boxes: int,
                  tracker: str = "amodal") -> tuple[dict, dict]:
    """-> ({(kind, "slot" | "track"): [per-episode, per-object consistency]}, {what the policy reads: [values]}).
    Kinds: "box" (the task's first `n_boxes` objects) and "goal" (every goal marker)."""
    import torch

    from policies.observation import NEVER_SEEN_AGE, camera_right
    from sim.env import FIRST_OBJECT_SEG_ID, GOAL_SEG_ID

    out: dict[tuple[str, str], list[float]] = {(o, u): [] for o in ("box", "goal") for u in ("slot", "track")}
    reads: dict[str, list[float]] = {m: [] for m in ("goal_remembered", "box_tracks_one", "spurious_tracks",
                                                      "box_untracked", "goal_untracked", "box_slot_spread_m",
                                                      "goal_slot_spread_m", "placing_goal_err_m",
                                                      "placing_box_err_m", "pushing_box_lateral_err_m")}
    for e, ep in enumerate(episodes):
        torch.manual_seed(e)  # the slots' random initialisation on the first frame
        state, memory = None, tracker_from_spec(tracker)
        n_goals = ep["goal"].shape[1]
        seg = [("box", FIRST_OBJECT_SEG_ID + i) for i in range(n_boxes)] + [("goal", GOAL_SEG_ID + k)
                                                                            for k in range(n_goals)]
        seq: list[list[tuple[int, int]]] = [[] for _ in seg]
        box_seen, goal_seen = np.zeros(n_boxes, bool), np.zeros(n_goals, bool)
        for t in range(len(ep["rgb"])):
            f = {k: torch.from_numpy(ep[k][t:t + 1]) for k in ("rgb", "depth", "intrinsics", "cam_pose")}
            enc, state = encoder.step(f["rgb"], f["depth"].float(), f["intrinsics"].float(), f["cam_pose"].float(),
                                      state)
            k = enc.slots.shape[2]
            tag = torch.arange(k, dtype=torch.float32).view(1, k, 1)  # each slot's index, carried as its "vector"
            cam_pose = f["cam_pose"][0].double().numpy()
            right = camera_right(f["cam_pose"].float())  # (1, 2) on the floor
            axis = right[0].double().numpy()
            fed, _, centre, shown, age = memory(tag, enc.extras["colour"][:, 0], enc.extras["centroid"][:, 0, :, :3],
                                                enc.extras["pixels"][:, 0], enc.extras["spread"][:, 0],
                                                f["cam_pose"][:, :3, 3].float(), enc.extras["sides"][:, 0], right)
            # a merged detection carries its largest slot's index; its other slots feed the same track
            track_of = {int(s): j for j, (s, p) in enumerate(zip(fed[0, :, 0].tolist(), shown[0].tolist())) if p > 0}
            won = enc.masks[0, 0].argmax(0).numpy()
            for j, (kind, sid) in enumerate(seg):
                px = won[ep["segmentation"][t] == sid]
                if px.size >= MIN_OBJECT_PIXELS:
                    s = int(np.bincount(px, minlength=k).argmax())
                    seq[j].append((s, track_of.get(s, -1)))
                    reads[f"{kind}_untracked"].append(float(s not in track_of))
                    reads[f"{kind}_slot_spread_m"].append(float(enc.extras["spread"][0, 0, s]))
            known = age[0].numpy() < NEVER_SEEN_AGE
            n_objects = len(ep["object_poses"][t])
            things = np.concatenate([ep["object_poses"][t][:, :2], ep["goal"][t]])  # every object, then the goals
            dist = np.linalg.norm(things[:, None] - centre[0, None, :, :2].numpy(), axis=-1)  # (things, tracks)
            near = (dist < 0.15) & known
            nearest = dist.min(0)
            box_seen |= ep["visible"][t][:n_boxes].astype(bool)
            goal_seen |= ep["goal_visible"][t].astype(bool)
            reads["box_tracks_one"] += (near[:n_boxes].sum(1) == 1)[box_seen].astype(float).tolist()
            reads["goal_remembered"] += near[n_objects:].any(1)[goal_seen].astype(float).tolist()
            reads["spurious_tracks"].append(float((known & (nearest > 0.2)).sum()))
            # placing (EgoPush-Single: one box, one goal): the box within PLACING_M of the goal
            if n_boxes == n_goals == 1 and known.any() and goal_seen[0] and \
                    np.linalg.norm(things[0] - things[n_objects]) < PLACING_M:
                reads["placing_goal_err_m"].append(float(dist[n_objects][known].min()))
                reads["placing_box_err_m"].append(float(dist[0][known].min()))
            rel = things[0] - cam_pose[:2, 3]
            ahead = float(rel @ cam_pose[:2, 2]) / np.linalg.norm(cam_pose[:2, 2])
            if n_boxes == 1 and 0 < ahead < PUSHING_AHEAD_M and abs(rel @ axis) > OFF_LINE_M and near[0].any():
                k = int(np.where(near[0], dist[0], np.inf).argmin())
                reads["pushing_box_lateral_err_m"].append(abs(float((centre[0, k, :2].numpy() - things[0]) @ axis)))
        for (kind, _), pairs in zip(seg, seq):
            if len(pairs) < MIN_FRAMES:
                continue
            a = np.array(pairs)
            for j, unit in enumerate(("slot", "track")):
                ids = a[:, j]  # -1: no track (the object's slot was background or went untracked), never a match
                tracked = ids[ids >= 0]
                out[(kind, unit)].append(float(np.mean(ids == np.bincount(tracked).argmax())) if tracked.size else 0.0)
    return out, reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="runs/pipeline/wm_encoder", help="world-model encoder checkpoint")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=600)
    ap.add_argument("--task", default="single", choices=("single", "formation"))
    ap.add_argument("--level", default="easy", choices=("easy", "hard"))
    ap.add_argument("--trackers", nargs="+", default=["amodal"],
                    help="observation.TRACKERS presets, each maybe with settings: objects:max_spread_m=0.3")
    ap.add_argument("--quick", action="store_true", help="5 episodes: the path only")
    args = ap.parse_args()
    import torch

    from sim.collect import collect
    from sim.dataset import EpisodeDataset
    from worldmodel.train import load_encoder

    for spec in args.trackers:  # a bad spec fails before minutes of collection
        tracker_from_spec(spec)
    torch.set_num_threads(2)
    n = 5 if args.quick else args.episodes
    encoder = load_encoder(args.encoder)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "tracks.zarr")
        collect(out=path, task=args.task, level=args.level, policy="noisy_expert", episodes=n, seed=args.seed,
                image_size=encoder.cfg.image_size[0], segmentation=True, workers=0, progress=False)
        ds = EpisodeDataset.open(path)
        episodes = [ds.episode(e, EPISODE_KEYS) for e in range(ds.n_episodes)]
    for tracker in args.trackers:
        runs, reads = identity_runs(encoder, episodes, N_BOXES[args.task], tracker)
        common = dict(tracker=tracker, task=args.task, level=args.level, encoder=args.encoder, quick=args.quick,
                      **machine())
        for (obj, unit), values in runs.items():
            emit(BENCH, "identity_consistency", round(float(np.mean(values)), 3) if values else None, "fraction",
                 object=obj, unit_of=unit, episodes=len(values), **common)
        for metric, values in reads.items():
            spread = metric.endswith("_m")  # the median: a few frames of a floor slot would swamp a mean
            value = (np.median if spread else np.mean)(values) if values else None
            emit(BENCH, metric, None if value is None else round(float(value), 3),
                 "m" if spread else "tracks" if metric == "spurious_tracks" else "fraction", episodes=len(episodes),
                 **common)


if __name__ == "__main__":
    main()
