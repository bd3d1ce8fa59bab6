"""Diffusion policy head: U-Net shapes, the DDPM schedule, DDIM against an oracle, training signal, consistency
distillation against its teacher, EMA, and bad input."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from policies.diffusion import (
    EMA,
    ConditionalUnet1D,
    DDPMSchedule,
    consistency_distillation_loss,
    consistency_output,
    consistency_steps,
    diffusion_loss,
    sample_consistency,
    sample_ddim,
)

T, A, C = 8, 2, 4
TINY = {"down_dims": (16, 32), "n_groups": 4, "step_embed_dim": 16}


def toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-mode chunks: x0 = +-0.8 tanh(W c), the sign a coin flip the cond does not reveal."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(C, T * A, generator=torch.Generator().manual_seed(123)) * 0.5
    cond = torch.randn(n, C, generator=gen)
    sign = torch.randint(0, 2, (n, 1), generator=gen).float() * 2 - 1
    return (0.8 * torch.tanh(cond @ w) * sign).view(n, T, A), cond


@pytest.fixture(scope="module")
def teacher():
    """A tiny DDPM teacher trained briefly on 64 toy chunks, with its loss on the whole set before and after."""
    torch.manual_seed(0)
    schedule = DDPMSchedule(100)
    x0, cond = toy_data(64, seed=0)
    model = ConditionalUnet1D(A, C, **TINY)

    def full_loss() -> float:
        with torch.no_grad():
            return diffusion_loss(model, schedule, x0, cond, generator=torch.Generator().manual_seed(99)).item()

    before = full_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        loss = diffusion_loss(model, schedule, x0, cond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = full_loss()
    return {"model": model.eval().requires_grad_(False), "schedule": schedule, "x0": x0, "cond": cond,
            "before": before, "after": after}


class OracleEps(nn.Module):
    """Returns the exact noise that separates x_t from one known clean chunk: a perfect epsilon model."""

    def __init__(self, schedule: DDPMSchedule, target: torch.Tensor) -> None:
        super().__init__()
        self.schedule, self.target = schedule, target

    def forward(self, x, t, cond):
        return self.schedule.predict_eps(x, self.target.expand_as(x), t)


# ----------------------------------------------------------------------------------------------------------------------
# Network


@pytest.mark.parametrize("horizon", [16, 8])
def test_unet_output_shape_and_step_dtype(horizon):
    model = ConditionalUnet1D(A, C, down_dims=(16, 32, 64), n_groups=4, step_embed_dim=16)
    x, cond = torch.randn(3, horizon, A), torch.randn(3, C)
    out = model(x, torch.tensor([0, 50, 99]), cond)
    assert out.shape == (3, horizon, A)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(model(x, torch.tensor([0.0, 50.0, 99.0]), cond), out)
    # The step and the cond both reach the output.
    assert not torch.allclose(model(x, torch.tensor([1, 50, 99]), cond)[0], out[0])
    assert not torch.allclose(model(x, torch.tensor([0, 50, 99]), cond + 1), out)


def test_unet_rejects_bad_horizon_and_groups():
    model = ConditionalUnet1D(A, C, down_dims=(16, 32, 64), n_groups=4, step_embed_dim=16)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(2, 6, A), torch.zeros(2), torch.randn(2, C))
    with pytest.raises(ValueError, match="n_groups=4 must divide"):
        ConditionalUnet1D(A, C, down_dims=(16, 30), n_groups=4)


# ----------------------------------------------------------------------------------------------------------------------
# Schedule and DDIM


def test_schedule_is_capped_cosine():
    s = DDPMSchedule(100)
    abar = s.alphas_cumprod
    assert abar.shape == (100,)
    assert ((abar > 0) & (abar < 1)).all()
    assert (abar[1:] < abar[:-1]).all()
    assert (s.betas > 0).all() and (s.betas <= 0.999 + 1e-7).all()
    assert s.betas[-1] == pytest.approx(0.999)  # the cap bites on the last step
    assert abar[-1] < 1e-5  # ... which still ends in (nearly) pure noise


def test_add_noise_then_predict_x0_recovers_x0():
    s = DDPMSchedule(100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(100, T, A, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(100, T, A, generator=gen, dtype=torch.float64)
    t = torch.arange(100)
    x_t = s.add_noise(x0, noise, t)
    torch.testing.assert_close(s.predict_x0(x_t, noise, t), x0, atol=1e-9, rtol=0)
    torch.testing.assert_close(s.predict_eps(x_t, x0, t), noise, atol=1e-9, rtol=0)
    # float32 below the last, most amplifying steps
    x_t = s.add_noise(x0.float(), noise.float(), t)
    torch.testing.assert_close(s.predict_x0(x_t, noise.float(), t)[:90], x0.float()[:90], atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 8, 100])
def test_inference_steps_descend_evenly(steps):
    ts = DDPMSchedule(100).inference_steps(steps)
    assert len(ts) == steps and ts[0] == 99
    assert all(a > b for a, b in itertools.pairwise(ts))
    if steps > 1:
        assert ts[-1] == 0
        gaps = [a - b for a, b in itertools.pairwise(ts)]
        assert max(gaps) - min(gaps) <= 1


def test_consistency_steps():
    s = DDPMSchedule(100)
    assert consistency_steps(s, 1) == [99]
    assert consistency_steps(s, 2) == [99, 49]
    assert consistency_steps(s, 3) == [99, 66, 33]
    assert consistency_steps(s, 100) == list(range(99, -1, -1))


@pytest.mark.parametrize("steps", [8, 3])
def test_ddim_with_oracle_eps_returns_the_target(steps):
    s = DDPMSchedule(100)
    target = torch.linspace(-0.9, 0.9, T * A).view(1, T, A)
    out = sample_ddim(OracleEps(s, target), s, torch.zeros(5, C), T, A, steps=steps,
                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand(5, T, A), atol=1e-4, rtol=0)


def test_consistency_output_is_identity_at_the_clean_step():
    s = DDPMSchedule(100)
    model = ConditionalUnet1D(A, C, **TINY)
    x = torch.rand(4, T, A) * 2 - 1
    t = torch.tensor([-1, -1, 0, 99])
    f = consistency_output(model, s, x, t, torch.randn(4, C))
    assert torch.equal(f[:2], x[:2])
    assert not torch.allclose(f[3], x[3])


# ----------------------------------------------------------------------------------------------------------------------
# Samplers


SAMPLERS = [(sample_ddim, 8), (sample_ddim, 1), (sample_consistency, 1), (sample_consistency, 2),
            (sample_consistency, 3)]


@pytest.mark.parametrize("sampler,steps", SAMPLERS)
def test_sampler_shape_bounds_and_determinism(sampler, steps):
    s = DDPMSchedule(100)
    torch.manual_seed(0)
    model = ConditionalUnet1D(A, C, **TINY).eval()
    cond = torch.randn(6, C)

    def run(seed, clip=0.3, noise=None):
        return sampler(model, s, cond, T, A, steps, noise=noise, generator=torch.Generator().manual_seed(seed),
                       clip=clip)

    a = run(0)
    assert a.shape == (6, T, A)
    assert torch.isfinite(a).all() and a.abs().max() <= 0.3
    torch.testing.assert_close(run(0), a, atol=0, rtol=0)
    assert not torch.allclose(run(1), a)
    # An explicit initial noise replaces the generator's first draw; multistep consistency sampling draws again
    # when it re-noises, from the generator.
    z = torch.randn(6, T, A, generator=torch.Generator().manual_seed(0))
    if sampler is sample_ddim or steps == 1:
        torch.testing.assert_close(run(5, noise=z), a, atol=0, rtol=0)
    else:
        torch.testing.assert_close(run(5, noise=z), run(5, noise=z), atol=0, rtol=0)
        assert not torch.allclose(run(5, noise=z), run(6, noise=z))
    assert torch.isfinite(run(0, clip=None)).all()


# ----------------------------------------------------------------------------------------------------------------------
# Training


def test_diffusion_loss_falls(teacher):
    assert teacher["after"] < 0.5 * teacher["before"], (teacher["before"], teacher["after"])


def test_consistency_distillation_beats_one_step_ddim(teacher):
    model, s = teacher["model"], teacher["schedule"]
    student = copy.deepcopy(model).train().requires_grad_(True)
    target = EMA(student, fixed=0.9)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    x0, cond = toy_data(256, seed=2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(120):
        idx = torch.randint(0, len(x0), (64,), generator=gen)
        loss = consistency_distillation_loss(student, target.module, model, s, x0[idx], cond[idx], skip=10,
                                             generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        target.update(student)
    assert torch.isfinite(loss)

    cond_test = torch.randn(128, C, generator=torch.Generator().manual_seed(5))
    z = torch.randn(128, T, A, generator=torch.Generator().manual_seed(6))
    reference = sample_ddim(model, s, cond_test, T, A, steps=8, noise=z)
    teacher_one = sample_ddim(model, s, cond_test, T, A, steps=1, noise=z)
    student_one = sample_consistency(student.eval(), s, cond_test, T, A, steps=1, noise=z)
    err_student, err_teacher = F.mse_loss(student_one, reference), F.mse_loss(teacher_one, reference)
    assert err_student < err_teacher, (err_student, err_teacher)
    # ... and it follows the teacher's trajectories, not just the mean chunk (which would score mean(ref^2)).
    assert err_student < 0.5 * reference.pow(2).mean(), (err_student, reference.pow(2).mean())


# ----------------------------------------------------------------------------------------------------------------------
# EMA


def test_ema_fixed_decay_gives_the_midpoint():
    model = nn.Linear(3, 2)
    ema = EMA(model, fixed=0.5)
    old = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, old[name] + 0.5)
        assert not p.requires_grad
    assert not ema.module.training


def test_ema_warmup_and_state_dict():
    model = nn.Linear(3, 2)
    ema = EMA(model, max_decay=0.999, power=0.75)
    assert ema.decay() == 0.0
    assert 0 < ema.decay(10) < ema.decay(1000) <= 0.999
    assert ema.decay(10**9) == 0.999
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay 0 at step 0: the average becomes the model
    torch.testing.assert_close(ema.module.weight, model.weight)
    other = EMA(nn.Linear(3, 2))
    other.load_state_dict(ema.state_dict())
    assert other.step == 1
    torch.testing.assert_close(other.module.weight, model.weight)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("sampler", [sample_ddim, sample_consistency])
def test_bad_input_is_refused(sampler):
    s = DDPMSchedule(100)
    model = ConditionalUnet1D(A, C, **TINY)
    cond = torch.randn(2, C)
    with pytest.raises(ValueError, match="cond contains NaN"):
        sampler(model, s, torch.tensor([[0.0, float("nan"), 0.0, 0.0], [0.0] * 4]), T, A)
    with pytest.raises(ValueError, match="cond_dim=4"):
        sampler(model, s, torch.randn(2, C + 1), T, A)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        sampler(model, s, torch.randn(C), T, A)
    for steps in (0, 101):
        with pytest.raises(ValueError, match="steps must be"):
            sampler(model, s, cond, T, A, steps)
    with pytest.raises(ValueError, match="noise must be"):
        sampler(model, s, cond, T, A, noise=torch.randn(2, T + 1, A))
    with pytest.raises(ValueError, match="cond contains NaN"):
        model(torch.randn(2, T, A), torch.zeros(2), torch.full((2, C), float("nan")))
