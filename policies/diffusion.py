"""Diffusion policy head: a FiLM-conditioned 1D temporal U-Net over an action chunk, its DDPM training
objective, a DDIM sampler, and consistency distillation into a one- or few-step sampler.

    training (Chi et al. 2023, "Diffusion Policy", CNN variant):
        t ~ U{0..N-1}, eps ~ N(0, I),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        loss = || eps_theta(x_t, t, cond) - eps ||^2
    sampling (DDIM, eta = 0): a few steps down an evenly spaced grid, x0 clipped to [-1, 1] each step
    consistency distillation (Song et al. 2023; Consistency Policy, Prasad et al. 2024; here on the
        teacher's discrete DDPM steps): a student f(x_t, t) ~ x0, initialised from the teacher, is trained
        so that f is constant along the teacher's deterministic DDIM trajectories; then one evaluation
        f(x_{N-1}, N-1) turns noise into an action chunk (or a few, re-noising in between).

Actions are normalised to [-1, 1] upstream; the clip bounds below rely on that.

Shapes: B batch, T horizon (action chunk length), A action dimension, C conditioning width,
N number of training diffusion steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------------------------
# Network


class SinusoidalStepEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the diffusion step. t (B,) -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"step embedding width must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish. (B, Cin, T) -> (B, Cout, T)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(n_groups, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return F.mish(self.norm(self.conv(x)))


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks with a residual path; FiLM from the conditioning vector after the first.
    x (B, Cin, T), cond (B, D) -> (B, Cout, T)."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.block1 = Conv1dBlock(in_ch, out_ch, kernel_size, n_groups)
        self.block2 = Conv1dBlock(out_ch, out_ch, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_ch))
        self.residual = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.block1(x)
        scale, bias = self.film(cond)[:, :, None].chunk(2, dim=1)
        # Scale about 1, not 0: a freshly initialised FiLM then passes the features through instead of
        # multiplying them by small random numbers.
        h = h * (1 + scale) + bias
        return self.block2(h) + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """1D temporal U-Net over an action chunk, FiLM-conditioned (per-channel scale and bias) on
    cond = [observation features, sinusoidal diffusion-step embedding -> MLP].

    Level i works at horizon T / 2**i with width down_dims[i]. On the way up, each level
    concatenates the encoder's features of the same resolution (the skip connection).
    """

    def __init__(self, action_dim: int, cond_dim: int, down_dims: Sequence[int] = (64, 128, 256),
                 kernel_size: int = 5, n_groups: int = 8, step_embed_dim: int = 128) -> None:
        super().__init__()
        down_dims = tuple(int(d) for d in down_dims)
        if action_dim < 1 or cond_dim < 0:
            raise ValueError(f"need action_dim >= 1 and cond_dim >= 0, got {action_dim}, {cond_dim}")
        if not down_dims:
            raise ValueError("down_dims must name at least one level width")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so a conv keeps the horizon, got {kernel_size}")
        bad = [d for d in down_dims if d % n_groups]
        if bad:
            raise ValueError(f"n_groups={n_groups} must divide every width in down_dims={down_dims}; {bad} are not")
        self.action_dim, self.cond_dim, self.down_dims = action_dim, cond_dim, down_dims

        self.step_embed = nn.Sequential(
            SinusoidalStepEmbedding(step_embed_dim),
            nn.Linear(step_embed_dim, 4 * step_embed_dim), nn.Mish(),
            nn.Linear(4 * step_embed_dim, step_embed_dim))
        film_dim = step_embed_dim + cond_dim

        def res(i: int, o: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(i, o, film_dim, kernel_size, n_groups)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        width = action_dim
        for i, d in enumerate(down_dims):
            self.down.append(nn.ModuleList([res(width, d), res(d, d)]))
            if i < len(down_dims) - 1:
                self.downsample.append(nn.Conv1d(d, d, 3, stride=2, padding=1))
            width = d
        self.mid = nn.ModuleList([res(width, width), res(width, width)])
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in reversed(range(len(down_dims) - 1)):  # deepest level first; it feeds the mid blocks directly
            deeper, d = down_dims[i + 1], down_dims[i]
            self.upsample.append(nn.ConvTranspose1d(deeper, deeper, 4, stride=2, padding=1))
            self.up.append(nn.ModuleList([res(deeper + d, d), res(d, d)]))
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
                                   nn.Conv1d(down_dims[0], action_dim, 1))

    @property
    def horizon_multiple(self) -> int:
        return 2 ** (len(self.down_dims) - 1)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        """x (B, T, A) noisy chunk, t (B,) or scalar diffusion step, cond (B, C) -> (B, T, A)."""
        if x.dim() != 3 or x.shape[-1] != self.action_dim:
            raise ValueError(f"x must be (B, T, A={self.action_dim}), got {tuple(x.shape)}")
        b, horizon = x.shape[:2]
        if horizon < 1 or horizon % self.horizon_multiple:
            raise ValueError(f"horizon T={horizon} must be a positive multiple of {self.horizon_multiple} "
                             f"(2 ** (len(down_dims) - 1)) so each downsampling halves it exactly")
        check_cond(cond, self.cond_dim, batch=b)
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or (B={b},), got {tuple(t.shape)}")

        film = torch.cat([self.step_embed(t).to(x.dtype), cond.to(x.dtype)], dim=-1)
        h = x.transpose(1, 2)  # convolve over time: (B, A, T)
        skips = []
        for i, (r1, r2) in enumerate(self.down):
            h = r2(r1(h, film), film)
            if i < len(self.downsample):
                skips.append(h)
                h = self.downsample[i](h)
        for r in self.mid:
            h = r(h, film)
        for upsample, (r1, r2) in zip(self.upsample, self.up):
            h = torch.cat([upsample(h), skips.pop()], dim=1)
            h = r2(r1(h, film), film)
        return self.final(h).transpose(1, 2)


def check_cond(cond: Tensor, cond_dim: int | None, batch: int | None = None) -> None:
    """Raise a ValueError unless cond is a finite-valued (B, cond_dim) tensor."""
    if not isinstance(cond, Tensor) or cond.dim() != 2:
        shape = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise ValueError(f"cond must be a (B, C) tensor, got {shape}")
    if cond_dim is not None and cond.shape[1] != cond_dim:
        raise ValueError(f"cond has {cond.shape[1]} features but the model was built for cond_dim={cond_dim}")
    if batch is not None and cond.shape[0] != batch:
        raise ValueError(f"cond batch {cond.shape[0]} does not match the action batch {batch}")
    if torch.isnan(cond).any():
        raise ValueError("cond contains NaN")


# ----------------------------------------------------------------------------------------------------------------------
# Noise schedule


class DDPMSchedule:
    """Discrete DDPM noise schedule, `squaredcos_cap_v2` (cosine, betas capped at 0.999), epsilon prediction.

    abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2) on s in [0, 1] (Nichol & Dhariwal 2021);
    beta_i = min(1 - abar((i+1)/N) / abar(i/N), 0.999);  alphas_cumprod[i] = prod_{j<=i} (1 - beta_j).
    Step -1 stands for clean data (abar = 1) wherever a step is taken, so "denoise all the way" is one more
    step on the same grid.
    """

    def __init__(self, num_train_steps: int = 100) -> None:
        if num_train_steps < 2:
            raise ValueError(f"num_train_steps must be >= 2, got {num_train_steps}")
        self.num_train_steps = num_train_steps
        s = torch.arange(num_train_steps + 1, dtype=torch.float64) / num_train_steps
        abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        # The cap keeps the last step from being exactly pure noise (beta = 1 would make x0 unrecoverable).
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        self._abar64 = torch.cumprod(1 - betas, dim=0)  # kept in float64 for `abar`
        self.betas = betas.float()  # (N,)
        self.alphas_cumprod = self._abar64.float()  # (N,)

    def abar(self, t: Tensor | int, like: Tensor) -> Tensor:
        """abar at steps t (B,) or scalar, -1 = clean (abar 1), shaped to broadcast against like (B, ...)."""
        t = torch.as_tensor(t, device=like.device).long()
        if t.dim() == 0:
            t = t.expand(like.shape[0])
        if ((t < -1) | (t >= self.num_train_steps)).any():
            raise ValueError(f"diffusion steps must lie in [-1, {self.num_train_steps - 1}], got {t.tolist()}")
        # Gather in float64, then cast: near t = N-1, abar ~ 1e-7 and 1/sqrt(abar) amplifies any rounding.
        a = torch.where(t < 0, torch.ones((), dtype=torch.float64, device=like.device),
                        self._abar64.to(like.device)[t.clamp(min=0)])
        return a.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """q(x_t | x0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise (B, ...), t (B,) -> (B, ...)."""
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: Tensor, eps: Tensor, t: Tensor | int) -> Tensor:
        """Invert add_noise given the noise: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        a = self.abar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def predict_eps(self, x_t: Tensor, x0: Tensor, t: Tensor | int) -> Tensor:
        """The noise that takes x0 to x_t at step t: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        a = self.abar(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def check_steps(self, steps: int) -> None:
        if not isinstance(steps, int) or not 1 <= steps <= self.num_train_steps:
            raise ValueError(f"steps must be an int in [1, {self.num_train_steps}], got {steps!r}")

    def inference_steps(self, steps: int) -> list[int]:
        """`steps` evenly spaced steps, descending from N-1 to 0 (just [N-1] for one step). Distinct for steps <= N."""
        self.check_steps(steps)
        if steps == 1:
            return [self.num_train_steps - 1]
        top = self.num_train_steps - 1
        # floor(x + 0.5), not round(): banker's rounding could map two neighbours to the same step.
        return [math.floor(top * (1 - i / (steps - 1)) + 0.5) for i in range(steps)]


def ddim_step(schedule: DDPMSchedule, x_t: Tensor, eps: Tensor, t: Tensor | int, t_prev: Tensor | int,
              clip: float | None = 1.0) -> Tensor:
    """Deterministic DDIM update (eta = 0) from step t to t_prev < t (-1 = clean). x_t, eps (B, T, A) -> (B, T, A).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat
    """
    x0 = schedule.predict_x0(x_t, eps, t)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        # Re-derive the noise from the clipped x0 so the step stays on the line through x_t and x0_hat;
        # otherwise clipping would mix an x0 and an eps that no longer explain x_t together.
        eps = schedule.predict_eps(x_t, x0, t)
    a_prev = schedule.abar(t_prev, x_t)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


# ----------------------------------------------------------------------------------------------------------------------
# DDPM training and DDIM sampling


def diffusion_loss(model: nn.Module, schedule: DDPMSchedule, x0: Tensor, cond: Tensor,
                   generator: torch.Generator | None = None) -> Tensor:
    """Epsilon-prediction MSE at a uniformly drawn step per sample. x0 (B, T, A), cond (B, C) -> scalar."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_train_steps, (b,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return F.mse_loss(model(schedule.add_noise(x0, noise, t), t, cond), noise)


def _initial_noise(cond: Tensor, horizon: int, action_dim: int, noise: Tensor | None,
                   generator: torch.Generator | None) -> Tensor:
    shape = (cond.shape[0], horizon, action_dim)
    if noise is None:
        return torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must be (B, T, A) = {shape}, got {tuple(noise.shape)}")
    return noise.to(device=cond.device, dtype=cond.dtype)


def _check_sampler_args(model: nn.Module, cond: Tensor, horizon: int, action_dim: int,
                        schedule: DDPMSchedule, steps: int, clip: float | None) -> None:
    check_cond(cond, getattr(model, "cond_dim", None))
    schedule.check_steps(steps)
    if horizon < 1 or action_dim < 1:
        raise ValueError(f"horizon and action_dim must be >= 1, got {horizon}, {action_dim}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")


def _finite(x: Tensor, what: str) -> Tensor:
    # A robot must never receive NaN commands: fail loudly instead.
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{what} produced non-finite actions")
    return x


@torch.no_grad()
def sample_ddim(model: nn.Module, schedule: DDPMSchedule, cond: Tensor, horizon: int, action_dim: int,
                steps: int = 8, *, noise: Tensor | None = None, generator: torch.Generator | None = None,
                clip: float | None = 1.0) -> Tensor:
    """Deterministic DDIM (eta = 0) over `schedule.inference_steps(steps)`. cond (B, C) -> actions (B, T, A).

    The last step goes to the clean end, so the result is the final clipped x0 estimate.
    """
    _check_sampler_args(model, cond, horizon, action_dim, schedule, steps, clip)
    x = _initial_noise(cond, horizon, action_dim, noise, generator)
    ts = schedule.inference_steps(steps)
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        eps = model(x, torch.full((x.shape[0],), t, device=x.device), cond)
        x = ddim_step(schedule, x, eps, t, t_prev, clip)
    return _finite(x, "sample_ddim")


# ----------------------------------------------------------------------------------------------------------------------
# Consistency distillation
#
# Parameterisation (Song et al. 2023, in EDM's form). In the "scaled" space y = x_t / sqrt(abar_t) = x0 + sigma eps,
# sigma(t) = sqrt((1 - abar_t) / abar_t), the diffusion is EDM's variance-exploding one, and
#
#     f(x_t, t) = c_skip(t) y + c_out(t) F(x_t, t),   F = -eps_theta (the student's network, read as in the teacher)
#     c_skip = s_d^2 / (sigma^2 + s_d^2),   c_out = sigma s_d / sqrt(sigma^2 + s_d^2),   s_d = 0.5 (data std)
#
# The clean end is the virtual step -1 (abar = 1, sigma = 0): c_skip = 1, c_out = 0, f is exactly the identity.
# Why not f = the x0 estimate y - sigma eps_theta (c_skip = 1, c_out = -sigma)? It also is the identity at sigma = 0
# and would start the student exactly at the teacher, but sigma reaches ~2000 at t = N-1 (abar ~ 2e-7 with the capped
# cosine schedule): a 1e-3 error in eps becomes 2 in x0, the loss explodes and the teacher's own one-step sample is
# saturated noise. EDM's coefficients keep both terms bounded (c_skip y -> s_d^2 sqrt(abar) x_t / (1 - abar),
# c_out <= s_d) at every step. Reading F as -eps_theta keeps what the teacher knows where it is reliable: for small
# sigma, c_skip ~ 1 and c_out ~ sigma, so f ~ y - sigma eps_theta, the teacher's x0 estimate; at high noise the student
# has to learn a new output (~ x0 / s_d), which is what distillation teaches it.
SIGMA_DATA = 0.5


def consistency_output(model: nn.Module, schedule: DDPMSchedule, x_t: Tensor, t: Tensor | int, cond: Tensor,
                       clip: float | None = 1.0) -> Tensor:
    """f(x_t, t) ~ x0, the identity at the clean step t = -1. x_t (B, T, A), t (B,) or scalar -> (B, T, A)."""
    t = torch.as_tensor(t, device=x_t.device).long()
    if t.dim() == 0:
        t = t.expand(x_t.shape[0])
    a = schedule.abar(t, x_t)  # 1 at t = -1
    # c_skip y and c_out with sigma^2 = (1 - a) / a substituted, so nothing divides by ~0 near t = N-1.
    denom = 1 - a + SIGMA_DATA**2 * a
    skip_x = SIGMA_DATA**2 * a.sqrt() / denom  # c_skip / sqrt(abar), multiplies x_t
    c_out = SIGMA_DATA * (1 - a).sqrt() / denom.sqrt()
    f = skip_x * x_t - c_out * model(x_t, t.clamp(min=0), cond)
    if clip is not None:
        f = f.clamp(-clip, clip)
    return torch.where((t < 0).view(-1, 1, 1), x_t, f)


def consistency_distillation_loss(student: nn.Module, target: nn.Module, teacher: nn.Module, schedule: DDPMSchedule,
                                  x0: Tensor, cond: Tensor, *, skip: int = 10, generator: torch.Generator | None = None,
                                  clip: float | None = 1.0) -> Tensor:
    """Consistency distillation along the teacher's DDIM ODE, `skip` train steps per link. x0 (B, T, A) -> scalar.

        t_hi ~ U{0..N-1},  t_lo = max(t_hi - skip, -1)
        x_hi = add_noise(x0, eps, t_hi);  x_lo = DDIM_teacher(x_hi, t_hi -> t_lo)          (no grad)
        loss = || f_student(x_hi, t_hi) - f_target(x_lo, t_lo) ||^2                         (target: EMA, no grad)

    When t_lo = -1 the target is x_lo itself (f is the identity there), which anchors the chain at the data.
    `clip` bounds the teacher's x0 inside its DDIM step, as at sampling time. The student's output is not
    clipped here: clamping would zero the gradient of any element that overshoots the range.
    """
    if skip < 1:
        raise ValueError(f"skip must be >= 1, got {skip}")
    b = x0.shape[0]
    t_hi = torch.randint(0, schedule.num_train_steps, (b,), generator=generator, device=x0.device)
    t_lo = (t_hi - skip).clamp(min=-1)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_hi = schedule.add_noise(x0, noise, t_hi)
    with torch.no_grad():
        x_lo = ddim_step(schedule, x_hi, teacher(x_hi, t_hi, cond), t_hi, t_lo, clip)
        goal = consistency_output(target, schedule, x_lo, t_lo, cond, clip=None)
    return F.mse_loss(consistency_output(student, schedule, x_hi, t_hi, cond, clip=None), goal)


def consistency_steps(schedule: DDPMSchedule, steps: int) -> list[int]:
    """The steps at which `sample_consistency` evaluates f: t_i = (N-1) - floor(i N / steps), i < steps.

    One step: [N-1]. Two: [N-1, N/2 - 1] (49 for N = 100, abar ~ 0.5: the re-noised estimate is half signal,
    half noise, the midpoint in the CM paper's sense). Three: [99, 66, 33]. Distinct for steps <= N, never 0:
    re-noising to t = 0 would just return the estimate.
    """
    schedule.check_steps(steps)
    n = schedule.num_train_steps
    return [n - 1 - (i * n) // steps for i in range(steps)]


@torch.no_grad()
def sample_consistency(model: nn.Module, schedule: DDPMSchedule, cond: Tensor, horizon: int, action_dim: int,
                       steps: int = 1, *, noise: Tensor | None = None, generator: torch.Generator | None = None,
                       clip: float | None = 1.0) -> Tensor:
    """Multistep consistency sampling over `consistency_steps(schedule, steps)`. cond (B, C) -> actions (B, T, A).

    x0 = f(x_{t_0}, t_0); then for each later t_i: x = add_noise(x0, z, t_i), z ~ N(0, I); x0 = f(x, t_i).
    """
    _check_sampler_args(model, cond, horizon, action_dim, schedule, steps, clip)
    x = _initial_noise(cond, horizon, action_dim, noise, generator)
    ts = consistency_steps(schedule, steps)
    x0 = consistency_output(model, schedule, x, ts[0], cond, clip)
    for t in ts[1:]:
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x0 = consistency_output(model, schedule, schedule.add_noise(x0, z, t), t, cond, clip)
    return _finite(x0, "sample_consistency")


# ----------------------------------------------------------------------------------------------------------------------
# Weight averaging


class EMA:
    """Exponential moving average of a model's parameters and buffers, with the warm-up of diffusion_policy (decay
    grows with the step: min(max_decay, 1 - (1 + step/inv_gamma)**-power)), or a fixed decay.

    inv_gamma is 1. The warm-up starts at decay 0 (the average is the model) so early, bad weights are forgotten
    quickly; with power 0.75 the decay reaches 0.999 near 10k updates and 0.9999 near 215k.
    Integer buffers (counters) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.9999, power: float = 0.75,
                 fixed: float | None = None) -> None:
        if not 0 <= max_decay <= 1 or (fixed is not None and not 0 <= fixed <= 1):
            raise ValueError(f"decays must lie in [0, 1], got max_decay={max_decay}, fixed={fixed}")
        self.max_decay, self.power, self.fixed = max_decay, power, fixed
        self.step = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self, step: int | None = None) -> float:
        """The decay the update at `step` (default: the next one) uses."""
        if self.fixed is not None:
            return self.fixed
        step = self.step if step is None else step
        return min(self.max_decay, max(0.0, 1 - (1 + step) ** -self.power))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        for avg, new in zip(self.module.parameters(), model.parameters()):
            avg.lerp_(new.detach(), 1 - d)
        for avg, new in zip(self.module.buffers(), model.buffers()):
            if avg.is_floating_point():
                avg.lerp_(new, 1 - d)
            else:
                avg.copy_(new)
        self.step += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.step = int(state["step"])
