"""The DDIM step as a Gaussian policy, with its log-probability and a sigma floor.

Notation (variable -> symbol of docs/design.md, "Policy"; Song et al. 2021, eq. 12 and 16):

| variable         | symbol          | meaning |
|------------------|-----------------|---------|
| `x_t`            | x_t             | noisy state before the step, (B, C, H, W) |
| `output`         | ε̂ or v̂          | the network's output, (B, C, H, W): noise (ε-prediction) or velocity (v-prediction) |
| `eps`            | ε̂               | the noise prediction, from the output |
| `alpha_bar_t`    | ᾱ_t             | cumulative signal fraction at t, (B,) or scalar |
| `alpha_bar_prev` | ᾱ_prev          | the same at the next (less noisy) timestep |
| `x0`             | x̂0              | predicted clean image |
| `sigma`          | σ_t             | DDIM noise std of the step, (B,) |
| `sigma_floor`    | σ_min           | lower bound of the std used in the log-prob: σ̃_t = max(σ_t, σ_min) |
| `noise_scale`    | e^ζ             | a learned factor on the step's std (SAC's actor): σ_t e^ζ drawn, σ̃_t e^ζ in the log-prob |
| `mu`             | μ_θ             | mean of the step (plus δ, the latent policy's drift, if given) |
| `x_prev`         | x_prev          | state after the step: μ_θ + σ_t z |
| `logp`           | log π_θ(x_prev ∣ x_t) | reduced over (C, H, W) by mean (default) or sum, (B,) |

The sample follows diffusers' `DDIMScheduler.step` exactly (same ε̂, noise, η and clipping give the
same x_prev; tested), but the log-prob, which diffusers does not provide, is ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum"]
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(v: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) schedule value against a (B, C, H, W) tensor, in its dtype."""
    v = torch.as_tensor(v, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def predict_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """x̂0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)   (Song et al. 2021, eq. 12, first term)."""
    a = _per_sample(alpha_bar_t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def x0_eps_from_v(x_t: Tensor, v: Tensor, alpha_bar_t: Tensor | float) -> tuple[Tensor, Tensor]:
    """v-prediction (Salimans & Ho 2022): x̂0 = sqrt(ᾱ_t) x_t − sqrt(1 − ᾱ_t) v̂,
    ε̂ = sqrt(1 − ᾱ_t) x_t + sqrt(ᾱ_t) v̂.

    Unlike x̂0 from ε̂, which divides by sqrt(ᾱ_t) (≈ 5e-5 at t = 999 of the cosine schedule, so a
    change of 1e-4 in ε̂ moves x̂0 by 2), both are well conditioned at every noise level.
    """
    a = _per_sample(alpha_bar_t, x_t)
    return a.sqrt() * x_t - (1 - a).sqrt() * v, (1 - a).sqrt() * x_t + a.sqrt() * v


def x0_eps(output: Tensor, x_t: Tensor, alpha_bar_t: Tensor | float, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from the network's output under its prediction type ('epsilon' or 'v_prediction')."""
    if prediction_type == "epsilon":
        return predict_x0(x_t, output, alpha_bar_t), output
    if prediction_type == "v_prediction":
        return x0_eps_from_v(x_t, output, alpha_bar_t)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'")


def ddim_sigma(alpha_bar_t: Tensor | float, alpha_bar_prev: Tensor | float, eta: float | Tensor) -> Tensor:
    """σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_prev)   (eq. 16), in float64.

    σ_t = 0 on the last step (ᾱ_prev = 1), which makes that step deterministic.
    """
    a_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    return torch.as_tensor(eta, dtype=torch.float64) * var.clamp(min=0).sqrt()


def ddim_mean(x0: Tensor, eps: Tensor, alpha_bar_prev: Tensor | float, sigma: Tensor | float) -> Tensor:
    """μ_θ = sqrt(ᾱ_prev) x̂0 + sqrt(1 − ᾱ_prev − σ_t²) ε̂   (eq. 12 without the noise term)."""
    a_prev = _per_sample(alpha_bar_prev, x0)
    s = _per_sample(sigma, x0)
    return a_prev.sqrt() * x0 + (1 - a_prev - s**2).clamp(min=0).sqrt() * eps


def gaussian_logprob(x: Tensor, mu: Tensor, sigma: Tensor | float, *, reduction: Reduction = "mean") -> Tensor:
    """log N(x; μ, σ² I) per sample: reduce_{C,H,W} [ −(x − μ)²/(2σ²) − log σ − ½ log 2π ].

    x, mu: (B, C, H, W); sigma: scalar or (B,). Returns (B,).
    'mean' divides the sum by the number of dimensions d = C·H·W (as DDPO does): log-ratios then
    stay O(1) whatever the image size, so PPO clip ranges like 1e-4..1e-1 carry across resolutions.
    'sum' is the true log-density of the d-dimensional Gaussian.
    """
    s = _per_sample(sigma, x)
    elem = -((x - mu) ** 2) / (2 * s**2) - s.log() - _HALF_LOG_2PI
    dims = tuple(range(1, x.ndim))
    return elem.mean(dim=dims) if reduction == "mean" else elem.sum(dim=dims)


@dataclass
class DDIMStep:
    """Result of one DDIM step; all (B, C, H, W) except `logp` and `sigma`, which are (B,)."""
    x_prev: Tensor
    mu: Tensor
    x0: Tensor
    sigma: Tensor
    logp: Tensor


def ddim_step_logprob(
    output: Tensor,
    x_t: Tensor,
    *,
    alpha_bar_t: Tensor | float,
    alpha_bar_prev: Tensor | float,
    eta: float | Tensor,
    sigma_floor: float,
    x_prev: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_range: float | None = 1.0,
    reduction: Reduction = "mean",
    prediction_type: str = "epsilon",
    mean_shift: Tensor | None = None,
    noise_scale: Tensor | float | None = None,
) -> DDIMStep:
    """One DDIM step x_t → x_prev and log π_θ(x_prev | x_t), from the network output ε̂ or v̂.

    x_prev = μ_θ + σ_t z with z = `noise` (or drawn from `generator` on the CPU). If `x_prev` is
    given (PPO's second pass, TRPO), it is not sampled: only its log-prob under the current
    parameters is computed. The log-prob uses σ̃_t = max(σ_t, σ_min), so it stays finite and bounded
    when σ_t → 0 (the last step, or η → 0). `mean_shift` δ (B, C, H, W) moves the mean: μ = μ_DDIM + δ
    (the latent-drift policy). `noise_scale` e^ζ (a scalar, differentiable) multiplies the step's std,
    both the noise drawn (σ_t e^ζ z) and the log-prob's (σ̃_t e^ζ); the mean stays the DDIM mean.
    """
    if sigma_floor <= 0:
        raise ValueError(f"sigma_floor must be > 0, got {sigma_floor}")
    x0, eps = x0_eps(output, x_t, alpha_bar_t, prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    sigma64 = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta).to(x_t.device)
    if sigma64.ndim == 0:
        sigma64 = sigma64.expand(x_t.shape[0])
    sigma = sigma64.to(x_t.dtype)
    mu = ddim_mean(x0, eps, alpha_bar_prev, sigma)
    if mean_shift is not None:
        mu = mu + mean_shift
    scale = 1.0 if noise_scale is None else torch.as_tensor(noise_scale, device=x_t.device).to(x_t.dtype)
    if x_prev is None:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
        x_prev = mu + _per_sample(sigma, x_t) * scale * noise
    sigma_tilde = sigma64.clamp(min=sigma_floor).to(x_t.dtype) * scale
    logp = gaussian_logprob(x_prev.detach(), mu, sigma_tilde, reduction=reduction)
    return DDIMStep(x_prev=x_prev, mu=mu, x0=x0, sigma=sigma, logp=logp)
