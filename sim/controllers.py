"""The `Controller` interface: anything that drives the robot (expert, teleop, planner, policy).

`reset(obs, info)` starts an episode; `act(obs, info)` returns one action
(float32 (2,) = v m/s, omega rad/s). Learned controllers ignore `info`, which
holds privileged state; scripted experts read only what their virtual field of
view allows (see `sim.experts`). A controller may set `label` to the action that
should be recorded for imitation when it differs from the one it executes
(noise injection with recovery); recorders fall back to the executed action.
A controller may also set `label_chunk`, float32 (L, 2): the actions to imitate from
this step on (the label first), recorded as `action_chunk`; and may have
`bind_env(env)`, which recorders call once so that it can look ahead in the
simulator (`EgoPushEnv.get_state` / `set_state`), as the DAgger labeller does.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Controller(Protocol):
    def reset(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> None: ...

    def act(self, obs: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> np.ndarray: ...


def recorded_action(controller: Any, executed: np.ndarray) -> np.ndarray:
    """The action to store in a dataset for this step: the controller's label if it has one."""
    label = getattr(controller, "label", None)
    return np.asarray(executed if label is None else label, np.float32)
