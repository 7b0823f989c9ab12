"""Set-level metrics: closed forms against brute force and independent references.

Where each expected value comes from:
* leave-one-out vectors: n explicit recomputations of the set value on X with row i removed;
* unbiased MMD^2: a double Python loop over kernel pairs;
* GP-MI: torch.linalg.slogdet of I + K/s^2 (and of its minors);
* kNN entropy: the analytic Gaussian entropy 1/2 log((2 pi e)^d det Sigma);
* Frechet distance: the usual scipy.linalg.sqrtm formula (scipy only here, not in the library);
* OT: the plan's marginals, a toy with a known crowded / uncovered structure, emd vs sinkhorn.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from reward import metrics as M

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def drop(x: torch.Tensor, i: int) -> torch.Tensor:
    return torch.cat([x[:i], x[i + 1:]])


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

def test_pairwise_sq_dists_and_rbf_against_brute_force():
    x, y = randn(6, 4, seed=0), randn(5, 4, seed=1)
    brute = torch.tensor([[float(((a - b) ** 2).sum()) for b in y] for a in x], dtype=F64)
    torch.testing.assert_close(M.pairwise_sq_dists(x, y), brute, rtol=0, atol=1e-12)
    h = 1.7
    torch.testing.assert_close(M.rbf_kernel(x, y, bandwidth=h), torch.exp(-brute / (2 * h * h)), rtol=0, atol=1e-12)


def test_median_bandwidth_is_numpy_median_of_distinct_pairs():
    y = randn(9, 3, seed=2)  # 36 pairs: even count, mean of the two middle values
    yn = y.numpy()
    d = [np.linalg.norm(yn[i] - yn[j]) for i in range(9) for j in range(i + 1, 9)]
    assert M.median_bandwidth(y) == pytest.approx(float(np.median(d)), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------

def test_mmd2_unbiased_against_double_loop():
    x, y, h = randn(5, 3, seed=3), randn(4, 3, seed=4) + 0.5, 1.3

    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    assert M.mmd2_unbiased(x, y, bandwidth=h) == pytest.approx(xx + yy - 2 * xy, abs=1e-13)


def test_mmd2_same_distribution_near_zero_shifted_positive():
    d = 8
    y = randn(300, d, seed=5)
    h = M.median_bandwidth(y)
    same = M.mmd2_unbiased(randn(300, d, seed=6), y, bandwidth=h)
    shifted = M.mmd2_unbiased(randn(300, d, seed=6) + 1.0, y, bandwidth=h)
    assert shifted > 0.05
    assert abs(same) < 0.05 * shifted


# ----------------------------------------------------------------------------------------------
# Closed-form leave-one-out against n recomputations
# ----------------------------------------------------------------------------------------------

def naive_loo(fn, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([fn(drop(x, i)) for i in range(x.shape[0])], dtype=F64)


@pytest.mark.parametrize("n", [3, 7, 30])
def test_mmd_loo_matches_recomputation(n):
    x, y = randn(n, 5, seed=10 + n), randn(11, 5, seed=7) + 0.3
    h = M.median_bandwidth(y)
    res = M.mmd2_unbiased_loo(x, y, bandwidth=h)
    assert res.value == pytest.approx(M.mmd2_unbiased(x, y, bandwidth=h), abs=1e-12)
    ref = naive_loo(lambda xi: M.mmd2_unbiased(xi, y, bandwidth=h), x)
    assert (res.loo - ref).abs().max() < 1e-10
    torch.testing.assert_close(res.rewards, res.loo - res.value)
    assert res.score == -res.value


@pytest.mark.parametrize("n", [2, 9, 40])
def test_gp_mi_loo_matches_recomputation(n):
    x, h, s2 = randn(n, 4, seed=20 + n), 2.0, 0.5
    res = M.gp_mi_loo(x, bandwidth=h, noise=s2)
    ref = naive_loo(lambda xi: M.gp_mi(xi, bandwidth=h, noise=s2), x)
    assert (res.loo - ref).abs().max() < 1e-10
    assert bool((res.rewards > 0).all())  # every point adds information


def test_gp_mi_equals_half_slogdet_and_marginals_are_slogdet_differences():
    x, h, s2 = randn(12, 3, seed=30), 1.5, 0.3
    a = torch.eye(12, dtype=F64) + M.rbf_kernel(x, x, bandwidth=h) / s2
    sign, logdet = torch.linalg.slogdet(a)
    assert sign > 0
    assert M.gp_mi(x, bandwidth=h, noise=s2) == pytest.approx(0.5 * float(logdet), abs=1e-12)
    res = M.gp_mi_loo(x, None, bandwidth=h, noise=s2)
    for i in (0, 5, 11):
        keep = [j for j in range(12) if j != i]
        minor = torch.linalg.slogdet(a[keep][:, keep])[1]
        assert float(res.rewards[i]) == pytest.approx(0.5 * float(logdet - minor), abs=1e-11)


@pytest.mark.parametrize("n,k,d", [(6, 1, 2), (25, 3, 3), (60, 5, 4)])
def test_knn_entropy_loo_matches_recomputation(n, k, d):
    z = randn(n, d, seed=40 + n)
    res = M.knn_entropy_loo(z, k=k)
    assert res.value == pytest.approx(M.knn_entropy(z, k=k), abs=1e-12)
    ref = naive_loo(lambda zi: M.knn_entropy(zi, k=k), z)
    assert (res.loo - ref).abs().max() < 1e-10
    torch.testing.assert_close(res.rewards, res.value - res.loo)


def test_knn_entropy_loo_with_ties():
    # points on an integer grid: many equal k-th distances
    z = torch.tensor([[i, j] for i in range(5) for j in range(4)], dtype=F64)
    res = M.knn_entropy_loo(z, k=2)
    ref = naive_loo(lambda zi: M.knn_entropy(zi, k=2), z)
    assert (res.loo - ref).abs().max() < 1e-10


@pytest.mark.parametrize("n", [5, 12, 50])
def test_fid_loo_matches_recomputation(n):
    # n >= d + 2 so that every Sigma^{-i} has full rank: at rank-deficient covariances sqrt of a
    # ~1e-16 eigenvalue turns rounding into ~1e-8 differences, in the downdate and recomputation alike
    d = 3
    x, y = randn(n, d, seed=50 + n), randn(20, d, seed=8) * 1.5 + 0.2
    res = M.fid_loo(x, y)
    assert res.value == pytest.approx(M.frechet_distance(x, y), abs=1e-10)
    ref = naive_loo(lambda xi: M.frechet_distance(xi, y), x)
    assert (res.loo - ref).abs().max() < 1e-8
    torch.testing.assert_close(res.rewards, res.loo - res.value)


# ----------------------------------------------------------------------------------------------
# kNN entropy, FID, PCA against references
# ----------------------------------------------------------------------------------------------

def test_knn_entropy_of_gaussian_near_analytic():
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=F64)
    z = randn(2000, 3, seed=60) @ torch.linalg.cholesky(cov).T
    analytic = 0.5 * math.log((2 * math.pi * math.e) ** 3 * float(torch.linalg.det(cov)))
    assert M.knn_entropy(z, k=5) == pytest.approx(analytic, abs=0.1)


def test_frechet_distance_against_scipy_sqrtm():
    x, y = randn(40, 5, seed=61), randn(30, 5, seed=62) * 0.7 + 0.4
    xn, yn = x.numpy(), y.numpy()
    mu1, mu2 = xn.mean(0), yn.mean(0)
    s1, s2 = np.cov(xn, rowvar=False), np.cov(yn, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert M.frechet_distance(x, y) == pytest.approx(ref, abs=1e-9)
    assert abs(M.frechet_distance(x, x)) < 1e-9


def test_pca_components_orthonormal_and_variance_from_covariance():
    y = randn(50, 6, seed=63) @ randn(6, 6, seed=64)
    pca = M.fit_pca(y, k=3)
    torch.testing.assert_close(pca.components @ pca.components.T, torch.eye(3, dtype=F64))
    eig = torch.linalg.eigvalsh(torch.cov(y.T)).flip(0)[:3]
    torch.testing.assert_close(pca.explained_variance, eig)
    assert pca.explained_variance_ratio == pytest.approx(float(eig.sum() / torch.cov(y.T).trace()), rel=1e-12)
    assert math.isnan(M.PCA(pca.mean, pca.components, pca.explained_variance).explained_variance_ratio)
    z = pca.project(y)
    assert z.shape == (50, 3)
    torch.testing.assert_close(z.var(0), eig)
    with pytest.raises(ValueError):
        M.fit_pca(y, k=7)


# ----------------------------------------------------------------------------------------------
# Optimal transport
# ----------------------------------------------------------------------------------------------

def test_ot_plan_marginals_uniform_and_rewards_sum():
    x, y = randn(7, 3, seed=70), randn(5, 3, seed=71)
    cost = M.pairwise_sq_dists(x, y)
    cost = cost / cost.median()  # 35 entries: odd count, torch's median is the true one
    plan = M._ot_plan(cost.numpy(), method="emd", reg=0.05)
    np.testing.assert_allclose(plan.sum(1), np.full(7, 1 / 7), atol=1e-12)
    np.testing.assert_allclose(plan.sum(0), np.full(5, 1 / 5), atol=1e-12)
    res = M.ot_rewards(x, y, method="emd")
    assert res.value == pytest.approx(float((torch.from_numpy(plan) * cost).sum()), abs=1e-12)
    assert float(res.rewards.sum()) == pytest.approx(-7 * res.value, abs=1e-10)
    torch.testing.assert_close(res.rewards, -res.loo)


def test_ot_crowded_samples_lose_to_sample_filling_uncovered_region():
    # reference points A, B, C; X has two samples crowded on A (mirror images about the A-B line,
    # so neither is closer to B), none near B, and one alone near C
    y = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=F64)
    x = torch.tensor([[0.0, 0.1], [0.0, -0.1], [0.0, 9.9]], dtype=F64)
    # exact OT sends one of the crowded pair (either: a tie) all the way to B
    r = M.ot_rewards(x, y, method="emd").rewards
    assert float(r[2]) >= float(r[:2].max()) - 1e-12
    assert float(r[2]) > float(r[:2].mean()) + 0.3  # costs are in units of the median (~100 here)
    # entropic OT splits B's mass between the two, so both lose to the lone sample
    r = M.ot_rewards(x, y, method="sinkhorn", reg=0.01).rewards
    assert float(r[2]) > float(r[:2].max()) + 0.3
    torch.testing.assert_close(r[0], r[1])


def _soft_coverage_brute(x, y, radii, softness):
    """C(X) = (1/m) sum_j [1 - prod_i (1 - sigmoid((r_j - |x_i - y_j|) / (softness r_j)))] by explicit loops."""
    total = 0.0
    for j in range(y.shape[0]):
        miss = 1.0
        for i in range(x.shape[0]):
            z = (float((x[i] - y[j]).norm()) - float(radii[j])) / (softness * float(radii[j]))
            kappa = 1.0 / (1.0 + math.exp(z)) if z < 700 else 0.0
            miss *= 1.0 - kappa
        total += 1.0 - miss
    return total / y.shape[0]


def test_knn_radii_are_the_kth_nearest_other_point():
    y = randn(12, 3, seed=5)
    r = M.knn_radii(torch.cdist(y, y), 3)
    for j in range(12):
        d = sorted(float((y[j] - y[l]).norm()) for l in range(12) if l != j)
        assert float(r[j]) == pytest.approx(d[2], rel=1e-12)


@pytest.mark.parametrize("n,softness", [(2, 0.1), (5, 0.1), (9, 0.1), (9, 0.01)])
def test_soft_coverage_loo_matches_recomputation(n, softness):
    x, y = randn(n, 4, seed=n), randn(11, 4, seed=n + 50)
    radii = M.knn_radii(torch.cdist(y, y), 3)
    res = M.soft_coverage_loo(x, y, radii=radii, softness=softness)
    assert res.value == pytest.approx(_soft_coverage_brute(x, y, radii, softness), rel=1e-12)
    want = torch.tensor([_soft_coverage_brute(drop(x, i), y, radii, softness) for i in range(n)], dtype=F64)
    torch.testing.assert_close(res.loo, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.rewards, res.value - want, rtol=1e-10, atol=1e-14)


def test_soft_coverage_credits_the_sample_on_an_uncovered_reference():
    # references A, B; two samples on A, one on B: the lone sample on B is the one whose loss uncovers a reference
    y = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=F64)
    x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0]], dtype=F64)
    r = M.soft_coverage_loo(x, y, radii=torch.tensor([1.0, 1.0], dtype=F64), softness=0.1).rewards
    assert float(r[2]) > 0.49 and float(r[:2].max()) < 1e-4
    with pytest.raises(ValueError, match="radii must be"):
        M.soft_coverage_loo(x, y, radii=torch.tensor([1.0, 0.0], dtype=F64), softness=0.1)


def test_ot_sinkhorn_small_reg_close_to_emd():
    x, y = randn(20, 4, seed=72), randn(25, 4, seed=73) + 0.3
    emd = M.ot_rewards(x, y, method="emd")
    sk = M.ot_rewards(x, y, method="sinkhorn", reg=0.005)
    assert sk.value == pytest.approx(emd.value, rel=0.03)
    assert float(sk.rewards.sum()) == pytest.approx(-20 * sk.value, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# Diversity ladder, dispatch, dtypes
# ----------------------------------------------------------------------------------------------

def test_every_metric_scores_diverse_set_above_collapsed_set():
    d = 6
    y = randn(120, d, seed=80)
    diverse = randn(60, d, seed=81)
    collapsed = y[0] + 0.05 * randn(60, d, seed=82)
    pca = M.fit_pca(y, k=3)
    h = M.median_bandwidth(y)
    params = {
        "mmd": dict(bandwidth=h), "mi": dict(bandwidth=h, noise=0.5),
        "knn_entropy": dict(k=3, pca=pca), "fid": dict(pca=pca), "ot": dict(method="emd"),
    }
    assert set(params) == set(M.METRICS)
    for name, p in params.items():
        hi = M.set_metric(name, diverse, y, **p).score
        lo = M.set_metric(name, collapsed, y, **p).score
        assert hi > lo, (name, hi, lo)


def test_set_metric_unknown_name_and_float32_input():
    x, y = randn(10, 3, seed=90), randn(8, 3, seed=91)
    with pytest.raises(ValueError, match="unknown set metric"):
        M.set_metric("vendi", x, y)
    r32 = M.set_metric("mmd", x.float(), y.float(), bandwidth=1.0)
    r64 = M.set_metric("mmd", x.float().double(), y.float().double(), bandwidth=1.0)
    assert r32.loo.dtype == F64 and r32.rewards.dtype == F64
    torch.testing.assert_close(r32.rewards, r64.rewards)


def test_bad_inputs_raise_clear_errors():
    x = randn(5, 3, seed=92)
    with pytest.raises(ValueError, match="non-finite"):
        M.mmd2_unbiased_loo(torch.full((5, 3), math.nan, dtype=F64), x, bandwidth=1.0)
    with pytest.raises(ValueError, match="feature dimension"):
        M.fid_loo(x, randn(5, 4, seed=93))
    with pytest.raises(ValueError, match="at least"):
        M.knn_entropy_loo(x, k=4)
    with pytest.raises(ValueError, match="bandwidth"):
        M.rbf_kernel(x, x, bandwidth=0.0)
