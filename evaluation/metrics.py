"""Evaluation metrics on feature vectors: generated set X against a real (held-out) set Y.

One function per equation; every function takes (N, D) feature matrices (any floating dtype, any
device), computes in float64 on the CPU and returns Python floats. `evaluate_features` runs them
all and returns one flat dict. These are *evaluation* metrics, never rewards: nothing here is
differentiable or leave-one-out (those live in `reward.metrics`, whose kernels are reused here).

Notation
--------
X, x_j        generated features, gen: (n, d), j = 0..n-1
Y, y_i        real (reference, held-out) features, real: (m, d), i = 0..m-1
d             feature dimension
k(a, b)       a kernel; KID's cubic polynomial kernel (aᵀb / d + 1)³, MMD's RBF exp(-|a-b|² / (2h²))
s             KID subset size (the same for X and Y)
A, B          centred feature matrices: A = Y - mean(Y): (m, d), B = X - mean(X): (n, d) (rows = samples)
mu, Sigma     mean (d,) and unbiased (1/(N-1)) covariance (d, d) of a set
NND_k(z)      distance from z to its k-th nearest neighbour within its own set (z itself excluded)
B(z, r)       the closed ball {u : |u - z| <= r}
lambda_i      eigenvalues of K / n (Vendi), K the (n, n) similarity matrix with K_ii = 1

Conventions
-----------
* Distances are Euclidean, computed from coordinate differences (no |a|² + |b|² - 2aᵀb expansion),
  so that duplicated points are at distance exactly 0 and a point on a ball's boundary is exactly on
  it. Balls are closed (`<=`): a generated point identical to a real one is inside its ball. (The
  `prdc` package uses a strict `<`, which scores a set of repeated points 0 against itself.)
* Sets are used whole: at fixed n, with the spread over sampling seeds taken by the caller.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from reward.metrics import as_feature_matrix, frechet_distance, knn_radii, median_bandwidth, mmd2_unbiased, rbf_kernel

__all__ = ["kid", "mmd", "prdc", "vendi", "mode_coverage", "evaluate_features", "METRIC_KEYS"]

METRIC_KEYS: tuple[str, ...] = ("fid", "kid_mean", "kid_std", "mmd", "precision", "recall", "density", "coverage",
                                "vendi", "vendi_real", "mode_coverage")
"""The per-set metrics `evaluate_features` returns (besides n_real, n_generated, n_modes, features)."""


def _pair(real: Tensor, gen: Tensor, *, min_real: int = 1, min_gen: int = 1) -> tuple[Tensor, Tensor]:
    real = as_feature_matrix(real, "real", min_rows=min_real).cpu()
    gen = as_feature_matrix(gen, "gen", min_rows=min_gen).cpu()
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"real and gen must have the same feature dimension, got {real.shape[1]} and {gen.shape[1]}")
    return real, gen


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------

def polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """KID's kernel k(a, b) = (aᵀb / d + 1)³ (Bińkowski et al. 2018, sec. 5).

    a: (p, d), b: (q, d) float64  ->  (p, q) float64.
    """
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased_kernel(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor) -> float:
    """Unbiased MMD² from kernel matrices (Gretton et al. 2012, eq. 3):

        MMD²_u = Σ_{j≠j'} k(x_j, x_j') / (n(n-1)) + Σ_{i≠i'} k(y_i, y_i') / (m(m-1)) - 2 Σ_{j,i} k(x_j, y_i) / (nm)

    k_xx: (n, n), k_yy: (m, m), k_xy: (n, m), n, m >= 2  ->  float (may be slightly negative).
    """
    n, m = k_xx.shape[0], k_yy.shape[0]
    s_xx = k_xx.sum() - k_xx.diagonal().sum()
    s_yy = k_yy.sum() - k_yy.diagonal().sum()
    return float(s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * k_xy.sum() / (n * m))


def kid(real: Tensor, gen: Tensor, *, subsets: int = 100, subset_size: int | None = None,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial
    kernel k(a, b) = (aᵀb / d + 1)³, averaged over random subsets:

        KID = (1/S) Σ_s MMD²_u(X_s, Y_s),   X_s ⊂ X, Y_s ⊂ Y drawn without replacement, |X_s| = |Y_s| = s

    (`mmd2_unbiased_kernel` gives MMD²_u). Subsets are drawn by `numpy.random.default_rng(seed)`, one
    `choice(m, s, replace=False)` for Y then one `choice(n, s, replace=False)` for X per subset, so the
    same seed gives the same value. Unbiased for any n: the main distance at small sample sizes,
    where FID is biased. The raw value is returned (reports often show it x 10³).

    real: (m, d), gen: (n, d); subsets S >= 1; subset_size s in [2, min(n, m)], default min(n, m, 1000).
    Returns (mean, std) over the S subsets, std with ddof = 0 (as torch-fidelity; 0 for S = 1).
    """
    real, gen = _pair(real, gen, min_real=2, min_gen=2)
    m, n = real.shape[0], gen.shape[0]
    if not (isinstance(subsets, int) and subsets >= 1):
        raise ValueError(f"subsets must be a positive integer, got {subsets!r}")
    s = min(n, m, 1000) if subset_size is None else subset_size
    if not isinstance(s, int) or s < 2:
        raise ValueError(f"KID subset_size must be an integer >= 2, got {subset_size!r}")
    if s > min(n, m):
        raise ValueError(f"KID subset_size {s} exceeds the sample counts (real {m}, generated {n}); "
                         f"use at most {min(n, m)}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for t in range(subsets):
        y = real[torch.from_numpy(rng.choice(m, s, replace=False))]
        x = gen[torch.from_numpy(rng.choice(n, s, replace=False))]
        values[t] = mmd2_unbiased_kernel(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------

def mmd(real: Tensor, gen: Tensor, *, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with the RBF kernel k(a, b) = exp(-|a - b|² / (2h²)) (Gretton et al. 2012):

        MMD²_u = Σ_{j≠j'} k(x_j, x_j') / (n(n-1)) + Σ_{i≠i'} k(y_i, y_i') / (m(m-1)) - 2 Σ_{j,i} k(x_j, y_i) / (nm)

    h = `bandwidth`, or the median heuristic on the real set (`reward.metrics.median_bandwidth`)
    when None. Computed by `reward.metrics.mmd2_unbiased`.

    real: (m, d), gen: (n, d), m, n >= 2  ->  float (0 in expectation for one distribution).
    """
    real, gen = _pair(real, gen, min_real=2, min_gen=2)
    h = median_bandwidth(real) if bandwidth is None else bandwidth
    return mmd2_unbiased(gen, real, bandwidth=h)


# ----------------------------------------------------------------------------------------------
# Precision, recall, density, coverage
# ----------------------------------------------------------------------------------------------

def _distances(real: Tensor, gen: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact Euclidean distances (real-real, gen-gen, real-gen) from one difference-based cdist,
    so that equal pairs give bitwise-equal distances across the three blocks. Memory: one
    (m + n)² float64 matrix (0.6 MB at m + n = 281, 3.2 GB at 20,000)."""
    both = torch.cat([real, gen])
    d = torch.cdist(both, both, compute_mode="donot_use_mm_for_euclid_dist")
    m = real.shape[0]
    return d[:m, :m], d[m:, m:], d[:m, m:]


def prdc(real: Tensor, gen: Tensor, *, k_pr: int = 3, k_dc: int = 5) -> dict[str, float]:
    """Precision and recall (Kynkäänniemi et al. 2019, k = k_pr) and density and coverage
    (Naeem et al. 2020, k = k_dc), with closed balls B(z, r) = {u : |u - z| <= r}:

        precision = (1/n) Σ_j 1[∃ i : x_j ∈ B(y_i, NND_kpr(y_i))]      generated samples on the real manifold
        recall    = (1/m) Σ_i 1[∃ j : y_i ∈ B(x_j, NND_kpr(x_j))]      real samples on the generated manifold
        density   = 1/(k_dc n) Σ_j Σ_i 1[x_j ∈ B(y_i, NND_kdc(y_i))]   (can exceed 1)
        coverage  = (1/m) Σ_i 1[∃ j : x_j ∈ B(y_i, NND_kdc(y_i))]      real neighbourhoods hit

    NND_k within each point's own set (`knn_radii`). `<=` as in the papers' definitions: identical
    sets score precision = recall = coverage = 1 even when points repeat (the `prdc` package's strict
    `<` gives 0 wherever a radius is 0). Recall (and precision) are noisy at n ~ 150: judge them over
    seeds, alongside coverage.

    real: (m, d) with m > max(k_pr, k_dc); gen: (n, d) with n > k_pr  ->
    dict(precision, recall, density, coverage) of floats.
    """
    for name, k in (("k_pr", k_pr), ("k_dc", k_dc)):
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"{name} must be a positive integer, got {k!r}")
    real, gen = _pair(real, gen, min_real=max(k_pr, k_dc) + 1, min_gen=k_pr + 1)
    d_rr, d_gg, d_rg = _distances(real, gen)          # (m, m), (n, n), (m, n)
    r_real_pr = knn_radii(d_rr, k_pr)[:, None]         # (m, 1)
    r_gen_pr = knn_radii(d_gg, k_pr)[None, :]          # (1, n)
    r_real_dc = knn_radii(d_rr, k_dc)[:, None]         # (m, 1)
    in_real_pr = d_rg <= r_real_pr                     # (m, n): x_j in B(y_i, NND_kpr(y_i))
    in_gen_pr = d_rg <= r_gen_pr                       # (m, n): y_i in B(x_j, NND_kpr(x_j))
    in_real_dc = d_rg <= r_real_dc                     # (m, n): x_j in B(y_i, NND_kdc(y_i))
    return {
        "precision": float(in_real_pr.any(0).double().mean()),
        "recall": float(in_gen_pr.any(1).double().mean()),
        "density": float(in_real_dc.sum(0).double().mean()) / k_dc,
        "coverage": float(in_real_dc.any(1).double().mean()),
    }


# ----------------------------------------------------------------------------------------------
# Vendi
# ----------------------------------------------------------------------------------------------

def _unit_rows(x: Tensor) -> Tensor:
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("vendi with kernel='cosine' needs non-zero feature vectors (a row is all zeros)")
    return x / norms


def similarity_matrix(x: Tensor, *, kernel: Literal["cosine", "rbf"] = "cosine") -> Tensor:
    """K with K_ii = 1: cosine similarity x̂_jᵀ x̂_j' of the L2-normalised rows ("cosine"), or the RBF
    kernel with the median-heuristic bandwidth of x itself ("rbf"; needs >= 2 distinct rows).

    x: (n, d)  ->  (n, n) float64.
    """
    x = as_feature_matrix(x, "x", min_rows=1).cpu()
    if kernel == "cosine":
        xn = _unit_rows(x)
        return xn @ xn.T
    if kernel == "rbf":
        return rbf_kernel(x, x, bandwidth=median_bandwidth(x))
    raise ValueError(f"unknown Vendi kernel {kernel!r}; use 'cosine' or 'rbf'")


def vendi(x: Tensor, *, kernel: Literal["cosine", "rbf"] = "cosine") -> float:
    """Vendi score (Friedman & Dieng 2023), order q = 1: the exponential of the Shannon entropy of the
    eigenvalues of K / n,

        VS(x) = exp(-Σ_i λ_i log λ_i),   λ_i the eigenvalues of K / n (Σ λ_i = tr K / n = 1, 0 log 0 = 0)

    with K the (n, n) similarity matrix, K_ii = 1 (`similarity_matrix`; cosine similarity of the
    features by default). The "effective number of distinct samples": 1 for n identical points,
    n for n mutually orthogonal ones. For the cosine kernel K = X̂ X̂ᵀ, so when d < n the non-zero
    eigenvalues come from the (d, d) matrix X̂ᵀ X̂ / n instead (the same spectrum, cheaper).
    Only q = 1 is implemented (the `vendi-score` package takes a `q` that `score_X` ignores).

    x: (n, d), n >= 1  ->  float in [1, n].
    """
    x = as_feature_matrix(x, "x", min_rows=1).cpu()
    n, d = x.shape
    if kernel == "cosine":
        xn = _unit_rows(x)
        gram = xn.T @ xn if d < n else xn @ xn.T
        lam = torch.linalg.eigvalsh(gram / n)
    else:
        lam = torch.linalg.eigvalsh(similarity_matrix(x, kernel=kernel) / n)
    lam = lam[lam > 0]
    return float(torch.exp(-(lam * lam.log()).sum()))


# ----------------------------------------------------------------------------------------------
# Mode coverage
# ----------------------------------------------------------------------------------------------

def mode_coverage(real: Tensor, gen: Tensor, *, n_modes: int = 20, seed: int = 0) -> float:
    """Fraction of the real set's k-means clusters ("modes") that the generated set hits:

        c_1..c_K = k-means centroids of Y (scikit-learn KMeans, K = n_modes, random_state = seed, n_init = 10)
        mode_coverage = (1/K) |{ argmin_k |x_j - c_k| : j = 1..n }|

    i.e. a cluster counts when its centroid is the nearest centroid of at least one generated
    sample. 1 for the real set itself (every cluster holds a real point nearest to its centroid).

    real: (m, d), m >= n_modes; gen: (n, d), n >= 1  ->  float in [1/K, 1].
    """
    from sklearn.cluster import KMeans

    real, gen = _pair(real, gen)
    if not (isinstance(n_modes, int) and 1 <= n_modes <= real.shape[0]):
        raise ValueError(f"n_modes must be an integer in [1, {real.shape[0]}] (the real set's size), got {n_modes!r}")
    km = KMeans(n_clusters=n_modes, n_init=10, random_state=seed)
    with warnings.catch_warnings():  # fewer distinct real points than clusters: sklearn warns, result still defined
        warnings.simplefilter("ignore")
        km.fit(real.numpy())
    hit = np.unique(km.predict(gen.numpy()))
    return float(len(hit) / n_modes)


# ----------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------

def evaluate_features(real: Tensor, gen: Tensor, *, features: str, seed: int = 0, kid_subsets: int = 100,
                      n_modes: int = 20, k_pr: int = 3, k_dc: int = 5) -> dict:
    """Every metric of this module for one generated set against one real set, in one feature space.

    real: (m, d), gen: (n, d) (m > k_dc, n > k_pr); `features` names the extractor (recorded only);
    `seed` drives KID's subsets and k-means; `n_modes` is capped at m (the value used is returned).
    Returns a flat dict: fid, kid_mean, kid_std (over subsets, subset size min(n, m, 1000)), mmd,
    precision, recall, density, coverage, vendi (of gen), vendi_real, mode_coverage (floats), and
    n_real, n_generated, n_modes (ints), features (str).
    """
    real, gen = _pair(real, gen, min_real=max(k_pr, k_dc) + 1, min_gen=k_pr + 1)
    modes = min(n_modes, real.shape[0])
    kid_mean, kid_std = kid(real, gen, subsets=kid_subsets, seed=seed)
    out = {
        "fid": frechet_distance(gen, real),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "mmd": mmd(real, gen),
        **prdc(real, gen, k_pr=k_pr, k_dc=k_dc),
        "vendi": vendi(gen),
        "vendi_real": vendi(real),
        "mode_coverage": mode_coverage(real, gen, n_modes=modes, seed=seed),
        "n_real": int(real.shape[0]),
        "n_generated": int(gen.shape[0]),
        "n_modes": int(modes),
        "features": str(features),
    }
    assert all(k in out for k in METRIC_KEYS)
    return out
