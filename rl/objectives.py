"""The per-step objectives of the policy-gradient algorithms, one function per equation.

Notation (docs/design.md, "RL algorithms"):

| variable    | symbol | meaning |
|-------------|--------|---------|
| `logp`      | log π_θ(x_prev ∣ x_t) | under the current parameters, (B,) |
| `logp_old`  | log π_old             | recorded when the batch was sampled, (B,) |
| `adv`       | A                     | advantage of each trajectory (or of each state with GAE), (B,) |
| `ratio`     | ρ = exp(log π_θ − log π_old) | |
| `clip_range`| ε                     | PPO clip range |
| `mu`, `mu_ref` | μ_θ, μ_ref         | means of two DDIM Gaussians with the same σ̃, (B, C, H, W) |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ClipLoss:
    """loss: scalar; ratio: (B,) ρ; clipped: (B,) bool, True where the clipped term was the active one."""
    loss: Tensor
    ratio: Tensor
    clipped: Tensor


def ppo_clip_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, *, clip_range: float) -> ClipLoss:
    """L = mean_i max(−A_i ρ_i, −A_i clip(ρ_i, 1 − ε, 1 + ε))   (Schulman et al. 2017, eq. 7, negated).

    The gradient is zero for samples whose clipped term is the larger (the 'clipped' ones).
    """
    ratio = torch.exp(logp - logp_old)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return ClipLoss(loss=torch.maximum(unclipped, clipped).mean(), ratio=ratio.detach(),
                    clipped=(clipped > unclipped).detach())


@dataclass
class TrajectoryRatio:
    """log_r: (B,) clipped trajectory log-ratio; step_active: (T, B) bool, per-step term unclipped;
    active: (B,) bool, global clip inactive; raw: (B,) Σ_t log r_t without any clipping."""
    log_r: Tensor
    step_active: Tensor
    active: Tensor
    raw: Tensor


def trajectory_log_ratio(log_r_steps: Tensor, *, per_step_clip: float, global_clip: float) -> TrajectoryRatio:
    """log r = clip(Σ_t clip(log r_t, ±c_step), ±c_global)   (the seed's PPO-DDPM ratio).

    log_r_steps: (T, B) per-step log-ratios log π_θ − log π_old. Gradients flow only through the
    steps whose log r_t is inside ±c_step, and only for trajectories whose sum is inside ±c_global.
    """
    per = log_r_steps.clamp(-per_step_clip, per_step_clip)
    total = per.sum(0)
    log_r = total.clamp(-global_clip, global_clip)
    return TrajectoryRatio(log_r=log_r, step_active=log_r_steps.abs() < per_step_clip,
                           active=total.abs() < global_clip, raw=log_r_steps.sum(0))


def trajectory_surrogate(adv: Tensor, ratio: TrajectoryRatio) -> Tensor:
    """The value of the trajectory objective, min form: mean_i min(A_i r_i^raw, A_i r_i^clipped)."""
    return torch.minimum(adv * ratio.raw.exp(), adv * ratio.log_r.exp()).mean()


def approx_kl(log_ratio: Tensor) -> Tensor:
    """KL(π_old ‖ π_θ) ≈ mean((ρ − 1) − log ρ), ρ = exp(log_ratio)   (Schulman's k3 estimator:
    unbiased and never negative; http://joschu.net/blog/kl-approx.html)."""
    return (log_ratio.exp() - 1 - log_ratio).mean()


def gaussian_kl(mu: Tensor, mu_ref: Tensor, sigma_tilde: float | Tensor) -> Tensor:
    """KL(N(μ_ref, σ̃²I) ‖ N(μ, σ̃²I)) per sample, reduced like the log-prob (mean over dimensions):

        KL_i = mean_{C,H,W} (μ_ref − μ)² / (2 σ̃²)                  (B,)

    Two Gaussians with the same covariance: the KL is symmetric in μ, μ_ref.
    """
    s = torch.as_tensor(sigma_tilde, dtype=mu.dtype, device=mu.device)
    if s.ndim == 1:
        s = s.reshape(-1, *([1] * (mu.ndim - 1)))
    return ((mu_ref - mu) ** 2 / (2 * s**2)).flatten(1).mean(1)


def reinforce_loss(logp: Tensor, adv: Tensor) -> Tensor:
    """L = −mean_i A_i log π_θ(x_prev,i | x_t,i)   (Williams 1992), one step's share."""
    return -(adv * logp).mean()
