"""Set-level diversity metrics with every sample's leave-one-out marginal in closed form.

A diversity reward is a statistic of the whole generated batch X against the reference set Y. Each
sample is credited its marginal contribution, computed for all n samples at once from quantities
that are built once for the set, never by n recomputations (`bench/loo.py` measures the speed-up
and checks the agreement with n recomputations):

    diversity score D (higher = better, e.g. MI, entropy):   r_i = D(X) - D(X \\ {x_i})
    distance to Y (lower = better, e.g. MMD^2, FID):         r_i = dist(X \\ {x_i}, Y) - dist(X, Y)

so that in both cases a sample whose removal would hurt the set gets a high reward. Optimal
transport is the exception: it credits each sample the share of the transport plan it carries
(see `ot_rewards`).

Notation
--------
X, x_i        generated features, x: (n, d), one row per sample, i = 0..n-1
Y, y_j        reference features, y: (m, d)
X \\ i        X with row i removed ("leave one out", loo)
k(a, b)       RBF kernel exp(-|a - b|^2 / (2 h^2)), h = `bandwidth`
K_XX, K_XY    kernel matrices k(x_i, x_j): (n, n), k(x_i, y_j): (n, m)
a_i, S        a_i = sum_{j != i} k(x_i, x_j), S = sum_i a_i                (MMD)
b_i, B        b_i = sum_j k(x_i, y_j), B = sum_i b_i                      (MMD)
C_YY          unbiased YY term of MMD^2, sum_{j != l} k(y_j, y_l) / (m (m - 1))
s^2           GP observation-noise variance, `noise` (GP-MI)
A             I + K_XX / s^2 (GP-MI)
z, N          PCA-reduced features (N, d) for kNN entropy and FID (d = the number of components)
eps_i         distance from z_i to its k-th nearest neighbour among the other points
V_d           volume of the unit ball in d dimensions, pi^{d/2} / Gamma(d/2 + 1)
psi           the digamma function
mu, Sigma     mean (d,) and unbiased (1/(n-1)) covariance (d, d) of a feature set
M             scatter matrix sum_i (x_i - mu)(x_i - mu)^T, so Sigma = M / (n - 1)
P, C          transport plan (n, m) and normalised cost matrix (n, m) (OT)
r_i           per-sample reward, `SetMetric.rewards`

Conventions
-----------
* Inputs are torch tensors of any floating dtype (float32 is fine) on any device; everything is
  computed in float64 on the input's device (kernel sums, log-determinants and eigenvalue
  square roots lose several digits in float32). Returned tensors are always float64 on x's device,
  whatever the input dtype; returned scalars are Python floats.
* The kernel bandwidth h is a *distance* (not a squared distance): k = exp(-|a-b|^2 / (2 h^2)).
  `median_bandwidth(y)` gives the median heuristic, fixed once from the reference and stored by the
  caller (the reward artifact), so that the reward does not drift with the batch.
* kNN entropy and FID are meant for PCA-reduced features (`fit_pca` on the reference, k << n):
  kNN estimators are badly biased in high dimension, and a covariance of n < d samples is singular.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SetMetric", "PCA", "pairwise_sq_dists", "rbf_kernel", "median_bandwidth",
    "mmd2_unbiased", "mmd2_unbiased_loo", "gp_mi", "gp_mi_loo", "fit_pca", "knn_entropy",
    "knn_entropy_loo", "trace_sqrt_product", "frechet_distance", "fid_loo", "ot_rewards", "knn_radii",
    "soft_coverage_loo", "METRICS", "set_metric",
]


@dataclass(frozen=True)
class SetMetric:
    """A set-level statistic of X (against Y) and its per-sample credit.

    Attributes:
        value: the raw statistic D(X): MMD^2, GP-MI in nats, kNN entropy in nats, FID, or OT cost.
        score: `value` oriented so that higher = more diverse / closer to the reference
            (-MMD^2, MI, entropy, -FID, -OT cost).
        loo: (n,) float64, the raw statistic without sample i, D(X \\ i). For OT, the cost carried by
            sample i, n sum_j P_ij C_ij, instead (see `ot_rewards`).
        rewards: (n,) float64, the per-sample marginal with the sign that makes higher = better:
            value - loo for a diversity score, loo - value for a distance; -loo for OT.
    """

    value: float
    score: float
    loo: Tensor
    rewards: Tensor


# ----------------------------------------------------------------------------------------------
# Checks and kernels
# ----------------------------------------------------------------------------------------------

def as_feature_matrix(x: Tensor, name: str, *, min_rows: int = 1) -> Tensor:
    """Validate a feature matrix (rows = points) and return it as float64 on its device (the one check of
    every metric here and in `evaluation.metrics`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (rows, features) matrix, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values")
    return x


def _check_same_dim(x: Tensor, y: Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")


def _check_positive(**kwargs: float) -> None:
    for name, v in kwargs.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def pairwise_sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances |x_i - y_j|^2 = |x_i|^2 + |y_j|^2 - 2 x_i . y_j, clamped at 0.

    x: (n, d), y: (m, d)  ->  (n, m) float64. By the expansion (one matrix product, O(n m d)); the
    result can be off by ~1e-16 |x|^2 through cancellation, which is harmless for kernels but is
    why `knn_entropy` computes its (small, PCA-reduced) distances directly instead.
    """
    x, y = as_feature_matrix(x, "x"), as_feature_matrix(y, "y")
    _check_same_dim(x, y)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return sq.clamp_min_(0.0)


def rbf_kernel(x: Tensor, y: Tensor, *, bandwidth: float) -> Tensor:
    """RBF kernel k(x_i, y_j) = exp(-|x_i - y_j|^2 / (2 h^2)), h = bandwidth (a distance).

    x: (n, d), y: (m, d)  ->  (n, m) float64.
    """
    _check_positive(bandwidth=bandwidth)
    return torch.exp(pairwise_sq_dists(x, y) / (-2.0 * bandwidth**2))


def _median(v: Tensor) -> Tensor:
    """Median of a 1-d tensor, the mean of the two middle values for an even count (as numpy)."""
    s = v.sort().values
    n = s.numel()
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def median_bandwidth(y: Tensor) -> float:
    """Median heuristic h = median_{j < l} |y_j - y_l| over the distinct pairs of the reference.

    y: (m, d), m >= 2  ->  float. A distance, to be used as `bandwidth` in `rbf_kernel`.
    """
    y = as_feature_matrix(y, "y", min_rows=2)
    h = float(_median(torch.pdist(y)))
    if h <= 0:
        raise ValueError("median pairwise distance of the reference is 0 (more than half the pairs are duplicates)")
    return h


# ----------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------

def _mmd2_parts(x: Tensor, y: Tensor, bandwidth: float) -> tuple[Tensor, Tensor, float]:
    """a: (n,) row sums of K_XX without the diagonal, b: (n,) row sums of K_XY, C_YY (float)."""
    k_xx = rbf_kernel(x, x, bandwidth=bandwidth)
    a = k_xx.sum(1) - k_xx.diagonal()
    b = rbf_kernel(x, y, bandwidth=bandwidth).sum(1)
    m = y.shape[0]
    k_yy = rbf_kernel(y, y, bandwidth=bandwidth)
    c_yy = float((k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1)))
    return a, b, c_yy


def mmd2_unbiased(x: Tensor, y: Tensor, *, bandwidth: float) -> float:
    """Unbiased squared MMD with the RBF kernel (Gretton et al. 2012, eq. 3):

        MMD^2(X, Y) = S / (n (n-1)) - 2 B / (n m) + C_YY,
        S = sum_{i != j} k(x_i, x_j),  B = sum_{i, j} k(x_i, y_j),  C_YY = sum_{j != l} k(y_j, y_l) / (m (m-1)).

    x: (n, d), y: (m, d), n, m >= 2  ->  float (can be slightly negative; 0 in expectation when X and
    Y come from the same distribution).
    """
    x, y = as_feature_matrix(x, "x", min_rows=2), as_feature_matrix(y, "y", min_rows=2)
    _check_same_dim(x, y)
    n, m = x.shape[0], y.shape[0]
    a, b, c_yy = _mmd2_parts(x, y, bandwidth)
    return float(a.sum() / (n * (n - 1)) - 2.0 * b.sum() / (n * m)) + c_yy


def mmd2_unbiased_loo(x: Tensor, y: Tensor, *, bandwidth: float) -> SetMetric:
    """Unbiased MMD^2 and its n leave-one-out values in O(n^2 + n m) after the kernels:

        MMD^2(X \\ i, Y) = (S - 2 a_i) / ((n-1)(n-2)) - 2 (B - b_i) / ((n-1) m) + C_YY,
        a_i = sum_{j != i} k(x_i, x_j),  b_i = sum_j k(x_i, y_j)   (removing x_i drops the 2 a_i
        ordered pairs that contain it from S, and b_i from B).

    x: (n, d), n >= 3; y: (m, d), m >= 2. value = MMD^2(X, Y), score = -value,
    loo: (n,) MMD^2(X \\ i, Y), rewards: (n,) loo - value (a distance: removing a helpful sample raises it).
    """
    x, y = as_feature_matrix(x, "x", min_rows=3), as_feature_matrix(y, "y", min_rows=2)
    _check_same_dim(x, y)
    n, m = x.shape[0], y.shape[0]
    a, b, c_yy = _mmd2_parts(x, y, bandwidth)
    s, bb = a.sum(), b.sum()
    value = float(s / (n * (n - 1)) - 2.0 * bb / (n * m)) + c_yy
    loo = (s - 2.0 * a) / ((n - 1) * (n - 2)) - 2.0 * (bb - b) / ((n - 1) * m) + c_yy
    return SetMetric(value=value, score=-value, loo=loo, rewards=loo - value)


# ----------------------------------------------------------------------------------------------
# GP mutual information (information gain)
# ----------------------------------------------------------------------------------------------

def _gp_a(x: Tensor, bandwidth: float, noise: float) -> Tensor:
    """A = I + K_XX / s^2: (n, n), with the unit diagonal of the RBF kernel set exactly."""
    _check_positive(noise=noise)
    k = rbf_kernel(x, x, bandwidth=bandwidth)
    k.diagonal().fill_(1.0)
    a = k / noise
    a.diagonal().add_(1.0)
    return a


def gp_mi(x: Tensor, *, bandwidth: float, noise: float) -> float:
    """GP information gain D(X) = 1/2 log det(I + K_XX / s^2), in nats (the seeds' "GP-MI").

    The mutual information between a GP f ~ GP(0, k) and noisy observations f(x_i) + N(0, s^2) at the
    points of X (Srinivas et al. 2010): it grows with the number of points and with how
    non-redundant they are; a collapsed set (K_XX ~ all ones) gains about 1/2 log(1 + n / s^2).
    Pure diversity: no reference set.

    x: (n, d); bandwidth: RBF h (a distance); noise: s^2, the observation-noise *variance*
    (smaller = more sensitive to near-duplicates; 0.1-1 is usual with a unit-diagonal kernel)
    ->  float. Computed as sum log diag(L), L = chol(A).
    """
    x = as_feature_matrix(x, "x")
    chol = torch.linalg.cholesky(_gp_a(x, bandwidth, noise))
    return float(torch.log(chol.diagonal()).sum())


def gp_mi_loo(x: Tensor, y: Optional[Tensor] = None, *, bandwidth: float, noise: float) -> SetMetric:
    """GP-MI and every sample's marginal from one Cholesky factorisation:

        D(X) - D(X \\ i) = 1/2 log (det A / det A_{-i,-i}) = -1/2 log [A^{-1}]_ii,   A = I + K_XX / s^2

    (the ratio of the determinants is 1 / [A^{-1}]_ii by Cramer's rule). [A^{-1}]_ii is the squared
    norm of column i of L^{-1}; total cost O(n^3) once instead of n times.

    x: (n, d), n >= 2; y: ignored (GP-MI has no reference; the argument keeps the signature of
    the other metrics); bandwidth, noise as in `gp_mi`. value = score = D(X) in nats,
    loo: (n,) D(X \\ i), rewards: (n,) value - loo (always >= 0: every point adds information).
    """
    x = as_feature_matrix(x, "x", min_rows=2)
    chol = torch.linalg.cholesky(_gp_a(x, bandwidth, noise))
    value = float(torch.log(chol.diagonal()).sum())
    eye = torch.eye(x.shape[0], dtype=torch.float64, device=x.device)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    a_inv_diag = (chol_inv * chol_inv).sum(0)
    rewards = -0.5 * torch.log(a_inv_diag)
    return SetMetric(value=value, score=value, loo=value - rewards, rewards=rewards)


# ----------------------------------------------------------------------------------------------
# PCA
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PCA:
    """A PCA fitted on the reference features (see `fit_pca`).

    Attributes:
        mean: (d,) float64, the reference mean.
        components: (k, d) float64, orthonormal rows, the top-k principal directions, sign fixed
            so that the largest-magnitude entry of each row is positive (deterministic).
        explained_variance: (k,) float64, variance of the reference along each component
            (unbiased, 1/(m-1)), descending.
        total_variance: the reference's total variance tr Sigma_Y (unbiased); NaN when unknown
            (e.g. a PCA rebuilt from mean, components and explained_variance alone).
    """

    mean: Tensor
    components: Tensor
    explained_variance: Tensor
    total_variance: float = math.nan

    @property
    def explained_variance_ratio(self) -> float:
        """Fraction of the reference's total variance captured by the k components (a float;
        NaN when `total_variance` is unknown). sum(explained_variance) / total_variance."""
        return float(self.explained_variance.sum()) / self.total_variance

    def project(self, x: Tensor) -> Tensor:
        """z = (x - mean) components^T:  x: (n, d)  ->  (n, k) float64 on x's device."""
        x = as_feature_matrix(x, "x")
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"PCA was fitted on {self.mean.shape[0]}-d features, got {x.shape[1]}-d")
        return (x - self.mean.to(x.device)) @ self.components.to(x.device).T


def fit_pca(y: Tensor, *, k: int) -> PCA:
    """Top-k principal components of the reference by SVD of the centred data, Y - mu = U S V^T:

        components = V^T[:k],  explained_variance = S[:k]^2 / (m - 1),  total_variance = sum S^2 / (m - 1).

    y: (m, d), 1 <= k <= min(m - 1, d) (m - 1: the centred data have rank at most m - 1)  ->  PCA.
    """
    y = as_feature_matrix(y, "y", min_rows=2)
    m, d = y.shape
    if not (isinstance(k, int) and 1 <= k <= min(m - 1, d)):
        raise ValueError(f"PCA k must be an int in [1, min(m - 1, d)] = [1, {min(m - 1, d)}], got {k!r}")
    mean = y.mean(0)
    _, s, vh = torch.linalg.svd(y - mean, full_matrices=False)
    comps = vh[:k]
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * sign
    var = s**2 / (m - 1)
    return PCA(mean=mean, components=comps.contiguous(), explained_variance=var[:k],
               total_variance=float(var.sum()))


# ----------------------------------------------------------------------------------------------
# kNN (Kozachenko-Leonenko) entropy
# ----------------------------------------------------------------------------------------------

def _log_unit_ball_volume(d: int) -> float:
    """log V_d = (d/2) log pi - log Gamma(d/2 + 1)."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def _digamma(v: float) -> float:
    return float(torch.special.digamma(torch.tensor(v, dtype=torch.float64)))


def _knn_dists(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Distances (N, k) and indices (N, k) of each point's k nearest other points, ascending.

    Distances are computed directly (not by the |a|^2 + |b|^2 - 2ab expansion, whose cancellation
    would corrupt the small distances of a crowded set); the point itself is excluded.
    """
    dist = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")
    dist.diagonal().fill_(math.inf)
    vals, idx = torch.topk(dist, k, dim=1, largest=False, sorted=True)
    return vals, idx


def _check_knn(z: Tensor, k: int, extra: int) -> Tensor:
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"kNN k must be a positive int, got {k!r}")
    return as_feature_matrix(z, "z", min_rows=k + 1 + extra)


def _kl_entropy(log_eps_sum: Tensor | float, n: int, d: int, k: int) -> Tensor | float:
    """H = psi(N) - psi(k) + log V_d + (d / N) sum_i log eps_i (broadcasts over log_eps_sum)."""
    return _digamma(n) - _digamma(k) + _log_unit_ball_volume(d) + (d / n) * log_eps_sum


def knn_entropy(z: Tensor, *, k: int, min_dist: float = 1e-12) -> float:
    """Kozachenko-Leonenko differential entropy estimate (Kraskov et al. 2004, eq. 20), in nats:

        H = psi(N) - psi(k) + log V_d + (d / N) sum_i log eps_i,   V_d = pi^{d/2} / Gamma(d/2 + 1),

    eps_i = distance from z_i to its k-th nearest neighbour. Consistent for fixed k as N -> inf, but
    badly biased when d is large relative to log N: use PCA-reduced features.

    z: (N, d), N >= k + 1; k: neighbour order (usually 3-10); min_dist: eps_i is clamped at this
    (exact duplicates would give log 0 = -inf)  ->  float.
    """
    z = _check_knn(z, k, 0)
    n, d = z.shape
    vals, _ = _knn_dists(z, k)
    log_eps = torch.log(vals[:, k - 1].clamp_min(min_dist))
    return float(_kl_entropy(log_eps.sum(), n, d, k))


def knn_entropy_loo(z: Tensor, *, k: int, min_dist: float = 1e-12) -> SetMetric:
    """kNN entropy and its N leave-one-out values from the k + 1 nearest neighbours, found once:

        H(Z \\ i) = psi(N-1) - psi(k) + log V_d + (d / (N-1)) [ L - log eps_i
                    + sum_{j : i in kNN(j)} (log eps'_j - log eps_j) ],   L = sum_j log eps_j,

    where eps'_j is the distance to j's (k+1)-th nearest neighbour: removing z_i changes eps_j only
    for the j that have i among their k nearest (then the k-th neighbour becomes the (k+1)-th; with
    ties at the k-th distance eps'_j = eps_j, as a recomputation gives). O(N^2 d) once for the
    distances, O(N k) for all i.

    z: (N, d), N >= k + 2; k, min_dist as in `knn_entropy`. value = score = H(Z) in nats,
    loo: (N,) H(Z \\ i), rewards: (N,) value - loo.
    """
    z = _check_knn(z, k, 1)
    n, d = z.shape
    vals, idx = _knn_dists(z, k + 1)
    log_eps = torch.log(vals[:, k - 1].clamp_min(min_dist))  # (N,) k-th neighbour
    log_eps_next = torch.log(vals[:, k].clamp_min(min_dist))  # (N,) (k+1)-th neighbour
    total = log_eps.sum()
    value = float(_kl_entropy(total, n, d, k))
    # delta_i = sum over the j that have i among their k nearest of (log eps'_j - log eps_j)
    gain = (log_eps_next - log_eps)[:, None].expand(n, k)
    delta = torch.zeros(n, dtype=torch.float64, device=z.device).index_add_(
        0, idx[:, :k].reshape(-1), gain.reshape(-1))
    loo = _kl_entropy(total - log_eps + delta, n - 1, d, k)
    return SetMetric(value=value, score=value, loo=loo, rewards=value - loo)


# ----------------------------------------------------------------------------------------------
# Frechet distance (FID on PCA-reduced features)
# ----------------------------------------------------------------------------------------------

def _psd_sqrt(a: Tensor) -> Tensor:
    """Symmetric PSD square root by eigendecomposition (tiny negative eigenvalues clamped to 0)."""
    lam, q = torch.linalg.eigh(0.5 * (a + a.T))
    return (q * lam.clamp_min(0.0).sqrt()) @ q.T


def _trace_sqrt_psd(a: Tensor) -> Tensor:
    """tr a^{1/2} = sum_k sqrt(lambda_k(a)) of symmetric PSD matrices a: (..., d, d) -> (...)."""
    lam = torch.linalg.eigvalsh(0.5 * (a + a.transpose(-1, -2)))
    return lam.clamp_min(0.0).sqrt().sum(-1)


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def trace_sqrt_product(a: Tensor, b: Tensor) -> float:
    """tr √(Σ_1 Σ_2) exactly, for Σ_1 = AᵀA / (m-1), Σ_2 = BᵀB / (n-1), from the centred matrices:

        tr √(Σ_1 Σ_2) = ‖A Bᵀ‖_* / √((m-1)(n-1))

    (‖·‖_* the nuclear norm, the sum of singular values; rows are samples). Why: the non-zero
    eigenvalues of AᵀA BᵀB equal those of (A Bᵀ)(A Bᵀ)ᵀ (cyclic permutation), i.e. the squared
    singular values of A Bᵀ, and Σ_1 Σ_2 is similar to the PSD Σ_1^{1/2} Σ_2 Σ_1^{1/2}, so its square
    root's trace is the sum of their square roots. No sqrtm, no eigenvalues of a non-symmetric
    product, exact when either covariance is singular (m or n <= d). Computed as ‖R_A R_Bᵀ‖_* with
    A = Q_A R_A, B = Q_B R_B (reduced QR; orthonormal Q_A, Q_B keep singular values), a
    min(m, d) x min(n, d) matrix.

    a: (m, d), b: (n, d) centred, float64  ->  float.
    """
    r_a = torch.linalg.qr(a, mode="r").R
    r_b = torch.linalg.qr(b, mode="r").R
    nuc = torch.linalg.matrix_norm(r_a @ r_b.T, ord="nuc")
    return float(nuc) / math.sqrt((a.shape[0] - 1) * (b.shape[0] - 1))


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to X and Y (FID when the features are Inception's):

        FID = |mu_x - mu_y|² + tr Σ_x + tr Σ_y - 2 tr √(Σ_x Σ_y)

    with unbiased covariances (1/(n-1), as `np.cov`) and tr √(Σ_x Σ_y) from `trace_sqrt_product`,
    exact even for rank-deficient covariances. Symmetric in X and Y. The reward (on PCA-reduced
    features, `fid_loo`) and the evaluation (`evaluation.metrics`, on full features) both use it.

    Small-sample caveat: FID is biased, and the bias grows as d/n (Chong & Forsyth 2020). At ~150
    images in 1280-d (both covariances of rank <= 149) the bias is as large as a real difference
    between models: compare FID only at the same n and feature extractor, and prefer KID.

    x: (n, d), y: (m, d), n, m >= 2  ->  float (>= 0 up to rounding).
    """
    x, y = as_feature_matrix(x, "x", min_rows=2), as_feature_matrix(y, "y", min_rows=2)
    _check_same_dim(x, y)
    mu_x, mu_y = x.mean(0), y.mean(0)
    a, b = x - mu_x, y - mu_y
    tr_x = float((a * a).sum()) / (x.shape[0] - 1)
    tr_y = float((b * b).sum()) / (y.shape[0] - 1)
    return float(((mu_x - mu_y) ** 2).sum()) + tr_x + tr_y - 2.0 * trace_sqrt_product(a, b)


def fid_loo(x: Tensor, y: Tensor) -> SetMetric:
    """FID and its n leave-one-out values by rank-one downdates of the mean and covariance of X:

        mu^{-i}    = (n mu - x_i) / (n - 1)
        M^{-i}     = M - n/(n-1) (x_i - mu)(x_i - mu)^T,   Sigma^{-i} = M^{-i} / (n - 2)
        FID(X \\ i) = |mu^{-i} - mu_y|^2 + tr Sigma^{-i} + tr Sigma_y
                     - 2 tr (Sigma_y^{1/2} Sigma^{-i} Sigma_y^{1/2})^{1/2}

    with the last trace for all i at once from one batched symmetric eigendecomposition of
    (n, d, d) matrices. O(n d^2 + n d^3) with d the (PCA-reduced) dimension, no pass over X \\ i.

    x: (n, d), n >= 3; y: (m, d), m >= 2. value = FID(X, Y), score = -value,
    loo: (n,) FID(X \\ i, Y), rewards: (n,) loo - value.
    """
    x, y = as_feature_matrix(x, "x", min_rows=3), as_feature_matrix(y, "y", min_rows=2)
    _check_same_dim(x, y)
    n = x.shape[0]
    mu_x, cov_x = _mean_cov(x)
    mu_y, cov_y = _mean_cov(y)
    sy = _psd_sqrt(cov_y)
    const = float(cov_y.trace())
    value = float(((mu_x - mu_y) ** 2).sum() + cov_x.trace() + const - 2.0 * _trace_sqrt_psd(sy @ cov_x @ sy))

    dev = x - mu_x                                    # (n, d) x_i - mu
    scatter = cov_x * (n - 1)                         # M
    mu_loo = (n * mu_x - x) / (n - 1)                 # (n, d)
    w = n / (n - 1)
    tr_cov_loo = (scatter.trace() - w * (dev * dev).sum(1)) / (n - 2)        # (n,)
    syd = dev @ sy                                                           # (n, d) Sigma_y^{1/2} dev_i
    # Sigma_y^{1/2} Sigma^{-i} Sigma_y^{1/2} = (Sigma_y^{1/2} M Sigma_y^{1/2} - w syd_i syd_i^T) / (n - 2)
    inner = (sy @ scatter @ sy - w * syd[:, :, None] * syd[:, None, :]) / (n - 2)   # (n, d, d)
    loo = ((mu_loo - mu_y) ** 2).sum(1) + tr_cov_loo + const - 2.0 * _trace_sqrt_psd(inner)
    return SetMetric(value=value, score=-value, loo=loo, rewards=loo - value)


# ----------------------------------------------------------------------------------------------
# Optimal transport
# ----------------------------------------------------------------------------------------------

def ot_rewards(
    x: Tensor, y: Tensor, *, method: Literal["emd", "sinkhorn"] = "emd", reg: float = 0.05
) -> SetMetric:
    """Transport X onto Y with uniform marginals and credit each sample minus the cost it carries.

        C_ij  = |x_i - y_j|^2 / median_{i,j} |x_i - y_j|^2           (normalised cost, (n, m))
        P     = argmin_{P 1 = 1/n, P^T 1 = 1/m, P >= 0} <P, C> [- reg H(P) for sinkhorn]
        value = sum_ij P_ij C_ij,       r_i = -n sum_j P_ij C_ij,     sum_i r_i = -n value.

    Dividing by the median of this batch's cost matrix makes the cost dimensionless, so `reg` is
    relative to a typical cost and the same value works for any feature scale or dimension. Each
    sample must send mass 1/n to the reference; samples crowded onto one reference region must
    travel far to reach the uncovered regions and lose, samples that fill under-covered regions win.

    OT does not compute a true leave-one-out: `loo` holds sample i's carried cost n sum_j P_ij C_ij
    (its share of the plan, scaled so that its mean is `value`) and rewards = -loo.

    x: (n, d), y: (m, d); method: "emd" (exact network simplex, `ot.emd`) or "sinkhorn" (entropic,
    log-domain when exp(-C/reg) would underflow); reg: entropic regularisation relative to the
    normalised cost (0.01-0.1 usual; smaller = closer to emd, slower to converge).
    value = OT cost (dimensionless), score = -value.
    """
    x, y = as_feature_matrix(x, "x"), as_feature_matrix(y, "y")
    _check_same_dim(x, y)
    n = x.shape[0]
    cost = pairwise_sq_dists(x, y)
    med = _median(cost.reshape(-1))
    if not float(med) > 0:
        raise ValueError("median squared distance between x and y is 0: the cost cannot be normalised")
    cost = cost / med
    plan = _ot_plan(cost.cpu().numpy(), method=method, reg=reg)
    carried = n * (torch.from_numpy(plan).to(cost.device) * cost).sum(1)  # (n,) n sum_j P_ij C_ij
    value = float(carried.sum() / n)
    return SetMetric(value=value, score=-value, loo=carried, rewards=-carried)


def _ot_plan(cost: np.ndarray, *, method: str, reg: float) -> np.ndarray:
    """The (n, m) plan with uniform marginals for a float64 cost matrix (through POT)."""
    import ot  # here, not at the top: POT imports scikit-learn (~1 s), and most rewards never transport

    n, m = cost.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    if method == "emd":
        plan, log = ot.emd(a, b, cost, numItermax=max(100_000, 50 * n * m), log=True)
        if log.get("warning"):
            warnings.warn(f"ot.emd: {log['warning']}", RuntimeWarning, stacklevel=3)
        return plan
    if method == "sinkhorn":
        _check_positive(reg=reg)
        # plain Sinkhorn is ~10x faster; exp(-C/reg) underflows (to 0 rows) past C/reg ~ 700
        algo = "sinkhorn" if float(cost.max()) / reg < 600 else "sinkhorn_log"
        return ot.sinkhorn(a, b, cost, reg, method=algo, numItermax=20_000, stopThr=1e-9)
    raise ValueError(f"OT method must be 'emd' or 'sinkhorn', got {method!r}")


# ----------------------------------------------------------------------------------------------
# Soft coverage of the reference
# ----------------------------------------------------------------------------------------------

def knn_radii(d_self: Tensor, k: int) -> Tensor:
    """NND_k of each point: the k-th smallest distance to the *other* points of its set (the balls of
    density/coverage, Naeem et al. 2020).

    d_self: (N, N) distances within one set (zero diagonal), N > k  ->  (N,). The (k+1)-th smallest
    value of each row, the point itself being the first (duplicates of a point count as neighbours
    at distance 0, as in the `prdc` package).
    """
    return d_self.kthvalue(k + 1, dim=1).values


def soft_coverage_loo(x: Tensor, y: Tensor, *, radii: Tensor, softness: float) -> SetMetric:
    """Soft coverage of the reference and its n leave-one-out values in O(n m):

        C(X) = (1/m) sum_j [1 - prod_i (1 - kappa_ij)],  kappa_ij = sigmoid((r_j - |x_i - y_j|) / (softness r_j)),
        C(X) - C(X \\ i) = (1/m) sum_j kappa_ij prod_{l != i} (1 - kappa_lj),

    the share of reference points y_j with a sample inside their ball of radius r_j (`knn_radii`: coverage's balls,
    Naeem et al. 2020), the ball's edge softened over ~softness r_j so that a sample just outside still gets credit.
    Sample i is credited the reference points it covers that no other sample does: the product over l != i is the
    chance that the rest of the batch misses y_j. x: (n, d), n >= 2; y: (m, d); radii: (m,) > 0.
    value = score = C(X); loo: (n,) C(X \\ i); rewards: (n,) value - loo.
    """
    x, y = as_feature_matrix(x, "x", min_rows=2), as_feature_matrix(y, "y", min_rows=1)
    _check_same_dim(x, y)
    _check_positive(softness=softness)
    r = radii.to(device=y.device, dtype=torch.float64)  # (m,)
    if r.shape != (y.shape[0],) or not bool((r > 0).all()):
        raise ValueError(f"radii must be ({y.shape[0]},) positive, got shape {tuple(r.shape)}")
    dist = pairwise_sq_dists(x, y).clamp_min(0).sqrt()  # (n, m)
    miss = torch.sigmoid((dist - r) / (softness * r))  # 1 - kappa: (n, m)
    ones = torch.ones_like(miss[:1])  # (1, m)
    # exclusive products over the samples by prefix and suffix products: no division by 1 - kappa, which may be 0
    before = torch.cumprod(torch.cat([ones, miss[:-1]]), dim=0)  # prod_{l < i}: (n, m)
    after = torch.cumprod(torch.cat([ones, miss.flip(0)[:-1]]), dim=0).flip(0)  # prod_{l > i}: (n, m)
    others = before * after  # prod_{l != i} (1 - kappa_lj): (n, m)
    m = y.shape[0]
    value = float((1.0 - others[0] * miss[0]).sum() / m)
    loo = (1.0 - others).sum(1) / m  # (n,)
    return SetMetric(value=value, score=value, loo=loo, rewards=value - loo)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

def _maybe_project(pca: Optional[PCA], *xs: Tensor) -> tuple[Tensor, ...]:
    return xs if pca is None else tuple(pca.project(v) for v in xs)


def _mmd_metric(x: Tensor, y: Tensor, *, bandwidth: float) -> SetMetric:
    """MMD^2 against Y, `mmd2_unbiased_loo`."""
    return mmd2_unbiased_loo(x, y, bandwidth=bandwidth)


def _mi_metric(x: Tensor, y: Optional[Tensor], *, bandwidth: float, noise: float) -> SetMetric:
    """GP-MI of X (y ignored), `gp_mi_loo`."""
    return gp_mi_loo(x, y, bandwidth=bandwidth, noise=noise)


def _knn_entropy_metric(x: Tensor, y: Optional[Tensor], *, k: int, pca: Optional[PCA] = None,
                        min_dist: float = 1e-12) -> SetMetric:
    """kNN entropy of pca.project(X) (or X when pca is None; y ignored), `knn_entropy_loo`."""
    (z,) = _maybe_project(pca, x)
    return knn_entropy_loo(z, k=k, min_dist=min_dist)


def _fid_metric(x: Tensor, y: Tensor, *, pca: Optional[PCA] = None) -> SetMetric:
    """FID of pca.project(X) against pca.project(Y) (raw features when pca is None), `fid_loo`."""
    zx, zy = _maybe_project(pca, x, y)
    return fid_loo(zx, zy)


def _ot_metric(x: Tensor, y: Tensor, *, method: Literal["emd", "sinkhorn"] = "emd",
               reg: float = 0.05) -> SetMetric:
    """OT cost onto Y, `ot_rewards`."""
    return ot_rewards(x, y, method=method, reg=reg)


METRICS: dict[str, Callable[..., SetMetric]] = {
    "mmd": _mmd_metric,
    "mi": _mi_metric,
    "knn_entropy": _knn_entropy_metric,
    "fid": _fid_metric,
    "ot": _ot_metric,
}
"""Metric name -> f(x, y, **params) -> SetMetric. Parameters by name:
mmd: bandwidth; mi: bandwidth, noise (y ignored); knn_entropy: k, pca=None, min_dist (y ignored);
fid: pca=None; ot: method="emd", reg=0.05."""


def set_metric(name: str, x: Tensor, y: Optional[Tensor], **params) -> SetMetric:
    """Compute the named set metric of x (n, d) against y (m, d) with its per-sample rewards.

    name: one of METRICS ("mmd", "mi", "knn_entropy", "fid", "ot"); params: that metric's keyword
    parameters (see METRICS), e.g. set_metric("mmd", x, y, bandwidth=h).
    """
    try:
        fn = METRICS[name]
    except KeyError:
        raise ValueError(f"unknown set metric {name!r}: use one of {', '.join(METRICS)}") from None
    return fn(x, y, **params)
