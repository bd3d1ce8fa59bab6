"""Render the README's picture of the tasks: third-person overview | egocentric RGB | depth.

    python scripts/readme_figure.py docs/egopush.png
"""

from __future__ import annotations

import sys

import imageio.v2 as imageio
import numpy as np

from sim.env import EgoPushEnv
from sim.evaluate import compose_frame


def main(out: str) -> None:
    rows = []
    for task, level, seed, formation in (("single", "easy", 3, "random"), ("formation", "easy", 1, "cross"),
                                         ("formation", "easy", 2, "line")):
        env = EgoPushEnv(task=task, level=level, image_size=96, formation=formation, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        rows.append(compose_frame(env.render(), obs["rgb"], obs["depth"]))
        env.close()
    imageio.imwrite(out, np.concatenate(rows, axis=0))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/egopush.png")
