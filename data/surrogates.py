"""Craterless surrogates: tiles with the texture of real ones and no crater, to check that an instrument
can say "nothing here".

    phase scramble:  s = F⁻¹( |F x| · e^{iφ} ),  φ the phases of the FFT of white noise (uniform, Hermitian),
                     φ_0 = arg (F x)_0, so s keeps x's amplitude spectrum (its texture, contrast and mean)
                     and loses every coherent structure (a crater rim is phase alignment across frequencies)
    smooth noise:    s = G_σ * w,  w white Gaussian noise, G_σ a Gaussian of σ px (periodic), scaled to std
    quadrant shuffle: the tile's four (H/2, W/2) quadrants, each turned by r_q · 90° (r_q uniform on {0..3}),
                     placed in a random order: texture and local rim arcs kept, the tile's centred crater cut
                     into four quarter arcs and moved (broken rims: not one of the craterless sets above)

A stationary Gaussian field has uniform independent phases, so both are draws of the same null: texture
without form. Written by hand: no library makes phase-randomised surrogates of a batch of images in torch.

Notation: x (N, C, H, W) tiles; F the 2-d DFT over (H, W).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SMOOTH_SIGMA_PX = 1.0
"""σ of the smooth-noise surrogate, in pixels."""


def random_phases(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """φ (*shape[:-1], W // 2 + 1) float64: the phases of the half-spectrum (`rfft2`) of standard normal noise of
    `shape` over its last two dims. Each is uniform on (−π, π], independent of the others up to the Hermitian
    symmetry φ(−f) = −φ(f) a real image needs (the self-conjugate frequencies get 0 or π); the other half follows
    from that symmetry, so a real image needs only this one."""
    return torch.angle(torch.fft.rfft2(torch.randn(shape, generator=generator, dtype=torch.float64)))


def phase_scramble(images: Tensor, generator: torch.Generator, *, dtype: torch.dtype = torch.float32,
                   copies: int | None = None) -> Tensor:
    """s = F⁻¹(|F x| e^{iφ}) of tiles (…, H, W), e.g. (N, C, H, W), as `dtype`; φ random per tile, the mean (f = 0)
    kept. With `copies` = S, S surrogates of each tile, (…, S, H, W), from one transform of the tile: the same
    draws as scrambling the tiles repeated S times along a new dim before the last two."""
    x = images.detach().cpu().double()
    spectrum = torch.fft.rfft2(x)                                        # (…, H, W // 2 + 1) complex
    if copies is not None:
        spectrum = spectrum.unsqueeze(-3)                                # (…, 1, H, W // 2 + 1)
    shape = (*x.shape[:-2], *((copies,) if copies is not None else ()), *x.shape[-2:])
    phases = random_phases(shape, generator)
    phases[..., 0, 0] = torch.angle(spectrum[..., 0, 0])
    return torch.fft.irfft2(torch.polar(spectrum.abs(), phases), s=x.shape[-2:]).to(dtype)


def smooth_noise(n: int, size: int, generator: torch.Generator, *, channels: int = 1,
                 sigma_px: float = SMOOTH_SIGMA_PX, std: float = 0.5) -> Tensor:
    """G_σ * w (n, channels, size, size) float32 with zero mean and standard deviation `std` per tile; the
    Gaussian filter is applied in Fourier space, ĝ(f) = exp(−2π² σ² |f|²) with f in cycles per pixel."""
    w = torch.randn((n, channels, size, size), generator=generator, dtype=torch.float64)
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    gain = torch.exp(-2 * math.pi ** 2 * sigma_px ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    s = torch.fft.ifft2(torch.fft.fft2(w) * gain).real
    s = s - s.mean(dim=(-2, -1), keepdim=True)
    return (s / s.std(dim=(-2, -1), keepdim=True) * std).float()


def quadrant_shuffle(images: Tensor, generator: torch.Generator) -> Tensor:
    """Tiles (N, C, S, S), S even, with their quadrants turned and reordered at random per tile (module
    docstring): the same pixels, the centred crater in pieces."""
    n, c, s, w = images.shape
    if s != w or s % 2:
        raise ValueError(f"quadrant_shuffle needs square tiles of even size, got {s}x{w}")
    h = s // 2
    q = images.reshape(n, c, 2, h, 2, h).permute(0, 2, 4, 1, 3, 5).reshape(n, 4, c, h, h)  # (N, 4, C, h, h)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)                     # (N, 4)
    turns = torch.randint(4, (n, 4), generator=generator)                                   # (N, 4)
    q = q[torch.arange(n)[:, None], order].clone()
    for r in (1, 2, 3):
        q[turns == r] = torch.rot90(q[turns == r], r, dims=(-2, -1))
    return q.reshape(n, 2, 2, c, h, h).permute(0, 3, 1, 4, 2, 5).reshape(n, c, s, s)


CRATERLESS = ("phase-scrambled held-out", "smooth noise")
"""The names of the craterless validation sets, in report order."""
BROKEN = "quadrant-shuffled held-out"
"""The broken-rims validation set: pieces of rims, no whole crater (the craterless goals apply to it too)."""


def craterless_sets(heldout: Tensor, *, seed: int = 0) -> dict[str, Tensor]:
    """The craterless validation sets built from the held-out tiles (N, C, H, W): each tile phase-scrambled,
    and as many tiles of smooth noise with the held-out tiles' mean standard deviation."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, _ = heldout.shape
    std = float(heldout.double().std(dim=(-2, -1)).mean())
    return {CRATERLESS[0]: phase_scramble(heldout, g), CRATERLESS[1]: smooth_noise(n, h, g, channels=c, std=std)}


def broken_rims(heldout: Tensor, *, seed: int = 0) -> dict[str, Tensor]:
    """{BROKEN: the held-out tiles (N, C, S, S) with their quadrants shuffled}: a crater's pieces, which a size
    instrument must not call a crater either."""
    return {BROKEN: quadrant_shuffle(heldout, torch.Generator().manual_seed(seed))}
