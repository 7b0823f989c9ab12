"""Do the diversity metrics respond to diversity? A ladder of procedural crater sets.

    python -m bench.diversity_ladder --out DIR [--extractors efficientnet_lite0 random_cnn pixels]

Step s of the ladder is a set of n images drawn from 2^s distinct procedural crater settings
(every factor varied), repeated cyclically: step 0 is one crater repeated n times, the last step
has n distinct craters. Each image draws its own terrain noise, so repeats are near-duplicates
(same crater, different terrain), as a collapsed generator's samples are; exact duplicates would
make the kNN entropy −∞ at every step where a setting has more than k copies. Each metric's set score (oriented so that higher = more diverse / closer to
a fully varied reference: −MMD², MI, kNN entropy, −FID, −OT cost) is computed at every step for
several draws. Writes DIR/diversity_ladder.json with, per extractor and metric, the mean and std
per step, the Spearman correlation with the step (of the step means, and of all draws), and the
dynamic range (top-minus-bottom mean score over the mean within-step std: a signal-to-noise ratio
that does not depend on the metric's units), and DIR/diversity_ladder.png.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from reward.features import build_extractor, extract_features
from reward.metrics import fit_pca, frechet_distance, gp_mi, knn_entropy, median_bandwidth, mmd2_unbiased, ot_rewards
from data.procedural import procedural_set

METRICS = ("mmd", "mi", "knn_entropy", "fid", "ot")


def ladder_steps(n: int) -> list[int]:
    """Distinct settings per step: 1, 2, 4, ... up to n (n itself last)."""
    steps, m = [], 1
    while m < n:
        steps.append(m)
        m *= 2
    return steps + [n]


def set_scores(x: torch.Tensor, y: torch.Tensor, *, bandwidth: float, pca, mi_noise: float, knn_k: int) -> dict:
    """Every metric's oriented set score of features x (n, D) against reference features y (m, D)."""
    zx, zy = pca.project(x), pca.project(y)
    return {
        "mmd": -mmd2_unbiased(x, y, bandwidth=bandwidth),
        "mi": gp_mi(x, bandwidth=bandwidth, noise=mi_noise),
        "knn_entropy": knn_entropy(zx, k=knn_k),
        "fid": -frechet_distance(zx, zy),
        "ot": -ot_rewards(x, y, method="emd").value,
    }


def summarise(scores: np.ndarray) -> dict:
    """scores: (steps, draws) -> Spearman correlations with the step and the dynamic range."""
    steps, draws = scores.shape
    mean, std = scores.mean(1), scores.std(1, ddof=1) if draws > 1 else np.zeros(steps)
    rho_means = spearmanr(np.arange(steps), mean).statistic
    rho_all = spearmanr(np.repeat(np.arange(steps), draws), scores.ravel()).statistic
    noise = float(std.mean())
    span = float(mean[-1] - mean[0])
    return {"mean": mean.tolist(), "std": std.tolist(), "spearman": float(rho_means),
            "spearman_all_draws": float(rho_all), "range": span,
            "dynamic_range": span / noise if noise > 0 else (math.inf if span > 0 else 0.0)}


def run(extractors: list[str], *, n: int, n_ref: int, draws: int, size: int, pca_dim: int, mi_noise: float,
        knn_k: int) -> dict:
    steps = ladder_steps(n)
    reference = procedural_set(n_ref, size=size, seed=10_000)
    sets = [[procedural_set(n, size=size, seed=100 * s + d, n_distinct=m, same_noise=False) for d in range(draws)]
            for s, m in enumerate(steps)]
    out = {"settings": {"n": n, "n_reference": n_ref, "draws": draws, "image_size": size, "pca_dim": pca_dim,
                        "mi_noise": mi_noise, "knn_k": knn_k, "distinct_per_step": steps}, "extractors": {}}
    for name in extractors:
        t0 = time.perf_counter()
        ex = build_extractor(name)
        y = extract_features(ex, reference).double()
        bandwidth, pca = median_bandwidth(y), fit_pca(y, k=min(pca_dim, n_ref - 1, y.shape[1]))
        table = np.zeros((len(METRICS), len(steps), draws))
        for s, per_draw in enumerate(sets):
            for d, images in enumerate(per_draw):
                sc = set_scores(extract_features(ex, images).double(), y, bandwidth=bandwidth, pca=pca,
                                mi_noise=mi_noise, knn_k=knn_k)
                table[:, s, d] = [sc[m] for m in METRICS]
        out["extractors"][name] = {m: summarise(table[i]) for i, m in enumerate(METRICS)}
        out["extractors"][name]["_seconds"] = time.perf_counter() - t0
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["settings"]["distinct_per_step"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.0))
    for ax, metric in zip(axes, METRICS):
        for name, per in result["extractors"].items():
            mean, std = np.array(per[metric]["mean"]), np.array(per[metric]["std"])
            lo, hi = mean.min(), mean.max()
            scale = (hi - lo) if hi > lo else 1.0
            ax.errorbar(range(len(steps)), (mean - lo) / scale, yerr=std / scale, marker="o", ms=3, capsize=2,
                        label=f"{name} (ρ={per[metric]['spearman']:.2f})")
        ax.set_title(metric)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
        ax.set_xlabel("distinct craters in the set")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("score (min-max scaled)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--extractors", nargs="+", default=["efficientnet_lite0", "random_cnn", "pixels"])
    p.add_argument("--n", type=int, default=64, help="images per set (the RL batch size)")
    p.add_argument("--n-ref", type=int, default=256, help="reference images (fully varied craters)")
    p.add_argument("--draws", type=int, default=3, help="independent sets per ladder step")
    p.add_argument("--size", type=int, default=32, help="image size")
    p.add_argument("--pca-dim", type=int, default=16)
    p.add_argument("--mi-noise", type=float, default=1.0)
    p.add_argument("--knn-k", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result = run(args.extractors, n=args.n, n_ref=args.n_ref, draws=args.draws, size=args.size,
                 pca_dim=args.pca_dim, mi_noise=args.mi_noise, knn_k=args.knn_k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diversity_ladder.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "diversity_ladder.png")
    print(f"{'extractor':<20}{'metric':<13}{'spearman':>9}{'all draws':>11}{'dyn. range':>12}")
    for name, per in result["extractors"].items():
        for metric in METRICS:
            s = per[metric]
            print(f"{name:<20}{metric:<13}{s['spearman']:>9.3f}{s['spearman_all_draws']:>11.3f}"
                  f"{s['dynamic_range']:>12.1f}")
    print(f"wrote {out / 'diversity_ladder.json'} and {out / 'diversity_ladder.png'}")


if __name__ == "__main__":
    main()
