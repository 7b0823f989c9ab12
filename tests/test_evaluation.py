"""Evaluation metrics (evaluation.metrics) against independent implementations and brute force, and the
report writers (evaluation.report). Where each expected value comes from is said in each test.

Oracles: the `prdc` package (Naeem et al.'s reference code; strict `<`), `vendi-score` (the Vendi
authors' package), `scipy.linalg.sqrtm`, scikit-learn's polynomial kernel, NumPy eigendecompositions
and plain double loops. torch-fidelity's feature-level KID/FID cannot serve: its package imports
torchvision, which the CPU torch cannot import.
"""
from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluation import metrics as E
from reward.metrics import frechet_distance, median_bandwidth, mmd2_unbiased, trace_sqrt_product
from evaluation.report import training_curves, tsne_plot



def _prdc_pkg():
    return pytest.importorskip("prdc", reason="test oracle from requirements-dev.txt (prdc==0.2)")


def _randn(*shape, seed=0, shift=0.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# ----------------------------------------------------------------------------------------------
# precision / recall / density / coverage
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m, n, d, shift", [(40, 50, 8, 0.0), (60, 35, 16, 0.5), (30, 30, 64, 1.0)])
def test_prdc_matches_package_on_continuous_data(m, n, d, shift, capsys):
    # Continuous random data: no distance ties (probability zero), so `<=` (ours) and `<` (prdc) agree.
    real, gen = _randn(m, d, seed=1), _randn(n, d, seed=2, shift=shift)
    prdc_pkg = _prdc_pkg()
    ours = E.prdc(real, gen, k_pr=3, k_dc=5)
    ref3 = prdc_pkg.compute_prdc(real.numpy(), gen.numpy(), nearest_k=3)
    ref5 = prdc_pkg.compute_prdc(real.numpy(), gen.numpy(), nearest_k=5)
    assert ours["precision"] == pytest.approx(ref3["precision"], abs=1e-12)
    assert ours["recall"] == pytest.approx(ref3["recall"], abs=1e-12)
    assert ours["density"] == pytest.approx(ref5["density"], abs=1e-12)
    assert ours["coverage"] == pytest.approx(ref5["coverage"], abs=1e-12)


def test_prdc_differs_from_package_exactly_on_repeated_points(capsys):
    # 10 distinct points, each repeated 6 times, scored against themselves: every k-NN radius
    # (k <= 5) is 0. Closed balls (ours) contain the copies: precision = recall = coverage = 1 and
    # density = 6 copies / k_dc = 1.2. prdc's strict `<` puts nothing inside a radius-0 ball: all 0.
    prdc_pkg = _prdc_pkg()
    x = _randn(10, 4, seed=3).repeat_interleave(6, dim=0)
    ours = E.prdc(x, x, k_pr=3, k_dc=5)
    assert ours == {"precision": 1.0, "recall": 1.0, "density": pytest.approx(1.2), "coverage": 1.0}
    theirs = prdc_pkg.compute_prdc(x.numpy(), x.numpy(), nearest_k=3)
    theirs5 = prdc_pkg.compute_prdc(x.numpy(), x.numpy(), nearest_k=5)
    assert (theirs["precision"], theirs["recall"], theirs5["density"], theirs5["coverage"]) == (0, 0, 0, 0)


def test_prdc_brute_force_boundary_point_counts_as_inside():
    # By hand on a line: real = {0, 1, 2, 3, 10}, k = 1 radii = {1, 1, 1, 1, 7}. The generated point 17
    # lies exactly on the boundary of 10's ball (|17 - 10| = 7): inside with `<=`.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    gen = torch.tensor([[17.0], [100.0]])
    r = E.prdc(real, gen, k_pr=1, k_dc=1)
    assert r["precision"] == 0.5          # 17 is inside 10's ball, 100 is not
    assert r["density"] == 0.5            # one ball containing 17, none containing 100, / (k n) = 1 / 2
    assert r["coverage"] == 0.2           # only 10's neighbourhood is hit
    # recall: gen radii (k = 1 within gen) = {83, 83}: every real point lies within 83 of 17
    assert r["recall"] == 1.0


def test_identical_sets_score_perfectly():
    # The reference itself as the generated set: precision = recall = coverage = 1 (every point is in
    # its own ball), MMD and KID near zero (against the distance to a shifted set), mode coverage 1.
    real = _randn(60, 12, seed=4)
    shifted = _randn(60, 12, seed=5, shift=1.0)
    r = E.prdc(real, real)
    assert (r["precision"], r["recall"], r["coverage"]) == (1.0, 1.0, 1.0)
    assert abs(E.mmd(real, real)) < 0.05 * E.mmd(real, shifted)
    assert abs(E.kid(real, real, subsets=20)[0]) < 0.05 * E.kid(real, shifted, subsets=20)[0]
    assert E.mode_coverage(real, real, n_modes=10) == 1.0


def test_collapsed_generator_is_caught():
    # A generated set that is one reference point repeated: its k-NN radius is 0, so recall is 1/m
    # (only that point itself), coverage small, Vendi = 1 (one distinct sample), one mode hit.
    real = _randn(80, 10, seed=6)
    gen = real[:1].repeat(80, 1)
    r = E.prdc(real, gen)
    assert r["recall"] == pytest.approx(1 / 80)
    assert r["coverage"] <= 0.1
    assert r["precision"] == 1.0  # the collapsed point is a real one: precision alone cannot see collapse
    assert E.vendi(gen) == pytest.approx(1.0, abs=1e-9)
    assert E.mode_coverage(real, gen, n_modes=10) == pytest.approx(0.1)


def test_prdc_needs_enough_points():
    with pytest.raises(ValueError, match="at least 6 rows"):
        E.prdc(_randn(5, 3), _randn(10, 3))


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------

def _kid_brute_force(real: np.ndarray, gen: np.ndarray, *, subsets: int, size: int, seed: int) -> list[float]:
    """Unbiased MMD² with k(a, b) = (a·b / d + 1)³ by explicit loops over pairs, on subsets drawn
    with the documented RNG sequence (numpy default_rng(seed): real subset, then generated subset)."""
    rng = np.random.default_rng(seed)
    d = real.shape[1]

    def k(a, b):
        return (sum(a[t] * b[t] for t in range(d)) / d + 1.0) ** 3

    out = []
    for _ in range(subsets):
        y = real[rng.choice(len(real), size, replace=False)]
        x = gen[rng.choice(len(gen), size, replace=False)]
        s_xx = sum(k(x[i], x[j]) for i in range(size) for j in range(size) if i != j)
        s_yy = sum(k(y[i], y[j]) for i in range(size) for j in range(size) if i != j)
        s_xy = sum(k(x[i], y[j]) for i in range(size) for j in range(size))
        out.append(s_xx / (size * (size - 1)) + s_yy / (size * (size - 1)) - 2 * s_xy / (size * size))
    return out


def test_kid_matches_brute_force_double_loop():
    real, gen = _randn(12, 5, seed=7), _randn(15, 5, seed=8, shift=0.3)
    values = _kid_brute_force(real.numpy(), gen.numpy(), subsets=4, size=8, seed=3)
    mean, std = E.kid(real, gen, subsets=4, subset_size=8, seed=3)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values), rel=1e-10)


def test_kid_full_sets_match_sklearn_polynomial_kernel():
    # One subset of the full sets is a permutation of them: KID = MMD²_u of the whole sets, here with
    # scikit-learn's polynomial_kernel (degree 3, gamma 1/d, coef0 1) as the kernel.
    from sklearn.metrics.pairwise import polynomial_kernel

    real, gen = _randn(20, 7, seed=9), _randn(20, 7, seed=10, shift=0.2)
    kw = dict(degree=3, gamma=1 / 7, coef0=1)
    kxx, kyy, kxy = (polynomial_kernel(a.numpy(), b.numpy(), **kw) for a, b in
                     ((gen, gen), (real, real), (gen, real)))
    n = 20
    ref = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
           - 2 * kxy.sum() / n**2)
    assert E.kid(real, gen, subsets=1)[0] == pytest.approx(ref, rel=1e-12)
    assert E.kid(real, gen, subsets=1)[1] == 0.0


def test_kid_is_reproducible_and_checks_subset_size():
    real, gen = _randn(30, 4, seed=11), _randn(25, 4, seed=12)
    assert E.kid(real, gen, subsets=5, seed=1) == E.kid(real, gen, subsets=5, seed=1)
    assert E.kid(real, gen, subsets=5, seed=1) != E.kid(real, gen, subsets=5, seed=2)
    with pytest.raises(ValueError, match="subset_size 26 exceeds the sample counts"):
        E.kid(real, gen, subset_size=26)


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------

def _fid_sqrtm(real: np.ndarray, gen: np.ndarray) -> float:
    """The textbook FID with scipy.linalg.sqrtm (as pytorch-fid)."""
    mu1, mu2 = real.mean(0), gen.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _fid_eigen(real: np.ndarray, gen: np.ndarray) -> float:
    """FID with tr √(Σ1 Σ2) = Σ √λ(Σ1^{1/2} Σ2 Σ1^{1/2}), symmetric eigendecompositions in float64."""
    mu1, mu2 = real.mean(0), gen.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    lam, q = np.linalg.eigh(s1)
    r1 = (q * np.sqrt(np.clip(lam, 0, None))) @ q.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_fid_matches_scipy_sqrtm_on_full_rank_data():
    real, gen = _randn(300, 10, seed=13), _randn(250, 10, seed=14, shift=0.4) * 1.3
    ref = _fid_sqrtm(real.numpy(), gen.numpy())
    assert frechet_distance(real, gen) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(gen, real) == pytest.approx(ref, rel=1e-9)  # symmetric


def test_fid_is_exact_on_rank_deficient_covariances():
    # n < d: both covariances singular (rank 19 and 24 in 64-d), as ~150 images in 1280-d.
    real, gen = _randn(20, 64, seed=15), _randn(25, 64, seed=16, shift=0.3)
    assert frechet_distance(real, gen) == pytest.approx(_fid_eigen(real.numpy(), gen.numpy()), rel=1e-6)
    # FID(X, X) = 0 exactly in theory: tr √(Σ²) = tr Σ. The nuclear-norm form keeps it at rounding
    # level even though Σ is singular (the eigenvalue route gets sqrt(rounding) per zero eigenvalue).
    scale = float(torch.cov(real.T).trace())
    assert abs(frechet_distance(real, real)) < 1e-10 * scale


def test_trace_sqrt_product_equals_nuclear_norm_of_cross_product():
    # Direct form from the docstring: ‖A Bᵀ‖_* / √((m-1)(n-1)), without the QR shortcut.
    a, b = _randn(30, 8, seed=17), _randn(12, 8, seed=18)
    a, b = a - a.mean(0), b - b.mean(0)
    direct = float(torch.linalg.svdvals(a @ b.T).sum()) / math.sqrt(29 * 11)
    assert trace_sqrt_product(a, b) == pytest.approx(direct, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------

def test_mmd_median_heuristic_matches_double_loop():
    real, gen = _randn(9, 3, seed=19), _randn(7, 3, seed=20, shift=0.5)
    y, x = real.numpy(), gen.numpy()
    dists = [np.linalg.norm(y[i] - y[j]) for i, j in itertools.combinations(range(9), 2)]
    h = float(np.median(dists))

    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h))

    n, m = 7, 9
    ref = (sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
           + sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
           - 2 * sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m))
    assert E.mmd(real, gen) == pytest.approx(ref, rel=1e-10)
    assert E.mmd(real, gen, bandwidth=2.0) == pytest.approx(mmd2_unbiased(gen, real, bandwidth=2.0), rel=1e-12)
    assert median_bandwidth(real) == pytest.approx(h, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Vendi
# ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # vendi-score uses scipy.sparse.csr
@pytest.mark.parametrize("n, d", [(40, 8), (12, 30)])  # d < n (dual path) and d > n (kernel path)
def test_vendi_matches_direct_eigen_and_package(n, d):
    vendi_pkg = pytest.importorskip("vendi_score.vendi", reason="test oracle from requirements-dev.txt")

    x = _randn(n, d, seed=21).abs() + 0.1 * _randn(n, d, seed=22)
    xn = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(xn @ xn.T / n)
    lam = lam[lam > 1e-15]
    direct = float(np.exp(-(lam * np.log(lam)).sum()))
    assert E.vendi(x) == pytest.approx(direct, rel=1e-8)
    # vendi-score's score_X normalises the rows and uses the cosine kernel with q = 1 whatever q is
    # passed (a known trap): compare at its default.
    assert E.vendi(x) == pytest.approx(float(vendi_pkg.score_X(x.numpy())), rel=1e-8)
    # the RBF kernel against the package's score_K on the same kernel matrix
    k_rbf = E.similarity_matrix(x, kernel="rbf").numpy()
    assert E.vendi(x, kernel="rbf") == pytest.approx(float(vendi_pkg.score_K(k_rbf)), rel=1e-8)


def test_vendi_limits():
    # n identical points: K = all ones, eigenvalues {1, 0, ...}: VS = 1. n orthogonal: K = I, VS = n.
    assert E.vendi(torch.ones(25, 6)) == pytest.approx(1.0, abs=1e-9)
    assert E.vendi(torch.eye(7)) == pytest.approx(7.0, rel=1e-12)
    assert E.vendi(torch.eye(7) * 3.5) == pytest.approx(7.0, rel=1e-12)  # scale-free (cosine)
    with pytest.raises(ValueError, match="non-zero"):
        E.vendi(torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------------
# Mode coverage and the combined dict
# ----------------------------------------------------------------------------------------------

def test_mode_coverage_counts_hit_clusters():
    # 5 well-separated blobs; k-means with 5 modes finds them. A generated set drawn from 2 of the
    # blobs hits exactly 2 of the 5 clusters.
    centres = torch.eye(5, 6, dtype=torch.float64) * 20
    real = torch.cat([c + _randn(15, 6, seed=i) for i, c in enumerate(centres)])
    gen = torch.cat([centres[0] + _randn(10, 6, seed=30), centres[3] + _randn(10, 6, seed=31)])
    assert E.mode_coverage(real, gen, n_modes=5) == pytest.approx(0.4)
    assert E.mode_coverage(real, real, n_modes=5) == 1.0
    assert E.mode_coverage(real, real, n_modes=20, seed=3) == 1.0
    with pytest.raises(ValueError, match="n_modes"):
        E.mode_coverage(real, gen, n_modes=76)


def test_evaluate_features_keys_and_values():
    real, gen = _randn(40, 16, seed=40), _randn(30, 16, seed=41, shift=0.2)
    r = E.evaluate_features(real, gen, features="test", seed=0, kid_subsets=10, n_modes=50)
    for k in ("fid", "kid_mean", "kid_std", "mmd", "precision", "recall", "density", "coverage", "vendi",
              "vendi_real", "mode_coverage", "n_real", "n_generated", "features"):
        assert k in r, k
    assert (r["n_real"], r["n_generated"], r["n_modes"], r["features"]) == (40, 30, 40, "test")  # modes capped
    assert r["fid"] == pytest.approx(frechet_distance(real, gen))
    assert r["kid_mean"] == pytest.approx(E.kid(real, gen, subsets=10, seed=0)[0])
    assert r["vendi_real"] == pytest.approx(E.vendi(real))
    r32 = E.evaluate_features(real.float(), gen.float(), features="test", seed=0, kid_subsets=10, n_modes=50)
    assert r32["kid_mean"] == pytest.approx(r["kid_mean"], rel=1e-4)  # float32 input accepted, computed in float64
    with pytest.raises(ValueError, match="feature dimension"):
        E.evaluate_features(real, gen[:, :8], features="x")


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def test_tsne_plot_embeds_sets_together(tmp_path):
    from PIL import Image

    p = tsne_plot(_randn(10, 5, seed=50), {"a": _randn(6, 5, seed=51), "b": _randn(4, 5, seed=52)},
                  tmp_path / "t.png")  # 20 points: perplexity min(30, 19/3) < 20
    assert Image.open(p).format == "PNG"


def test_training_curves_tolerate_missing_columns(tmp_path):
    from PIL import Image

    csv_path = tmp_path / "metrics.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "reward_mean", "reward_std", "reward_ot", "kl", "time_sample_s", "time_update_s"])
        for s in range(1, 6):
            w.writerow([s, 0.1 * s, 0.05, -s, 1e-4 * s, 1.5, ""])  # a blank cell too
    p = training_curves(csv_path, tmp_path / "c.png")
    assert p is not None and Image.open(p).format == "PNG"
    only_step = tmp_path / "empty.csv"
    only_step.write_text("step\n1\n2\n")
    assert training_curves(only_step, tmp_path / "none.png") is None
