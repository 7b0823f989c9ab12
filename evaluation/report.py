"""Evaluation reports: t-SNE plots, training curves, and report.json / report.md / report.html.

The report dict (written by `evaluation.run`, read here) has the shape

    report["models"][model][extractor] = {metric: {"mean": float, "std": float, "values": [per seed]}}
    report["realism_logit"][model]     = {"mean", "std", "values"}          (optional)
    report["sizes"]                    = {"estimator", "templates", "heldout", "models": {model: {figure: stat}}}
                                                                             (optional)
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
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from utils import atomic_write_text

__all__ = ["tsne_plot", "training_curves", "size_plots", "write_report", "format_metric", "TABLE_METRICS",
           "FID_CAVEAT", "SIZE_METRICS"]

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
    ("share_ge100", "share ≥ 100 km", "fix"),
    ("w1_log10", "W1(log10 D) ↓", "fix"),
    ("kl_hist", "KL(sizes) ↓", "fix"),
    ("share_ge100_templates", "share ≥ 100 km (templates)", "fix"),
    ("w1_log10_templates", "W1(log10 D) (templates) ↓", "fix"),
    ("kl_hist_templates", "KL(sizes) (templates) ↓", "fix"),
)
"""Columns of the crater-size table (besides coverage of the held-out craters ≥ 100 km per extractor): the
ridge estimator's figures, then the template matcher's."""

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
    fig.savefig(path, format="png")
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

def size_plots(sizes: Mapping[str, list[np.ndarray]], heldout_true: np.ndarray | None, heldout_est: np.ndarray,
               out_dir: str | Path) -> dict[str, Path]:
    """The size-frequency figures: the cumulative SFD N(≥D) against D on log-log axes (the planetary
    convention; one line per model and seed, or per pooled group (`evaluation.run.pool_sizes`), N normalised by
    the set's size so sets of any n compare)
    and the histograms of log10 D (each model's seeds pooled), beside the held-out craters' (their
    catalogue diameters, and the estimator's sizes of them). sizes: model -> [D̂ (n,) per seed]."""
    from evaluation.sizes import HIST_EDGES_LOG10, cumulative_counts

    plt = _mpl()
    out_dir = Path(out_dir)
    fig, ax = plt.subplots(figsize=(6.5, 5), dpi=110)
    refs = [("held-out, estimated", heldout_est, dict(color="black", ls="--", lw=2))]
    if heldout_true is not None:
        refs.insert(0, ("held-out, catalogue", heldout_true, dict(color="black", lw=2)))
    for name, d, style in refs:
        x, n = cumulative_counts(d)
        ax.step(x, n / len(d), where="post", label=name, **style)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (model, per_seed) in enumerate(sizes.items()):
        for j, d in enumerate(per_seed):
            x, n = cumulative_counts(d)
            ax.step(x, n / len(d), where="post", color=colours[i % len(colours)], lw=1, alpha=0.8,
                    label=model if j == 0 else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("crater diameter D (km)")
    ax.set_ylabel("N(≥ D) / N")
    ax.set_title("cumulative size-frequency distribution")
    ax.legend(fontsize=7, loc="lower left")  # the curves fall to the right: that corner stays empty
    sfd = _save_figure(fig, out_dir / "sizes_sfd.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    edges = np.asarray(HIST_EDGES_LOG10)
    for name, d, style in refs:
        ax.hist(np.log10(d), bins=edges, density=True, histtype="step", **style, label=name)
    for i, (model, per_seed) in enumerate(sizes.items()):
        ax.hist(np.log10(np.concatenate(per_seed)), bins=edges, density=True, histtype="step",
                color=colours[i % len(colours)], lw=1.2, label=model)
    ax.axvline(2.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("log10 D (km); dotted: 100 km")
    ax.set_ylabel("density")
    ax.set_title("crater sizes")
    ax.legend(fontsize=8)
    return {"size-frequency distribution": sfd, "size histograms": _save_figure(fig, out_dir / "sizes_hist.png")}


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


def training_curves(metrics_csv: str | Path, path: str | Path, *, title: str | None = None) -> Path | None:
    """Plot a fine-tuning run's metrics.csv: reward mean (± std) and its components (reward_<c>),
    each component's set-level statistic (value_<c>: MMD², OT cost, ...) as relative change from the
    first step (their scales differ), KL, clip fraction, gradient norm (before / after clipping) and
    the time split per iteration (stacked sample / reward / update seconds). Panels whose columns are missing are left out; TRPO columns
    (step_size, backtrack_iters, accepted) get a panel when present. Returns `path`, or None when
    the file has no step column or no rows.
    """
    cols = _read_metrics_csv(Path(metrics_csv))
    if "step" not in cols:
        return None
    step = cols["step"]

    def has(*keys: str) -> list[str]:
        return [k for k in keys if k in cols]

    components = sorted(k for k in cols if k.startswith("reward_") and k not in ("reward_mean", "reward_std"))
    panels = []
    if has("reward_mean"):
        panels.append(("reward", ["reward_mean"]))
    if components:
        panels.append(("reward components (mean per-sample credit)", components))
    values = sorted(k for k in cols if k.startswith("value_"))
    if values:
        panels.append(("set-level values, relative change from the first step", values))
    for title_, keys in (("KL", has("kl")), ("clip fraction", has("clip_frac")),
                         ("grad norm", has("grad_norm", "grad_norm_clipped")),
                         ("time per iteration (s)", has("time_sample_s", "time_reward_s", "time_update_s")),
                         ("TRPO line search", has("step_size", "backtrack_iters", "accepted"))):
        if keys:
            panels.append((title_, keys))
    if not panels:
        return None
    plt = _mpl()
    ncol = 2 if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 2.9 * nrow), dpi=100, squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
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
    """(header, rows, the estimator's line) of the crater-size table, or None without size figures."""
    sizes = report.get("sizes")
    if not sizes:
        return None
    exs = [ex for ex in _extractors(report)
           if any(ex in (m.get("coverage_ge100") or {}) for m in sizes["models"].values())]
    header = ["model"] + [t for _, t, _ in SIZE_METRICS] + [f"coverage ≥ 100 km ({ex}) ↑" for ex in exs]
    held = sizes.get("heldout", {})
    nan = float("nan")
    rows = [["held-out (estimated)", f"{held.get('share_ge100_estimated', nan):.3f}", "0", "0",
             f"{held.get('share_ge100_templates', nan):.3f}", "0", "0"] + ["–"] * len(exs)]
    if "share_ge100_true" in held:
        rows.append(["held-out (catalogue)", f"{held['share_ge100_true']:.3f}", "–", "–", "–", "–", "–"]
                    + ["–"] * len(exs))
    for model, per in sizes["models"].items():
        cov = per.get("coverage_ge100") or {}
        rows.append([model] + [format_metric(per.get(k), fmt) for k, _, fmt in SIZE_METRICS]
                    + [format_metric(cov.get(ex), "fix") for ex in exs])
    e, t = sizes.get("estimator", {}), sizes.get("templates", {})
    line = (f"Two instruments measure sizes. The ridge estimator on radial profiles, fitted on the "
            f"{e.get('n_train')} train craters' diameters: on the {e.get('n_heldout')} held-out craters "
            f"R² = {e.get('r2_log10', nan):.3f}, MAE = {e.get('mae_log10', nan):.3f} in log10 D "
            f"(×{10 ** e.get('mae_log10', 0.0):.2f}). The template matcher (normalised cross-correlation with "
            f"rendered craters, fitted to no diameters; sun at azimuth {t.get('light_azimuth_deg', nan):.0f}°, "
            f"elevation {t.get('light_elevation_deg', nan):.0f}°): R² = {t.get('r2_log10', nan):.3f}, "
            f"MAE = {t.get('mae_log10', nan):.3f}, Spearman ρ = {t.get('spearman', nan):.3f}. The `size` reward "
            f"uses the template matcher, so the ridge estimator is the independent judge of a run trained on it. "
            f"W1 and KL compare each set's sizes with the held-out craters' sizes by the same instrument; "
            f"coverage ≥ 100 km is coverage restricted to the held-out craters whose catalogue diameter is at "
            f"least 100 km.")
    return header, rows, line


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
    return notes + [str(c) for c in report.get("caveats", [])]


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
    size_table = _size_table(report)
    if size_table:
        header, rows, line = size_table
        lines += ["## Crater sizes", "", line, "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
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
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left;font-weight:600}
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


def _html(report: Mapping, images: Mapping[str, Path]) -> str:
    e = html.escape
    title = e(str(report.get("title", "craterdiff evaluation")))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{title}</title><style>{_CSS}</style></head><body>", f"<h1>{title}</h1>"]
    for ex, header, rows in _tables(report):
        parts.append(f"<h2>Features: {e(ex)}</h2><table><thead><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
        parts.append("</tbody></table>")
    size_table = _size_table(report)
    if size_table:
        header, rows, line = size_table
        parts.append(f"<h2>Crater sizes</h2><p>{e(line)}</p><table><thead><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</tbody></table>")
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
