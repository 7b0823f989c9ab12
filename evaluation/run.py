"""The evaluation run behind `scripts.eval`: sample models, extract features, score, write a report.

Two entry points:

* `evaluate_run(cfg, models=..., out=...)`: for every sampling seed in `cfg.eval.seeds`, draw
  `cfg.eval.n` images from each model with the same seed; score each set against the held-out split
  (`load_image_set(cfg.data, "heldout")`, min(n, size) images) in every extractor of
  `cfg.eval.extractors`; add the ceiling row (the train split against the held-out split, real vs.
  real) and, when the run's reward artifact has a realism scorer, the mean realism logit per model;
  write sample grids, one t-SNE per extractor, training curves and report.json/.md/.html.
* `evaluate_folders(real_dir, generated_dir, out)`: any two image folders, no model, one row.

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

from data.sources import ImageSet, load_image_set
from evaluation.metrics import METRIC_KEYS, evaluate_features
from evaluation.report import size_plots, training_curves, tsne_plot, write_report
from evaluation.sizes import (LARGE_KM, META_FILE, SizeEstimator, TemplateInstrument, fit_size_estimator,
                              folder_diameters, images_sha256, load_size_estimator, save_size_estimator, share_large,
                              size_figures, subset_coverage, template_instrument)
from utils import (PROJECT_ROOT, Config, CraterdiffError, DataConfig, EvalConfig, config_to_dict, resolve_device,
                   resolve_path, save_image_grid)

__all__ = ["CEILING", "BASE", "FINETUNED", "ModelSpec", "parse_model_args", "resolve_models", "summarize",
           "pool_sizes", "evaluate_run", "evaluate_folders", "default_run_dir"]

BASE, FINETUNED = "base", "finetuned"
CEILING = "train_split"
"""Name of the ceiling row: the train split scored against the held-out split (real vs. real)."""
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
        if not _NAME.match(name) or name == CEILING:
            raise CraterdiffError(f"--model '{item}': the name must be letters, digits, '_', '.' or '-' and not "
                                  f"'{CEILING}' (the ceiling row)")
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
"""The embedded crater set at 32 px: the size instrument's training set in folder mode."""


def size_estimator(train: ImageSet, heldout: ImageSet, path: Path) -> SizeEstimator | None:
    """The crater-size estimator at `path` (checksum-verified, and fitted on these train craters), else
    fitted on the train split's diameters, validated on the held-out split and saved there; None when
    the data carry no diameters (`data.source` other than mars)."""
    if train.diameters_km is None or heldout.diameters_km is None:
        return None
    d_train = train.diameters_km.double().numpy()
    if (path / META_FILE).is_file():
        est = load_size_estimator(path)
        if est.train_sha256 != images_sha256(train.images, d_train):
            raise CraterdiffError(f"the size estimator in '{path}' was fitted on other train craters; delete it to "
                                  f"fit it on these")
        return est
    est = fit_size_estimator(train.images, d_train, heldout.images, heldout.diameters_km.double().numpy())
    save_size_estimator(est, path)
    return est


@dataclass
class SizeMeasure:
    """One instrument's sizes D̂ km: of every model's samples per seed, and of the held-out craters."""
    models: dict[str, list[np.ndarray]]
    heldout: np.ndarray


def measure_sizes(instrument, sets: Mapping[str, Sequence[Tensor]], heldout: Tensor) -> SizeMeasure:
    """`instrument.predict_km` of every model's image sets and of the held-out craters."""
    return SizeMeasure({m: [instrument.predict_km(x) for x in xs] for m, xs in sets.items()},
                       instrument.predict_km(heldout))


def _size_report(est: SizeEstimator, path: Path, ridge: SizeMeasure, tm: TemplateInstrument, templates: SizeMeasure,
                 heldout_true: np.ndarray | None, coverage: dict[str, dict[str, list[float]]]) -> dict:
    """report["sizes"]: both instruments' validations, the held-out shares, and per model the size
    figures over seeds (`size_figures` against the held-out craters' sizes by the same instrument; the
    template matcher's with the suffix `_templates`) and coverage of the large craters."""
    models = {}
    for m in ridge.models:
        for measure, suffix in ((ridge, ""), (templates, "_templates")):
            figs = [size_figures(d, measure.heldout) for d in measure.models[m]]
            models.setdefault(m, {}).update({k + suffix: summarize([f[k] for f in figs]) for k in figs[0]})
        if coverage.get(m):
            models[m]["coverage_ge100"] = {ex: summarize(v) for ex, v in coverage[m].items()}
    held = {"n": int(len(ridge.heldout)), "share_ge100_estimated": share_large(ridge.heldout),
            "share_ge100_templates": share_large(templates.heldout)}
    if heldout_true is not None:
        held["share_ge100_true"] = share_large(heldout_true)
    return {"estimator": {"path": str(path), "r2_log10": est.heldout_r2, "mae_log10": est.heldout_mae,
                          "n_train": est.n_train, "n_heldout": est.n_heldout, "ridge_alpha": est.alpha,
                          "train_sha256": est.train_sha256},
            "templates": {"light_azimuth_deg": tm.matcher.azimuth_deg, "light_elevation_deg": tm.matcher.elevation_deg,
                          "light_peak_ncc": tm.light_peak_ncc, "r2_log10": tm.heldout_r2, "mae_log10": tm.heldout_mae,
                          "spearman": tm.heldout_spearman, "n_heldout": tm.n_heldout},
            "large_km": LARGE_KM, "heldout": held, "models": models}


def _check_eval_config(ev: EvalConfig) -> None:
    if not ev.seeds:
        raise CraterdiffError("eval.seeds is empty: give at least one sampling seed, e.g. --set eval.seeds=[0,1,2]")
    if not ev.extractors:
        raise CraterdiffError("eval.extractors is empty: give at least one, e.g. --set eval.extractors=[random_cnn]")
    for key, seq in (("eval.seeds", ev.seeds), ("eval.extractors", ev.extractors)):
        if len(set(seq)) != len(seq):
            raise CraterdiffError(f"{key} has duplicates: {list(seq)}")


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

def pool_sizes(sizes: Mapping[str, list[np.ndarray]], groups: Mapping[str, Sequence[str]] | None
               ) -> dict[str, list[np.ndarray]]:
    """The size figures' lines: with `groups` (name -> model names, e.g. a variant's training seeds), one pooled
    array per group, then every model in no group as it is (one array per seed); without, `sizes` unchanged."""
    if not groups:
        return dict(sizes)
    grouped = {m for names in groups.values() for m in names}
    out = {g: [np.concatenate([d for m in names for d in sizes[m]])] for g, names in groups.items()}
    return {**out, **{m: d for m, d in sizes.items() if m not in grouped}}


def evaluate_run(cfg: Config, models: Sequence[ModelSpec], *, out: Path | None = None, run_dir: Path | None = None,
                 progress: bool = True, groups: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Evaluate `models` against the held-out split as configured by `cfg.eval`; write the report to
    `out` (default <run_dir>/eval). Returns the report dict (also in out/report.json). `groups` (name -> model
    names) pools each group's models into one line of the size-frequency figures (`pool_sizes`)."""
    from reward.features import extract_features
    from rl.build import model_sampler

    t_start = time.perf_counter()
    ev = cfg.eval
    _check_eval_config(ev)
    run_dir = run_dir or default_run_dir(cfg)
    out = Path(out) if out else run_dir / "eval"
    device = resolve_device(cfg.device)
    heldout = load_image_set(cfg.data, "heldout")
    train = load_image_set(cfg.data, "train")
    n_gen, n_real, n_train = ev.n, min(ev.n, len(heldout)), min(ev.n, len(train))
    if min(n_real, n_train) < MIN_IMAGES:
        raise CraterdiffError(f"the held-out and train splits need at least {MIN_IMAGES} images each for the metrics, "
                              f"got {len(heldout)} and {len(train)}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CraterdiffError(f"cannot write to the report directory '{out}' ({e.strerror}); choose another --out") \
            from None
    extractors = {name: _build_extractor(cfg, name, device) for name in ev.extractors}  # fail early on bad names
    sizer = size_estimator(train, heldout, out / "size_estimator")
    matcher = (template_instrument(train.images, heldout.images, heldout.diameters_km.double().numpy())
               if sizer is not None else None)
    large = (heldout.diameters_km >= LARGE_KM) if heldout.diameters_km is not None else None

    # 1. samples: every model, every seed, the same seeds
    timings: dict[str, float] = {}
    samples: dict[str, dict[int, Tensor]] = {}
    for spec in models:
        t0 = time.perf_counter()
        sample = model_sampler(cfg, spec.path, device)
        samples[spec.name] = {}
        for seed in tqdm(ev.seeds, desc=f"sampling {spec.name}", disable=not progress, leave=False):
            samples[spec.name][seed] = sample(n_gen, torch.Generator().manual_seed(int(seed))).cpu()
        del sample
        timings[f"sample_{spec.name}_s"] = time.perf_counter() - t0

    # 2. metrics: every extractor, seed, model; plus the ceiling (train split vs held-out)
    t0 = time.perf_counter()
    per_seed: dict[str, dict[str, list[dict]]] = {m: {} for m in [*samples, CEILING]}
    coverage_large: dict[str, dict[str, list[float]]] = {m: {} for m in [*samples, CEILING]}
    tsne_sets: dict[str, tuple[Tensor, dict[str, Tensor]]] = {}
    fb = cfg.reward.features.batch_size
    for ex_name, extractor in extractors.items():
        f_held = extract_features(extractor, heldout.images, batch_size=fb)
        f_train = extract_features(extractor, train.images, batch_size=fb)
        for seed in ev.seeds:
            held_idx = _subset(len(heldout), n_real, seed)
            real = f_held[held_idx]
            mask = large[held_idx] if large is not None and bool(large[held_idx].any()) else None
            kw = dict(features=ex_name, seed=int(seed), kid_subsets=ev.kid_subsets, n_modes=ev.n_modes)
            gens = {m: extract_features(extractor, s[seed], batch_size=fb) for m, s in samples.items()}
            ceiling = f_train[_subset(len(train), n_train, seed)]
            for m, g in {**gens, CEILING: ceiling}.items():
                per_seed[m].setdefault(ex_name, []).append(evaluate_features(real, g, **kw))
                if mask is not None:
                    coverage_large[m].setdefault(ex_name, []).append(subset_coverage(real, g, mask))
            if seed == ev.seeds[0]:
                tsne_sets[ex_name] = (real, gens)
        if progress:
            tqdm.write(f"scored {len(samples)} models and the ceiling in {ex_name} features")
    timings["metrics_s"] = time.perf_counter() - t0

    report: dict = {
        "title": f"craterdiff evaluation: {cfg.name}",
        "models": {m: {ex: _aggregate(rs) for ex, rs in per.items()} for m, per in per_seed.items()},
    }

    # 3. crater sizes by both instruments, each against the held-out craters' sizes by the same instrument
    ridge = None
    if sizer is not None:
        sets = {m: [s[seed] for seed in ev.seeds] for m, s in samples.items()}
        sets[CEILING] = [train.images[_subset(len(train), n_train, seed)] for seed in ev.seeds]
        ridge, templates = measure_sizes(sizer, sets, heldout.images), measure_sizes(matcher, sets, heldout.images)
        report["sizes"] = _size_report(sizer, out / "size_estimator", ridge, matcher, templates,
                                       heldout.diameters_km.double().numpy(), coverage_large)

    # 4. realism logits (the run's reward artifact)
    realism, artifact = _realism_model(cfg, run_dir, device)
    if realism is not None:
        rl_logits = {m: summarize([float(realism.realism_logits(s[seed]).mean()) for seed in ev.seeds])
                     for m, s in samples.items()}
        rl_logits["heldout_real"] = summarize([float(realism.realism_logits(heldout.images).mean())])
        report["realism_logit"] = rl_logits

    # 5. figures
    t0 = time.perf_counter()
    images: dict[str, Path] = {}
    first = ev.seeds[0]
    images["held-out craters (real)"] = save_image_grid(heldout.images[_subset(len(heldout), n_real, first)][:64],
                                                        out / "samples_heldout.png", scale=2)
    for m, s in samples.items():
        images[f"samples: {m} (seed {first})"] = save_image_grid(s[first][:64], out / f"samples_{_file_name(m)}.png",
                                                                 scale=2)
    if ridge is not None:
        images.update(size_plots(pool_sizes(ridge.models, groups), heldout.diameters_km.double().numpy(),
                                 ridge.heldout, out))
    if ev.tsne:
        for ex_name, (real, gens) in tsne_sets.items():
            images[f"t-SNE, {ex_name} features (seed {first})"] = tsne_plot(
                real, gens, out / f"tsne_{_file_name(ex_name)}.png", seed=int(first),
                title=f"t-SNE of {ex_name} features (seed {first})")
    curves = {FINETUNED: run_dir / "metrics.csv"}
    for spec in models:
        if spec.name != BASE:
            curves.setdefault(spec.name, spec.path.parent / "metrics.csv")
    for m, csv_path in curves.items():
        if m in samples and csv_path.is_file():
            p = training_curves(csv_path, out / f"curves_{_file_name(m)}.png", title=f"training: {m} ({csv_path.parent})")
            if p is not None:
                images[f"training curves: {m}"] = p
    timings["figures_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    report["settings"] = {
        "config": cfg.name,
        "run_dir": str(run_dir),
        "models": {s.name: str(s.path) for s in models},
        "reference": f"held-out split of data.source={cfg.data.source} ({len(heldout)} images)",
        "ceiling": f"{CEILING}: the train split ({len(train)} images, {n_train} per seed) against the held-out split",
        "n_generated": n_gen,
        "n_real": n_real,
        "seeds": list(ev.seeds),
        "extractors": list(ev.extractors),
        "extractor_input_sizes": {k: e.input_size for k, e in extractors.items()},
        "kid_subsets": ev.kid_subsets,
        "n_modes": min(ev.n_modes, n_real),
        "sampler": {"num_steps": cfg.sampler.num_steps, "eta": cfg.sampler.eta},
        "reward_extractor": cfg.reward.features.name,
        "realism_artifact": str(artifact) if realism is not None else None,
        "device": str(device),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    report["caveats"] = [f"{CEILING} is the ceiling: real train craters against real held-out craters.",
                         f"'{cfg.reward.features.name}' is the reward's own feature space: a gain seen only there may "
                         f"be the reward being gamed; check the other extractors."]
    if realism is not None:
        report["caveats"].append("realism logit: the reward artifact's scorer (trained on train-split craters vs. base "
                                 "samples); heldout_real is its mean on the real held-out craters.")
    report["config"] = config_to_dict(cfg)
    write_report(out, report, images)
    return report


# ----------------------------------------------------------------------------------------------
# Folder mode
# ----------------------------------------------------------------------------------------------

def evaluate_folders(real_dir: Path, generated_dir: Path, out: Path, *, features: Sequence[str],
                     ev: EvalConfig = EvalConfig(), device: str = "auto", seed: int = 0) -> dict:
    """Score the images of `generated_dir` against those of `real_dir` (all of each, any size, RGB or
    grayscale: loaded as 3 channels at each extractor's input size) in every extractor of
    `features`; one row ("generated"). Writes grids, t-SNE (if `ev.tsne`) and the report to `out`."""
    from data.datasets import load_image_folder
    from reward.features import build_extractor, extract_features

    t_start = time.perf_counter()
    if not features:
        raise CraterdiffError("--features: give at least one extractor name")
    dev = resolve_device(device)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CraterdiffError(f"cannot write to the report directory '{out}' ({e.strerror}); choose another --out") \
            from None
    report: dict = {"title": f"craterdiff evaluation: {generated_dir} vs {real_dir}", "models": {"generated": {}}}
    images: dict[str, Path] = {}
    counts = {}
    # every extractor first, so that a bad name fails before any image is read
    extractors = {n: build_extractor(n, input_size=ev.input_size, seed=seed, device=dev) for n in dict.fromkeys(features)}
    # crater sizes, when the real folder's metadata.csv gives each image's diameter: the instrument is the
    # estimator fitted on the embedded Mars set's train split (the same 320 km tiles), also validated on
    # the real folder's catalogue diameters
    real_small, real_files = load_image_folder(real_dir, size=32, channels=1)
    real_km, why = folder_diameters(real_dir, real_files)
    sizer = coverage = None
    if real_km is None:
        tqdm.write(f"size figures skipped: {why} (columns file, diameter_km)")
    else:
        mars_train, mars_heldout = load_image_set(MARS_32, "train"), load_image_set(MARS_32, "heldout")
        sizer = size_estimator(mars_train, mars_heldout, out / "size_estimator")
        matcher = template_instrument(mars_train.images, mars_heldout.images,
                                      mars_heldout.diameters_km.double().numpy())
        coverage = {"generated": {}}
        large = torch.from_numpy(real_km >= LARGE_KM)
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
        gen = extract_features(extractor, gen_img)
        r = evaluate_features(real, gen, features=ex_name, seed=seed, kid_subsets=ev.kid_subsets, n_modes=ev.n_modes)
        report["models"]["generated"][ex_name] = _aggregate([r])
        if coverage is not None and bool(large.any()):
            coverage["generated"][ex_name] = [subset_coverage(real, gen, large)]
        if not images:
            images["real"] = save_image_grid(real_img[:64], out / "samples_real.png")
            images["generated"] = save_image_grid(gen_img[:64], out / "samples_generated.png")
        if ev.tsne:
            images[f"t-SNE, {ex_name} features"] = tsne_plot(real, {"generated": gen},
                                                             out / f"tsne_{_file_name(ex_name)}.png", seed=seed)
    if sizer is not None:
        gen_small, _ = load_image_folder(generated_dir, size=32, channels=1)
        ridge = measure_sizes(sizer, {"generated": [gen_small]}, real_small)
        templates = measure_sizes(matcher, {"generated": [gen_small]}, real_small)
        report["sizes"] = _size_report(sizer, out / "size_estimator", ridge, matcher, templates, real_km, coverage)
        r2, mae = sizer.validate(real_small, real_km)
        r2_t, mae_t = matcher.validate(real_small, real_km)
        report["sizes"]["real_folder_validation"] = {"r2_log10": r2, "mae_log10": mae, "r2_log10_templates": r2_t,
                                                     "mae_log10_templates": mae_t, "n": int(len(real_km))}
        images.update(size_plots(ridge.models, real_km, ridge.heldout, out))
    else:
        report["sizes_skipped"] = why
    report["settings"] = {"real": str(real_dir), "generated": str(generated_dir), **counts,
                          "extractors": list(dict.fromkeys(features)), "kid_subsets": ev.kid_subsets,
                          "n_modes": min(ev.n_modes, counts["n_real"]), "seed": seed, "device": str(dev),
                          "timings_s": {"total_s": round(time.perf_counter() - t_start, 2)}}
    report["caveats"] = ["One set each, all images of each folder: no spread over seeds; compare only at equal n."]
    if sizer is None:
        report["caveats"].append(f"Crater-size figures skipped: {why}.")
    write_report(out, report, images)
    return report
