"""Benchmark: closed-form leave-one-out vs. n recomputations for the set-level metrics.

For each batch size n, with d = 1280 random Gaussian features (EfficientNet-Lite0's width) and
m = n reference points, both in float64, and for each metric with a closed-form leave-one-out
(`mmd`, `mi`, `knn_entropy`, `fid`; the last two on a PCA with k = 32 fitted on Y), it times

* closed: one call of the `*_loo` function (median of `--repeats` runs after a warm-up), and
* naive: the set value recomputed from scratch on X with row i removed, for every i,

and records their ratio and the largest absolute difference between the two leave-one-out vectors.
When the n recomputations would take longer than `--naive-budget` seconds (estimated from two
probe calls), a random subset of `--subset` indices is timed instead and the time is extrapolated
linearly to n (`naive_extrapolated: true`, `naive_subset` in the JSON); the difference is then
taken over that subset. Both sides run with the same torch thread count (`--threads`, default 1).
The PCA is fitted and applied once, outside both timings (`pca_fit_s`).

    python -m bench.loo --out DIR [--sizes 64 256 1024] [--threads 1]   ->  DIR/loo.json and a table on stdout
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from reward import metrics as M

D_FEATURES = 1280
PCA_K = 32
KNN_K = 3
GP_NOISE = 0.5


@dataclass
class Row:
    """One (metric, n) measurement; times in seconds."""

    metric: str
    n: int
    closed_s: float
    naive_s: float
    speedup: float
    max_abs_diff: float
    naive_extrapolated: bool
    naive_subset: Optional[int]
    value: float


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _drop(x: torch.Tensor, i: int) -> torch.Tensor:
    return torch.cat([x[:i], x[i + 1:]])


def measure(name: str, n: int, closed: Callable[[], M.SetMetric], one: Callable[[int], float], *,
            repeats: int, budget_s: float, subset: int, gen: torch.Generator) -> Row:
    """Time `closed()` against `one(i)` (the value without row i) for all i, or an extrapolated subset."""
    closed()  # warm-up
    times = []
    for _ in range(repeats):
        t, res = _timed(closed)
        times.append(t)
    closed_s = statistics.median(times)

    order = torch.randperm(n, generator=gen).tolist()
    probe_t, _ = _timed(lambda: [one(i) for i in order[:2]])
    extrapolate = probe_t / 2 * n > budget_s and subset < n
    idx = sorted(order[:subset]) if extrapolate else list(range(n))
    t, naive = _timed(lambda: [one(i) for i in idx])
    naive_s = t / len(idx) * n
    diff = float((res.loo[idx] - torch.tensor(naive, dtype=torch.float64)).abs().max())
    return Row(metric=name, n=n, closed_s=closed_s, naive_s=naive_s, speedup=naive_s / closed_s,
               max_abs_diff=diff, naive_extrapolated=extrapolate,
               naive_subset=len(idx) if extrapolate else None, value=res.value)


def run(sizes: list[int], *, repeats: int, budget_s: float, subset: int, seed: int) -> dict:
    rows: list[Row] = []
    setup: dict[int, dict] = {}
    for n in sizes:
        gen = torch.Generator().manual_seed(seed + n)
        x = torch.randn(n, D_FEATURES, generator=gen, dtype=torch.float64)
        y = torch.randn(n, D_FEATURES, generator=gen, dtype=torch.float64) * 1.1 + 0.05
        h = M.median_bandwidth(y)
        pca_fit_s, pca = _timed(lambda: M.fit_pca(y, k=PCA_K))
        zx, zy = pca.project(x), pca.project(y)
        setup[n] = {"bandwidth": h, "pca_fit_s": pca_fit_s}
        cases = {
            "mmd": (lambda: M.mmd2_unbiased_loo(x, y, bandwidth=h),
                    lambda i: M.mmd2_unbiased(_drop(x, i), y, bandwidth=h)),
            "mi": (lambda: M.gp_mi_loo(x, bandwidth=h, noise=GP_NOISE),
                   lambda i: M.gp_mi(_drop(x, i), bandwidth=h, noise=GP_NOISE)),
            "knn_entropy": (lambda: M.knn_entropy_loo(zx, k=KNN_K),
                            lambda i: M.knn_entropy(_drop(zx, i), k=KNN_K)),
            "fid": (lambda: M.fid_loo(zx, zy),
                    lambda i: M.frechet_distance(_drop(zx, i), zy)),
        }
        for name, (closed, one) in cases.items():
            row = measure(name, n, closed, one, repeats=repeats, budget_s=budget_s, subset=subset, gen=gen)
            rows.append(row)
            print(_format_row(row), flush=True)
    return {
        "config": {
            "d": D_FEATURES, "m": "n", "dtype": "float64", "pca_k": PCA_K, "knn_k": KNN_K,
            "gp_noise": GP_NOISE, "bandwidth": "median_bandwidth(y)", "repeats": repeats,
            "naive_budget_s": budget_s, "naive_subset_size": subset, "seed": seed,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },
        "setup": {str(n): v for n, v in setup.items()},
        "results": [asdict(r) for r in rows],
    }


HEADER = f"{'metric':<12} {'n':>5} {'closed_s':>10} {'naive_s':>10} {'speedup':>9} {'max_abs_diff':>13}  naive"


def _format_row(r: Row) -> str:
    how = f"extrapolated from {r.naive_subset}" if r.naive_extrapolated else "all n"
    return (f"{r.metric:<12} {r.n:>5} {r.closed_s:>10.4f} {r.naive_s:>10.3f} {r.speedup:>9.0f}x "
            f"{r.max_abs_diff:>12.1e}  {how}")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output directory for loo.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="batch sizes n (m = n)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each closed form (median)")
    p.add_argument("--naive-budget", type=float, default=60.0,
                   help="seconds above which the naive loop is timed on a subset and extrapolated")
    p.add_argument("--subset", type=int, default=32, help="recomputations timed when extrapolating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared 2-core machine, 2 threads under load made "
                        "small ops up to ~100x slower and the timings meaningless)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if min(args.sizes) < PCA_K + 2:
        p.error(f"--sizes must be >= {PCA_K + 2} (PCA k = {PCA_K} on m = n reference points)")
    print(HEADER, flush=True)
    report = run(args.sizes, repeats=args.repeats, budget_s=args.naive_budget, subset=args.subset,
                 seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'loo.json'}")


if __name__ == "__main__":
    main()
