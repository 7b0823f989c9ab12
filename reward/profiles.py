"""Radial-profile features of a crater tile: how slope, brightness and its spread vary with the
distance from the tile centre, the quantities a crater's rim and size show in.

    φ(x) = [ĝ_0..ĝ_R, Î_0..Î_R, ŝ_0..ŝ_R]     R + 1 rings about the tile centre

ĝ_r is the ring mean of the gradient magnitude |∇x| over its image mean (a rim is a ring of steep
slopes), Î_r the ring mean of intensity and ŝ_r the ring std, both over the image's std (the shaded
relief's bright and dark rim halves). Rings are fixed fractions of the half-width, so a tile of any
pixel size maps to the same kilometres (the Mars tiles are a fixed 320 km window), and the features
are invariant to the tile's 8 rotations and flips by construction.

Written by hand: no library computes azimuthal ring statistics of a batch of tiles in torch. Used by
the `radial_profile` feature extractor (reward/features.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

RINGS = 16
"""Radial rings of the profile features (the corner beyond the inscribed circle is one more)."""


def _gray(images: Tensor) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W) float64 on the same device; RGB by BT.601 luma."""
    x = images.to(torch.float64)
    if x.shape[1] == 3:
        x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return x[:, 0]


def ring_index(size: int, rings: int = RINGS) -> Tensor:
    """(size, size) long: the ring of each pixel, floor(r / (size/2) · rings), r from the tile centre
    ((size − 1)/2, (size − 1)/2); pixels beyond the inscribed circle share ring `rings`."""
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    r = ((yy - c) ** 2 + (xx - c) ** 2).sqrt()
    return (r / (size / 2) * rings).long().clamp(max=rings)


def radial_profile_features(images: Tensor, *, rings: int = RINGS) -> Tensor:
    """φ(x): (N, C, H, W) square tiles in [-1, 1] -> (N, 3 (rings + 1)) float64, as in the module
    docstring (gradient by central differences, `torch.gradient`); differentiable in the images."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (N, C, H, W) square tiles, got shape {tuple(images.shape)}")
    x = _gray(images)                                                  # (N, H, W)
    gy, gx = torch.gradient(x, dim=(1, 2))
    g = (gx ** 2 + gy ** 2).sqrt()
    ring = ring_index(x.shape[-1], rings).flatten().to(x.device)      # (H·W,)
    onehot = torch.nn.functional.one_hot(ring, rings + 1).double()     # (H·W, R+1)
    count = onehot.sum(0)                                              # (R+1,)

    def ring_mean(v: Tensor) -> Tensor:                                # (N, H, W) -> (N, R+1)
        return v.flatten(1) @ onehot / count

    mean_i, mean_i2 = ring_mean(x), ring_mean(x ** 2)
    std_img = x.flatten(1).std(1, keepdim=True).clamp_min(1e-8)        # (N, 1)
    g_hat = ring_mean(g) / ring_mean(g).mean(1, keepdim=True).clamp_min(1e-8)
    i_hat = (mean_i - mean_i.mean(1, keepdim=True)) / std_img
    s_hat = (mean_i2 - mean_i ** 2).clamp_min(0).sqrt() / std_img
    return torch.cat([g_hat, i_hat, s_hat], dim=1)
