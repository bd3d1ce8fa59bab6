"""`DiffusionPolicy`: observation history -> action chunk, by denoising (Chi et al. 2023, CNN variant).

    cond   = ObsEncoder(observations of the last To steps, robot state)        (B, C)
    chunk  = denoise(noise (B, Tp, 2) | cond) with the U-Net                    (B, Tp, 2) in [-1, 1]
    action = unnormalise(chunk); the controller executes chunk[To-1 : To-1+Ta]

The observation encoder is `SlotSetEncoder` over the frozen world model's slot tokens (`obs="slots"`)
or `RGBDResNetEncoder` over raw RGB-D frames (`obs="cnn"`, the baseline); everything else is shared.
Two samplers read the same conditioning: DDIM over the DDPM-trained U-Net (`sampler="ddim"`, up to 8
steps), and a consistency-distilled copy of the U-Net (`student`, `sampler="consistency"`, 1 or 2
steps). Normalisation lives in buffers (and in stats.json): actions min-max to [-1, 1], slot tokens
and robot state to zero mean and unit variance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from policies.diffusion import ConditionalUnet1D, DDPMSchedule, diffusion_loss, sample_consistency, sample_ddim
from policies.obs_encoders import RGBDResNetEncoder, SlotSetEncoder
from policies.observation import DEFAULT_TRACKER, FORGET_STEPS, TOKEN_EXTRA_DIM, TRACKERS

OBS_KINDS = ("slots", "cnn")
SAMPLERS = ("ddim", "consistency")


@dataclass
class PolicyConfig:
    """The policy's shape (`policy.*` options of `ego-train-policy`)."""

    obs: str = "slots"  # slots | cnn
    n_obs: int = 2  # To: observation steps the policy reads
    horizon: int = 16  # Tp: actions predicted per chunk
    n_action: int = 8  # Ta: actions executed per chunk before replanning
    cond_dim: int = 256
    down_dims: list[int] = field(default_factory=lambda: [32, 64, 128])  # CPU-sized; diffusion_policy: 256-1024
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_steps: int = 100  # DDPM training steps (cosine schedule)
    sampler: str = "consistency"  # what the controller uses: ddim | consistency (falls back to ddim if not distilled)
    ddim_steps: int = 8
    consistency_steps: int = 1
    set_hidden: int = 128  # slots: width of the set encoder
    set_layers: int = 2
    # slots: read the last `token_tail` features of each token only (0: all of it). The default keeps a
    # track's colour and geometry and drops its 128-d slot vector, on which 200 demonstrations overfit
    token_tail: int = TOKEN_EXTRA_DIM
    # objects and goal markers whose remembered positions an auxiliary head reads back from the conditioning
    # in training (`aux_loss`; filled in from the data when train.aux_weight > 0); 0: no head
    aux_targets: int = 0
    # slots: steps a remembered object may go unseen before its track can be taken by a new one
    # (`SlotMemory.forget_steps`): the tracker the demonstrations were encoded with and the controller runs
    memory_forget_steps: int = FORGET_STEPS
    # slots: the object tracker's settings, a preset of `observation.TRACKERS` (which slots are objects, how
    # colours compare, whether a half-hidden object's centre is held, whether one cut by the image's side is
    # completed); a checkpoint written before the option has none and runs "legacy"
    tracker: str = DEFAULT_TRACKER
    cnn_width: int = 32  # cnn: ResNet base width (ResNet-18 layout)
    cnn_stem_stride: int = 2  # cnn: 1 keeps the first stage at full resolution (4x the compute)
    # filled in from the data at training time
    token_dim: int = 0  # slots: features per slot token
    num_slots: int = 0
    state_dim: int = 0
    image_size: list[int] = field(default_factory=lambda: [64, 64])
    action_dim: int = 2

    def check(self) -> None:
        if self.obs not in OBS_KINDS:
            raise ValueError(f"policy.obs must be one of {OBS_KINDS}; got {self.obs!r}")
        if self.tracker not in TRACKERS:
            raise ValueError(f"policy.tracker must be one of {sorted(TRACKERS)}; got {self.tracker!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"policy.sampler must be one of {SAMPLERS}; got {self.sampler!r}")
        if not (1 <= self.n_obs and 1 <= self.n_action and self.n_obs - 1 + self.n_action <= self.horizon):
            raise ValueError(f"need n_obs - 1 + n_action <= horizon; got n_obs={self.n_obs}, "
                             f"n_action={self.n_action}, horizon={self.horizon}")


def config_from_dict(d: dict[str, Any]) -> PolicyConfig:
    known = set(PolicyConfig.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown policy config fields {unknown}")
    return PolicyConfig(**{"tracker": "legacy", **d})  # written before the tracker was an option: legacy


class DiffusionPolicy(nn.Module):
    """Observation encoder + conditional U-Net (+ its consistency-distilled student)."""

    def __init__(self, cfg: PolicyConfig, stats: dict[str, Any]) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        if cfg.obs == "slots":
            if not 0 <= cfg.token_tail <= cfg.token_dim:
                raise ValueError(f"token_tail must lie in [0, token_dim={cfg.token_dim}]; got {cfg.token_tail}")
            self.obs_encoder = SlotSetEncoder(cfg.token_tail or cfg.token_dim, cfg.n_obs, cfg.state_dim, cfg.cond_dim,
                                              hidden=cfg.set_hidden, layers=cfg.set_layers)
            self.register_buffer("token_mean", torch.tensor(stats["token_mean"], dtype=torch.float32))
            self.register_buffer("token_std", torch.tensor(stats["token_std"], dtype=torch.float32))
        else:
            self.obs_encoder = RGBDResNetEncoder(cfg.n_obs, cfg.state_dim, cfg.cond_dim, base_width=cfg.cnn_width,
                                                 stem_stride=cfg.cnn_stem_stride)

        def unet() -> ConditionalUnet1D:
            return ConditionalUnet1D(cfg.action_dim, cfg.cond_dim, tuple(cfg.down_dims), cfg.kernel_size, cfg.n_groups)

        self.unet = unet()
        self.student = unet()
        if cfg.aux_targets > 0:
            self.aux_head = nn.Sequential(nn.Linear(cfg.cond_dim, 256), nn.Mish(), nn.Linear(256, 3 * cfg.aux_targets))
        self.register_buffer("distilled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("state_mean", torch.tensor(stats["state_mean"], dtype=torch.float32))
        self.register_buffer("state_std", torch.tensor(stats["state_std"], dtype=torch.float32))
        self.register_buffer("action_min", torch.tensor(stats["action_min"], dtype=torch.float32))
        self.register_buffer("action_max", torch.tensor(stats["action_max"], dtype=torch.float32))
        self.schedule = DDPMSchedule(cfg.diffusion_steps)

    # -- normalisation ----------------------------------------------------------

    def normalise_action(self, a: Tensor) -> Tensor:
        return (a - self.action_min) / (self.action_max - self.action_min) * 2 - 1

    def unnormalise_action(self, a: Tensor) -> Tensor:
        return (a.clamp(-1, 1) + 1) / 2 * (self.action_max - self.action_min) + self.action_min

    # -- conditioning -----------------------------------------------------------

    def condition(self, obs: Tensor, state: Tensor) -> Tensor:
        """obs (B, To, K, F) slot tokens or (B, To, 4, H, W) images, state (B, To, P) -> (B, cond_dim)."""
        state = (state - self.state_mean) / self.state_std
        if self.cfg.obs == "slots":
            x = (obs - self.token_mean) / self.token_std
            return self.obs_encoder(x[..., -self.cfg.token_tail:] if self.cfg.token_tail else x, state)
        return self.obs_encoder(obs, state)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None, aux_weight: float = 0.0
             ) -> tuple[Tensor, dict[str, float]]:
        """DDPM epsilon loss of the expert's chunks (batch "obs", "state", "action" (B, Tp, 2)), plus
        `aux_weight` x `aux_loss` when the batch has "aux" targets -> total and its parts."""
        cond = self.condition(batch["obs"], batch["state"])
        loss = diffusion_loss(self.unet, self.schedule, self.normalise_action(batch["action"]), cond, generator)
        parts = {"diffusion": loss.item()}
        if aux_weight > 0 and self.cfg.aux_targets > 0 and "aux" in batch:
            aux = self.aux_loss(cond, batch["aux"])
            parts["aux"] = aux.item()
            loss = loss + aux_weight * aux
        return loss, parts

    def aux_loss(self, cond: Tensor, target: Tensor) -> Tensor:
        """How well the conditioning (B, C) tells where the task's objects are: Huber (m) between the aux
        head's read-out and `policies.data.remembered_positions` targets (B, M, 3) for the objects seen
        so far, plus the cross-entropy of the seen flags."""
        pred = self.aux_head(cond).view(len(cond), -1, 3)
        seen = target[..., 2]
        where = nn.functional.huber_loss(pred[..., :2], target[..., :2], reduction="none", delta=0.1).sum(-1)
        flag = nn.functional.binary_cross_entropy_with_logits(pred[..., 2], seen)
        return (where * seen).sum() / seen.sum().clamp(min=1) + 0.1 * flag

    @torch.no_grad()
    def predict(self, obs: Tensor, state: Tensor, *, sampler: str | None = None, steps: int | None = None,
                generator: torch.Generator | None = None, num_samples: int = 1) -> Tensor:
        """Action chunks (B * num_samples, Tp, 2) in env units; `num_samples` chunks per observation
        (sample i of observation b at row b * num_samples + i)."""
        sampler = sampler or self.cfg.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
        if sampler == "consistency" and not bool(self.distilled):
            sampler = "ddim"  # no student yet (a run stopped before distillation)
        cond = self.condition(obs, state)
        if num_samples > 1:
            cond = cond.repeat_interleave(num_samples, 0)
        shape = (self.cfg.horizon, self.cfg.action_dim)
        if sampler == "ddim":
            chunk = sample_ddim(self.unet, self.schedule, cond, *shape, steps=steps or self.cfg.ddim_steps,
                                generator=generator)
        else:
            chunk = sample_consistency(self.student, self.schedule, cond, *shape,
                                       steps=steps or self.cfg.consistency_steps, generator=generator)
        return self.unnormalise_action(chunk)


def policy_config_dict(cfg: PolicyConfig) -> dict[str, Any]:
    return asdict(cfg)
