"""Evaluation reports: t-SNE plots, training curves, and report.json / report.md / report.html.

The report dict (written by `evaluation.run`, read here) has the shape

    report["models"][model][extractor] = {metric: {"mean": float, "std": float, "values": [per seed]}}
    report["realism_logit"][model]     = {"mean", "std", "values"}          (optional)
    report["realism_validation"]       = {"sets": {set: {"n", "mean_logit", "called_real"}}, "goal", "met"}
                                                                             (optional)
    report["sizes"]                    = {"instruments", "validation", "heldout", "models": {model: {figure: stat}}}
                                                                             (optional)
    report["detail"]                   = {"heldout_mean_gradient", "models": {model: {figure: stat}}}   (optional)
    report["texture_check"]            = {model: {"behind_texture", "wins", "shared", "own", "texture_only"}}
    report["settings"]                 = {...}                               (free-form, shown as a list)
    report["caveats"]                  = [str, ...]                          (optional)

`write_report` needs only that shape; everything else in the dict is kept in report.json.
Plots use matplotlib's Agg backend (no display); report.html embeds every image as a base64 data
URI and uses inline CSS only, so it opens from anywhere with no server and no other file.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from basics import atomic_write_text, replaced_file

__all__ = ["tsne_plot", "training_curves", "size_plots", "largest_craters_grid", "spectrum_plot", "write_report",
           "format_metric", "TABLE_METRICS", "FID_CAVEAT", "SIZE_METRICS"]

TABLE_METRICS: tuple[tuple[str, str, str], ...] = (
    # (key, column title, number format: "sig" = 4 significant digits, "fix" = 3 decimals)
    ("kid_mean", "KID ↓", "sig"),
    ("fid", "FID ↓", "sig"),
    ("mmd", "MMD² ↓", "sig"),
    ("precision", "precision ↑", "fix"),
    ("recall", "recall ↑", "fix"),
    ("density", "density", "fix"),
    ("coverage", "coverage ↑", "fix"),
    ("vendi", "Vendi ↑", "sig"),
    ("mode_coverage", "mode cov. ↑", "fix"),
)
"""Columns of the comparison tables, in order. Values are raw (KID's scale follows the features':
with EfficientNet-Lite0 features the polynomial kernel is ~60, so KID is O(1-100), not O(10⁻³))."""

SIZE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("detect_rate", "detected", "fix"),
    ("share_ge100", "share ≥ 100 km", "fix"),
    ("share_ge150", "share ≥ 150 km", "fix"),
    ("w1_log10", "W1(log10 D) ↓", "fix"),
    ("kl_hist", "KL(sizes) ↓", "fix"),
)
"""Columns of the crater-size table, once per instrument (keys <key>_<instrument>), besides the coverage of the
held-out craters ≥ 100 km per extractor. The shares count every tile (one with no crater found counts as no)."""

FID_CAVEAT = ("FID at small n is biased (the bias grows as d/n; ~150 images in 1280-d give rank-deficient "
              "covariances) and is comparable only at equal n and extractor; KID is the unbiased main distance.")


def _mpl():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------------
# t-SNE
# ----------------------------------------------------------------------------------------------

def _save_figure(fig, path: str | Path) -> Path:
    """tight_layout, write `path` as PNG (parents created), close the figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def tsne_plot(real: Tensor, gen_sets: Mapping[str, Tensor], path: str | Path, *, seed: int = 0,
              title: str | None = None) -> Path:
    """A 2-d t-SNE of the real features and every generated set, embedded together, saved as PNG.

    real: (m, d); gen_sets: name -> (n_k, d). scikit-learn's TSNE has no `transform`, so all sets are
    stacked into one (N, d) matrix, N = m + Σ n_k, and embedded at once (PCA init, random_state =
    seed); perplexity = min(30, (N - 1) / 3), below N as TSNE requires. Returns `path`.
    """
    from sklearn.manifold import TSNE

    blocks = [("real (held-out)", real)] + list(gen_sets.items())
    feats = torch.cat([b.detach().to("cpu", torch.float64) for _, b in blocks]).numpy()
    n_total = feats.shape[0]
    if n_total < 4:
        raise ValueError(f"t-SNE needs at least 4 points in all, got {n_total}")
    perplexity = min(30.0, (n_total - 1) / 3.0)
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    start = 0
    for i, (name, b) in enumerate(blocks):
        e = emb[start:start + b.shape[0]]
        start += b.shape[0]
        style = dict(marker="o", s=22, facecolors="none", edgecolors="black", linewidths=0.8) if i == 0 else \
            dict(marker="x" if i % 2 else "+", s=18, linewidths=0.9)
        ax.scatter(e[:, 0], e[:, 1], label=f"{name} ({b.shape[0]})", **style)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE (perplexity {perplexity:.3g})")
    ax.legend(loc="best", fontsize=8, frameon=True)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Crater sizes
# ----------------------------------------------------------------------------------------------

def size_plots(measures: Mapping[str, Mapping[str, list]], heldout: Mapping[str, tuple], catalogue_km: np.ndarray | None,
               out_dir: str | Path) -> dict[str, Path]:
    """The size-frequency figures, one row per instrument: the cumulative SFD N(≥D) per tile against D on log-log
    axes (the planetary convention; a tile where nothing was found adds nothing, so the curve's height at the
    smallest D is the detection rate), and the R-plot over √2 bins with Poisson error bars
    (`evaluation.sizes.r_plot`), each model beside the held-out tiles measured by the same instrument and their
    catalogue diameters. measures: instrument -> model -> [(found, D km) per seed or pooled group]; heldout:
    instrument -> (found, D km)."""
    from evaluation.sizes import cumulative_counts, r_plot

    plt = _mpl()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(measures)
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.6 * len(names)), dpi=100, squeeze=False)
    for row, inst in zip(axes, names):
        refs = [(f"held-out, {inst}", heldout[inst], dict(color="black", ls="--", lw=2))]
        if catalogue_km is not None:
            refs.insert(0, ("held-out, catalogue", (np.ones(len(catalogue_km), bool), catalogue_km),
                            dict(color="black", lw=2)))
        lines = list(refs)
        for i, (model, per) in enumerate(measures[inst].items()):
            for j, fd in enumerate(per):
                lines.append((model if j == 0 else None, fd, dict(color=colours[i % len(colours)], lw=1, alpha=0.85)))
        for label, (found, d), style in lines:
            det = np.asarray(d)[np.asarray(found)]
            if det.size:
                x, n = cumulative_counts(det)
                row[0].step(x, n / len(found), where="post", label=label, **style)
            mid, r, sigma, _ = r_plot(det, len(found))
            ok = np.isfinite(r)
            if ok.any():
                row[1].errorbar(mid[ok], r[ok], yerr=sigma[ok], marker="o", ms=3, capsize=2, label=label, **style)
        for ax, title, ylabel in ((row[0], "cumulative SFD", "N(≥ D) per tile"),
                                  (row[1], "R-plot (√2 bins, Poisson errors)", "R = D̄³ N / (A ΔD), A in tiles")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("crater diameter D (km)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}: {inst}")
            ax.legend(fontsize=7, loc="lower left")
    return {"size-frequency distributions (cumulative and R-plot)": _save_figure(fig, Path(out_dir) / "sizes_sfd.png")}


def largest_craters_grid(images: Tensor, found: np.ndarray, d_km: np.ndarray, path: str | Path, *, n: int = 32) -> Path:
    """A grid of the n largest detected craters of `images` (N, C, H, W), largest first (as many as were
    detected; a blank tile when none was)."""
    from utils import save_image_grid

    idx = np.flatnonzero(np.asarray(found))
    idx = idx[np.argsort(-np.asarray(d_km)[idx], kind="stable")][:n]
    tiles = images[torch.as_tensor(idx, dtype=torch.long)] if idx.size else torch.zeros_like(images[:1])
    return save_image_grid(tiles, path, nrow=8, scale=2)


def spectrum_plot(sets: Mapping[str, Tensor], path: str | Path) -> Path:
    """The radially averaged power spectrum P(k) of each set of tiles (evaluation/texture.py), log-log, the first
    set drawn as the reference."""
    from evaluation.texture import radial_power_spectrum

    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for i, (name, x) in enumerate(sets.items()):
        p = radial_power_spectrum(x).numpy()
        k = np.arange(len(p))
        style = dict(color="black", lw=2) if i == 0 else dict(lw=1)
        ax.plot(k[1:], p[1:], label=name, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("spatial frequency k (cycles per tile)")
    ax.set_ylabel("P(k)")
    ax.set_title("radially averaged power spectrum")
    ax.legend(fontsize=7)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------

def _read_metrics_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a run's metrics.csv as float arrays (blank or non-numeric cells -> NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, np.ndarray] = {}
    if not rows:
        return cols
    for key in rows[0]:
        vals = []
        for r in rows:
            try:
                vals.append(float(r.get(key) or "nan"))
            except ValueError:
                vals.append(math.nan)
        arr = np.asarray(vals, dtype=float)
        if np.isfinite(arr).any():
            cols[key] = arr
    return cols


def _curve_panels(cols: dict[str, np.ndarray]) -> list[tuple[str, list[str]]]:
    """(title, columns) of each panel of `training_curves` that the metrics have columns for."""
    def has(*keys: str) -> list[str]:
        return [k for k in keys if k in cols]

    components = sorted(k for k in cols if k.startswith("reward_") and k not in ("reward_mean", "reward_std"))
    values = sorted(k for k in cols if k.startswith("value_"))
    panels = [("reward", has("reward_mean")), ("reward components (mean per-sample credit)", components),
              ("set-level values, relative change from the first step", values), ("KL", has("kl")),
              ("clip fraction", has("clip_frac")), ("grad norm", has("grad_norm", "grad_norm_clipped")),
              ("time per iteration (s)", has("time_sample_s", "time_reward_s", "time_update_s")),
              ("TRPO line search", has("step_size", "backtrack_iters", "accepted"))]
    return [(title, keys) for title, keys in panels if keys]


def _plot_panel(ax, name: str, keys: list[str], cols: dict[str, np.ndarray]) -> None:
    """One panel of `training_curves`: the reward with its ± std band, set-level values relative to their first
    step, the time split stacked, anything else as lines."""
    step = cols["step"]
    if name == "reward":
        ax.plot(step, cols["reward_mean"], label="reward_mean")
        if "reward_std" in cols:
            lo, hi = cols["reward_mean"] - cols["reward_std"], cols["reward_mean"] + cols["reward_std"]
            ax.fill_between(step, lo, hi, alpha=0.25, label="± std")
    elif name.startswith("set-level"):
        for k in keys:
            v = cols[k]
            first = v[np.isfinite(v)][0]
            ax.plot(step, (v - first) / abs(first) if first != 0 else v, label=k.removeprefix("value_"))
    elif name.startswith("time"):
        parts = [np.nan_to_num(cols[k]) for k in keys]
        ax.stackplot(step, *parts, labels=[k.removeprefix("time_").removesuffix("_s") for k in keys], alpha=0.8)
    else:
        for k in keys:
            ax.plot(step, cols[k], label=k)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("iteration", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="best")


def training_curves(metrics_csv: str | Path, path: str | Path, *, title: str | None = None) -> Path | None:
    """Plot a fine-tuning run's metrics.csv: reward mean (± std) and its components (reward_<c>),
    each component's set-level statistic (value_<c>: MMD², OT cost, ...) as relative change from the
    first step (their scales differ), KL, clip fraction, gradient norm (before / after clipping) and
    the time split per iteration (stacked sample / reward / update seconds). Panels whose columns are missing are left out; TRPO columns
    (step_size, backtrack_iters, accepted) get a panel when present. Returns `path`, or None when
    the file has no step column or no rows.
    """
    cols = _read_metrics_csv(Path(metrics_csv))
    panels = _curve_panels(cols) if "step" in cols else []
    if not panels:
        return None
    plt = _mpl()
    ncol = 2 if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 2.9 * nrow), dpi=100, squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        _plot_panel(ax, name, keys, cols)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# report.json / .md / .html
# ----------------------------------------------------------------------------------------------

def format_metric(stat: Mapping | None, fmt: str = "sig") -> str:
    """'mean ± std' of a {"mean", "std", "values"} entry (std left out for a single value).

    fmt "sig": the mean to 4 significant digits (no decimals from 1000 up) and the std to the same
    decimals; "fix": 3 decimals.
    """
    if not stat or stat.get("mean") is None or not math.isfinite(float(stat["mean"])):
        return "–"
    mean, std = float(stat["mean"]), float(stat.get("std") or 0.0)
    single = len(stat.get("values") or [None]) <= 1
    if fmt == "fix":
        return f"{mean:.3f}" if single else f"{mean:.3f} ± {std:.3f}"
    text = f"{mean:.0f}" if abs(mean) >= 1000 else f"{mean:.4g}"
    if "e" in text:
        return f"{mean:.3e}" if single else f"{mean:.3e} ± {std:.1e}"
    decimals = len(text.split(".")[1]) if "." in text else 0
    return text if single else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _extractors(report: Mapping) -> list[str]:
    seen: list[str] = []
    for per_model in report.get("models", {}).values():
        for ex in per_model:
            if ex not in seen:
                seen.append(ex)
    return seen


def _tables(report: Mapping) -> list[tuple[str, list[str], list[list[str]]]]:
    """(extractor, header, rows) per extractor: one row per model, one column per TABLE_METRICS."""
    out = []
    models = report.get("models", {})
    realism = report.get("realism_logit") or {}
    for ex in _extractors(report):
        header = ["model"] + [t for _, t, _ in TABLE_METRICS] + (["realism logit"] if realism else [])
        rows = []
        for model, per in models.items():
            if ex not in per:
                continue
            row = [model] + [format_metric(per[ex].get(k), fmt) for k, _, fmt in TABLE_METRICS]
            if realism:
                row.append(format_metric(realism.get(model)))
            rows.append(row)
        out.append((ex, header, rows))
    return out


def _size_table(report: Mapping) -> tuple[list[str], list[list[str]], str] | None:
    """(header, rows, the instruments' line) of the crater-size table, or None without size figures."""
    sizes = report.get("sizes")
    if not sizes:
        return None
    insts = sizes.get("instruments", [])
    exs = [ex for ex in _extractors(report)
           if any(ex in (m.get("coverage_ge100") or {}) for m in sizes["models"].values())]
    cols = [(f"{k}_{inst}", f"{title} ({inst})", fmt) for inst in insts for k, title, fmt in SIZE_METRICS]
    header = ["model"] + [t for _, t, _ in cols] + [f"coverage ≥ 100 km ({ex}) ↑" for ex in exs]
    held = sizes.get("heldout", {})
    nan = float("nan")
    own = {"w1_log10": "0", "kl_hist": "0"}
    rows = [["held-out (same instrument)"] + [own.get(k.rsplit("_", 1)[0], f"{held.get(k, nan):.3f}")
                                              for k, _, _ in cols] + ["–"] * len(exs)]
    if "share_ge100_true" in held:
        cat = {"detect_rate": "1.000", "share_ge100": f"{held['share_ge100_true']:.3f}",
               "share_ge150": f"{held.get('share_ge150_true', nan):.3f}"}
        rows.append(["held-out (catalogue)"] + [cat.get(k.rsplit("_", 1)[0], "–") for k, _, _ in cols]
                    + ["–"] * len(exs))
    for model, per in sizes["models"].items():
        cov = per.get("coverage_ge100") or {}
        rows.append([model] + [format_metric(per.get(k), fmt) for k, _, fmt in cols]
                    + [format_metric(cov.get(ex), "fix") for ex in exs])
    line = ("Detectors measure sizes; each reports a diameter only where it finds a crater, so a tile with "
            "none counts as no crater in the shares (validation below). `rims` tests the coherence of radial "
            "gradients on rings about the tile centre against phase-scrambled copies of the tile (one scale "
            "fitted to the train diameters); `arcs` is the same test asking for the rim on two opposite arcs, so "
            "a crater's pieces (the quadrant-shuffled row of the validation) do not count; `templates` is the "
            "matched filter against rendered craters with a closed-form phase-randomisation null (fitted to no "
            "diameters). The `size` reward uses `templates` (or `arcs` with `reward.size_detector: arcs`); the "
            "other family, sharing no fitted part with it, judges a run trained on it. W1 and KL compare the "
            "detected craters' "
            "sizes with the held-out tiles' detected craters by the same instrument; coverage ≥ 100 km is "
            "coverage restricted to the held-out craters whose catalogue diameter is at least 100 km.")
    return header, rows, line


def _validation_table(report: Mapping) -> tuple[list[str], list[list[str]], list[str]] | None:
    """(header, rows, one line per instrument on its goals) of the instruments' validation, or None."""
    validation = (report.get("sizes") or {}).get("validation") or {}
    if not validation:
        return None
    header = ["instrument", "set", "tiles", "detected", "called ≥ 100 km", "called ≥ 150 km",
              "detected share ≥ 100 km (catalogue)", "detected share ≥ 150 km (catalogue)", "Spearman ρ of D"]
    rows, lines = [], []
    nan = float("nan")
    for inst, v in validation.items():
        for name, r in v["sets"].items():
            real = "catalogue_share_ge100" in r
            rows.append([inst, name, str(r["n"]), f"{r['detect_rate']:.3f}", f"{r['share_ge100']:.3f}",
                         f"{r['share_ge150']:.3f}",
                         f"{r.get('share_ge100_detected', nan):.3f} ({r['catalogue_share_ge100']:.3f})" if real else "–",
                         f"{r.get('share_ge150_detected', nan):.3f} ({r['catalogue_share_ge150']:.3f})" if real else "–",
                         f"{r.get('spearman', nan):.3f}" if real else "–"])
        missed = [g for g, ok in v["goals"].items() if not ok]
        lines.append(f"{inst}: " + ("every validation goal met." if not missed else "goals missed: " + "; ".join(missed)
                                    + ". Its size figures are not evidence."))
    return header, rows, lines


def _realism_table(report: Mapping) -> tuple[list[str], list[list[str]], str] | None:
    """(header, rows, line) of the realism scorer's validation, or None."""
    v = report.get("realism_validation")
    if not v:
        return None
    header = ["set", "tiles", "mean logit", "called real (logit > 0)"]
    rows = [[name, str(r["n"]), f"{r['mean_logit']:.3f}", f"{r['called_real']:.3f}"] for name, r in v["sets"].items()]
    line = (f"The realism scorer calls at most {v['goal']} of each craterless set real: it can say \"nothing here\"."
            if v["met"] else
            f"Goal missed: the realism scorer calls more than {v['goal']} of a craterless set real, so it cannot say "
            f"\"nothing here\"; its logit is not evidence of craters.")
    return header, rows, line


def _detail_table(report: Mapping) -> tuple[list[str], list[list[str]], str] | None:
    """(header, rows, line) of the fine-detail table, or None."""
    detail = report.get("detail")
    if not detail:
        return None
    header = ["set", "mean gradient |∇x|", "power spectrum: worst band's relative error ↓"]
    rows = [["held-out (real)", f"{detail['heldout_mean_gradient']:.4f}", "0"]]
    rows += [[m, format_metric(d["mean_gradient"]), format_metric(d["spectrum_deviation"], "fix")]
             for m, d in detail["models"].items()]
    return header, rows, ("Fine detail: the mean gradient magnitude of the tiles, and max over spatial frequencies "
                          "k ≥ 1 of |P(k) / P_held-out(k) − 1| of the radially averaged power spectrum.")


def _texture_lines(report: Mapping) -> list[str]:
    """One line per model on what it gained beyond the texture-only row."""
    out = []
    for m, c in (report.get("texture_check") or {}).items():
        if "wins" in c:
            if c["texture_only"]:
                out.append(f"{m} beats the base model only where the texture-only row does as well "
                           f"({', '.join(c['shared'])}): it has gained texture, not craters.")
            elif c["wins"]:
                out.append(f"{m} beats the base model on {', '.join(c['own'])}, where the texture-only row does not"
                           + (f"; on {', '.join(c['shared'])} the texture-only row does as well." if c["shared"] else "."))
            else:
                out.append(f"{m} beats the base model on no compared metric.")
        if c["behind_texture"]:
            out.append(f"The texture-only row is better than {m} on {', '.join(c['behind_texture'])}.")
    return out


def _sections(report: Mapping) -> list[tuple[str, list[str], list[str], list[list[str]]]]:
    """The report's tables after the per-extractor ones: (title, lines above, header, rows)."""
    out = []
    v = _validation_table(report)
    if v:
        out.append(("Crater-size instruments: validation", v[2], v[0], v[1]))
    size_table = _size_table(report)
    if size_table:
        out.append(("Crater sizes", [size_table[2]], size_table[0], size_table[1]))
    r = _realism_table(report)
    if r:
        out.append(("Realism scorer: validation", [r[2]], r[0], r[1]))
    d = _detail_table(report)
    if d:
        out.append(("Fine detail", [d[2]], d[0], d[1]))
    return out


def _notes(report: Mapping) -> list[str]:
    notes = [
        "Each cell: mean ± std over sampling seeds (sample std, ddof = 1); per-seed values in report.json.",
        "KID (polynomial kernel) and MMD² (RBF, median bandwidth of the real set) are raw values whose scale "
        "follows the feature space: compare models within one table only. KID's std over subsets is kid_std in "
        "report.json.",
        FID_CAVEAT,
    ]
    vr = []
    for ex in _extractors(report):
        for per in report.get("models", {}).values():
            if ex in per and "vendi_real" in per[ex]:
                vr.append(f"{ex} {format_metric(per[ex]['vendi_real'])}")
                break
    if vr:
        notes.append("Vendi of the real set: " + "; ".join(vr) + ".")
    held = (report.get("realism_logit") or {}).get("heldout_real")
    if held:
        notes.append(f"Mean realism logit of the real held-out images: {format_metric(held)}.")
    return notes + _texture_lines(report) + [str(c) for c in report.get("caveats", [])]


def _settings_lines(report: Mapping) -> list[tuple[str, str]]:
    def show(v):
        return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)
    return [(str(k), show(v)) for k, v in (report.get("settings") or {}).items()]


def _markdown(report: Mapping, images: Mapping[str, Path], out_dir: Path) -> str:
    title = report.get("title", "craterdiff evaluation")
    lines = [f"# {title}", ""]
    for ex, header, rows in _tables(report):
        lines += [f"## Features: {ex}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    for title_, above, header, rows in _sections(report):
        lines += [f"## {title_}", ""] + [x for a in above for x in (a, "")]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in _notes(report)] + [""]
    settings = _settings_lines(report)
    if settings:
        lines += ["## Settings", ""] + [f"- **{k}**: {v}" for k, v in settings] + [""]
    if images:
        lines += ["## Figures", ""]
        for name, p in images.items():
            p = Path(p)
            try:
                rel = p.resolve().relative_to(out_dir.resolve()).as_posix()
            except ValueError:
                rel = p.as_posix()
            lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
.table{overflow-x:auto;max-width:100%;margin:.6em 0}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}
th{background:#f2f2f2;white-space:normal;min-width:4.5em;vertical-align:bottom}td{background:#fff}
td:first-child,th:first-child{text-align:left;font-weight:600;position:sticky;left:0;z-index:1}
tr:nth-child(even) td{background:#fafafa}
ul{font-size:.9em}figure{display:inline-block;margin:.6em 1em .6em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555;text-align:center}
img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}
code{background:#f4f4f4;padding:0 .2em}
"""


def _data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
            ".svg": "image/svg+xml"}.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table in its own horizontal scroll box (its first column, the model, stays in view): no table widens the
    page."""
    e = html.escape
    return ('<div class="table"><table><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in header)
            + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</tbody></table></div>")


def _html(report: Mapping, images: Mapping[str, Path]) -> str:
    e = html.escape
    title = e(str(report.get("title", "craterdiff evaluation")))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{title}</title><style>{_CSS}</style></head><body>", f"<h1>{title}</h1>"]
    for ex, header, rows in _tables(report):
        parts.append(f"<h2>Features: {e(ex)}</h2>" + _html_table(header, rows))
    for title_, above, header, rows in _sections(report):
        parts.append(f"<h2>{e(title_)}</h2>" + "".join(f"<p>{e(a)}</p>" for a in above) + _html_table(header, rows))
    parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in _notes(report)) + "</ul>")
    settings = _settings_lines(report)
    if settings:
        parts.append("<h2>Settings</h2><ul>"
                     + "".join(f"<li><b>{e(k)}</b>: <code>{e(v)}</code></li>" for k, v in settings) + "</ul>")
    if images:
        parts.append("<h2>Figures</h2>")
        for name, p in images.items():
            parts.append(f'<figure><img alt="{e(name)}" src="{_data_uri(Path(p))}">'
                         f"<figcaption>{e(name)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _json_safe(v):
    """NaN/inf -> None (strict JSON), tensors and numpy scalars -> Python numbers, paths -> str."""
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (torch.Tensor, np.ndarray, np.generic)):
        v = v.tolist()
        return _json_safe(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    return v


def write_report(out_dir: str | Path, report: Mapping, images: Mapping[str, Path]) -> dict[str, Path]:
    """Write `report.json` (the dict, NaN as null), `report.md` (one comparison table per
    extractor, mean ± std over seeds, notes with the FID small-n caveat, settings, figures linked by
    relative path) and `report.html` (the same, self-contained: every image of `images` embedded as
    a base64 data URI, inline CSS, no external file or URL). images: caption -> PNG path.
    Returns {"json", "md", "html"} -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    atomic_write_text(paths["json"], json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False))
    atomic_write_text(paths["md"], _markdown(report, images, out))
    atomic_write_text(paths["html"], _html(report, images))
    return paths
