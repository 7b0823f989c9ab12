"""The procedural crater generator: determinism, ranges, factors, and the shading model."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from data.procedural import (
    FACTOR_RANGES,
    CraterFactors,
    height_field,
    hillshade,
    procedural_set,
    render_crater,
    sample_factors,
)
from basics import CraterdiffError

QUIET = CraterFactors(noise=0.0)  # no terrain noise: renders depend on the factors alone


def test_same_seed_same_images_different_seed_different():
    a = procedural_set(6, size=32, seed=3)
    assert torch.equal(a, procedural_set(6, size=32, seed=3))
    assert not torch.equal(a, procedural_set(6, size=32, seed=4))


def test_shape_range_and_channels():
    x = procedural_set(5, size=24, channels=3, seed=0)
    assert x.shape == (5, 3, 24, 24) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_n_distinct_repeats_settings_cyclically():
    one = procedural_set(5, size=16, seed=1, n_distinct=1)
    assert all(torch.equal(one[0], one[i]) for i in range(5))
    four = procedural_set(8, size=16, seed=1, n_distinct=4)
    assert all(torch.equal(four[i], four[i + 4]) for i in range(4))
    assert len({tuple(four[i].flatten().tolist()) for i in range(4)}) == 4
    assert len({tuple(x.flatten().tolist()) for x in procedural_set(8, size=16, seed=1)}) == 8
    with pytest.raises(CraterdiffError):
        procedural_set(4, size=16, n_distinct=0)


def test_render_is_deterministic_and_factor_sensitive():
    f = CraterFactors()
    a = render_crater(f, size=32, seed=0)
    assert a.dtype == np.float32 and a.shape == (32, 32) and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, render_crater(f, size=32, seed=0))
    assert not np.array_equal(a, render_crater(f, size=32, seed=1))  # noise differs
    assert not np.array_equal(a, render_crater(dataclasses.replace(f, depth=0.05), size=32, seed=0))


def test_sample_factors_draws_only_named_factors_within_ranges():
    rng = np.random.default_rng(0)
    base = CraterFactors()
    f = sample_factors(rng, vary=["depth", "albedo"], base=base)
    changed = {k for k in FACTOR_RANGES if getattr(f, k) != getattr(base, k)}
    assert changed == {"depth", "albedo"}
    for _ in range(20):
        g = sample_factors(rng, vary=None)
        for k, (lo, hi) in FACTOR_RANGES.items():
            assert lo <= getattr(g, k) <= hi
    with pytest.raises(CraterdiffError, match="unknown crater factor.*colour"):
        sample_factors(rng, vary=["colour"])


def test_invalid_factors_raise():
    with pytest.raises(ValueError, match="diameter"):
        CraterFactors(diameter=0.0)
    with pytest.raises(ValueError, match="light_elevation_deg"):
        CraterFactors(light_elevation_deg=0.0)


def test_height_field_profile():
    # Expected values from the profile formula: centre = -depth * D, rim crest = +rim_height * D
    # (other terms there are below 1e-10 for these widths), far field = 0.
    f = CraterFactors(diameter=0.5, depth=0.2, rim_height=0.04, rim_width=0.1, noise=0.0)
    size = 66  # a pixel centre falls exactly on the rim crest, x = 49.5 / 66 - 1/2 = R
    h = height_field(f, size, np.random.default_rng(0))
    c = size // 2
    centre = h[c - 1:c + 1, c - 1:c + 1].mean()
    assert centre == pytest.approx(-0.2 * 0.5, rel=0.01)
    x = (np.arange(size) + 0.5) / size - 0.5
    crest = np.argmin(np.abs(x - 0.25))  # r = R = D / 2 = 0.25 W east of the centre
    assert h[c, crest] == pytest.approx(0.04 * 0.5, rel=0.01)
    assert abs(h[0, 0]) < 1e-6


def test_hillshade_of_planes_against_closed_form():
    # Plane h = a x lit from the east (azimuth 90): n = (-a, 0, 1) / sqrt(1 + a^2),
    # l = (cos t, 0, sin t), so s = (sin t - a cos t) / sqrt(1 + a^2).
    size, a, t = 16, 0.3, 40.0
    x = (np.arange(size) + 0.5) / size - 0.5
    plane = np.tile(a * x, (size, 1))
    s = hillshade(plane, azimuth_deg=90.0, elevation_deg=t)
    r = math.radians(t)
    np.testing.assert_allclose(s, (math.sin(r) - a * math.cos(r)) / math.sqrt(1 + a * a), atol=1e-12)
    flat = hillshade(np.zeros((size, size)), azimuth_deg=123.0, elevation_deg=t)
    np.testing.assert_allclose(flat, math.sin(r), atol=1e-12)
    # north-facing up-slope (h rises to the south, i.e. down the rows) is lit from the north
    north_facing = np.tile(0.3 * np.arange(size)[:, None] / size, (1, size))
    assert hillshade(north_facing, azimuth_deg=0.0, elevation_deg=t).mean() > math.sin(r)


def test_opposite_sun_flips_the_shading():
    f = dataclasses.replace(QUIET, light_azimuth_deg=315.0)
    g = dataclasses.replace(QUIET, light_azimuth_deg=135.0)
    a = render_crater(f, size=48, seed=0) - f.albedo
    b = render_crater(g, size=48, seed=0) - g.albedo
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < -0.8
    # lit from the top left (315 deg), a bowl's top-left inner wall faces away: darker than the
    # bottom-right inner wall, which faces the sun
    assert a[19, 19] < 0 < a[29, 29]


def test_central_peak_changes_only_the_centre():
    flat = render_crater(QUIET, size=64, seed=0)
    peaked = render_crater(dataclasses.replace(QUIET, central_peak=0.1), size=64, seed=0)
    diff = np.abs(peaked - flat)
    assert diff[28:36, 28:36].max() > 0.1
    assert diff[:8].max() < 1e-6 and diff[:, :8].max() < 1e-6
