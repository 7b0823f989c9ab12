"""Crater size by template matching: the classical matched-filter crater detector, with a null that lets
it say "no crater here".

A tile is compared with noise-free rendered craters (data/procedural.py) of known diameters and a few
morphologies under one sun direction. Each match is scored against what the tile's own texture would give
by chance: under phase randomisation (the tile's amplitude spectrum kept, its phases uniform; data/
surrogates.py) the matched filter's output has mean 0 and a variance known in closed form, so

    x̃ = (x − mean x) / std x,   X = F x̃,   T_vk = F T̃_vk           F the 2-d DFT; v morphology, k diameter
    w_f = S̄_x(|f|)^(−γ)                                           whitening by the tile's radially averaged
                                                                   power spectrum S̄_x (w_0 = 0)
    m_vk = Σ_f w_f X_f T*_vk,f                                     the whitened matched filter (real)
    Var_null(m_vk) = Σ_f w_f² |X_f|² |T_vk,f|²                    over uniform Hermitian phases of X
    z_vk = m_vk / sqrt(Var_null(m_vk))
    found(x) = max_vk z_vk > z*,   log d̂(x) = log d_k* + δ       k* = argmax_k max_v z_vk; δ the vertex of
                                                                   the parabola through its neighbours

z* is the 1 − α quantile of max z over phase-scrambled copies of the train tiles (`null_threshold`). The
closed-form variance makes the test exact for any texture, red or white, so texture alone is called a
crater with probability about α, and a large template no longer wins on a tile of large-scale texture.

d is the diameter as a fraction of the tile width (the Mars tiles are a fixed window, so D km = d ·
window_km). The calibrated quantities are the sun direction, chosen on the train images without their
diameters (`calibrate_light`), and z*, from surrogates of the train images. Nothing is fitted to
catalogue diameters, so it shares no fitted part with the rim detector of reward/rims.py, and each can
judge a reward built on the other. Written by hand: no library matches a bank of rendered crater templates
with a surrogate null in torch.

Notation: x a tile (H, W) in [-1, 1]; P = H·W; V morphologies; K diameters; d fractions of the tile width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from data.procedural import CraterFactors, render_crater
from data.surrogates import phase_scramble

D_MIN, D_MAX, N_TEMPLATES = 0.1, 0.8, 48
"""The template diameters: 48 log-spaced fractions of the tile width from 0.1 to 0.8 (32-256 km on the
320 km Mars tiles, whose craters are at most 0.8 of the tile so the rim stays inside)."""
MORPHOLOGIES: tuple[dict, ...] = (
    {},                                              # simple bowl: depth 0.15 D, rim 0.03 D
    {"depth": 0.05, "rim_width": 0.3},               # shallow, degraded, broad rim
    {"depth": 0.08, "central_peak": 0.05},           # complex: shallow floor, central peak
    {"depth": 0.25, "rim_width": 0.12},              # deep and sharp-rimmed
)
"""CraterFactors overrides of the template morphologies (the rest at their defaults)."""
WHITEN_GAMMA = 0.5
"""γ of the whitening w_f = S̄_x(|f|)^(−γ): 0 is the plain matched filter, 1 full whitening."""
ALPHA, NULL_COPIES = 0.01, 5
"""z* is the 1 − ALPHA quantile of max z over NULL_COPIES phase-scrambled copies of each train tile."""
NO_CRATER_LOG10 = math.log10(D_MIN) - 0.5
"""The log size the `size` reward gives a tile with no crater found: an atom half a decade below the bank."""
LIGHT_AZIMUTH_DEG, LIGHT_ELEVATION_DEG = 50.0, 65.0
"""The sun direction of the embedded Mars tiles, from `calibrate_light` on the train split."""
LIGHT_GRID = (tuple(range(0, 360, 10)), (20.0, 35.0, 50.0, 65.0))
"""The (azimuths, elevations) `calibrate_light` searches, in degrees."""
CALIBRATION_PX = 64
"""Largest tile side `calibrate_light` works at."""


def template_diameters() -> np.ndarray:
    """d_k (K,): the template diameters, log-spaced in [D_MIN, D_MAX]."""
    return np.geomspace(D_MIN, D_MAX, N_TEMPLATES)


LOG10_STEP = math.log10(D_MAX / D_MIN) / (N_TEMPLATES - 1)
"""Δ = log10 d_{k+1} − log10 d_k, the bank's resolution in log10 d."""


def standardise(x: Tensor) -> Tensor:
    """x̃ = (x − mean x) / std x over the last two dims (pixels); (…, H, W) float64. A flat tile stays 0."""
    x = x.double()
    centred = x - x.mean(dim=(-2, -1), keepdim=True)
    std = centred.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
    return centred / std.clamp_min(1e-8)


def render_templates(size: int, *, azimuth_deg: float = LIGHT_AZIMUTH_DEG, elevation_deg: float = LIGHT_ELEVATION_DEG,
                     morphologies: tuple[dict, ...] = MORPHOLOGIES) -> Tensor:
    """T̃_vk (V, K, size, size): the standardised noise-free templates (contrast 0.5 so nothing clips)."""
    t = [[render_crater(CraterFactors(diameter=float(d), noise=0.0, contrast=0.5, light_azimuth_deg=azimuth_deg,
                                      light_elevation_deg=elevation_deg, **m), size=size, seed=0)
          for d in template_diameters()] for m in morphologies]
    return standardise(torch.from_numpy(np.stack(t)))


def ncc(images: Tensor, templates: Tensor) -> Tensor:
    """ρ (N, K) = (1/P) Σ_p x̃_p T̃_k,p for (N, C, H, W) images (channels averaged) and (K, H, W) templates."""
    x = standardise(images.detach().to(templates.device).double().mean(1))      # (N, H, W)
    return torch.einsum("nij,kij->nk", x, templates) / (x.shape[-1] * x.shape[-2])


def frequency_rings(size: int) -> Tensor:
    """(size, size) long: the ring round(|f| · size) of each DFT frequency, |f| in cycles per pixel."""
    f = torch.fft.fftfreq(size, dtype=torch.float64) * size
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).round().long()


def ring_means(power: Tensor) -> Tensor:
    """S̄ (N, R): the mean of power spectra |X_f|² (N, H, W) over each frequency ring (`frequency_rings`)."""
    ring = frequency_rings(power.shape[-1]).flatten()                       # (P,)
    onehot = torch.nn.functional.one_hot(ring).double()                    # (P, R)
    return (power.flatten(1) @ onehot) / onehot.sum(0)


def whitening(power: Tensor, gamma: float = WHITEN_GAMMA) -> Tensor:
    """w_f = S̄(|f|)^(−γ) (N, H, W) from the power spectra |X_f|² (N, H, W), S̄ from `ring_means`; w_0 = 0, and 0
    where a ring holds no power."""
    ring = frequency_rings(power.shape[-1])
    s = ring_means(power)[:, ring]                                         # (N, H, W)
    w = torch.where(s > 1e-12, s.clamp_min(1e-12) ** (-gamma), torch.zeros_like(s))
    w[:, 0, 0] = 0.0
    return w


def matched_z(images: Tensor, template_spectra: Tensor, *, gamma: float = WHITEN_GAMMA) -> Tensor:
    """z_vk (N, V, K) of (N, C, H, W) tiles (channels averaged) for template spectra T_vk (V, K, H, W)."""
    x = standardise(images.detach().cpu().double().mean(1))                 # (N, H, W)
    spec = torch.fft.fft2(x)
    power = spec.abs() ** 2
    w = whitening(power, gamma)
    m = torch.einsum("nij,vkij->nvk", spec * w, template_spectra.conj()).real
    var = torch.einsum("nij,vkij->nvk", power * w ** 2, template_spectra.abs() ** 2)
    return m / var.clamp_min(1e-30).sqrt()


def parabolic_offset(left: Tensor, mid: Tensor, right: Tensor) -> Tensor:
    """δ in grid steps of the vertex of the parabola through (−1, left), (0, mid), (1, right):
    δ = (left − right) / (2 (left − 2 mid + right)), clamped to [−½, ½] (0 where the three are collinear)."""
    curv = left - 2 * mid + right
    safe = torch.where(curv.abs() > 1e-12, curv, torch.ones_like(curv))
    return torch.where(curv.abs() > 1e-12, (left - right) / (2 * safe), torch.zeros_like(curv)).clamp(-0.5, 0.5)


def refined_argmax(values: Tensor) -> tuple[Tensor, Tensor]:
    """(k (N,), δ (N,)) of values (N, K) on an even grid: k = argmax_k values, δ its `parabolic_offset` in grid
    steps (0 at the grid's ends, where there is no neighbour on one side)."""
    k = values.argmax(1)
    inner = k.clamp(1, values.shape[1] - 2)
    rows = torch.arange(len(k))
    delta = parabolic_offset(values[rows, inner - 1], values[rows, inner], values[rows, inner + 1])
    return k, torch.where(k == inner, delta, torch.zeros_like(delta))


@dataclass
class Detections:
    """What a detector says of N tiles: found (N,) bool, log10 d̂ (N,) float64 (NaN where nothing was found),
    and the test statistic (N,) float64 (larger: more crater-like)."""
    found: Tensor
    log10_fraction: Tensor
    score: Tensor


@dataclass
class TemplateMatcher:
    """The detector of the module docstring. `threshold` is z* (`null_threshold`); NaN until calibrated."""
    azimuth_deg: float = LIGHT_AZIMUTH_DEG
    elevation_deg: float = LIGHT_ELEVATION_DEG
    threshold: float = math.nan
    gamma: float = WHITEN_GAMMA

    def __post_init__(self):
        self._bank: dict[int, Tensor] = {}

    def spectra(self, size: int) -> Tensor:
        """T_vk (V, K, size, size) complex, rendered once per tile size."""
        if size not in self._bank:
            self._bank[size] = torch.fft.fft2(render_templates(size, azimuth_deg=self.azimuth_deg,
                                                               elevation_deg=self.elevation_deg))
        return self._bank[size]

    def z(self, images: Tensor, *, batch_size: int = 128) -> Tensor:
        """z_vk (N, V, K) of (N, C, H, W) square tiles in [-1, 1]."""
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be (N, C, H, W) square tiles, got shape {tuple(images.shape)}")
        t = self.spectra(int(images.shape[-1]))
        return torch.cat([matched_z(chunk, t, gamma=self.gamma) for chunk in images.split(batch_size)])

    def detect(self, images: Tensor) -> Detections:
        """Detections of (N, C, H, W) tiles: found where max z > z*, with log10 d̂ refined by a parabola."""
        if not math.isfinite(self.threshold):
            raise ValueError("the template detector has no threshold: calibrate it with null_threshold first")
        zk = self.z(images).amax(1)                                            # (N, K): best morphology
        k, delta = refined_argmax(zk)
        log_d = torch.from_numpy(np.log10(template_diameters()))[k] + LOG10_STEP * delta
        score = zk.amax(1)
        found = score > self.threshold
        return Detections(found, torch.where(found, log_d, torch.full_like(log_d, math.nan)), score)


def null_threshold(matcher: TemplateMatcher, images: Tensor, *, alpha: float = ALPHA, copies: int = NULL_COPIES,
                   seed: int = 0) -> float:
    """z*: the 1 − α quantile of max_vk z over `copies` phase-scrambled copies of each of `images`."""
    g = torch.Generator().manual_seed(seed)
    null = torch.cat([matcher.z(phase_scramble(images, g)).flatten(1).amax(1) for _ in range(copies)])
    return float(torch.quantile(null, 1 - alpha))


def calibrate_light(images: Tensor, *, grid: tuple = LIGHT_GRID) -> tuple[float, float, float]:
    """(φ, θ, mean peak ρ): the sun direction whose simple-bowl templates match `images` best on average,
    argmax over `grid` of mean_n max_k ρ_k(x_n). Uses no diameters. Tiles larger than CALIBRATION_PX are
    resized to it first (the sun direction does not depend on resolution; 144 × 48 renders at 512 px would)."""
    if images.shape[-1] > CALIBRATION_PX:
        images = torch.nn.functional.interpolate(images.float(), size=(CALIBRATION_PX, CALIBRATION_PX),
                                                 mode="bilinear", antialias=True, align_corners=False)
    best = (math.nan, math.nan, -math.inf)
    for el in grid[1]:
        for az in grid[0]:
            t = render_templates(images.shape[-1], azimuth_deg=az, elevation_deg=el, morphologies=MORPHOLOGIES[:1])[0]
            score = float(ncc(images, t).max(1).values.mean())
            if score > best[2]:
                best = (float(az), float(el), score)
    return best


def calibrated_matcher(images: Tensor, *, seed: int = 0) -> tuple[TemplateMatcher, float]:
    """(the detector with its sun direction and z* calibrated on `images`, e.g. the train tiles; the light's
    mean peak NCC). No diameters are used."""
    azimuth, elevation, peak = calibrate_light(images)
    matcher = TemplateMatcher(azimuth_deg=azimuth, elevation_deg=elevation)
    matcher.threshold = null_threshold(matcher, images, seed=seed)
    return matcher, peak
