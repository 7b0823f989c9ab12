"""The evaluation run behind `scripts.eval`: sample models, extract features, score, write a report.

Two entry points:

* `evaluate_run(cfg, models=..., out=...)`: for every sampling seed in `cfg.eval.seeds`, draw
  `cfg.eval.n` images from each model with the same seed; score each set against the held-out split
  (`load_image_set(cfg.data, "heldout")`, min(n, size) images) in every extractor of
  `cfg.eval.extractors`; add the ceiling row (the train split against the held-out split, real vs.
  real), the texture-only row (the held-out tiles phase-scrambled, scored like a model) and, when the
  run's reward artifact has a realism scorer, the mean realism logit per model and the scorer's validation on the
  held-out tiles and craterless surrogates (`realism_validation`); measure crater sizes
  with each detector, validated on the held-out tiles, craterless surrogates and broken rims (evaluation/sizes.py),
  and fine detail; write sample grids, the largest detected craters, size-frequency figures, the power
  spectrum, one t-SNE per extractor, training curves and report.json/.md/.html.
* `evaluate_folders(real_dir, generated_dir, out)`: any two image folders, no model: the generated row
  and the texture-only row (the real folder phase-scrambled).

When n is smaller than a split, each seed uses its own random subset of it (the same subset for
every model), so the spread over seeds includes the choice of real images.

report["models"][model][extractor][metric] = {"mean", "std" (over seeds, ddof = 1), "values" (per seed)}.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from config import Config, DataConfig, EvalConfig, check_eval, config_to_dict
from data.sources import ImageSet, load_image_set
from evaluation.metrics import METRIC_KEYS, evaluate_features
from data.surrogates import broken_rims, craterless_sets, phase_scramble
from evaluation.report import largest_craters_grid, size_plots, spectrum_plot, training_curves, tsne_plot, write_report
from evaluation.sizes import (HUGE_KM, LARGE_KM, SizeInstrument, build_instruments, folder_diameters,
                              share_called, share_large, size_figures, subset_coverage, validate_instrument)
from evaluation.texture import mean_gradient, radial_power_spectrum, spectrum_deviation
from basics import PROJECT_ROOT, CraterdiffError
from utils import resolve_device, resolve_path, save_image_grid

__all__ = ["CEILING", "TEXTURE", "BASE", "FINETUNED", "ModelSpec", "parse_model_args", "resolve_models", "summarize",
           "pool_sizes", "texture_check", "realism_validation", "REALISM_GOAL", "evaluate_run", "evaluate_folders", "default_run_dir"]

BASE, FINETUNED = "base", "finetuned"
CEILING = "train_split"
"""Name of the ceiling row: the train split scored against the held-out split (real vs. real)."""
TEXTURE = "texture_only"
"""Name of the texture-only reference row: the held-out tiles phase-scrambled (their texture, no crater; a fresh
scramble per sampling seed), scored like a model."""
RESERVED = (CEILING, TEXTURE)
MIN_IMAGES = 6
"""Fewest images per set: density and coverage use the 5th nearest neighbour."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: its report name and its diffusers pipeline directory."""
    name: str
    path: Path


# ----------------------------------------------------------------------------------------------
# Which models
# ----------------------------------------------------------------------------------------------

def default_run_dir(cfg: Config) -> Path:
    """`eval.run_dir`, or runs/<config name>."""
    return resolve_path(cfg.eval.run_dir) if cfg.eval.run_dir else PROJECT_ROOT / "runs" / cfg.name


def parse_model_args(items: Sequence[str]) -> dict[str, Path]:
    """`--model NAME=PATH` values -> {name: path}; a malformed or repeated name is a CraterdiffError."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise CraterdiffError(f"--model '{item}': expected NAME=PATH, e.g. --model ppo=runs/default/model")
        if not _NAME.match(name) or name in RESERVED:
            raise CraterdiffError(f"--model '{item}': the name must be letters, digits, '_', '.' or '-' and not "
                                  f"'{CEILING}' or '{TEXTURE}' (the reference rows)")
        if name in out:
            raise CraterdiffError(f"--model: name '{name}' is given twice")
        out[name] = Path(path).expanduser()
    return out


def resolve_models(cfg: Config, run_dir: Path, *, extra: Mapping[str, Path] = {},
                   only: Sequence[str] | None = None) -> list[ModelSpec]:
    """The models to evaluate, in report order: base (`model.pretrained`), finetuned
    (`<run_dir>/model`), then the `extra` (--model NAME=PATH, which may also replace base or
    finetuned), restricted to `only` (--models) when given.

    A missing fine-tuned model is an error telling to run scripts.finetune first, unless other
    models were named with --model (then it is left out) or --models leaves it out.
    """
    from rl.build import base_model_path

    candidates: dict[str, Path | None] = {
        BASE: base_model_path(cfg) if cfg.model.pretrained else None,
        FINETUNED: run_dir / "model",
    }
    candidates.update(extra)
    if only:
        unknown = [m for m in only if m not in candidates]
        if unknown:
            raise CraterdiffError(f"--models: unknown model '{unknown[0]}'; available: {', '.join(candidates)} "
                                  f"(add others with --model NAME=PATH)")
        names = list(dict.fromkeys(only))
    else:
        names = list(candidates)
    specs = []
    for name in names:
        path = candidates[name]
        if name == BASE and path is None:
            if only or not extra:
                raise CraterdiffError("model.pretrained is not set: the base model to compare with is unknown; set "
                                      "model.pretrained or pass --model base=PATH")
            continue
        if name == FINETUNED and name not in extra and not (path / "unet" / "config.json").is_file():
            if extra and not only:
                continue
            raise CraterdiffError(f"no fine-tuned model at '{path}': run python -m scripts.finetune --cfg CFG "
                                  f"--out {run_dir} first (or set eval.run_dir, or pass --model NAME=PATH)")
        specs.append(ModelSpec(name, Path(path)))
    if not specs:
        raise CraterdiffError("no model to evaluate: pass --model NAME=PATH or --models base")
    return specs


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def summarize(values: Sequence[float]) -> dict:
    """{"mean", "std", "values"} over seeds; std is the sample std (ddof = 1), 0 for one value."""
    v = np.asarray([float(x) for x in values], dtype=float)
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "values": [float(x) for x in v]}


def _aggregate(per_seed: list[dict]) -> dict:
    """Per-seed `evaluate_features` dicts -> {metric: summarize(values)} for every METRIC_KEYS."""
    return {k: summarize([r[k] for r in per_seed]) for k in METRIC_KEYS}


def _subset(n_total: int, n: int, seed: int) -> Tensor:
    """All indices when n >= n_total, else a sorted random n-subset drawn with `seed`."""
    if n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(10_000 + seed))[:n].sort().values


def report_dir(out: Path) -> None:
    """Create the report directory, or fail with one line before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CraterdiffError(f"cannot write to the report directory '{out}' ({e.strerror}); choose another --out") \
            from None


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _build_extractor(cfg: Config, name: str, device: torch.device):
    """An evaluation extractor: the reward's path and input size when it is the reward's extractor."""
    from reward.features import build_extractor

    f = cfg.reward.features
    same = name == f.name
    input_size = cfg.eval.input_size or (f.input_size if same else None)
    return build_extractor(name, input_size=input_size, path=f.path if same else None, seed=cfg.seed, device=device)


MARS_32 = DataConfig(source="mars", image_size=32, channels=1)
"""The embedded crater set at 32 px: the size instruments' calibration set in folder mode."""


def instruments_for(train: ImageSet) -> dict[str, SizeInstrument] | None:
    """Both size instruments calibrated on the train split (evaluation/sizes.py), or None when the data carry
    no diameters (`data.source` other than mars)."""
    if train.diameters_km is None:
        return None
    return build_instruments(train.images, train.diameters_km.double().numpy())


Found = tuple[np.ndarray, np.ndarray]
"""(found (n,) bool, D km (n,) with NaN where nothing was found): one set measured by one instrument."""


def measure_sizes(instruments: Mapping[str, SizeInstrument], sets: Mapping[str, Sequence[Tensor]], heldout: Tensor,
                  *, progress: bool = False) -> dict[str, dict]:
    """{instrument: {"models": {model: [Found per seed]}, "heldout": Found}}."""
    bar = tqdm(total=len(instruments) * (1 + sum(len(xs) for xs in sets.values())), desc="crater sizes",
               disable=not progress, leave=False)

    def detect(inst: SizeInstrument, x: Tensor) -> Found:
        found = inst.detect_km(x)
        bar.update(1)
        return found

    measures = {name: {"models": {m: [detect(inst, x) for x in xs] for m, xs in sets.items()},
                       "heldout": detect(inst, heldout)} for name, inst in instruments.items()}
    bar.close()
    return measures


def size_report(instruments: Mapping[str, SizeInstrument], measures: Mapping[str, dict], heldout: Tensor,
                heldout_km: np.ndarray | None, craterless: Mapping[str, Tensor],
                coverage: Mapping[str, Mapping[str, list[float]]]) -> dict:
    """report["sizes"]: each instrument's validation (on the real held-out tiles when their catalogue diameters
    are known, and on the craterless and broken-rim sets), the held-out tiles' own figures, and per model each instrument's
    `size_figures` over seeds against the held-out tiles measured by the same instrument (keys
    <figure>_<instrument>), with the coverage of the held-out craters ≥ 100 km."""
    validation, held, models = {}, {}, {}
    for name, inst in instruments.items():
        ref_found, ref_km = measures[name]["heldout"]
        if heldout_km is not None:
            validation[name] = validate_instrument(inst, heldout, heldout_km, dict(craterless),
                                                   detected=(ref_found, ref_km))
        held.update({f"detect_rate_{name}": float(ref_found.mean()),
                     f"share_ge100_{name}": share_called(ref_found, ref_km, LARGE_KM),
                     f"share_ge150_{name}": share_called(ref_found, ref_km, HUGE_KM)})
        for m, per_seed in measures[name]["models"].items():
            figs = [size_figures(f, d, ref_found, ref_km) for f, d in per_seed]
            models.setdefault(m, {}).update({f"{k}_{name}": summarize([f[k] for f in figs]) for k in figs[0]})
    for m, cov in coverage.items():
        if cov and m in models:
            models[m]["coverage_ge100"] = {ex: summarize(v) for ex, v in cov.items()}
    held["n"] = int(len(heldout))
    if heldout_km is not None:
        held["share_ge100_true"] = share_large(heldout_km)
        held["share_ge150_true"] = share_large(heldout_km, threshold_km=HUGE_KM)
    return {"instruments": list(instruments), "validation": validation, "large_km": LARGE_KM, "huge_km": HUGE_KM,
            "heldout": held, "models": models}


_BETTER = {"coverage": 1, "recall": 1, "precision": 1, "density": 1, "vendi": 1, "mode_coverage": 1,
           "kid_mean": -1, "fid": -1, "mmd": -1}
"""The direction in which each compared metric improves."""


def texture_check(report: Mapping, *, base: str = BASE) -> dict[str, dict]:
    """Per model (not the base or a reference row), against the texture-only row: `behind_texture`, the metrics
    (every extractor's, each size instrument's W1, and the coverage of held-out craters ≥ 100 km in each
    extractor) on which the texture row's mean is better than the
    model's; with a base model, `wins`, those on which the model beats the base, split into `shared` (the
    texture row beats the base there too) and `own`, and `texture_only`: it has wins and all are shared, i.e.
    it gained texture, not craters."""
    models = report.get("models", {})
    if TEXTURE not in models:
        return {}
    sizes = (report.get("sizes") or {}).get("models", {})
    w1_keys = [f"w1_log10_{inst}" for inst in (report.get("sizes") or {}).get("instruments", [])]

    def better(m: str, ref: str) -> set[str]:
        """The metrics on which m's mean is better than ref's."""
        out = {f"{ex}/{k}" for ex, per in models[m].items() for k, sign in _BETTER.items()
               if k in per and k in models[ref].get(ex, {}) and sign * (per[k]["mean"] - models[ref][ex][k]["mean"]) > 0}
        if m in sizes and ref in sizes:
            out |= {f"sizes/{k}" for k in w1_keys if sizes[m][k]["mean"] < sizes[ref][k]["mean"]}
            cov, cov_ref = sizes[m].get("coverage_ge100", {}), sizes[ref].get("coverage_ge100", {})
            out |= {f"{ex}/coverage_ge100" for ex in cov if ex in cov_ref and cov[ex]["mean"] > cov_ref[ex]["mean"]}
        return out

    has_base = base in models
    tex = better(TEXTURE, base) if has_base else set()
    out = {}
    for m in models:
        if m == base or m in RESERVED:
            continue
        row: dict = {"behind_texture": sorted(better(TEXTURE, m))}
        if has_base:
            w = better(m, base)
            row.update(wins=sorted(w), shared=sorted(w & tex), own=sorted(w - tex),
                       texture_only=bool(w) and not (w - tex))
        out[m] = row
    return out


def detail_report(sets: Mapping[str, Sequence[Tensor]], heldout: Tensor) -> dict:
    """report["detail"]: per set the mean gradient magnitude G and the worst band's relative error of the
    radially averaged power spectrum against the held-out tiles' (over seeds), and the held-out tiles' G."""
    ref = radial_power_spectrum(heldout)
    out = {m: {"mean_gradient": summarize([mean_gradient(x) for x in xs]),
               "spectrum_deviation": summarize([spectrum_deviation(radial_power_spectrum(x), ref) for x in xs])}
           for m, xs in sets.items()}
    return {"heldout_mean_gradient": mean_gradient(heldout), "models": out}


def size_figures_and_grids(measures: Mapping[str, dict], sets: Mapping[str, Sequence[Tensor]], heldout: Tensor,
                           heldout_km: np.ndarray | None, groups: Mapping[str, Sequence[str]] | None,
                           out: Path) -> dict[str, Path]:
    """The size-frequency figures (cumulative and R-plot, per instrument) and, per instrument, a grid of the 32
    largest detected craters of the held-out tiles and of each set (its first seed), largest first."""
    images = size_plots({name: pool_sizes(meas["models"], groups) for name, meas in measures.items()},
                        {name: meas["heldout"] for name, meas in measures.items()}, heldout_km, out)
    for name, meas in measures.items():
        f, d = meas["heldout"]
        images[f"largest detected craters ({name}): held-out"] = largest_craters_grid(
            heldout, f, d, out / f"largest_{name}_heldout.png")
        for m, per in meas["models"].items():
            f, d = per[0]
            images[f"largest detected craters ({name}): {m}"] = largest_craters_grid(
                sets[m][0], f, d, out / f"largest_{name}_{_file_name(m)}.png")
    return images


def _realism_model(cfg: Config, run_dir: Path, device: torch.device):
    """The run's reward artifact if it exists and has a realism scorer, else None."""
    from reward import load
    from reward.build import artifact_path

    path = artifact_path(cfg, run_dir)
    if not (path / "reward.yaml").is_file():
        return None, path
    model = load(path, device=device)
    return (model if model.realism is not None else None), path


# ----------------------------------------------------------------------------------------------
# Model mode
# ----------------------------------------------------------------------------------------------

def pool_sizes(sizes: Mapping[str, list[Found]], groups: Mapping[str, Sequence[str]] | None) -> dict[str, list[Found]]:
    """The size figures' lines: with `groups` (name -> model names, e.g. a variant's training seeds), one pooled
    measurement per group, then every model in no group as it is (one per seed); without, `sizes` unchanged."""
    if not groups:
        return dict(sizes)
    grouped = {m for names in groups.values() for m in names}
    out = {g: [tuple(np.concatenate(parts) for parts in zip(*[fd for m in names for fd in sizes[m]]))]
           for g, names in groups.items()}
    return {**out, **{m: d for m, d in sizes.items() if m not in grouped}}


@dataclass
class EvalSplits:
    """What every stage of `evaluate_run` reads: the settings, where it writes, and the real splits."""
    cfg: Config
    run_dir: Path
    out: Path
    device: torch.device
    heldout: ImageSet
    train: ImageSet
    n_gen: int    # generated images per model and seed
    n_real: int   # held-out images per seed
    n_train: int  # train images per seed (the ceiling row)
    progress: bool = True

    def heldout_at(self, seed: int) -> Tensor:
        """The held-out images of sampling seed `seed` (its own subset when n < the split)."""
        return self.heldout.images[_subset(len(self.heldout), self.n_real, seed)]

    def train_at(self, seed: int) -> Tensor:
        return self.train.images[_subset(len(self.train), self.n_train, seed)]

    @property
    def heldout_km(self) -> np.ndarray | None:
        """The held-out tiles' catalogue diameters (km), None when the data carry none."""
        d = self.heldout.diameters_km
        return d.double().numpy() if d is not None else None


def eval_splits(cfg: Config, run_dir: Path, out: Path | None, progress: bool) -> EvalSplits:
    """Check the evaluation settings and the splits, create the report directory: all before any work."""
    check_eval(cfg.eval)
    out = Path(out) if out else run_dir / "eval"
    heldout, train = load_image_set(cfg.data, "heldout"), load_image_set(cfg.data, "train")
    ev = cfg.eval
    splits = EvalSplits(cfg, run_dir, out, resolve_device(cfg.device), heldout, train, ev.n, min(ev.n, len(heldout)),
                        min(ev.n, len(train)), progress)
    if min(splits.n_real, splits.n_train) < MIN_IMAGES:
        raise CraterdiffError(f"the held-out and train splits need at least {MIN_IMAGES} images each for the metrics, "
                              f"got {len(heldout)} and {len(train)}")
    report_dir(out)
    return splits


Samples = dict[str, dict[int, Tensor]]
"""{set name: {sampling seed: images (n, C, H, W)}}."""


def sample_models(sp: EvalSplits, models: Sequence[ModelSpec], timings: dict[str, float]) -> Samples:
    """Every model's images at every sampling seed (the same seeds for all), then the texture-only row: the seed's
    held-out subset phase-scrambled with that seed."""
    from rl.build import model_sampler

    samples: Samples = {}
    for spec in models:
        t0 = time.perf_counter()
        sample = model_sampler(sp.cfg, spec.path, sp.device)
        samples[spec.name] = {seed: sample(sp.n_gen, torch.Generator().manual_seed(int(seed))).cpu()
                              for seed in tqdm(sp.cfg.eval.seeds, desc=f"sampling {spec.name}",
                                               disable=not sp.progress, leave=False)}
        del sample
        timings[f"sample_{spec.name}_s"] = time.perf_counter() - t0
    samples[TEXTURE] = {seed: phase_scramble(sp.heldout_at(seed), torch.Generator().manual_seed(int(seed)))
                        for seed in sp.cfg.eval.seeds}
    return samples


@dataclass
class Scores:
    """Per set and extractor, the per-seed `evaluate_features` dicts and the coverage of the held-out craters
    ≥ 100 km; per extractor, the first seed's features for the t-SNE (held-out, {set: generated})."""
    per_seed: dict[str, dict[str, list[dict]]]
    coverage_large: dict[str, dict[str, list[float]]]
    tsne_sets: dict[str, tuple[Tensor, dict[str, Tensor]]]


def score_sets(sp: EvalSplits, extractors: Mapping, samples: Samples) -> Scores:
    """Every extractor, seed and set against the seed's held-out subset, plus the ceiling (the train split)."""
    from reward.features import extract_features

    ev, fb = sp.cfg.eval, sp.cfg.reward.features.batch_size
    large = (sp.heldout.diameters_km >= LARGE_KM) if sp.heldout.diameters_km is not None else None
    scores = Scores({m: {} for m in [*samples, CEILING]}, {m: {} for m in [*samples, CEILING]}, {})
    bar = tqdm(total=len(extractors) * len(ev.seeds), desc="metrics", disable=not sp.progress, leave=False)
    for ex_name, extractor in extractors.items():
        f_held = extract_features(extractor, sp.heldout.images, batch_size=fb)
        f_train = extract_features(extractor, sp.train.images, batch_size=fb)
        for seed in ev.seeds:
            held_idx = _subset(len(sp.heldout), sp.n_real, seed)
            real = f_held[held_idx]
            mask = large[held_idx] if large is not None and bool(large[held_idx].any()) else None
            kw = dict(features=ex_name, seed=int(seed), kid_subsets=ev.kid_subsets, n_modes=ev.n_modes)
            gens = {m: extract_features(extractor, s[seed], batch_size=fb) for m, s in samples.items()}
            ceiling = f_train[_subset(len(sp.train), sp.n_train, seed)]
            for m, g in {**gens, CEILING: ceiling}.items():
                scores.per_seed[m].setdefault(ex_name, []).append(evaluate_features(real, g, **kw))
                if mask is not None:
                    scores.coverage_large[m].setdefault(ex_name, []).append(subset_coverage(real, g, mask))
            if seed == ev.seeds[0]:
                scores.tsne_sets[ex_name] = (real, gens)
            bar.update(1)
        if sp.progress:
            tqdm.write(f"scored {len(samples)} models and the ceiling in {ex_name} features")
    bar.close()
    return scores


def realism_report(realism, samples: Samples, heldout: Tensor, craterless: Mapping[str, Tensor],
                   seeds: Sequence[int]) -> dict:
    """report["realism_logit"] (mean logit per set, over seeds, and the real held-out tiles') and
    report["realism_validation"], from the reward artifact's scorer."""
    validation = realism_validation(realism.realism_logits, heldout, craterless)
    logits = {m: summarize([float(realism.realism_logits(s[seed]).mean()) for seed in seeds]) for m, s in samples.items()}
    logits["heldout_real"] = summarize([validation["sets"]["real held-out"]["mean_logit"]])
    return {"realism_logit": logits, "realism_validation": validation}


def run_figures(sp: EvalSplits, models: Sequence[ModelSpec], samples: Samples, sets: Mapping[str, list[Tensor]],
                measures: Mapping[str, dict] | None, scores: Scores, groups: Mapping[str, Sequence[str]] | None
                ) -> dict[str, Path]:
    """Sample grids (held-out and each set, first seed), the size figures and largest-crater grids, the power
    spectrum, one t-SNE per extractor and each run's training curves; {caption: file}."""
    out, first = sp.out, sp.cfg.eval.seeds[0]
    curves = {FINETUNED: sp.run_dir / "metrics.csv"}
    for spec in models:
        if spec.name != BASE:
            curves.setdefault(spec.name, spec.path.parent / "metrics.csv")
    curves = {m: path for m, path in curves.items() if m in samples and path.is_file()}
    tsne = scores.tsne_sets if sp.cfg.eval.tsne else {}
    bar = tqdm(total=2 + len(samples) + (measures is not None) + len(tsne) + len(curves), desc="figures",
               disable=not sp.progress, leave=False)
    images = {"held-out craters (real)": save_image_grid(sp.heldout_at(first)[:64], out / "samples_heldout.png",
                                                         scale=2)}
    bar.update(1)
    for m, s in samples.items():
        images[f"samples: {m} (seed {first})"] = save_image_grid(s[first][:64], out / f"samples_{_file_name(m)}.png",
                                                                 scale=2)
        bar.update(1)
    if measures is not None:
        images.update(size_figures_and_grids(measures, sets, sp.heldout.images, sp.heldout_km, groups, out))
        bar.update(1)
    images["radially averaged power spectrum"] = spectrum_plot(
        {"held-out (real)": sp.heldout.images, **{m: torch.cat(xs) for m, xs in sets.items()}}, out / "spectrum.png")
    bar.update(1)
    for ex_name, (real, gens) in tsne.items():
        images[f"t-SNE, {ex_name} features (seed {first})"] = tsne_plot(
            real, gens, out / f"tsne_{_file_name(ex_name)}.png", seed=int(first),
            title=f"t-SNE of {ex_name} features (seed {first})")
        bar.update(1)
    for m, csv_path in curves.items():
        p = training_curves(csv_path, out / f"curves_{_file_name(m)}.png", title=f"training: {m} ({csv_path.parent})")
        if p is not None:
            images[f"training curves: {m}"] = p
        bar.update(1)
    bar.close()
    return images


def run_settings(sp: EvalSplits, models: Sequence[ModelSpec], extractors: Mapping, artifact: Path | None,
                 timings: Mapping[str, float]) -> dict:
    """report["settings"]: what was compared, with which settings, and how long each stage took."""
    cfg, ev = sp.cfg, sp.cfg.eval
    return {
        "config": cfg.name,
        "run_dir": str(sp.run_dir),
        "models": {s.name: str(s.path) for s in models},
        "reference": f"held-out split of data.source={cfg.data.source} ({len(sp.heldout)} images)",
        "ceiling": f"{CEILING}: the train split ({len(sp.train)} images, {sp.n_train} per seed) against the held-out "
                   f"split",
        "n_generated": sp.n_gen,
        "n_real": sp.n_real,
        "seeds": list(ev.seeds),
        "extractors": list(ev.extractors),
        "extractor_input_sizes": {k: e.input_size for k, e in extractors.items()},
        "kid_subsets": ev.kid_subsets,
        "n_modes": min(ev.n_modes, sp.n_real),
        "sampler": {"num_steps": cfg.sampler.num_steps, "eta": cfg.sampler.eta},
        "reward_extractor": cfg.reward.features.name,
        "realism_artifact": str(artifact) if artifact is not None else None,
        "device": str(sp.device),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }


def run_caveats(cfg: Config, realism_met: bool | None) -> list[str]:
    """report["caveats"]: how to read the reference rows, the reward's own feature space and the realism logit
    (`realism_met`: its validation's verdict; None without a scorer)."""
    caveats = [f"{CEILING} is the ceiling: real train craters against real held-out craters.",
               f"{TEXTURE} is the texture-only reference: the held-out tiles with their Fourier phases "
               f"scrambled (same texture, no crater). A model that beats the base only where this row "
               f"does as well has gained texture, not craters.",
               f"'{cfg.reward.features.name}' is the reward's own feature space: a gain seen only there may "
               f"be the reward being gamed; check the other extractors."]
    if realism_met is not None:
        caveats.append("realism logit: the reward artifact's scorer (trained on train-split craters vs. base "
                       "samples); heldout_real is its mean on the real held-out craters."
                       + ("" if realism_met else
                          " It calls craterless tiles real (validation table), so it is no judge of "
                          "craters, and a realism reward built on it would pay for texture."))
    return caveats


def evaluate_run(cfg: Config, models: Sequence[ModelSpec], *, out: Path | None = None, run_dir: Path | None = None,
                 progress: bool = True, groups: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Evaluate `models` against the held-out split as configured by `cfg.eval`; write the report to
    `out` (default <run_dir>/eval). Returns the report dict (also in out/report.json). `groups` (name -> model
    names) pools each group's models into one line of the size-frequency figures (`pool_sizes`)."""
    t_start = time.perf_counter()
    sp = eval_splits(cfg, run_dir or default_run_dir(cfg), out, progress)
    ev = cfg.eval
    extractors = {name: _build_extractor(cfg, name, sp.device) for name in ev.extractors}  # fail early on bad names
    timings: dict[str, float] = {}
    samples = sample_models(sp, models, timings)                                            # 1. samples
    t0 = time.perf_counter()
    scores = score_sets(sp, extractors, samples)                                            # 2. metrics
    timings["metrics_s"] = time.perf_counter() - t0
    report: dict = {"title": f"craterdiff evaluation: {cfg.name}",
                    "models": {m: {ex: _aggregate(rs) for ex, rs in per.items()} for m, per in scores.per_seed.items()}}
    # 3. crater sizes by each detector, against the held-out tiles measured by the same detector; fine detail
    t0 = time.perf_counter()
    sets = {m: [s[seed] for seed in ev.seeds] for m, s in samples.items()}
    sets[CEILING] = [sp.train_at(seed) for seed in ev.seeds]
    instruments, measures = instruments_for(sp.train), None
    craterless = craterless_sets(sp.heldout.images)  # the validation sets of the size instruments and the realism scorer
    if instruments is not None:
        measures = measure_sizes(instruments, sets, sp.heldout.images, progress=sp.progress)
        report["sizes"] = size_report(instruments, measures, sp.heldout.images, sp.heldout_km,
                                      {**craterless, **broken_rims(sp.heldout.images)}, scores.coverage_large)
    report["detail"] = detail_report(sets, sp.heldout.images)
    report["texture_check"] = texture_check(report)
    timings["sizes_s"] = time.perf_counter() - t0
    realism, artifact = _realism_model(cfg, sp.run_dir, sp.device)                          # 4. realism
    if realism is not None:
        report.update(realism_report(realism, samples, sp.heldout.images, craterless, ev.seeds))
    t0 = time.perf_counter()
    images = run_figures(sp, models, samples, sets, measures, scores, groups)              # 5. figures
    timings["figures_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    report["settings"] = run_settings(sp, models, extractors, artifact if realism is not None else None, timings)
    report["caveats"] = run_caveats(cfg, report["realism_validation"]["met"] if realism is not None else None)
    report["config"] = config_to_dict(cfg)
    write_report(sp.out, report, images)
    return report


REALISM_GOAL = 0.05
"""A realism judge calls at most this share of each craterless set real (logit > 0)."""


def realism_validation(logits, heldout: Tensor, craterless: Mapping[str, Tensor]) -> dict:
    """Can the realism scorer say "nothing here"? `logits`: images (N, C, H, W) -> (N,) logits. Per set (the
    real held-out tiles and each craterless set) the mean logit and the share called real (logit > 0, the
    scorer's decision rule); `met` when every craterless set has at most `REALISM_GOAL` called real."""
    sets = {"real held-out": heldout, **craterless}
    rows = {}
    for name, x in sets.items():
        s = logits(x).double()  # (N,)
        rows[name] = {"n": int(s.numel()), "mean_logit": float(s.mean()), "called_real": float((s > 0).double().mean())}
    met = all(rows[name]["called_real"] <= REALISM_GOAL for name in craterless)
    return {"sets": rows, "goal": REALISM_GOAL, "met": met}


# ----------------------------------------------------------------------------------------------
# Folder mode
# ----------------------------------------------------------------------------------------------

def score_folders(real_dir: Path, generated_dir: Path, out: Path, extractors: Mapping, ev: EvalConfig, seed: int,
                  large: Tensor | None) -> tuple[dict, dict, dict, dict[str, Path]]:
    """Both folders (3 channels at each extractor's input size) and the texture-only row in every extractor: returns
    report["models"], the coverage of the real craters ≥ 100 km per row (`large`: their mask, None without
    diameters), the image counts, and the sample grids and t-SNE plots."""
    from data.datasets import load_image_folder
    from reward.features import extract_features

    models: dict = {"generated": {}, TEXTURE: {}}
    coverage: dict = {"generated": {}, TEXTURE: {}}
    images: dict[str, Path] = {}
    counts: dict = {}
    for ex_name, extractor in extractors.items():
        size = extractor.input_size
        real_img, _ = load_image_folder(real_dir, size=size, channels=3)  # the same sorted files as real_files
        gen_img, _ = load_image_folder(generated_dir, size=size, channels=3)
        for what, x in (("--real", real_img), ("--generated", gen_img)):
            if x.shape[0] < MIN_IMAGES:
                raise CraterdiffError(f"{what} folder holds {x.shape[0]} readable images; the metrics need at least "
                                      f"{MIN_IMAGES}")
        counts = {"n_real": real_img.shape[0], "n_generated": gen_img.shape[0]}
        real = extract_features(extractor, real_img)
        rows = {"generated": extract_features(extractor, gen_img),
                TEXTURE: extract_features(extractor, phase_scramble(real_img, torch.Generator().manual_seed(seed)))}
        for name, gen in rows.items():
            r = evaluate_features(real, gen, features=ex_name, seed=seed, kid_subsets=ev.kid_subsets,
                                  n_modes=ev.n_modes)
            models[name][ex_name] = _aggregate([r])
            if large is not None and bool(large.any()):
                coverage[name][ex_name] = [subset_coverage(real, gen, large)]
        if not images:
            images["real"] = save_image_grid(real_img[:64], out / "samples_real.png")
            images["generated"] = save_image_grid(gen_img[:64], out / "samples_generated.png")
        if ev.tsne:
            images[f"t-SNE, {ex_name} features"] = tsne_plot(real, {"generated": rows["generated"]},
                                                             out / f"tsne_{_file_name(ex_name)}.png", seed=seed)
    return models, coverage, counts, images


def check_same_format(real_dir: Path, generated_dir: Path) -> None:
    """The two folders' most common image size and channel count agree (data.datasets.folder_format): otherwise every
    metric would also measure the resizing and the colour conversion."""
    from data.datasets import folder_format

    real, gen = folder_format(real_dir), folder_format(generated_dir)
    if real and gen and real != gen:
        def name(f): return f"{f[0]}x{f[1]} {'grayscale' if f[2] == 1 else 'colour'}"
        raise CraterdiffError(f"--real images are {name(real)} but --generated ones {name(gen)} (the most common of "
                              f"each): every metric would also measure the resizing and colour conversion; save both "
                              f"at one size and mode, or pass --allow-mismatch to score them anyway")


def evaluate_folders(real_dir: Path, generated_dir: Path, out: Path, *, features: Sequence[str],
                     ev: EvalConfig = EvalConfig(), device: str = "auto", seed: int = 0,
                     allow_mismatch: bool = False) -> dict:
    """Score the images of `generated_dir` against those of `real_dir` (all of each, loaded as 3 channels
    at each extractor's input size; sets of another size or channel count only with `allow_mismatch`) in
    every extractor of `features`; one row ("generated"). Writes grids, t-SNE (if `ev.tsne`) and the
    report to `out`."""
    from data.datasets import load_image_folder
    from reward.features import build_extractor

    t_start = time.perf_counter()
    if not features:
        raise CraterdiffError("--features: give at least one extractor name")
    if not allow_mismatch:
        check_same_format(real_dir, generated_dir)
    dev = resolve_device(device)
    report_dir(out)
    # every extractor first, so that a bad name fails before any image is read
    extractors = {n: build_extractor(n, input_size=ev.input_size, seed=seed, device=dev) for n in dict.fromkeys(features)}
    # crater sizes, when the real folder's metadata.csv gives each image's diameter: the instruments are
    # calibrated on the embedded Mars set's train split (the same 320 km tiles) and validated on the real folder
    real_small, real_files = load_image_folder(real_dir, size=32, channels=1)
    real_km, why = folder_diameters(real_dir, real_files)
    if real_km is None:
        tqdm.write(f"size figures skipped: {why} (columns file, diameter_km)")
    instruments = instruments_for(load_image_set(MARS_32, "train")) if real_km is not None else None
    large = torch.from_numpy(real_km >= LARGE_KM) if real_km is not None else None
    models, coverage, counts, images = score_folders(real_dir, generated_dir, out, extractors, ev, seed, large)
    report: dict = {"title": f"craterdiff evaluation: {generated_dir} vs {real_dir}", "models": models}
    gen_small, _ = load_image_folder(generated_dir, size=32, channels=1)
    sets = {"generated": [gen_small], TEXTURE: [phase_scramble(real_small, torch.Generator().manual_seed(seed))]}
    if instruments is not None:
        measures = measure_sizes(instruments, sets, real_small)
        report["sizes"] = size_report(instruments, measures, real_small, real_km,
                                      {**craterless_sets(real_small, seed=seed), **broken_rims(real_small, seed=seed)},
                                      coverage)
        images.update(size_figures_and_grids(measures, sets, real_small, real_km, None, out))
    else:
        report["sizes_skipped"] = why
    report["detail"] = detail_report(sets, real_small)
    report["texture_check"] = texture_check(report)
    images["radially averaged power spectrum"] = spectrum_plot(
        {"real": real_small, **{m: xs[0] for m, xs in sets.items()}}, out / "spectrum.png")
    report["settings"] = {"real": str(real_dir), "generated": str(generated_dir), **counts,
                          "extractors": list(dict.fromkeys(features)), "kid_subsets": ev.kid_subsets,
                          "n_modes": min(ev.n_modes, counts["n_real"]), "seed": seed, "device": str(dev),
                          "timings_s": {"total_s": round(time.perf_counter() - t_start, 2)}}
    report["caveats"] = ["One set each, all images of each folder: no spread over seeds; compare only at equal n.",
                         f"{TEXTURE}: the real folder's images with their Fourier phases scrambled (same texture, "
                         f"no crater), scored like the generated folder."]
    if instruments is None:
        report["caveats"].append(f"Crater-size figures skipped: {why}.")
    write_report(out, report, images)
    return report
