"""Crater sizes: three detectors, validated on real, craterless and broken-rim tiles, and the size-frequency figures.

A planetary scientist judges a crater population by its size-frequency distribution (SFD) first, and an
instrument that always returns a diameter measures texture where there is no crater. So every size
instrument here is a detector: it reports a diameter only where it finds a crater, and every report
validates it on four sets: the real held-out tiles (detection rate, shares ≥ 100 and ≥ 150 km of the
detected craters against the catalogue's, Spearman ρ of D), their phase-scrambled copies and smooth noise
(data/surrogates.py: the same texture, no crater) and, as broken rims, their quadrants shuffled (a crater's pieces;
`VALIDATION_GOALS`). The rim detectors and the template matcher share no fitted part, so each can judge a reward
built on the other:

* `rims`: the rim-coherence detector of reward/rims.py on the whole ring (one scale κ fitted on the train
  diameters); it calls a crater's pieces a crater more often than the goal allows;
* `arcs`: the same test asking for the rim on two opposite arcs (`reward.rims.ARCS`), which pieces fail;
* `templates`: the matched filter of reward/templates.py (sun direction and threshold from the train tiles
  and their surrogates, no diameters), which the `size` reward uses unless `reward.size_detector: arcs` puts it on
  `arcs` (with κ = 1: the reward compares sizes measured alike); the other family then judges it.

Notation: D diameters in km, (n,), NaN where nothing was found; P, Q histograms of log10 D on fixed bins;
W1 the 1-Wasserstein distance of the detected craters' log10 D; N(≥D) the cumulative count; R the relative
SFD (Crater Analysis Techniques Working Group 1979).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reward.metrics import knn_radii
from reward.rims import ARCS, RimDetector, fit_rim_detector
from reward.templates import TemplateMatcher, calibrated_matcher
from basics import first_line

WINDOW_KM = 320.0
"""Side of the embedded Mars tiles on the ground (data/mars_craters/README.md): D km = d · WINDOW_KM."""
LARGE_KM, HUGE_KM = 100.0, 150.0
"""Diameters from which a crater counts as large (the mode the base model under-covers) and very large."""
HIST_EDGES_LOG10 = tuple(np.linspace(math.log10(40.0), math.log10(320.0), 13).tolist())
"""Bins of log10 D for the histograms and their KL: 12 bins from 40 to 320 km (the tile's width)."""
VALIDATION_GOALS = {"craterless_share_ge100": 0.05, "craterless_share_ge150": 0.02, "real_share_gap": 0.05,
                    "real_spearman": 0.7}
"""On each craterless set at most these shares called ≥ 100 and ≥ 150 km; on the real held-out tiles the
detected craters' shares ≥ 100 and ≥ 150 km within `real_share_gap` of the catalogue's, and ρ of D at least
`real_spearman`."""


# ----------------------------------------------------------------------------------------------
# The instruments
# ----------------------------------------------------------------------------------------------

@dataclass
class SizeInstrument:
    """A crater detector in km: `detector.detect` gives found and log10 d̂ (fractions of the tile width)."""
    name: str
    detector: RimDetector | TemplateMatcher
    window_km: float = WINDOW_KM
    info: dict = field(default_factory=dict)

    def detect_km(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(found (N,) bool, D̂ km (N,) float64, NaN where nothing was found)."""
        det = self.detector.detect(images)
        return det.found.numpy(), 10.0 ** det.log10_fraction.numpy() * self.window_km


def build_instruments(train_images: Tensor, train_km: np.ndarray, *, window_km: float = WINDOW_KM
                      ) -> dict[str, SizeInstrument]:
    """The three instruments calibrated on the train tiles: each rim detector's κ from their diameters, the
    template matcher's sun direction and threshold from the tiles and their surrogates alone."""
    fraction = np.asarray(train_km, dtype=np.float64) / window_km
    rims, arcs = fit_rim_detector(train_images, fraction), fit_rim_detector(train_images, fraction, **ARCS)
    matcher, peak = calibrated_matcher(train_images)
    return {"rims": SizeInstrument("rims", rims, window_km, {"kappa": rims.kappa, "alpha": rims.alpha,
                                                              "surrogates": rims.surrogates}),
            "arcs": SizeInstrument("arcs", arcs, window_km, {"kappa": arcs.kappa, "alpha": arcs.alpha,
                                                              "surrogates": arcs.surrogates, **ARCS}),
            "templates": SizeInstrument("templates", matcher, window_km,
                                        {"light_azimuth_deg": matcher.azimuth_deg,
                                         "light_elevation_deg": matcher.elevation_deg, "light_peak_ncc": peak,
                                         "z_threshold": matcher.threshold})}


def share_called(found: np.ndarray, d_km: np.ndarray, threshold_km: float) -> float:
    """The share of all tiles in which a crater of D ≥ threshold was found (a tile with none counts as no)."""
    return float((np.asarray(found) & (np.nan_to_num(d_km, nan=0.0) >= threshold_km)).mean())


def share_detected(found: np.ndarray, d_km: np.ndarray, threshold_km: float) -> float:
    """The share of the detected craters with D ≥ threshold (NaN when none was detected)."""
    d = np.asarray(d_km)[np.asarray(found)]
    return share_large(d, threshold_km=threshold_km) if d.size else math.nan


def validate_instrument(inst: SizeInstrument, heldout: Tensor, heldout_km: np.ndarray,
                        craterless: dict[str, Tensor], *, detected: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The instrument's validation table and goals (`VALIDATION_GOALS`): on the real held-out tiles the
    detection rate, the shares ≥ 100 and ≥ 150 km of all tiles and of the detected craters against the
    catalogue's, and Spearman ρ of D over the detected craters; on each craterless set the detection rate and
    the shares called ≥ 100 and ≥ 150 km. `detected`: the instrument's (found, D km) of `heldout`, when the
    caller has them already."""
    from scipy.stats import spearmanr

    g = VALIDATION_GOALS
    found, d = detected if detected is not None else inst.detect_km(heldout)
    cat = np.asarray(heldout_km, dtype=np.float64)
    rho = float(spearmanr(d[found], cat[found]).statistic) if found.sum() > 2 else math.nan
    real = {"n": int(len(cat)), "detect_rate": float(found.mean()),
            "share_ge100": share_called(found, d, LARGE_KM), "share_ge150": share_called(found, d, HUGE_KM),
            "share_ge100_detected": share_detected(found, d, LARGE_KM),
            "share_ge150_detected": share_detected(found, d, HUGE_KM),
            "catalogue_share_ge100": float((cat >= LARGE_KM).mean()),
            "catalogue_share_ge150": float((cat >= HUGE_KM).mean()), "spearman": rho}
    sets = {"real held-out": real}
    goals = {"real: detected share ≥ 100 km within 0.05 of the catalogue's":
             abs(real["share_ge100_detected"] - real["catalogue_share_ge100"]) <= g["real_share_gap"],
             "real: detected share ≥ 150 km within 0.05 of the catalogue's":
             abs(real["share_ge150_detected"] - real["catalogue_share_ge150"]) <= g["real_share_gap"],
             f"real: Spearman ρ ≥ {g['real_spearman']}": rho >= g["real_spearman"]}
    for name, x in craterless.items():
        f, dd = inst.detect_km(x)
        row = {"n": int(len(f)), "detect_rate": float(f.mean()), "share_ge100": share_called(f, dd, LARGE_KM),
               "share_ge150": share_called(f, dd, HUGE_KM)}
        sets[name] = row
        goals[f"{name}: ≤ {g['craterless_share_ge100']} called ≥ 100 km"] = \
            row["share_ge100"] <= g["craterless_share_ge100"]
        goals[f"{name}: ≤ {g['craterless_share_ge150']} called ≥ 150 km"] = \
            row["share_ge150"] <= g["craterless_share_ge150"]
    return {"info": inst.info, "sets": sets, "goals": goals, "met": all(goals.values())}


# ----------------------------------------------------------------------------------------------
# Size-frequency figures
# ----------------------------------------------------------------------------------------------

def folder_diameters(root: Path, files: list[Path]) -> tuple[np.ndarray | None, str]:
    """The catalogue diameter of each image file from `root/metadata.csv` (columns `file` and
    `diameter_km`, `file` relative to `root` or its folder of tiles), or (None, why not)."""
    import csv

    path = Path(root) / "metadata.csv"
    if not path.is_file():
        return None, f"{root} has no metadata.csv"
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        by_name = {r["file"]: float(r["diameter_km"]) for r in rows}
    except (KeyError, ValueError, TypeError) as e:
        return None, f"{path} has no usable file and diameter_km columns ({first_line(e)})"
    out = []
    for p in files:
        rel = Path(p).relative_to(root).as_posix()
        d = by_name.get(rel, by_name.get(Path(p).name))
        if d is None or not d > 0:
            return None, f"{path} gives no positive diameter_km for {rel}"
        out.append(d)
    return np.asarray(out), ""


def share_large(d_km: np.ndarray, *, threshold_km: float = LARGE_KM) -> float:
    """The share of craters with D ≥ threshold."""
    return float((np.asarray(d_km) >= threshold_km).mean())


def wasserstein_log10(d_km: np.ndarray, ref_km: np.ndarray) -> float:
    """W1(log10 D, log10 D_ref) = ∫ |F(u) − F_ref(u)| du over the two empirical CDFs (scipy)."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(np.log10(d_km), np.log10(ref_km)))


def size_histogram(d_km: np.ndarray, *, edges: tuple[float, ...] = HIST_EDGES_LOG10) -> np.ndarray:
    """Counts of log10 D on `edges`; sizes outside go to the first or last bin."""
    u = np.clip(np.log10(np.asarray(d_km, dtype=np.float64)), edges[0], np.nextafter(edges[-1], -np.inf))
    return np.histogram(u, bins=np.asarray(edges))[0].astype(np.float64)


def kl_histograms(ref_km: np.ndarray, d_km: np.ndarray, *, edges: tuple[float, ...] = HIST_EDGES_LOG10,
                  pseudocount: float = 0.5) -> float:
    """KL(P_ref ‖ Q) = Σ_b P_b log(P_b / Q_b) of the size histograms, each count + `pseudocount` (so an
    empty bin of Q stays finite), in nats."""
    p = size_histogram(ref_km, edges=edges) + pseudocount
    q = size_histogram(d_km, edges=edges) + pseudocount
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


def cumulative_counts(d_km: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The SFD N(≥D): diameters sorted descending and, for each, the number of craters at least as large."""
    d = np.sort(np.asarray(d_km, dtype=np.float64))[::-1]
    return d, np.arange(1, len(d) + 1, dtype=np.float64)


def subset_coverage(real: Tensor, gen: Tensor, subset: Tensor, *, k: int = 5) -> float:
    """Coverage restricted to the real points in `subset` (m,) bool:

        (1/|S|) Σ_{i∈S} 1[∃ j : x_j ∈ B(y_i, NND_k(y_i))]

    with NND_k within the whole real set, as `evaluation.metrics.prdc`'s coverage (which is the
    case S = all)."""
    if not bool(subset.any()):
        raise ValueError("the subset of real points is empty")
    real, gen = real.detach().double().cpu(), gen.detach().double().cpu()
    radii = knn_radii(torch.cdist(real, real), k)                      # (m,)
    hit = (torch.cdist(real[subset], gen) <= radii[subset, None]).any(1)
    return float(hit.double().mean())


R_BIN_EDGES_KM = tuple((32.0 * 2 ** (np.arange(0, 9) / 2)).tolist())
"""√2 diameter bins for the R-plot (Crater Analysis Techniques Working Group 1979): 32 km to 512 km."""


def r_plot(d_km: np.ndarray, n_tiles: int, *, edges: tuple[float, ...] = R_BIN_EDGES_KM
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The relative SFD per tile over √2 bins [D_a, D_b):

        D̄ = sqrt(D_a D_b),  R = D̄³ N_b / (A (D_b − D_a)),  σ_R = R / sqrt(N_b)     (Poisson)

    with N_b the detected craters in the bin and the area A counted in tiles (A = n_tiles). Returns
    (D̄, R, σ_R, N_b), each (bins,); R and σ_R are NaN in empty bins. Written by hand: craterstats (the field's
    tool) needs scipy.integrate.simps, which current scipy no longer has, in the version the index serves."""
    e = np.asarray(edges, dtype=np.float64)
    d = np.asarray(d_km, dtype=np.float64)
    counts = np.histogram(d[np.isfinite(d)], bins=e)[0].astype(np.float64)
    mid = np.sqrt(e[:-1] * e[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(counts > 0, mid ** 3 * counts / (n_tiles * (e[1:] - e[:-1])), np.nan)
        sigma = np.where(counts > 0, r / np.sqrt(counts), np.nan)
    return mid, r, sigma, counts


def size_figures(found: np.ndarray, d_km: np.ndarray, ref_found: np.ndarray, ref_km: np.ndarray) -> dict[str, float]:
    """One instrument's figures of a set against a reference set measured by the same instrument: the
    detection rate, the shares of all tiles called ≥ 100 and ≥ 150 km, and of the detected craters W1(log10 D)
    and the KL of the size histograms (NaN when nothing was detected)."""
    d, ref = np.asarray(d_km)[np.asarray(found)], np.asarray(ref_km)[np.asarray(ref_found)]
    out = {"detect_rate": float(np.mean(found)), "share_ge100": share_called(found, d_km, LARGE_KM),
           "share_ge150": share_called(found, d_km, HUGE_KM)}
    if d.size and ref.size:
        out.update(w1_log10=wasserstein_log10(d, ref), kl_hist=kl_histograms(ref, d))
    else:
        out.update(w1_log10=math.nan, kl_hist=math.nan)
    return out
