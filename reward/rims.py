"""Crater size by rim coherence: a detector that shares no fitted part with the template matcher.

A crater rim is a ring on which the brightness changes across the ring, not along it, whatever the sun:
the gradient there points along the radius from the crater centre. Texture has no preferred orientation
relative to the tile centre, so over a full ring its radial and tangential gradient energies are equal.
For a ring of radius R about the tile centre (a Gaussian annulus w_R, width max(0.1 R, 0.7 px)):

    g = ∇x (central differences),  g_r = g · r̂,  |g|² = g_r² + g_t²
    c(R) = Σ_p w_R,p (g_r,p² − g_t,p²) / mean_p |g_p|²          radial minus tangential energy on the ring
    z(R) = (c(R) − mean_s c_s(R)) / std_s c_s(R)                 against S phase-scrambled copies s of the tile
    found(x) = p ≤ α,  p = (1 + #{s : max_R z_s ≥ max_R z}) / (S + 1)       the surrogate test (Theiler 1992)
    d̂(x) = κ · 2 R*,  R* = argmax_R z(R) refined by a parabola in log R

`statistic: opposite` asks for the rim on both sides of the centre: with c_j(R) the same ratio on the arc A_j alone
(K sectors, sector j centred at the angle 2πj/K; A_j the m = `arc` sectors centred on sector j),

    c(R) = max_{j < K/2} min(c_j(R), c_{j+K/2}(R))                  the weaker of two opposite arcs, best axis

so a single arc scores as its empty opposite side (the light sets which axis carries the rim: the best one counts).
The null comes from the tile's own surrogates, so it is exact for any texture and either statistic: a craterless tile
is called a crater with probability α. κ, the one fitted number, maps the ring of steepest radial shading (the inner
wall, just inside the crest) to the catalogue's rim-to-rim diameter: exp(median log(D / 2R*)) over the
detected train craters. Written by hand: no library tests ring coherence of gradients against surrogates.

Notation: x a tile (H, W); R and d fractions of the tile width; S surrogates per tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from data.surrogates import phase_scramble
from reward.templates import Detections, refined_argmax

RADII = np.geomspace(0.05, 0.45, 40)
"""R: ring radii as fractions of the tile width (d = 2κR covers about 0.1-0.9 of the tile)."""
ALPHA, SURROGATES = 0.01, 99
"""Test level α and the number S of phase-scrambled copies per tile (α (S + 1) must be ≥ 1)."""
MIN_WIDTH_PX = 0.7
"""Smallest annulus width in pixels."""
STATISTICS = ("ring", "opposite")
"""c(R) over the whole ring, or the weaker of two opposite arcs (module docstring)."""
ARCS = {"statistic": "opposite", "sectors": 16, "arc": 5}
"""The reports' opposite-arcs detector: arcs of 5/16 of the circle (112.5°) on 8 axes (`bench.rim_statistics`)."""


def ring_weights(size: int, radii: np.ndarray = RADII) -> Tensor:
    """w_R (n_R, size, size): Gaussian annuli exp(−(r − R)² / 2 s²), s = max(0.1 R, MIN_WIDTH_PX), each
    summing to 1; r the pixel distance from the tile centre, R in pixels."""
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    r = torch.sqrt((yy - c) ** 2 + (xx - c) ** 2)
    rad = torch.from_numpy(np.asarray(radii, dtype=np.float64) * size)[:, None, None]
    w = torch.exp(-0.5 * ((r - rad) / torch.clamp(0.1 * rad, min=MIN_WIDTH_PX)) ** 2)
    return w / w.sum(dim=(1, 2), keepdim=True)


def radial_unit(size: int) -> tuple[Tensor, Tensor]:
    """(r̂_y, r̂_x) (size, size): the unit vector from the tile centre (0 at the centre)."""
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64) - c, torch.arange(size, dtype=torch.float64) - c,
                            indexing="ij")
    r = torch.sqrt(yy ** 2 + xx ** 2).clamp_min(1e-9)
    return yy / r, xx / r


def radial_excess(x: Tensor) -> tuple[Tensor, Tensor]:
    """(g_r² − g_t² = 2 g_r² − |g|² (…, H, W), mean_p |g_p|² (…, 1)) of tiles x (…, H, W) float64, g = ∇x by
    central differences, g_r its component along the radius from the tile centre."""
    gy, gx = torch.gradient(x, dim=(-2, -1))
    uy, ux = radial_unit(x.shape[-1])
    g2 = gy ** 2 + gx ** 2
    return 2 * (gy * uy + gx * ux) ** 2 - g2, g2.mean(dim=(-2, -1)).clamp_min(1e-20)[..., None]


def ring_coherence(x: Tensor, weights: Tensor) -> Tensor:
    """c(R) (…, n_R) of tiles x (…, H, W) float64 for annuli `weights` (n_R, H, W)."""
    excess, energy = radial_excess(x)
    return torch.einsum("...ij,rij->...r", excess, weights) / energy


def sector_masks(size: int, sectors: int) -> Tensor:
    """(K, size, size) 0/1: the pixels of each angular sector about the tile centre, sector j centred at 2πj/K."""
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64) - c, torch.arange(size, dtype=torch.float64) - c,
                            indexing="ij")
    j = torch.remainder(torch.round(torch.atan2(yy, xx) / (2 * math.pi / sectors)), sectors).long()  # (size, size)
    return torch.stack([(j == k).double() for k in range(sectors)])


def arc_sectors(sectors: int, arc: int) -> Tensor:
    """A_j (K, m) long: the m sectors of the arc about sector j, j − ⌊m/2⌋ … j − ⌊m/2⌋ + m − 1 (mod K)."""
    return (torch.arange(sectors)[:, None] + torch.arange(arc)[None] - arc // 2) % sectors


def opposite_coherence(x: Tensor, weights: Tensor, sectors: int, arc: int = 1) -> Tensor:
    """c(R) = max_{j<K/2} min(c_j(R), c_{j+K/2}(R)) (…, n_R) of tiles x (…, H, W) float64, c_j the ring coherence on
    the arc A_j (`arc_sectors`) with its annulus weights renormalised there."""
    w = weights[:, None] * sector_masks(x.shape[-1], sectors)[None]             # (n_R, K, H, W)
    excess, energy = radial_excess(x)
    num = torch.einsum("...ij,rkij->...rk", excess, w)                          # (…, n_R, K)
    a = arc_sectors(sectors, arc)                                                # (K, m)
    c = num[..., a].sum(-1) / w.sum(dim=(-2, -1))[:, a].sum(-1).clamp_min(1e-20) / energy[..., None]  # (…, n_R, K)
    return torch.minimum(c[..., :sectors // 2], c[..., sectors // 2:]).amax(-1)


@dataclass
class RimDetector:
    """The detector of the module docstring; `kappa` from `fit_rim_detector`."""
    kappa: float = 1.0
    alpha: float = ALPHA
    surrogates: int = SURROGATES
    seed: int = 0
    statistic: str = "ring"
    sectors: int = 8
    arc: int = 1

    def __post_init__(self):
        if self.alpha * (self.surrogates + 1) < 1:
            raise ValueError(f"alpha {self.alpha} needs at least {math.ceil(1 / self.alpha) - 1} surrogates")
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown rim statistic {self.statistic!r}; choose one of {', '.join(STATISTICS)}")
        if self.sectors < 2 or self.sectors % 2:
            raise ValueError(f"sectors must be an even number ≥ 2 (opposite pairs), got {self.sectors}")
        if not 1 <= self.arc <= self.sectors // 2:
            raise ValueError(f"arc must be 1 to sectors / 2 = {self.sectors // 2} sectors (one side), got {self.arc}")

    def coherence(self, x: Tensor, weights: Tensor) -> Tensor:
        """c(R) (…, n_R) by the detector's statistic."""
        if self.statistic == "ring":
            return ring_coherence(x, weights)
        return opposite_coherence(x, weights, self.sectors, self.arc)

    def test(self, images: Tensor, *, batch_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
        """(p (N,), z_max (N,), log10 R* (N,)) of (N, C, H, W) square tiles (channels averaged). The surrogate
        draws depend on the seed and each tile's place in its batch, so a call is deterministic."""
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be (N, C, H, W) square tiles, got shape {tuple(images.shape)}")
        x_all = images.detach().cpu().double().mean(1)
        w = ring_weights(x_all.shape[-1])
        log_r = torch.from_numpy(np.log10(RADII))
        step = float(log_r[1] - log_r[0])
        g = torch.Generator().manual_seed(self.seed)
        out_p, out_z, out_r = [], [], []
        for x in x_all.split(batch_size):
            c = self.coherence(x, w)                                           # (n, n_R)
            copies = phase_scramble(x, g, dtype=torch.float64, copies=self.surrogates)  # (n, S, H, W)
            cs = self.coherence(copies, w)                                     # (n, S, n_R)
            mu, sd = cs.mean(1), cs.std(1).clamp_min(1e-12)
            z = (c - mu) / sd
            zs_max = ((cs - mu[:, None]) / sd[:, None]).amax(2)                # (n, S)
            z_max = z.amax(1)
            out_p.append((1 + (zs_max >= z_max[:, None]).sum(1)) / (self.surrogates + 1))
            k, delta = refined_argmax(z)
            out_r.append(log_r[k] + step * delta)
            out_z.append(z_max)
        return torch.cat(out_p).double(), torch.cat(out_z), torch.cat(out_r)

    def detect(self, images: Tensor) -> Detections:
        """Found where p ≤ α; log10 d̂ = log10(2 κ R*) there, NaN elsewhere; score −log10 p."""
        p, _, log_r = self.test(images)
        found = p <= self.alpha
        log_d = log_r + math.log10(2 * self.kappa)
        return Detections(found, torch.where(found, log_d, torch.full_like(log_d, math.nan)), -torch.log10(p))


def fit_rim_detector(images: Tensor, diameters_fraction: np.ndarray, **kw) -> RimDetector:
    """The detector with κ = exp(median over the detected tiles of log(d / 2R*)), d the catalogue diameters
    as fractions of the tile width; κ = 1 when none is detected."""
    det = RimDetector(**kw)
    found = det.detect(images)
    hit = found.found.numpy()
    if hit.any():
        ratio = np.log10(np.asarray(diameters_fraction, dtype=np.float64)[hit]) - found.log10_fraction.numpy()[hit]
        det.kappa = float(10 ** np.median(ratio))
    return det
