"""Take the README's screenshot of `ego-view`: the real window under a private Xvfb display.

    python scripts/viewer_screenshot.py docs/viewer.png [ego-view overrides ...]

Needs Xvfb, ImageMagick's `import` and xdotool (scripts/bootstrap.sh installs them). The viewer
runs the expert until `pause_at`, the window is captured with `import -window root`, cropped to
the window and stored as a 256-colour PNG.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio.v2 as imageio
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["task=formation", "level=easy", "seed=1", "pause_at=66", "seconds=120"]


def main(out: str, overrides: list[str]) -> None:
    n = next(n for n in range(91, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    xvfb = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "1440x900x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, DISPLAY=f":{n}", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), PYTHONPATH=str(ROOT))
    viewer = None
    try:
        while not Path(f"/tmp/.X11-unix/X{n}").exists():
            time.sleep(0.05)
        viewer = subprocess.Popen([sys.executable, "-m", "sim.viewer", *DEFAULTS, *overrides], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in viewer.stdout:
            print(line, end="")
            if "paused at step" in line:
                break
        else:
            raise RuntimeError("ego-view ended before it paused")

        def x(*args: str) -> str:
            return subprocess.run(args, env=env, check=True, text=True, capture_output=True).stdout

        wid = x("xdotool", "search", "--sync", "--name", "MuJoCo").split()[0]
        geo = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", x("xdotool", "getwindowgeometry", "--shell", wid))}
        time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            x("import", "-window", "root", f"{tmp}/root.png")
            shot = imageio.imread(f"{tmp}/root.png")[..., :3]
        window = shot[geo["Y"]:geo["Y"] + geo["HEIGHT"], geo["X"]:geo["X"] + geo["WIDTH"]]
        Image.fromarray(window).quantize(256, dither=Image.Dither.NONE).save(out, optimize=True)
        print(f"wrote {out} ({Path(out).stat().st_size // 1024} KB)")
        x("xdotool", "key", "--window", wid, "ctrl+q")
        viewer.wait(timeout=30)
    finally:
        if viewer is not None and viewer.poll() is None:
            viewer.kill()
        xvfb.terminate()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/viewer.png", sys.argv[2:])
