"""Fine detail of a set of tiles: the radially averaged power spectrum and the mean gradient magnitude.

    P(k) = mean over tiles and over the frequencies f with round(|f| · H) = k of |F x̃_f|² / P      x̃ = x − mean x
    G = mean over tiles and pixels of |∇x|                                  central differences (torch.gradient)

A model that blurs has too little power at high k and too small G; one that adds noise, too much. The
report compares each set's P(k) with the held-out tiles' band by band (`spectrum_deviation`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from reward.templates import ring_means


def radial_power_spectrum(images: Tensor) -> Tensor:
    """P(k) (⌊H/2⌋ + 1,) float64 of (N, C, H, W) square tiles (channels averaged), k = 0 … H/2 cycles per tile."""
    x = images.detach().cpu().double().mean(1)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = (torch.fft.fft2(x).abs() ** 2).mean(0) / x[0].numel()           # (H, W)
    return ring_means(power[None])[0, : x.shape[-1] // 2 + 1]


def mean_gradient(images: Tensor) -> float:
    """G: the mean gradient magnitude of (N, C, H, W) tiles (channels averaged), in intensity per pixel."""
    x = images.detach().cpu().double().mean(1)
    gy, gx = torch.gradient(x, dim=(-2, -1))
    return float(torch.sqrt(gy ** 2 + gx ** 2).mean())


def spectrum_deviation(spectrum: Tensor, reference: Tensor) -> float:
    """max over k ≥ 1 of |P(k) / P_ref(k) − 1|: the worst band's relative power error."""
    return float((spectrum[1:] / reference[1:].clamp_min(1e-30) - 1).abs().max())
