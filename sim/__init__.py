"""EgoPush simulator: MuJoCo scenes, gymnasium envs, scripted experts, demonstration recording.

Importing `sim` registers the gymnasium envs `EgoPush-Single-v0` and `EgoPush-Formation-v0`
(pass `level="easy"|"hard"` and any other `EgoPushConfig` field to `gymnasium.make`).
No torch import anywhere in this package.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402

__version__ = "0.1.0"

ENV_IDS = ("EgoPush-Single-v0", "EgoPush-Formation-v0")

for _id, _task in zip(ENV_IDS, ("single", "formation")):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point="sim.env:EgoPushEnv", kwargs={"task": _task})
