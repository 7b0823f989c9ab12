"""A procedural crater generator with known factors, deterministic by seed.

A crater is a radially symmetric height field (bowl, raised rim, optional central peak) plus
seeded fractal noise, rendered by Lambertian hillshading: the brightness of a surface patch is the
cosine between its normal and the direction to the sun. The factors of variation are explicit
(`CraterFactors`), so that image sets of known diversity can be built: from one crater repeated
(`n_distinct=1`) through a few distinct settings to every factor varied. Tests and the check that
every diversity metric rises along such a ladder use it.

Notation
--------
W         image width (= height); planar coordinates (x east, y north) are in units of W,
          centred on the image, so x, y in (-1/2, 1/2)
D         crater diameter, D = diameter * W;  R = D / 2 its radius
rho       normalised radial distance, rho = sqrt(x^2 + y^2) / R
h         height field in units of W (heights given relative to D are multiplied by D)
n         unit surface normal, n = (-dh/dx, -dh/dy, 1) / |.|
l         unit vector towards the sun, azimuth phi clockwise from north (image up), elevation theta:
          l = (sin phi cos theta, cos phi cos theta, sin theta)
s         Lambertian shade, s = max(0, n . l); flat ground has s_0 = sin theta
v         rendered brightness in [0, 1], v = clip(albedo + contrast * (s - s_0), 0, 1)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from basics import CraterdiffError

PEAK_SIGMA: float = 0.18
"""Width (standard deviation) of the Gaussian central peak, in units of R."""
NOISE_BETA: float = 3.0
"""Spectral exponent of the fractal noise: power spectrum ~ f^-NOISE_BETA (3 = Brownian surface)."""


@dataclass(frozen=True)
class CraterFactors:
    """The factors of one procedural crater. Heights of crater parts are relative to D.

    Attributes (usual range in `FACTOR_RANGES`):
        diameter: D / W, the crater's rim-to-rim diameter as a fraction of the image width.
        depth: bowl depth / D (fresh simple craters on Mars ~0.2, degraded or complex ~0.05).
        rim_height: rim crest height above the surroundings / D (~0.02-0.05).
        rim_width: standard deviation of the Gaussian rim profile, in units of R.
        central_peak: central peak height / D; 0 = no peak (simple crater).
        light_azimuth_deg: sun azimuth, degrees clockwise from image up (north); 315 = from the top left.
        light_elevation_deg: sun elevation above the horizon in degrees; low sun = long, strong shading.
        albedo: brightness of flat ground in [0, 1].
        contrast: gain on the shading, v = albedo + contrast * (s - s_0).
        noise: standard deviation of the fractal terrain noise, in units of W.
    """

    diameter: float = 0.5
    depth: float = 0.15
    rim_height: float = 0.03
    rim_width: float = 0.2
    central_peak: float = 0.0
    light_azimuth_deg: float = 315.0
    light_elevation_deg: float = 35.0
    albedo: float = 0.5
    contrast: float = 1.0
    noise: float = 0.002

    def __post_init__(self) -> None:
        checks = {
            "diameter": self.diameter > 0, "depth": self.depth >= 0, "rim_height": self.rim_height >= 0,
            "rim_width": self.rim_width > 0, "central_peak": self.central_peak >= 0,
            "light_elevation_deg": 0 < self.light_elevation_deg <= 90, "albedo": 0 <= self.albedo <= 1,
            "contrast": self.contrast >= 0, "noise": self.noise >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid crater factor(s) {', '.join(f'{k}={getattr(self, k)}' for k in bad)}")


FACTOR_RANGES: dict[str, tuple[float, float]] = {
    "diameter": (0.2, 0.8),
    "depth": (0.04, 0.2),
    "rim_height": (0.0, 0.06),
    "rim_width": (0.1, 0.35),
    "central_peak": (0.0, 0.1),
    "light_azimuth_deg": (0.0, 360.0),
    "light_elevation_deg": (20.0, 60.0),
    "albedo": (0.35, 0.65),
    "contrast": (0.6, 1.4),
    "noise": (0.0, 0.004),
}
"""(low, high) of each factor for `sample_factors` (uniform draws)."""


# ----------------------------------------------------------------------------------------------
# Height field
# ----------------------------------------------------------------------------------------------

def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x east, y north) in units of W, each (size, size); row 0 is the top."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    x, y_down = np.meshgrid(c, c, indexing="xy")
    return x, -y_down


def crater_profile(rho: np.ndarray, f: CraterFactors) -> np.ndarray:
    """Crater height relative to D as a function of rho = r / R.

    h(rho) / D = -depth (1 - rho^2) [rho < 1]                  parabolic bowl
               + rim_height exp(-(rho - 1)^2 / (2 rim_width^2))   Gaussian rim at rho = 1
               + central_peak exp(-rho^2 / (2 PEAK_SIGMA^2))      Gaussian central peak
    """
    bowl = -f.depth * np.clip(1.0 - rho**2, 0.0, None)
    rim = f.rim_height * np.exp(-((rho - 1.0) ** 2) / (2.0 * f.rim_width**2))
    peak = f.central_peak * np.exp(-(rho**2) / (2.0 * PEAK_SIGMA**2))
    return bowl + rim + peak


def fractal_noise(size: int, rng: np.random.Generator, *, beta: float = NOISE_BETA) -> np.ndarray:
    """Zero-mean, unit-std fractal noise (size, size) by spectral synthesis.

    White Gaussian noise filtered in Fourier space by |k|^(-beta/2) (k in cycles per image, the
    k = 0 term removed), so that its power spectrum falls as |k|^-beta.
    """
    white = rng.standard_normal((size, size))
    ky = np.fft.fftfreq(size)[:, None] * size
    kx = np.fft.rfftfreq(size)[None, :] * size
    k = np.hypot(kx, ky)
    k[0, 0] = np.inf
    field = np.fft.irfft2(np.fft.rfft2(white) * k ** (-beta / 2.0), s=(size, size))
    return (field - field.mean()) / field.std()


def height_field(factors: CraterFactors, size: int, rng: np.random.Generator) -> np.ndarray:
    """Height h (size, size) in units of W: D * crater_profile(r / R) + noise * fractal_noise.

    Row 0 is the top (north) edge; the crater is centred. `rng` draws only the noise.
    """
    x, y = grid(size)
    d = factors.diameter
    rho = np.hypot(x, y) / (d / 2.0)
    h = d * crater_profile(rho, factors)
    return h + factors.noise * fractal_noise(size, rng)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

def light_vector(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """l = (sin phi cos theta, cos phi cos theta, sin theta) in (east, north, up); shape (3,)."""
    phi, theta = np.radians(azimuth_deg), np.radians(elevation_deg)
    return np.array([np.sin(phi) * np.cos(theta), np.cos(phi) * np.cos(theta), np.sin(theta)])


def hillshade(h: np.ndarray, *, azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Lambertian shade s = max(0, n . l) of a height field h (H, W) in units of W -> (H, W).

    Gradients by central differences with pixel spacing 1/size; rows run south, so
    dh/dy = -dh/drow.
    """
    size = h.shape[1]
    dh_drow, dh_dx = np.gradient(h, 1.0 / size)
    dh_dy = -dh_drow
    norm = np.sqrt(dh_dx**2 + dh_dy**2 + 1.0)
    l_e, l_n, l_u = light_vector(azimuth_deg, elevation_deg)
    return np.clip((-dh_dx * l_e - dh_dy * l_n + l_u) / norm, 0.0, None)


def render_crater(factors: CraterFactors, *, size: int, seed: int) -> np.ndarray:
    """Render one crater: v = clip(albedo + contrast * (s - sin theta), 0, 1), (size, size) float32.

    s is the hillshade of `height_field(factors, size, default_rng(seed))`; flat ground renders
    at `albedo`, slopes facing the sun brighter, slopes facing away darker.
    """
    h = height_field(factors, size, np.random.default_rng(seed))
    s = hillshade(h, azimuth_deg=factors.light_azimuth_deg, elevation_deg=factors.light_elevation_deg)
    s0 = np.sin(np.radians(factors.light_elevation_deg))
    return np.clip(factors.albedo + factors.contrast * (s - s0), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Sets
# ----------------------------------------------------------------------------------------------

def _check_vary(vary: Iterable[str] | None) -> tuple[str, ...]:
    """The factor names to vary (None = all), validated against FACTOR_RANGES."""
    names = tuple(FACTOR_RANGES) if vary is None else tuple(vary)
    unknown = [v for v in names if v not in FACTOR_RANGES]
    if unknown:
        raise CraterdiffError(
            f"unknown crater factor(s) {', '.join(unknown)} in vary: use names from {', '.join(FACTOR_RANGES)}"
        )
    return names


def sample_factors(
    rng: np.random.Generator, *, vary: Iterable[str] | None, base: CraterFactors = CraterFactors()
) -> CraterFactors:
    """Draw the factors named in `vary` (None = all) uniformly from FACTOR_RANGES; others stay at `base`.

    Factors are drawn in FACTOR_RANGES order, so a given rng state gives the same draws whatever
    the order of `vary`.
    """
    names = set(_check_vary(vary))
    draws = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in FACTOR_RANGES.items() if k in names}
    return dataclasses.replace(base, **draws)


def procedural_set(
    n: int,
    *,
    size: int,
    channels: int = 1,
    vary: Iterable[str] | None = None,
    seed: int = 0,
    n_distinct: int | None = None,
    base: CraterFactors = CraterFactors(),
    same_noise: bool = True,
) -> torch.Tensor:
    """n procedural craters as model-space images (n, channels, size, size) float32 in [-1, 1].

    Draws m = n_distinct (or n when None) settings (factors from `sample_factors`, plus a noise
    seed each) from default_rng(seed); image i shows setting i mod m, so n_distinct=1 repeats one
    crater n times and n_distinct=None makes every image distinct. With same_noise=False each
    image draws its own terrain-noise seed, so repeats of a setting are near-duplicates (same
    crater, different terrain) rather than identical. x = 2 v - 1; for channels=3 the gray image
    is repeated.
    """
    if n < 1 or size < 1 or channels not in (1, 3):
        raise ValueError(f"need n >= 1, size >= 1, channels in (1, 3); got {n}, {size}, {channels}")
    m = n if n_distinct is None else n_distinct
    if m < 1:
        raise CraterdiffError(f"n_distinct must be at least 1, got {n_distinct}: use None for all-distinct images")
    vary = _check_vary(vary)
    rng = np.random.default_rng(seed)
    settings = [(sample_factors(rng, vary=vary, base=base), int(rng.integers(2**31))) for _ in range(m)]
    if same_noise:
        rendered = [render_crater(f, size=size, seed=s) for f, s in settings[: min(m, n)]]
        v = np.stack([rendered[i % len(rendered)] for i in range(n)])[:, None]
    else:
        noise_seeds = rng.integers(2**31, size=n)
        v = np.stack([render_crater(settings[i % m][0], size=size, seed=int(noise_seeds[i])) for i in range(n)])[:, None]
    x = torch.from_numpy(v * 2.0 - 1.0)
    return x.repeat(1, channels, 1, 1) if channels == 3 else x
