"""Demonstrations as policy training samples: observation histories and action chunks.

`DemoData` holds every step of some `ego-collect` datasets in memory: the observations a policy
variant reads (slot tokens, or RGB-D frames), the robot state and the expert's action labels.
`DemoData.sample` draws training windows the way diffusion_policy does: for step t, the
observations of steps t - To + 1 .. t and the actions of steps t - To + 1 .. t - To + Tp, padded at
the episode's ends by repeating its first observation and its last action.

Slot tokens come from streaming the frozen encoder over each episode with `step()`, exactly as the
policy's controller does on the robot, so training and deployment see the same slots. That is the
slow part on a CPU (about 3 ms a frame), so it is cached in a file keyed by the encoder's weights and
the datasets' commit records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from policies.observation import DEFAULT_TRACKER, FORGET_STEPS, SlotMemory, frame_tokens, rgbd_image, robot_state
from sim.collect import STATE_KEYS  # privileged state: read for the auxiliary targets only, never as input
from sim.dataset import EpisodeDataset
from sim.geometry import to_local
from worldmodel.checkpoint import _atomic_write, weights_digest

CACHE_VERSION = 5  # 2: slot memory and the age feature; 3: visible centroids; 4: tracks, colour; 5: hard colour
FRAME_KEYS = ("rgb", "depth", "intrinsics", "cam_pose", "proprio")


@dataclass
class DemoData:
    """Every step of some demonstrations, concatenated over episodes."""

    state: np.ndarray  # (N, P + 4) float32: proprio + odometry
    action: np.ndarray  # (N, 2) float32: the expert's action labels
    starts: np.ndarray  # (E,) int64 first step of each episode
    ends: np.ndarray  # (E,) int64 one past its last step
    tokens: np.ndarray | None = None  # (N, K, S + TOKEN_EXTRA_DIM) float32 slot tokens (slots policy)
    rgb: np.ndarray | None = None  # (N, H, W, 3) uint8 (cnn policy)
    depth: np.ndarray | None = None  # (N, H, W) float16 m (cnn policy)
    # (N, M, 3) float32 training-only targets: each object's and goal's last seen planar position in the
    # robot's frame and whether it has been seen yet (`remembered_positions`); None without them
    aux: np.ndarray | None = None
    # (N, L, 2) float32: where a dataset labels each step with a whole chunk (`action_chunk`, DAgger's
    # expert look-ahead), the actions from that step on; NaN rows elsewhere; None if no dataset does
    chunk: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.action)
        self.episode_of = np.repeat(np.arange(len(self.starts)), self.ends - self.starts)
        if len(self.episode_of) != n:
            raise ValueError(f"episode bounds cover {len(self.episode_of)} steps, arrays have {n}")

    @property
    def n_steps(self) -> int:
        return len(self.action)

    def window_index(self, steps: np.ndarray, n_obs: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Global step indices (B,) -> observation indices (B, To) and action indices (B, Tp), clamped
        to each step's episode."""
        ep = self.episode_of[steps]
        lo, hi = self.starts[ep][:, None], self.ends[ep][:, None] - 1
        first = steps[:, None] - n_obs + 1
        obs = np.clip(first + np.arange(n_obs)[None], lo, hi)
        act = np.clip(first + np.arange(horizon)[None], lo, hi)
        return obs, act

    def sample(self, steps: np.ndarray, n_obs: int, horizon: int, kind: str) -> dict[str, Tensor]:
        """Training windows at global steps (B,): "obs" (B, To, K, F) tokens or (B, To, 4, H, W) images,
        "state" (B, To, P + 4), "action" (B, Tp, 2) and, with aux targets, "aux" (B, M, 3) at the last
        observed step."""
        obs_i, act_i = self.window_index(steps, n_obs, horizon)
        action = self.action[act_i]
        if self.chunk is not None:  # steps labelled with a chunk take it from the current step on
            future = horizon - n_obs + 1
            if self.chunk.shape[1] < future:
                raise ValueError(f"action chunks of {self.chunk.shape[1]} steps cannot fill a horizon of {horizon} "
                                 f"with {n_obs} observations")
            rows = self.chunk[steps, :future]
            has = ~np.isnan(rows).any((1, 2))
            action[has, n_obs - 1:] = rows[has]
        out = {"state": torch.from_numpy(self.state[obs_i]), "action": torch.from_numpy(action)}
        if self.aux is not None:
            out["aux"] = torch.from_numpy(self.aux[obs_i[:, -1]])
        if kind == "slots":
            out["obs"] = torch.from_numpy(self.tokens[obs_i])
        else:
            out["obs"] = rgbd_image(self.rgb[obs_i], self.depth[obs_i].astype(np.float32))
        return out


def _read_episodes(paths: list[str], keys: tuple[str, ...], optional: tuple[str, ...] = ()):
    """Yield (path, episode index, episode dict) over the datasets, after checking they hold `keys`; the
    `optional` keys are read where a dataset has them."""
    sets = []
    for p in paths:
        ds = EpisodeDataset.open(p)
        if ds.n_episodes == 0:
            raise ValueError(f"{p}: dataset has no episodes (with only_success, did every episode fail?)")
        missing = [k for k in keys if k not in ds.keys]
        if missing:
            raise ValueError(f"{p}: dataset lacks {missing}; collect demonstrations with ego-collect")
        sets.append((p, ds))
    for p, ds in sets:
        extra = [k for k in optional if k in ds.keys]
        for e in range(ds.n_episodes):
            yield p, e, ds.episode(e, [*keys, *extra])


def load_demos(paths: list[str], kind: str, encoder: torch.nn.Module | None = None, *,
               cache_dir: str | Path | None = None, encoder_dir: str | Path | None = None,
               device: str | torch.device = "cpu", batch: int = 16, seed: int = 0,
               progress: bool = True, tracker: str = DEFAULT_TRACKER, forget_steps: int = FORGET_STEPS) -> DemoData:
    """Demonstrations for policy `kind` ("slots" needs the frozen `encoder`; with `cache_dir` and
    `encoder_dir` the slot tokens are cached on disk; `tracker`, `forget_steps`: the object tracker's,
    `SlotMemory`)."""
    if kind not in ("slots", "cnn"):
        raise ValueError(f"kind must be 'slots' or 'cnn'; got {kind!r}")
    if not paths:
        raise ValueError("no demonstration datasets given")
    items = list(_read_episodes(paths, (*FRAME_KEYS, "action"), optional=(*STATE_KEYS, "action_chunk")))
    episodes = [ep for _, _, ep in items]
    with_state = all(set(STATE_KEYS) <= ep.keys() for ep in episodes)
    lengths = np.array([len(ep["action"]) for ep in episodes])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    state, action = [], []
    for ep in episodes:
        cam = torch.from_numpy(ep["cam_pose"])
        state.append(robot_state(torch.from_numpy(ep["proprio"]), cam, cam[:1].expand_as(cam)).numpy())
        action.append(ep["action"].astype(np.float32))
    data = dict(state=np.concatenate(state).astype(np.float32), action=np.concatenate(action), starts=starts,
                ends=ends)
    if with_state and len({remembered_count(ep) for ep in episodes}) == 1:  # one object count across datasets
        data["aux"] = np.concatenate([remembered_positions(ep) for ep in episodes])
    chunked = [ep["action_chunk"] for ep in episodes if "action_chunk" in ep]
    if chunked:
        shape = (chunked[0].shape[1], chunked[0].shape[2])
        data["chunk"] = np.concatenate([ep["action_chunk"].astype(np.float32) if "action_chunk" in ep else
                                        np.full((len(ep["action"]), *shape), np.nan, np.float32) for ep in episodes])
    if kind == "cnn":
        return DemoData(**data, rgb=np.concatenate([ep["rgb"] for ep in episodes]),
                        depth=np.concatenate([ep["depth"] for ep in episodes]).astype(np.float16))
    if encoder is None:
        raise ValueError("the slots policy needs the world-model encoder")
    tokens = []
    for path in paths:  # one cache file per dataset, so that datasets combine without re-encoding
        eps = [ep for p, _, ep in items if p == path]
        cache = None
        if cache_dir is not None and encoder_dir is not None:
            cache = Path(cache_dir) / f"policy_slots_{cache_key(encoder_dir, [path], seed, tracker, forget_steps)}.npy"
            if cache.exists():
                cached = np.load(cache)
                if len(cached) == sum(len(ep["action"]) for ep in eps):
                    tokens.append(cached)
                    continue
        tok = encode_episodes(encoder, eps, device=device, batch=batch, seed=seed, progress=progress,
                              tracker=tracker, forget_steps=forget_steps)
        if cache is not None:
            def write(tmp: str, tok: np.ndarray = tok) -> None:
                with open(tmp, "wb") as f:
                    np.save(f, tok)
            _atomic_write(cache, write)
        tokens.append(tok)
    return DemoData(**data, tokens=np.concatenate(tokens))


def remembered_count(ep: dict[str, np.ndarray]) -> int:
    return ep["object_poses"].shape[1] + ep["goal"].shape[1]


def remembered_positions(ep: dict[str, np.ndarray]) -> np.ndarray:
    """One episode's privileged state -> (T, M, 3) float32: for each of its M objects and goal markers,
    where it was last in the robot's field of view (`visible` / `goal_visible`), as (forward, left) m
    in the robot's frame at each step, and 1 once it has been seen (before that: 0, 0, 0).

    This is what a perfect object memory would hold, built only from what the camera has shown. The
    policy is trained to read it back from its conditioning (`DiffusionPolicy.aux_loss`), which tells
    the observation encoder which tracks are the task's objects: a training-time target, as the
    encoder's segmentation is, never an input."""
    pos = np.concatenate([ep["object_poses"][..., :2], ep["goal"]], 1).astype(np.float64)  # (T, M, 2)
    seen = np.concatenate([ep["visible"], ep["goal_visible"]], 1).astype(bool)  # (T, M)
    t = np.arange(len(pos))[:, None]
    last = np.maximum.accumulate(np.where(seen, t, -1), axis=0)  # last step each was seen, -1 if not yet
    held = pos[np.maximum(last, 0), np.arange(pos.shape[1])[None]]
    local = to_local(held, ep["robot_pose"][:, None])  # (T, M, 2), each step in that step's robot frame
    out = np.concatenate([local, np.ones_like(local[..., :1])], -1) * (last >= 0)[..., None]
    return out.astype(np.float32)


def datasets_fingerprint(paths: list[str]) -> str:
    """Which datasets, with which committed episodes: changes when an episode is added to any of them."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(Path(p).resolve()).encode())
        h.update((Path(p) / "committed.json").read_bytes() if (Path(p) / "committed.json").exists() else b"")
    return h.hexdigest()[:16]


def cache_key(encoder_dir: str | Path, paths: list[str], seed: int, tracker: str = DEFAULT_TRACKER,
              forget_steps: int = FORGET_STEPS) -> str:
    # the legacy tracker with its memory adds nothing to the key, so caches written before the options stay valid
    settings = ("" if tracker == "legacy" else f" {tracker}") + ("" if forget_steps == FORGET_STEPS
                                                                else f" forget{forget_steps}")
    h = hashlib.sha256(f"v{CACHE_VERSION} seed{seed}{settings}".encode())
    h.update(bytes.fromhex(weights_digest(encoder_dir)))
    h.update(datasets_fingerprint(paths).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_episodes(encoder: torch.nn.Module, episodes: list[dict[str, np.ndarray]], *,
                    device: str | torch.device = "cpu", batch: int = 16, seed: int = 0,
                    progress: bool = True, tracker: str = DEFAULT_TRACKER, forget_steps: int = FORGET_STEPS) -> np.ndarray:
    """Stream the encoder over each episode with `step()` (episodes in lockstep, `batch` at a time,
    grouped by length) -> slot tokens (N, K, S + TOKEN_EXTRA_DIM), episodes concatenated in the given order."""
    device = torch.device(device)
    lengths = np.array([len(ep["rgb"]) for ep in episodes])
    order = np.argsort(-lengths, kind="stable")
    out: list[np.ndarray | None] = [None] * len(episodes)
    torch.manual_seed(seed)  # the slots' random initialisation on each episode's first frame
    bar = tqdm(total=int(lengths.sum()), desc="encoding demos into slots", unit="frame", disable=not progress,
               dynamic_ncols=True)
    with bar:
        for g in range(0, len(order), batch):
            group = order[g:g + batch]
            t_max = int(lengths[group].max())
            parts = []
            state, memory = None, SlotMemory(tracker, forget_steps)
            for t in range(t_max):
                idx = [min(t, lengths[i] - 1) for i in group]  # finished episodes repeat their last frame
                frame = {k: torch.from_numpy(np.stack([episodes[i][k][j] for i, j in zip(group, idx)])).to(device)
                         for k in ("rgb", "depth", "intrinsics", "cam_pose")}
                enc, state = encoder.step(frame["rgb"], frame["depth"].float(), frame["intrinsics"].float(),
                                          frame["cam_pose"].float(), state)
                tok = frame_tokens(enc, frame["cam_pose"].float(), memory)
                parts.append(tok.float().cpu().numpy())
                bar.update(int((lengths[group] > t).sum()))
            stacked = np.stack(parts, 1)  # (G, T_max, K, F)
            for j, i in enumerate(group):
                out[i] = stacked[j, :lengths[i]]
    return np.concatenate(out).astype(np.float32)
