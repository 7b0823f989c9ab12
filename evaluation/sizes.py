"""Crater sizes: an estimator of crater diameter fitted on the train split, and the size-frequency figures.

A planetary scientist judges a crater population by its size-frequency distribution (SFD) first, so
the evaluation measures the sizes of generated craters with an instrument fitted once on the real
train split's `diameter_km` (metadata.csv) and validated on the held-out split, never on generated
images. Two instruments measure sizes: the template matcher of reward/templates.py, fitted to no
diameters (`TemplateInstrument`), and this estimator, classical and written by hand (no library fits
crater sizes from tiles):

    φ(x) = [ĝ_0..ĝ_R, Î_0..Î_R, ŝ_0..ŝ_R]     radial profiles about the tile centre (reward/profiles.py)
    log10 D̂ = w·(φ(x) − mean) / std + b      ridge regression (sklearn's RidgeCV picks the penalty)

with ĝ_r, Î_r, ŝ_r the ring means of slope and intensity and the ring std. Rings are fixed fractions of
the half-width, so a tile of any pixel size maps to the same kilometres. The features are
invariant to the tile's 8 rotations and flips by construction (tested), which is the rotation and
flip augmentation the estimator needs; arbitrary-angle rotations were tried and lowered the
held-out R² (0.61 -> 0.57: the rotated corners are interpolated from reflections).

Notation: D diameters in km, (n,); P, Q histograms of log10 D on fixed bins; W1 the 1-Wasserstein
distance of the log10 D samples; N(≥D) the cumulative count (the planetary-science SFD convention).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from evaluation.metrics import knn_radii
from reward.profiles import RINGS, radial_profile_features
from reward.templates import TemplateMatcher, calibrate_light
from utils import CraterdiffError, atomic_directory, first_line

WINDOW_KM = 320.0
"""Side of the embedded Mars tiles on the ground (data/mars_craters/README.md): D km = d · WINDOW_KM."""
LARGE_KM = 100.0
"""Diameter from which a crater counts as large (the mode the base model under-covers)."""
HIST_EDGES_LOG10 = tuple(np.linspace(math.log10(40.0), math.log10(320.0), 13).tolist())
"""Bins of log10 D for the histograms and their KL: 12 bins from 40 to 320 km (the tile's width)."""
ESTIMATOR_FILE, META_FILE = "size_estimator.npz", "size_estimator.json"
FORMAT = "craterdiff.size_estimator"


# ----------------------------------------------------------------------------------------------
# The instrument
# ----------------------------------------------------------------------------------------------

def r_squared(pred: np.ndarray, target: np.ndarray) -> float:
    """R² = 1 − Σ (ŷ − y)² / Σ (y − ȳ)²."""
    return float(1 - ((pred - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def log10_errors(pred_km: np.ndarray, diameters_km: np.ndarray) -> tuple[float, float]:
    """(R², mean |log10 D̂ − log10 D|) of predicted against known diameters, both in km."""
    pred, y = np.log10(np.asarray(pred_km, dtype=np.float64)), np.log10(np.asarray(diameters_km, dtype=np.float64))
    return r_squared(pred, y), float(np.abs(pred - y).mean())


@dataclass
class SizeEstimator:
    """log10 D̂ = coef · (φ − mean) / std + intercept, with its validation on the held-out split."""
    coef: np.ndarray          # (F,)
    intercept: float
    feature_mean: np.ndarray  # (F,)
    feature_std: np.ndarray   # (F,)
    alpha: float              # the ridge penalty RidgeCV chose
    rings: int = RINGS
    n_train: int = 0
    heldout_r2: float = float("nan")   # on log10 D
    heldout_mae: float = float("nan")  # mean |log10 D̂ − log10 D|
    n_heldout: int = 0
    train_sha256: str = ""             # of the train images and diameters it was fitted on

    def predict_log10(self, images: Tensor) -> np.ndarray:
        """log10 D̂ (N,) of (N, C, H, W) tiles in [-1, 1]."""
        phi = radial_profile_features(images.detach().cpu(), rings=self.rings).numpy()
        return (phi - self.feature_mean) / self.feature_std @ self.coef + self.intercept

    def predict_km(self, images: Tensor) -> np.ndarray:
        """D̂ in km (N,)."""
        return 10.0 ** self.predict_log10(images)

    def validate(self, images: Tensor, diameters_km: np.ndarray) -> tuple[float, float]:
        """(R², MAE) of log10 D̂ against known diameters."""
        return log10_errors(self.predict_km(images), diameters_km)


def images_sha256(images: Tensor, diameters_km: np.ndarray) -> str:
    """A checksum of a labelled image set (what an estimator was fitted on)."""
    h = hashlib.sha256(images.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(np.asarray(diameters_km, dtype=np.float64).tobytes())
    return h.hexdigest()


def fit_size_estimator(train_images: Tensor, train_km: np.ndarray, heldout_images: Tensor, heldout_km: np.ndarray,
                       *, rings: int = RINGS) -> SizeEstimator:
    """Fit on the train split, validate on the held-out split (R², MAE in log10 D)."""
    from sklearn.linear_model import RidgeCV

    if len(train_images) < 8:
        raise CraterdiffError(f"the size estimator needs at least 8 train craters with diameters, got "
                              f"{len(train_images)}")
    phi = radial_profile_features(train_images.detach().cpu(), rings=rings).numpy()
    mean, std = phi.mean(0), phi.std(0) + 1e-8
    y = np.log10(np.asarray(train_km, dtype=np.float64))
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 25)).fit((phi - mean) / std, y)
    est = SizeEstimator(coef=ridge.coef_.astype(np.float64), intercept=float(ridge.intercept_), feature_mean=mean,
                        feature_std=std, alpha=float(ridge.alpha_), rings=rings, n_train=len(train_images),
                        train_sha256=images_sha256(train_images, train_km))
    est.heldout_r2, est.heldout_mae = est.validate(heldout_images, heldout_km)
    est.n_heldout = len(heldout_images)
    return est


def save_size_estimator(est: SizeEstimator, path: Path) -> Path:
    """Write `path/` atomically: the arrays (npz) and their metadata with the npz's sha256."""
    with atomic_directory(path) as tmp:
        np.savez(tmp / ESTIMATOR_FILE, coef=est.coef, feature_mean=est.feature_mean, feature_std=est.feature_std)
        meta = {k: v for k, v in asdict(est).items() if not isinstance(v, np.ndarray)}
        meta.update(format=FORMAT, sha256=hashlib.sha256((tmp / ESTIMATOR_FILE).read_bytes()).hexdigest())
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return Path(path)


def load_size_estimator(path: Path) -> SizeEstimator:
    """Read a saved estimator, refusing a foreign, corrupted (checksum) or unreadable one in one line."""
    path = Path(path)
    redo = f"delete '{path}' to fit it again"
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta.pop("format", None) != FORMAT:
            raise CraterdiffError(f"'{path}' is not a craterdiff size estimator; {redo}")
        digest = meta.pop("sha256")
        if hashlib.sha256((path / ESTIMATOR_FILE).read_bytes()).hexdigest() != digest:
            raise CraterdiffError(f"the size estimator in '{path}' is corrupted (checksum mismatch); {redo}")
        arrays = np.load(path / ESTIMATOR_FILE, allow_pickle=False)
        return SizeEstimator(coef=arrays["coef"], feature_mean=arrays["feature_mean"],
                             feature_std=arrays["feature_std"], **meta)
    except CraterdiffError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CraterdiffError(f"cannot read the size estimator in '{path}' ({first_line(e)}); {redo}") from None


# ----------------------------------------------------------------------------------------------
# The second instrument: template matching
# ----------------------------------------------------------------------------------------------

@dataclass
class TemplateInstrument:
    """The matched filter of reward/templates.py in km, with its validation on held-out craters. It is
    fitted to no diameters (only its sun direction is chosen, on the train images), so it judges a
    reward built on the ridge estimator, and the estimator judges the `size` reward built on it."""
    matcher: TemplateMatcher
    light_peak_ncc: float
    window_km: float = WINDOW_KM
    heldout_r2: float = float("nan")
    heldout_mae: float = float("nan")
    heldout_spearman: float = float("nan")
    n_heldout: int = 0

    def predict_km(self, images: Tensor) -> np.ndarray:
        """D̂ km (N,) = d̂ · window_km."""
        return 10.0 ** self.matcher.log10_fraction(images).numpy() * self.window_km

    def validate(self, images: Tensor, diameters_km: np.ndarray) -> tuple[float, float]:
        """(R², MAE) of log10 D̂ against known diameters."""
        return log10_errors(self.predict_km(images), diameters_km)


def template_instrument(train_images: Tensor, heldout_images: Tensor, heldout_km: np.ndarray) -> TemplateInstrument:
    """The template matcher with its sun direction calibrated on the train images (no diameters used),
    validated on the held-out craters (R², MAE of log10 D, Spearman ρ of D)."""
    from scipy.stats import spearmanr

    azimuth, elevation, peak = calibrate_light(train_images)
    inst = TemplateInstrument(TemplateMatcher(azimuth_deg=azimuth, elevation_deg=elevation), light_peak_ncc=peak)
    inst.heldout_r2, inst.heldout_mae = inst.validate(heldout_images, heldout_km)
    inst.heldout_spearman = float(spearmanr(inst.predict_km(heldout_images), heldout_km).statistic)
    inst.n_heldout = len(heldout_images)
    return inst


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


def size_figures(d_km: np.ndarray, ref_km: np.ndarray) -> dict[str, float]:
    """The per-set size figures against a reference: share ≥ 100 km, W1(log10 D), KL of the histograms."""
    return {"share_ge100": share_large(d_km), "w1_log10": wasserstein_log10(d_km, ref_km),
            "kl_hist": kl_histograms(ref_km, d_km)}
