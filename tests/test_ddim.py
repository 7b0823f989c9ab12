"""The DDIM policy step: sample vs. diffusers, log-prob vs. torch.distributions, the sigma floor."""
from __future__ import annotations

import math

import pytest
import torch

from ddpm.ddim import ddim_sigma, ddim_step_logprob, gaussian_logprob
from ddpm.sampling import sample_trajectory
from ddpm.schedulers import ddim_schedule, make_ddim_scheduler, make_train_scheduler


def _schedule(num_steps=10, beta="squaredcos_cap_v2", clip=True, prediction="epsilon"):
    train = make_train_scheduler(num_train_timesteps=1000, beta_schedule=beta, prediction_type=prediction)
    ddim = make_ddim_scheduler(train.config, num_steps=num_steps, clip_sample=clip)
    return ddim, ddim_schedule(ddim)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sample_matches_diffusers_ddim_step(eta, beta, clip, prediction):
    # Reference: diffusers' DDIMScheduler.step with the same network output, x_t, η and noise.
    ddim, sched = _schedule(beta=beta, clip=clip, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    for k in range(sched.num_steps):
        x = torch.randn(3, 2, 8, 8, generator=g)
        eps = torch.randn(3, 2, 8, 8, generator=g)
        z = torch.randn(3, 2, 8, 8, generator=g)
        ref = ddim.step(eps, sched.timesteps[k], x, eta=eta, variance_noise=z).prev_sample
        ours = ddim_step_logprob(eps, x, alpha_bar_t=sched.alpha_bar_t[k], alpha_bar_prev=sched.alpha_bar_prev[k],
                                 eta=eta, sigma_floor=1e-3, noise=z, clip_range=1.0 if clip else None,
                                 prediction_type=sched.prediction_type)
        torch.testing.assert_close(ours.x_prev, ref, rtol=1e-5, atol=1e-5)


def test_sigma_matches_diffusers_variance():
    ddim, sched = _schedule()
    for k in range(sched.num_steps):
        t, prev = int(sched.timesteps[k]), int(sched.prev_timesteps[k])
        ref = ddim._get_variance(t, prev).sqrt().item()
        assert ddim_sigma(sched.alpha_bar_t[k], sched.alpha_bar_prev[k], 1.0).item() == pytest.approx(ref, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_logprob_matches_torch_normal(reduction):
    # Reference: torch.distributions.Normal(μ, σ̃).log_prob(x_prev), reduced over (C, H, W) the same way.
    _, sched = _schedule()
    g = torch.Generator().manual_seed(1)
    for k in range(sched.num_steps):
        x = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
        eps = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
        step = ddim_step_logprob(eps, x, alpha_bar_t=sched.alpha_bar_t[k], alpha_bar_prev=sched.alpha_bar_prev[k],
                                 eta=1.0, sigma_floor=1e-2, generator=g, reduction=reduction)
        sigma_tilde = step.sigma.clamp(min=1e-2).reshape(-1, 1, 1, 1)
        ref = torch.distributions.Normal(step.mu, sigma_tilde).log_prob(step.x_prev)
        ref = ref.mean(dim=(1, 2, 3)) if reduction == "mean" else ref.sum(dim=(1, 2, 3))
        torch.testing.assert_close(step.logp, ref)


def test_logprob_of_given_action_recomputes_sampling_logprob():
    # PPO's second pass: the same parameters must give back log π_old exactly.
    _, sched = _schedule()
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    kw = dict(alpha_bar_t=sched.alpha_bar_t[3], alpha_bar_prev=sched.alpha_bar_prev[3], eta=1.0, sigma_floor=1e-3)
    first = ddim_step_logprob(eps, x, generator=g, **kw)
    again = ddim_step_logprob(eps, x, x_prev=first.x_prev, **kw)
    torch.testing.assert_close(again.logp, first.logp)


def test_sigma_floor_bounds_logprob_when_sigma_vanishes():
    # Last step: ᾱ_prev = 1, so σ_t = 0 and the sample is deterministic. Without a floor the
    # log-density of x_prev = μ would be +inf; with σ̃ = σ_min it is exactly −log σ_min − ½ log 2π.
    _, sched = _schedule()
    k = sched.num_steps - 1
    assert ddim_sigma(sched.alpha_bar_t[k], sched.alpha_bar_prev[k], 1.0).item() == 0.0
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    for floor in (1e-4, 1e-2):
        step = ddim_step_logprob(eps, x, alpha_bar_t=sched.alpha_bar_t[k], alpha_bar_prev=sched.alpha_bar_prev[k],
                                 eta=1.0, sigma_floor=floor, generator=g)
        assert torch.isfinite(step.logp).all()
        expected = -math.log(floor) - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(step.logp, torch.full_like(step.logp, expected))
        # a perturbed action is finite too, and bounded by the same maximum
        off = ddim_step_logprob(eps, x, x_prev=step.x_prev + 0.01, alpha_bar_t=sched.alpha_bar_t[k],
                                alpha_bar_prev=sched.alpha_bar_prev[k], eta=1.0, sigma_floor=floor)
        assert torch.isfinite(off.logp).all() and (off.logp <= expected).all()


def test_sigma_floor_must_be_positive():
    with pytest.raises(ValueError, match="sigma_floor"):
        ddim_step_logprob(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), alpha_bar_t=0.5, alpha_bar_prev=0.9,
                          eta=1.0, sigma_floor=0.0)


def test_gaussian_logprob_sum_is_mean_times_dims():
    g = torch.Generator().manual_seed(4)
    x, mu = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    s = torch.tensor([0.1, 0.5, 1.0])
    torch.testing.assert_close(gaussian_logprob(x, mu, s, reduction="sum"),
                               gaussian_logprob(x, mu, s, reduction="mean") * 50)


def test_trajectory_sampler_records_consistent_steps():
    # Each recorded log π_old must equal the step's log-prob recomputed from the cached states.
    _, sched = _schedule(num_steps=5)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    eps_fn = lambda x, t: net(x)  # noqa: E731
    traj = sample_trajectory(eps_fn, sched, shape=(3, 1, 8, 8), eta=1.0, sigma_floor=1e-3,
                             generator=torch.Generator().manual_seed(5))
    assert traj.states.shape == (6, 3, 1, 8, 8) and traj.logp.shape == (5, 3)
    assert traj.x_t.shape == traj.x_prev.shape == (5, 3, 1, 8, 8)
    assert traj.images.min() >= -1 and traj.images.max() <= 1
    torch.testing.assert_close(traj.x_t[1:], traj.x_prev[:-1])
    with torch.no_grad():
        for k in range(5):
            step = ddim_step_logprob(net(traj.x_t[k]), traj.x_t[k], x_prev=traj.x_prev[k],
                                     alpha_bar_t=sched.alpha_bar_t[k], alpha_bar_prev=sched.alpha_bar_prev[k],
                                     eta=1.0, sigma_floor=1e-3)
            torch.testing.assert_close(step.logp, traj.logp[k])
    # same seed -> same trajectories
    again = sample_trajectory(eps_fn, sched, shape=(3, 1, 8, 8), eta=1.0, sigma_floor=1e-3,
                              generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.states, traj.states)


def test_v_prediction_is_well_conditioned_at_the_first_step():
    # At t = 999 of the cosine schedule ᾱ ≈ 2e-9: a 1e-4 change of ε̂ moves x̂0 by ~2 (so clipping
    # decides it), while the same change of v̂ moves x̂0 by 1e-4.
    from ddpm.ddim import predict_x0, x0_eps_from_v
    _, sched = _schedule()
    a = sched.alpha_bar_t[0]
    assert a < 1e-8
    x, out = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4, dtype=torch.float64)
    d_eps = (predict_x0(x, out + 1e-4, a) - predict_x0(x, out, a)).abs().max()
    d_v = (x0_eps_from_v(x, out + 1e-4, a)[0] - x0_eps_from_v(x, out, a)[0]).abs().max()
    assert d_eps > 1.0 and d_v < 2e-4
