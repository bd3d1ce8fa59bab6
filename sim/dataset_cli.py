"""`ego-dataset`: look inside an episode dataset and export episodes to video.

    ego-dataset info data/demos.zarr
    ego-dataset export data/demos.zarr --episode 3 --out episode3.mp4   # or .gif
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from sim.dataset import DatasetError, EpisodeDataset, export_episode


def info(path: str) -> dict:
    """Summary of a dataset: episodes, steps, per-step keys with dtype and shape, success, meta."""
    ds = EpisodeDataset.open(path)
    lengths = ds.episode_lengths
    successes = [ds.episode_info(i).get("success") for i in range(len(ds))]
    known = [s for s in successes if s is not None]
    return {
        "path": path,
        "episodes": len(ds),
        "steps": int(ds.n_steps),
        "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())}
        if len(ds)
        else None,
        "success_rate": float(np.mean(known)) if known else None,
        "keys": {k: f"{np.dtype(dtype).name} {tuple(shape)}" for k, (dtype, shape) in ds.schema.items()},
        "meta": ds.meta,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ego-dataset", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print a JSON summary of a dataset")
    p_info.add_argument("path")
    p_export = sub.add_parser("export", help="write one episode as MP4 or GIF (RGB and depth side by side)")
    p_export.add_argument("path")
    p_export.add_argument("--episode", type=int, default=0)
    p_export.add_argument("--out", required=True, help="output file, .mp4 or .gif")
    p_export.add_argument("--fps", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(json.dumps(info(args.path), indent=2))
        else:
            out = export_episode(args.path, args.episode, args.out, fps=args.fps)
            print(f"wrote {out}")
    except DatasetError as e:
        print(f"ego-dataset: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
