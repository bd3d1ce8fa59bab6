"""`DiffusionPolicyController`: a trained policy as a `sim` Controller (`reset(obs, info)`, `act(obs)`).

    {"_target_": "policies.controller.DiffusionPolicyController", "checkpoint": "runs/policy_slots"}

Every step it turns the observation into what the policy reads (the slots policy streams the
frame through its world-model encoder, which must see every frame to keep slot identity); when
the action buffer is empty it samples a chunk of `horizon` actions from the last `n_obs`
observations and buffers the `n_action` that start at the current step (diffusion_policy's
receding horizon). `planned_actions()` shows the rest of the buffer (the viewer draws it).

Randomness (the sampler's noise, the slots' initialisation) is seeded per episode from `seed` and
the episode's first frame, so an evaluation gives the same result whichever worker runs an episode.

World-model-guided selection (`select=K`, `predictor=DIR`, in the manner of GPC): each time a chunk
is due, K chunks are sampled in one batch, the C-JEPA predictor rolls each out from the recent
slot history (batched over the candidates) and scores it with the latent planner's goal cost (its
phase set as a replan would: `LatentPlanner.score`), and the best chunk is executed. The goal comes as the latent planner takes it: the goal
positions and which slot holds the box are read from the task's `info` at reset (the task's
specification, as a benchmark hands it over; the policy network itself reads nothing privileged).

Coherent re-planning (`coherence=K`, in the manner of Bidirectional Decoding, Liu et al. 2024): each
time a chunk is due, K chunks are sampled in one batch and the one that agrees best with what is left
of the chunk being executed is run (a weighted squared distance over the actions both cover, in
normalised units, the nearer steps weighing more: `coherence_decay` per step). Fresh noise per chunk
lets a multimodal policy switch modes between chunks (go round the box, or push it head on); this
keeps the mode it chose while still re-planning on every new observation. The first chunk of an
episode, with nothing to agree with, is the samples' medoid (the most typical of the K).
"""

from __future__ import annotations

import hashlib
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.observation import TOKEN_EXTRA_DIM, SlotMemory, frame_tokens, rgbd_image, robot_state


def first_frame_key(obs: dict[str, np.ndarray]) -> int:
    """A 64-bit number from an episode's first RGB frame: seeds per-episode randomness so that a
    result does not depend on which worker ran the episode."""
    return int.from_bytes(hashlib.sha256(np.ascontiguousarray(obs["rgb"]).tobytes()).digest()[:8], "little")


class CheckpointMismatch(ValueError):
    """A policy checkpoint that does not fit the env it is asked to drive."""


class DiffusionPolicyController:
    """Drive the robot with a trained diffusion policy (see the module docstring)."""

    def __init__(self, checkpoint: str | Path, task: str | None = None, level: str | None = None,
                 sampler: str | None = None, steps: int | None = None, n_action: int | None = None,
                 seed: int = 0, device: str = "cpu", threads: int = 1, select: int = 0,
                 predictor: str | None = None, same_noise: bool = False, coherence: int = 0,
                 coherence_decay: float = 0.9, forget_steps: int | None = None) -> None:
        from policies.train import load_policy

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.policy, self.config = load_policy(checkpoint, self.device)
        self.checkpoint = str(checkpoint)
        cfg = self.policy.cfg
        trained_task = self.config.get("data", {}).get("task")
        if task is not None and trained_task is not None and task != trained_task:
            raise CheckpointMismatch(f"{checkpoint} was trained on task {trained_task!r}, not {task!r}")
        self.sampler = sampler or cfg.sampler
        self.steps = steps
        self.n_action = n_action or cfg.n_action
        if not 1 <= self.n_action <= cfg.horizon - cfg.n_obs + 1:
            raise ValueError(f"n_action must lie in [1, {cfg.horizon - cfg.n_obs + 1}]; got {self.n_action}")
        self.seed = seed
        # draw every chunk of an episode from the same starting noise, making the chunk a function of the
        # observation alone (a test of whether noise flips the policy between behaviours: it does not help;
        # on Single easy, re-planning every 2 steps, 0.40 against 0.72 with fresh noise)
        self.same_noise = same_noise
        self._episode_seed = 0
        self.encoder = None
        if cfg.obs == "slots":
            from worldmodel.train import load_encoder

            enc_dir = Path(checkpoint) / "encoder"
            if not (enc_dir / "model.safetensors").exists():
                raise CheckpointMismatch(f"{checkpoint}: slots policy without its encoder in {enc_dir}")
            self.encoder = load_encoder(enc_dir, self.device)
            dim = self.encoder.cfg.slot_dim + TOKEN_EXTRA_DIM
            if dim != cfg.token_dim or self.encoder.cfg.num_slots != cfg.num_slots:
                raise CheckpointMismatch(f"{checkpoint}: encoder gives {self.encoder.cfg.num_slots} slots x {dim} "
                                         f"features, the policy was trained on {cfg.num_slots} x {cfg.token_dim}")
        if coherence < 0 or select < 0:
            raise ValueError(f"select and coherence count samples, >= 0; got select={select}, coherence={coherence}")
        if coherence > 0 and select > 0:
            raise ValueError("choose one way to pick among sampled chunks: select (the predictor) or coherence")
        if not 0 < coherence_decay <= 1:
            raise ValueError(f"coherence_decay must lie in (0, 1]; got {coherence_decay}")
        self.coherence = coherence
        self.coherence_decay = coherence_decay
        # the object tracker's memory: as the policy was trained, unless overridden (an experiment)
        self.forget_steps = forget_steps or cfg.memory_forget_steps
        self._rest: np.ndarray | None = None  # the unexecuted actions of the current chunk
        self.last_selection: dict[str, Any] = {}  # the candidates' costs and the one run (select or coherence)
        self.select = select
        self.selector = None
        if select > 0:
            from worldmodel.planner import make_latent_planner

            if not predictor:
                raise ValueError("select > 0 needs predictor=<predictor checkpoint trained on this policy's encoder>")
            # the selector streams the frames through the encoder its predictor was trained on (the policy's
            # own, when that one is not here): a predictor can come from another run than the policy
            from worldmodel.train_predictor import load_predictor

            _, pconf = load_predictor(predictor, "cpu", with_config=True)
            own = pconf.get("encoder")
            sel_encoder = own if own and Path(own, "model.safetensors").exists() else str(Path(checkpoint) / "encoder")
            self.selector = make_latent_planner(predictor, encoder=sel_encoder, device=device)
        self._history: deque = deque(maxlen=cfg.n_obs)
        self._buffer: list[np.ndarray] = []
        self._stream = None
        self._memory = SlotMemory(cfg.tracker, self.forget_steps)
        self._start_pose: torch.Tensor | None = None
        self._gen = torch.Generator(self.device)

    # -- Controller ------------------------------------------------------------

    def reset(self, obs: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> None:
        self._check_obs(obs)
        episode_seed = (first_frame_key(obs) + self.seed) % 2**62
        self._episode_seed = episode_seed
        self._gen.manual_seed(episode_seed)
        torch.manual_seed(episode_seed)  # the encoder's slot initialisation on the first frame
        self._history.clear()
        self._buffer = []
        self._rest = None
        self._stream = None
        self._memory = SlotMemory(self.policy.cfg.tracker, self.forget_steps)
        self._start_pose = torch.as_tensor(obs["cam_pose"], dtype=torch.float32, device=self.device)
        if self.selector is not None:
            self.selector.reset(obs, info)  # its own encoder stream, the goal and the box's slot
            self._selector_seen = True

    def act(self, obs: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> np.ndarray:
        if self._start_pose is None:
            self.reset(obs, info)
        self._observe(obs)
        if self.selector is not None:
            if not self._selector_seen:  # reset() encoded the first frame already
                self.selector._observe(obs)
            self._selector_seen = False
        if not self._buffer:
            chunk = self.next_chunk()
            start = self.policy.cfg.n_obs - 1
            self._buffer = list(chunk[start:start + self.n_action])
            self._rest = chunk[start + self.n_action:]
        action = self._buffer.pop(0).astype(np.float32)
        if self.selector is not None:
            self.selector.executed.append(torch.as_tensor(action))
        return action

    def planned_actions(self) -> np.ndarray:
        """(n, 2) the buffered actions still to execute."""
        return np.asarray(self._buffer, np.float32).reshape(-1, 2)

    # -- parts -----------------------------------------------------------------

    def next_chunk(self) -> np.ndarray:
        """(horizon, 2) the chunk to run from the current observation history: one sample, or the pick of
        `select` (the predictor) or `coherence` samples."""
        if self.selector is not None:
            return self._select()
        if self.coherence > 0:
            return self._coherent()
        return self.sample_chunks(1)[0]

    def sample_chunks(self, num_samples: int) -> np.ndarray:
        """(num_samples, horizon, 2) action chunks for the current observation history."""
        obs, state = self.observation()
        if self.same_noise:
            self._gen.manual_seed(self._episode_seed)
        chunks = self.policy.predict(obs, state, sampler=self.sampler, steps=self.steps, generator=self._gen,
                                     num_samples=num_samples)
        return chunks.cpu().numpy()

    @torch.no_grad()
    def _select(self) -> np.ndarray:
        """The best of `select` sampled chunks by the predictor's forecast of the goal cost (the latent
        planner's cost, in the phase the planner would be in now)."""
        chunks = self.sample_chunks(self.select)  # (N, Tp, 2)
        cost = self.selector.score(chunks[:, self.policy.cfg.n_obs - 1:])
        best = int(torch.argmin(cost))
        self.last_selection = {"cost": cost.cpu().numpy(), "best": best}
        return chunks[best]

    def _coherent(self) -> np.ndarray:
        """The one of `coherence` sampled chunks that best continues the chunk being executed (the
        samples' medoid when there is none); the costs go to `last_selection`."""
        chunks = self.sample_chunks(self.coherence)  # (N, Tp, 2)
        model = self.policy
        span = (model.action_max - model.action_min).cpu().numpy()
        ahead = chunks[:, model.cfg.n_obs - 1:] / span  # from the current step on, in units of the action range
        if self._rest is not None and len(self._rest):
            n = min(len(self._rest), ahead.shape[1])
            weight = self.coherence_decay ** np.arange(n)
            cost = (((ahead[:, :n] - self._rest[:n] / span) ** 2).sum(-1) * weight).sum(-1) / weight.sum()
        else:  # medoid: the smallest summed distance to the other samples
            flat = ahead.reshape(len(ahead), -1)
            cost = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1)).sum(-1)
        best = int(np.argmin(cost))
        self.last_selection = {"cost": cost, "best": best}
        return chunks[best]

    def observation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's input: obs (1, To, ...) and state (1, To, P), the first frame repeated until To are seen."""
        hist = list(self._history)
        hist = [hist[0]] * (self.policy.cfg.n_obs - len(hist)) + hist
        obs = torch.stack([h[0] for h in hist]).unsqueeze(0)
        state = torch.stack([h[1] for h in hist]).unsqueeze(0)
        return obs, state

    def _observe(self, obs: dict[str, np.ndarray]) -> None:
        t = {k: torch.as_tensor(np.asarray(obs[k]), device=self.device).unsqueeze(0)
             for k in ("rgb", "depth", "intrinsics", "cam_pose", "proprio")}
        cam = t["cam_pose"].float()
        state = robot_state(t["proprio"], cam, self._start_pose.unsqueeze(0))[0]
        if self.encoder is not None:
            out, self._stream = self.encoder.step(t["rgb"], t["depth"].float(), t["intrinsics"].float(), cam,
                                                  self._stream)
            x = frame_tokens(out, cam, self._memory)[0]
        else:
            x = rgbd_image(t["rgb"], t["depth"])[0]
        self._history.append((x.float(), state))

    def _check_obs(self, obs: dict[str, np.ndarray]) -> None:
        cfg = self.policy.cfg
        missing = [k for k in ("rgb", "depth", "intrinsics", "cam_pose", "proprio") if k not in obs]
        if missing:
            raise CheckpointMismatch(f"observation lacks {missing}")
        hw = list(np.shape(obs["rgb"])[:2])
        want = list(self.encoder.cfg.image_size) if self.encoder is not None else list(cfg.image_size)
        if hw != want:
            raise CheckpointMismatch(f"{self.checkpoint} expects {want[0]}x{want[1]} images, the env gives "
                                     f"{hw[0]}x{hw[1]} (set image_size={want[0]})")
        p = int(np.shape(obs["proprio"])[0]) + 4
        if p != cfg.state_dim:
            raise CheckpointMismatch(f"{self.checkpoint} expects proprio of {cfg.state_dim - 4} values, got {p - 4}")
