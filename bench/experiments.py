"""Run and evaluate a set of fine-tuning experiments: the published results, the ablations and the size ladder.

    python -m bench.experiments main     [--train-seeds 0 1 2] [--runs runs/bench] [--out docs/results/main]
    python -m bench.experiments ablation [--train-seeds 0] [--variants ot ot+realism]
    python -m bench.experiments tune     [--variants ot_minibatch ot_b128]
    python -m bench.experiments modes    [--train-seeds 0 1 2]
    python -m bench.experiments sizes    [--train-seeds 0 1 2]
    python -m bench.experiments levers   [--variants default --train-seeds 0 1 2]

Every variant is a config file, `configs/experiments/<set>/<variant>.yaml`, which `python -m scripts.finetune --cfg`
runs as it is; each names the recipe it changes (`base:`) and says why in its header. `SETS` lists each set's
variants in table order. Two shared recipes sit beside the sets: `configs/experiments/pre_coverage.yaml` (the
detector-reward default: the default before the sharp coverage credit) and `pre_size.yaml` (before the crater-size
levers: MMD + GP-MI, every step alike, 25 iterations at lr 3e-5).

Sets:

* `sizes`: the crater-size levers that make `configs/default.yaml`, one added at a time (each rung's `base:` is the
  rung before): the pre-size default's MMD + GP-MI reward, + the `size` reward at lr 1e-4, + the last step held at
  the base model, + σ-weighted steps, + 50 iterations, + 75 iterations (the detector-reward default); on that rung
  either 100 iterations or the sharp coverage credit (the default).
* `levers`: the default, the detector-reward default before it, and screens toward the goals (checked against
  `DEFAULT_GOALS`): on the detector-reward default a narrower size kernel, KL to the base model at every step (two
  strengths), the soft-coverage reward, twice the size weight, and the last two together; on the default two PPO
  epochs per batch and the size reward on the opposite-arcs rim test (`size_arcs`; `size_arcs_bw0.37` with its kernel
  narrowed to the detected references' spread). Variants without a finished run at a seed are left out of the
  evaluation, so `--no-train --train-seeds 0 1 2` evaluates the 3-seed variants beside single-seed screens.
* `main`: the base model against PPO, TRPO (`configs/trpo.yaml`; `trpo_64` and `trpo_32` with the solve of 64 or 32
  uniformly drawn states and 10 or 8 CG iterations; `trpo_size` with the default's crater-size reward for 50
  iterations) and the SAC-style actor-critic (`configs/sac.yaml`, soft λ-returns; `sac_td0`: the one-step soft
  Bellman target, λ = 0), all with the pre-size default's reward and budget, as published in docs/results/main.
* `ablation`: the pre-size default (same iterations, step sizes, batch) with the reward weights of `mmd`, `mi`,
  `mmd_mi` (both, weight 1 each), `fid` and `ot`, each without and with the realism term (`+realism`, weight 0.5).
* `modes`: what is trained, at the pre-size default's budget (25 iterations of 64 trajectories, PPO, the
  MMD + GP-MI reward): every UNet weight (`full`), LoRA adapters, the latent drift net, the sampler-schedule policy
  (each with its own learning rate, calibrated as its file says).
* `tune`: the levers tried to meet the target (docs/design.md, "Measured warning": the step size and the
  reward decide): KL to the base model, the realism term, one-to-one (minibatch) OT matching, and single-seed
  screens of the crater-size levers before the size reward moved to the detector.

Every variant is fine-tuned once per training seed into RUNS/<set>/<variant>/seed_<s>; a finished
run (model/ saved) is reused, an interrupted one resumed from its last checkpoint, so the command
can be re-run after a crash or with more seeds. The runs of a set share one reward artifact
(RUNS/reward, built once from configs/default.yaml: the weights and the OT matching are applied when
it is loaded; the features, reference and realism scorer do not depend on them).

Then every model and the base model are evaluated together by `evaluation.run.evaluate_run` (the
`scripts.eval` code) at the same sampling seeds, against the held-out split, in the reward's
extractor and an independent one; OUT gets that full report (report.json/.md/.html) and
summary.json/summary.md: per variant the headline metrics, mean ± std over training seeds (over
sampling seeds when there is one training seed), the mean wall time of a run, and for every variant the
target check of docs/design.md ("Evaluation") (coverage and KID halfway from the base model to the train-split ceiling,
precision down by at most 0.1, recall and Vendi not below the base model's, the share of craters ≥ 100 km halfway
to the held-out craters' and W1(log D) halved by each size instrument, at most 15 minutes).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config import load_config
from evaluation.run import BASE, CEILING, TEXTURE, ModelSpec, evaluate_run
from basics import PROJECT_ROOT
from utils import apply_threads, resolve_path

DEFAULT_CFG = PROJECT_ROOT / "configs" / "default.yaml"
EXPERIMENTS = PROJECT_ROOT / "configs" / "experiments"
"""configs/experiments/<set>/<variant>.yaml: every published variant (module docstring)."""
SETS = {
    "main": ("ppo", "trpo", "trpo_64", "trpo_32", "trpo_size", "sac", "sac_td0"),
    "ablation": ("mmd", "mmd+realism", "mi", "mi+realism", "mmd_mi", "mmd_mi+realism", "fid", "fid+realism", "ot",
                 "ot+realism"),
    "tune": ("ot", "kl_base_1", "ot+realism", "ot_minibatch", "ot_b128", "ot_final", "mi_final", "size1", "size3",
             "size3_it50", "size3_final_it50", "size3_final_sigma", "size3_final_sigma_lr3e-4",
             "size6_final_sigma_lr1e-4", "size3_final0.1_sigma_lr1e-4"),
    "modes": ("full", "lora", "latent", "schedule"),
    "sizes": ("mmd_mi", "size3_lr1e-4", "size3_final_lr1e-4", "size3_final_sigma_lr1e-4",
              "size3_final_sigma_lr1e-4_it50", "size3_final_sigma_lr1e-4_it75", "size3_final_sigma_lr1e-4_it100",
              "default"),
    "levers": ("default", "ppo_epochs2", "size_arcs", "size_arcs_bw0.37", "detector_default", "size_bw0.35",
               "kl_base_0.1", "kl_base_0.02", "coverage1", "size6", "size6_coverage1"),
}
"""Each set's variants, in the order of its tables."""
HEADLINE = [("efficientnet_lite0", "coverage"), ("efficientnet_lite0", "recall"), ("efficientnet_lite0", "precision"),
            ("efficientnet_lite0", "kid_mean"), ("efficientnet_lite0", "fid"), ("efficientnet_lite0", "vendi"),
            ("random_cnn", "coverage"), ("random_cnn", "precision"), ("random_cnn", "kid_mean")]
SIZE_HEADLINE = [("detect_rate_rims", None), ("detect_rate_templates", None), ("share_ge100_rims", None),
                 ("share_ge150_rims", None), ("w1_log10_rims", None), ("share_ge100_templates", None),
                 ("share_ge150_templates", None), ("w1_log10_templates", None), ("detect_rate_arcs", None),
                 ("share_ge100_arcs", None), ("share_ge150_arcs", None), ("w1_log10_arcs", None),
                 ("coverage_ge100", "efficientnet_lite0")]
"""report["sizes"]["models"][model] figures: (key, extractor or None); summary keys sizes/<key>. "_rims" is the
rim-coherence detector on the whole ring; "_arcs" the same asking for the rim on two opposite arcs (reports since
2026-12-07); "_templates" the template detector. The `size` reward uses templates unless `reward.size_detector: arcs`;
the default's goals read `SIZE_JUDGES`."""
SIZE_GOALS = {"share_ge100_rims": ("share_ge100_rims", "w1_log10_rims"),
              "share_ge100_templates": ("share_ge100_templates", "w1_log10_templates")}
"""Per instrument: its share key -> (the held-out craters' own share in report["sizes"]["heldout"], its W1 key)."""
SIZE_JUDGES = ("arcs", "templates")
"""The detectors the default's goals read: the two that meet every validation goal, broken rims included (`rims`
counts a crater's pieces: docs/design.md, "Evaluation"). Reports made before `arcs` existed get no arcs check."""
HELDOUT = "held-out"
"""The summary row of the held-out tiles' own figures (sizes by each detector, mean gradient)."""
TARGET_MINUTES = 15.0
MAX_PRECISION_DROP = 0.1


@dataclass(frozen=True)
class Variant:
    """One fine-tuning recipe: its name and config file."""
    name: str
    cfg: Path


def variants(which: str) -> list[Variant]:
    """The set's variants in table order, each with its file under configs/experiments/<set>/."""
    return [Variant(name, EXPERIMENTS / which / f"{name}.yaml") for name in SETS[which]]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def shared_artifact(root: Path) -> Path:
    """RUNS/reward, built from configs/default.yaml if missing; returns its path."""
    from rl.build import build_reward_artifact

    path = root / "reward"
    if not (path / "reward.yaml").is_file():
        t0 = time.perf_counter()
        build_reward_artifact(load_config(DEFAULT_CFG), path)
        (root / "reward_build_s.json").write_text(json.dumps({"reward_build_s": time.perf_counter() - t0}))
    return path


def train(variant: Variant, seed: int, run_dir: Path, artifact: Path, *, threads: int | None = None) -> float:
    """Fine-tune (or resume, or reuse) one run; returns its accumulated wall time in seconds."""
    from rl.trainer import Finetuner
    from config import prepare_run_dir
    from basics import latest_checkpoint, list_checkpoints

    timing = run_dir / "timing.json"
    spent = json.loads(timing.read_text())["train_s"] if timing.is_file() else 0.0
    if (run_dir / "model" / "unet" / "config.json").is_file():
        print(f"{run_dir}: finished, reused")
        return spent
    cfg = load_config(variant.cfg, [f"seed={seed}", f"reward.artifact={artifact}",
                                     *([f"num_threads={threads}"] if threads else [])])
    apply_threads(cfg.num_threads)
    resume = bool(list_checkpoints(run_dir / "checkpoints"))
    print(f"{run_dir}: {'resuming from ' + latest_checkpoint(run_dir / 'checkpoints').name if resume else 'training'}")
    t0 = time.perf_counter()
    prepare_run_dir(run_dir, cfg, resume=resume)
    Finetuner(cfg, run_dir).run(resume=resume)
    spent += time.perf_counter() - t0
    timing.write_text(json.dumps({"train_s": spent}))
    return spent


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------

def _stat(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def _spread(per_run: list[dict]) -> dict:
    """One figure of a variant's runs (report cells {"mean", "values"}): over the runs' means when there are
    several, over the one run's sampling seeds otherwise."""
    return _stat([r["mean"] for r in per_run] if len(per_run) > 1 else per_run[0]["values"])


def iteration_seconds(run_dir: Path) -> tuple[float, float] | None:
    """(mean seconds per iteration, of which the update) from a run's metrics.csv."""
    import csv

    f = run_dir / "metrics.csv"
    if not f.is_file():
        return None
    with open(f) as fh:
        rows = list(csv.DictReader(fh))
    total = [float(r["time_sample_s"]) + float(r["time_reward_s"]) + float(r["time_update_s"]) for r in rows]
    return float(np.mean(total)), float(np.mean([float(r["time_update_s"]) for r in rows]))


def summarize_variants(report: dict, runs: dict[str, list[str]], wall: dict[str, list[float]],
                       iters: dict[str, list[tuple[float, float]]] | None = None) -> dict:
    """Per variant (and base, ceiling): each headline metric over training seeds, or over sampling
    seeds when the variant has one run; realism logit; wall time; seconds per iteration."""
    models = report["models"]
    realism = report.get("realism_logit", {})
    sizes = report.get("sizes", {}).get("models", {})
    detail = report.get("detail", {}).get("models", {})
    out: dict = {}
    refs = {TEXTURE: [TEXTURE]} if TEXTURE in models else {}
    for variant, names in {BASE: [BASE], **runs, **refs, CEILING: [CEILING]}.items():
        row: dict = {}
        for ex, metric in HEADLINE:
            if ex not in models[names[0]]:
                continue
            row[f"{ex}/{metric}"] = _spread([models[m][ex][metric] for m in names])
        for key, ex in SIZE_HEADLINE if all(m in sizes for m in names) else ():
            if all(key in sizes[m] for m in names):  # reports before the arcs detector have no "_arcs" keys
                row[f"sizes/{key}"] = _spread([sizes[m][key][ex] if ex else sizes[m][key] for m in names])
        if all(m in detail for m in names):
            for key in ("mean_gradient", "spectrum_deviation"):
                row[f"detail/{key}"] = _spread([detail[m][key] for m in names])
        if all(m in realism for m in names):
            row["realism_logit"] = _spread([realism[m] for m in names])
        if variant in wall:
            row["wall_min"] = _stat([w / 60 for w in wall[variant]])
        if iters and variant in iters:
            row["iter_s"] = _stat([t for t, _ in iters[variant]])
            row["update_s"] = _stat([u for _, u in iters[variant]])
        row["spread_over"] = "training seeds" if len(names) > 1 else "sampling seeds"
        out[variant] = row
    held = report.get("sizes", {}).get("heldout", {})
    if held or "detail" in report:
        row = {f"sizes/{k}": _stat([v]) for k, v in held.items() if k.startswith(("share_", "detect_rate_"))}
        if "detail" in report:
            row["detail/mean_gradient"] = _stat([report["detail"]["heldout_mean_gradient"]])
        out[HELDOUT] = {**row, "spread_over": "one set"}
    return out


def _check(value: float, target: float, op: str) -> dict:
    return {"value": value, "target": target, "op": op, "met": value >= target if op == "≥" else value <= target}


def target_check(summary: dict, variant: str, heldout: dict | None = None) -> dict:
    """The held-out target (docs/design.md, "Evaluation") for `variant`, against the base model and the
    ceiling, in the reward's extractor: coverage and KID halfway to the ceiling, precision down by at most
    0.1, recall and Vendi not below the base model's; with the size figures and `heldout` (report["sizes"]["heldout"]),
    the share ≥ 100 km halfway to the held-out craters' and W1(log D) halved, by each instrument."""
    ex = "efficientnet_lite0"
    b, c, v = summary[BASE], summary[CEILING], summary[variant]
    get = lambda row, m: row[f"{ex}/{m}"]["mean"]  # noqa: E731
    half = lambda m: get(b, m) + (get(c, m) - get(b, m)) / 2  # noqa: E731
    checks = {
        "coverage": _check(get(v, "coverage"), half("coverage"), "≥"),
        "kid_mean": _check(get(v, "kid_mean"), half("kid_mean"), "≤"),
        "precision": _check(get(v, "precision"), get(b, "precision") - MAX_PRECISION_DROP, "≥"),
        "recall": _check(get(v, "recall"), get(b, "recall"), "≥"),
        "vendi": _check(get(v, "vendi"), get(b, "vendi"), "≥"),
    }
    for share, (held, w1) in SIZE_GOALS.items() if heldout else ():
        if f"sizes/{share}" not in v:
            continue
        base_share = b[f"sizes/{share}"]["mean"]
        checks[share] = _check(v[f"sizes/{share}"]["mean"], base_share + (heldout[held] - base_share) / 2, "≥")
        checks[w1] = _check(v[f"sizes/{w1}"]["mean"], b[f"sizes/{w1}"]["mean"] / 2, "≤")
    if "wall_min" in v:
        checks["wall_min"] = _check(v["wall_min"]["mean"], TARGET_MINUTES, "≤")
    return {"variant": variant, "checks": checks, "met": all(c["met"] for c in checks.values())}


DEFAULT_GOALS = {"precision_vs_base": 0.0, "recall": 0.70, "coverage": 0.92, "kid_mean": 4.0, "vendi": 7.2,
                 "share_gap": 0.05, "w1_fraction_of_base": 0.5, "detail_tolerance": 0.15}
"""The goals of a default that keeps the sizes and closes the realism and recall gaps (in the reward's extractor): precision
at least the base model's, recall, coverage, KID and Vendi bounds, coverage and KID better than the texture-only row's;
by both `SIZE_JUDGES` the shares called ≥ 100 and ≥ 150 km within `share_gap` of the held-out tiles' and W1(log D) at
most half the base model's; the mean gradient and every band of the power spectrum within `detail_tolerance` of the held-out
tiles'; at most TARGET_MINUTES."""


def default_goals(summary: dict, variant: str) -> dict:
    """`DEFAULT_GOALS` checked for `variant` ({"variant", "checks", "met"}, as `target_check`); the size, texture and
    detail checks only where the summary has their rows."""
    ex, g = "efficientnet_lite0", DEFAULT_GOALS
    b, v = summary[BASE], summary[variant]
    get = lambda row, m: row[f"{ex}/{m}"]["mean"]  # noqa: E731
    checks = {"precision": _check(get(v, "precision"), get(b, "precision") + g["precision_vs_base"], "≥"),
              "recall": _check(get(v, "recall"), g["recall"], "≥"),
              "coverage": _check(get(v, "coverage"), g["coverage"], "≥"),
              "kid_mean": _check(get(v, "kid_mean"), g["kid_mean"], "≤"),
              "vendi": _check(get(v, "vendi"), g["vendi"], "≥")}
    if TEXTURE in summary and f"{ex}/coverage" in summary[TEXTURE]:
        checks["coverage_vs_texture"] = _check(get(v, "coverage"), get(summary[TEXTURE], "coverage"), "≥")
        checks["kid_vs_texture"] = _check(get(v, "kid_mean"), get(summary[TEXTURE], "kid_mean"), "≤")
    held = summary.get(HELDOUT, {})
    for inst in SIZE_JUDGES:
        for share in ("share_ge100", "share_ge150"):
            key = f"sizes/{share}_{inst}"
            if key in v and key in held:
                checks[f"{share}_{inst}_gap"] = _check(abs(v[key]["mean"] - held[key]["mean"]), g["share_gap"], "≤")
        key = f"sizes/w1_log10_{inst}"
        if key in v:
            checks[f"w1_log10_{inst}"] = _check(v[key]["mean"], b[key]["mean"] * g["w1_fraction_of_base"], "≤")
    if "detail/spectrum_deviation" in v and "detail/mean_gradient" in held:
        checks["spectrum_deviation"] = _check(v["detail/spectrum_deviation"]["mean"], g["detail_tolerance"], "≤")
        checks["mean_gradient_error"] = _check(abs(v["detail/mean_gradient"]["mean"] / held["detail/mean_gradient"]["mean"]
                                                   - 1), g["detail_tolerance"], "≤")
    if "wall_min" in v:
        checks["wall_min"] = _check(v["wall_min"]["mean"], TARGET_MINUTES, "≤")
    return {"variant": variant, "checks": checks, "met": all(c["met"] for c in checks.values())}


def _fmt(stat: dict | None, digits: int) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def summary_markdown(which: str, summary: dict, targets: dict[str, dict], settings: dict,
                     goals: dict[str, dict] | None = None) -> str:
    cols = [("efficientnet_lite0/coverage", "coverage ↑", 3), ("efficientnet_lite0/recall", "recall ↑", 3),
            ("efficientnet_lite0/precision", "precision ↑", 3), ("efficientnet_lite0/kid_mean", "KID ↓", 2),
            ("efficientnet_lite0/fid", "FID ↓", 0), ("efficientnet_lite0/vendi", "Vendi ↑", 2),
            ("realism_logit", "realism ↑", 2), ("random_cnn/coverage", "coverage (rand. CNN) ↑", 3),
            ("random_cnn/precision", "precision (rand. CNN) ↑", 3), ("random_cnn/kid_mean", "KID (rand. CNN) ↓", 4),
            ("sizes/detect_rate_rims", "detected (rims)", 3), ("sizes/detect_rate_templates", "detected (templates)", 3),
            ("sizes/share_ge100_rims", "share ≥ 100 km (rims) ↑", 3), ("sizes/share_ge150_rims", "share ≥ 150 km (rims)", 3),
            ("sizes/w1_log10_rims", "W1 log D (rims) ↓", 3),
            ("sizes/share_ge100_templates", "share ≥ 100 km (templates) ↑", 3),
            ("sizes/share_ge150_templates", "share ≥ 150 km (templates)", 3),
            ("sizes/w1_log10_templates", "W1 log D (templates) ↓", 3),
            ("sizes/detect_rate_arcs", "detected (arcs)", 3), ("sizes/share_ge100_arcs", "share ≥ 100 km (arcs) ↑", 3),
            ("sizes/share_ge150_arcs", "share ≥ 150 km (arcs)", 3), ("sizes/w1_log10_arcs", "W1 log D (arcs) ↓", 3),
            ("sizes/coverage_ge100", "coverage of craters ≥ 100 km ↑", 3),
            ("detail/mean_gradient", "mean gradient", 4), ("detail/spectrum_deviation", "power spectrum: worst band ↓", 2),
            ("wall_min", "wall time (min)", 1), ("iter_s", "s / iteration", 1), ("update_s", "update s / iter.", 1)]
    lines = [f"# craterdiff experiments: {which}", "",
             "| model | " + " | ".join(c[1] for c in cols) + " | spread over |",
             "|---|" + "---:|" * len(cols) + "---|"]
    for variant, row in summary.items():
        cells = [_fmt(row.get(key), d) for key, _, d in cols]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {row['spread_over']} |")
    lines += ["", f"EfficientNet-Lite0 is the reward's own feature space; the random CNN is independent of it. "
                  f"{CEILING} is the ceiling: real train craters against real held-out craters; {TEXTURE} the "
                  f"texture-only reference (the held-out tiles phase-scrambled: their texture, no crater)."]
    if any("sizes/share_ge100_rims" in row for row in summary.values()):
        lines += ["", "Crater sizes (docs/design.md, \"Evaluation\"): detectors, each validated on real, craterless "
                      "and broken-rim tiles in report.md; \"(rims)\" is the rim-coherence detector, \"(arcs)\" the same "
                      "asking for the rim on two opposite arcs (a crater's pieces do not count); \"(templates)\" the "
                      "template detector; the `size` reward uses templates (arcs where `reward.size_detector: arcs`), "
                      "so the other family judges it. Shares count every tile "
                      "(no crater found counts as no); W1 is in log10 D of the detected craters against the held-out "
                      "tiles' by the same detector; the coverage of held-out craters ≥ 100 km is in the reward's "
                      "extractor."]
    intro = ("Coverage and KID halfway from the base model to the ceiling, precision down by at most "
             f"{MAX_PRECISION_DROP}, recall and Vendi not below the base model's, the share of craters ≥ 100 km "
             "halfway to the held-out craters' and W1 halved (by each instrument, when measured), at most "
             f"{TARGET_MINUTES:.0f} minutes; means over the spread above.")
    lines += _check_table("Target check", intro, targets)
    g = DEFAULT_GOALS
    lines += _check_table("The default's goals", "`bench.experiments.DEFAULT_GOALS`: precision at least the base "
                          "model's, recall, coverage, KID and Vendi bounds, coverage and KID better than the texture-only "
                          f"row's; by {' and '.join(SIZE_JUDGES)} (the detectors that pass every validation) the shares "
                          f"called ≥ 100 and ≥ 150 km within {g['share_gap']} of the "
                          f"held-out tiles' (the gap is checked) and W1 at most {g['w1_fraction_of_base']} of the base "
                          f"model's; mean gradient and power spectrum within {g['detail_tolerance']:.0%} of the held-out "
                          "tiles'.", goals or {})
    lines += ["", "## Settings", ""] + [f"- **{k}**: {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def _check_table(title: str, intro: str, targets: dict[str, dict]) -> list[str]:
    """Markdown lines of one check table: a column per check (its bound), a row per variant."""
    if not targets:
        return []
    checks = {k: c for t in targets.values() for k, c in t["checks"].items()}  # in check order; the bounds are
    keys = list(checks)  # the same for every variant (a variant without a timing has no wall_min check)
    lines = ["", f"## {title}", "", intro, "",
             "| variant | " + " | ".join(f"{k} {checks[k]['op']} {checks[k]['target']:.3f}" for k in keys) + " | target |",
             "|---|" + "---:|" * len(keys) + "---|"]
    for variant, t in targets.items():
        c = t["checks"]
        cells = [f"{c[k]['value']:.3f} {'✓' if c[k]['met'] else '✗'}" if k in c else "–" for k in keys]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {'met' if t['met'] else 'NOT met'} |")
    return lines


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("set", choices=list(SETS))
    p.add_argument("--train-seeds", type=int, nargs="+", default=None,
                   help="training seeds per variant (default: main and sizes 0 1 2, the others 0)")
    p.add_argument("--variants", nargs="+", default=None, help="run only these variants")
    p.add_argument("--runs", default=str(PROJECT_ROOT / "runs" / "bench"), help="where the runs go")
    p.add_argument("--out", default=None, help="report directory (default docs/results/<set>)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override for the evaluation config (eval.*), e.g. --set eval.seeds=[0,1,2]")
    p.add_argument("--no-train", action="store_true", help="evaluate the finished runs only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per training run (1 when two runs share two cores; their wall times "
                        "then measure a shared machine)")
    p.add_argument("--no-eval", action="store_true",
                   help="train only (e.g. several variants in parallel processes, then one --no-train)")
    args = p.parse_args(argv)

    seeds = args.train_seeds if args.train_seeds is not None else ([0, 1, 2] if args.set in ("main", "sizes") else [0])
    chosen = variants(args.set)
    if args.variants:
        unknown = sorted(set(args.variants) - {v.name for v in chosen})
        if unknown:
            p.error(f"unknown variant(s) {unknown}; choose from {[v.name for v in chosen]}")
        chosen = [v for v in chosen if v.name in args.variants]
    root = resolve_path(args.runs) / args.set
    out = Path(args.out) if args.out else PROJECT_ROOT / "docs" / "results" / args.set
    root.mkdir(parents=True, exist_ok=True)
    artifact = shared_artifact(resolve_path(args.runs))

    runs: dict[str, list[str]] = {}
    wall: dict[str, list[float]] = {}
    iters: dict[str, list[tuple[float, float]]] = {}
    specs = []
    for v in chosen:
        for s in seeds:
            run_dir = root / v.name / f"seed_{s}"
            if not args.no_train:
                train(v, s, run_dir, artifact, threads=args.threads)
            if not (run_dir / "model" / "unet" / "config.json").is_file():
                print(f"{run_dir}: not finished, left out of the evaluation")
                continue
            name = f"{v.name}_s{s}"
            specs.append(ModelSpec(name, run_dir / "model"))
            runs.setdefault(v.name, []).append(name)
            timing = run_dir / "timing.json"
            if timing.is_file():
                wall.setdefault(v.name, []).append(json.loads(timing.read_text())["train_s"])
            if (its := iteration_seconds(run_dir)) is not None:
                iters.setdefault(v.name, []).append(its)

    if args.no_eval:
        return
    cfg = load_config(DEFAULT_CFG, [*args.overrides, f"reward.artifact={artifact}"])
    apply_threads(cfg.num_threads)
    base = ModelSpec(BASE, resolve_path(cfg.model.pretrained))
    report = evaluate_run(cfg, [base, *specs], out=out, run_dir=root / chosen[0].name / f"seed_{seeds[0]}",
                          groups={v: names for v, names in runs.items() if len(names) > 1})
    summary = summarize_variants(report, runs, wall, iters)
    build = artifact.parent / "reward_build_s.json"
    settings = {"set": args.set, "variants": {v.name: str(v.cfg.relative_to(PROJECT_ROOT)) for v in chosen},
                "train_seeds": seeds, "sampling_seeds": list(cfg.eval.seeds), "n_generated": cfg.eval.n,
                "reward_build_s": json.loads(build.read_text())["reward_build_s"] if build.is_file() else None,
                "device": report["settings"]["device"]}
    targets = {v: target_check(summary, v, report.get("sizes", {}).get("heldout")) for v in runs}
    goals = {v: default_goals(summary, v) for v in runs}
    (out / "summary.json").write_text(json.dumps({"summary": summary, "targets": targets, "goals": goals,
                                                  "settings": settings}, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(args.set, summary, targets, settings, goals))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
