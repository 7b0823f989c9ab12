"""The objectives every algorithm shares, one function per equation: the KL estimates and the REINFORCE loss
(PPO's own live in `rl/ppo.py`).

Notation (docs/design.md, "RL algorithms"):

| variable    | symbol | meaning |
|-------------|--------|---------|
| `logp`      | log π_θ(x_prev ∣ x_t) | under the current parameters, (B,) |
| `adv`       | A                     | advantage of each trajectory (or of each state with GAE), (B,) |
| `log_ratio` | log ρ = log π_θ − log π_old | |
| `mu`, `mu_ref` | μ_θ, μ_ref         | means of two DDIM Gaussians with the same σ̃, (B, C, H, W) |
"""
from __future__ import annotations

import torch
from torch import Tensor


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
