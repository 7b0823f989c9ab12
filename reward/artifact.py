"""The frozen reward model: build it from reference images, save it as a directory, load it exactly.

Artifact directory:

| file | holds |
|---|---|
| `reward.yaml` | format, extractor (name, input size, path, seed, dim), weights, bandwidth, GP noise, PCA and kNN settings, OT settings, the coverage reward's ball edge, reference description, realism metrics, SHA-256 of every file below |
| `reference_features.npy` | φ(Y), (m, D) float64, loaded with allow_pickle=False |
| `reference_sizes.npy` | s(Y), (m,) float64: the reference craters' log10 sizes by the template detector (reward/templates.py), `NO_CRATER_LOG10` where it finds none |
| `reference_sizes_arcs.npy` | the same by the opposite-arcs rim test (reward/rims.py, `ARCS`, κ = 1: the reward compares sizes measured alike, so the scale cancels) |
| `pca.npz` | the PCA fitted on φ(Y) (mean, components, explained variance), allow_pickle=False |
| `realism.safetensors` | the realism CNN (only when trained) |

Calling the model on images gives `RewardOutput(rewards, components, values)`, which also unpacks
as `rewards, components = model(images)`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch
import yaml
from torch import Tensor

from config import RewardConfig
from reward.composite import composite_reward
from reward.features import FeatureExtractor, build_extractor, extract_features
from reward.metrics import PCA, fid_loo, fit_pca, gp_mi_loo, knn_entropy_loo, knn_radii, median_bandwidth, \
    mmd2_unbiased_loo, ot_rewards, pairwise_sq_dists, soft_coverage_loo
from reward.realism import RealismCNN, load_realism, realism_logits, save_realism
from reward.rims import ARCS, RimDetector
from reward.templates import LOG10_STEP, NO_CRATER_LOG10, TemplateMatcher, calibrated_matcher
from basics import CraterdiffError
from utils import atomic_directory, save_array

REWARD_ARTIFACT_VERSION = 3
DIVERSITY_COMPONENTS = ("mmd", "mi", "knn_entropy", "fid", "ot", "coverage", "size")
COVERAGE_K = 5
"""k of the reference points' k-NN radii in the `coverage` component (as in the density/coverage metrics)."""
COMPONENTS = DIVERSITY_COMPONENTS + ("realism",)
FILES = ("reference_features.npy", "reference_sizes.npy", "reference_sizes_arcs.npy", "pca.npz", "realism.safetensors")
SIZE_DETECTORS = ("templates", "arcs")
"""The size reward's crater detectors (`reward.size_detector`)."""


@dataclass
class RewardOutput:
    """rewards: (n,) composite reward; components: per-sample reward of each component (n,),
    higher = better; values: each component's set-level statistic (MMD², MI, entropy, FID, OT cost,
    soft coverage, MMD² of the log sizes, mean realism logit) for logging."""
    rewards: Tensor
    components: dict[str, Tensor]
    values: dict[str, float] = field(default_factory=dict)

    def __iter__(self) -> Iterator:
        yield self.rewards
        yield self.components


class RewardModel:
    """images (n, C, H, W) in [-1, 1] -> RewardOutput, frozen.

    Set-level components are computed on the whole batch against the reference features φ(Y);
    each sample is credited its leave-one-out marginal (OT: minus the cost it carries). The `size`
    component is the MMD of the batch's log crater sizes s = log10 d̂(x) to the reference's, a 1-d space in
    which only the crater's size counts, by the detector `size_detector` names: the template detector `sizer`,
    or the opposite-arcs rim test (`arcs_reference`, the reference's sizes by it, and `arcs_bandwidth`).

    Only the components in `computed` are computed: those with a positive weight and those named
    in `log` (None: every component the artifact can give, for inspecting a model by hand).
    """

    def __init__(self, *, extractor: FeatureExtractor, reference: Tensor, bandwidth: float, pca: PCA,
                 weights: dict[str, float], mi_noise: float, knn_k: int, ot_method: str, ot_reg: float,
                 sizer: TemplateMatcher, size_reference: Tensor, size_bandwidth: float,
                 ot_match: str = "full", realism: RealismCNN | None = None, info: dict | None = None,
                 log: Iterable[str] | None = None, coverage_softness: float = RewardConfig.coverage_softness,
                 arcs_reference: Tensor | None = None, arcs_bandwidth: float | None = None,
                 size_detector: str = "templates", size_bandwidth_scale: float = 1.0):
        self.extractor = extractor
        self.reference = reference.double()  # φ(Y): (m, D)
        self.bandwidth = float(bandwidth)
        if size_detector not in SIZE_DETECTORS:
            raise CraterdiffError(f"unknown size detector {size_detector!r}; choose one of {', '.join(SIZE_DETECTORS)}")
        if size_detector == "arcs" and arcs_reference is None:
            raise CraterdiffError("reward.size_detector: arcs but the artifact holds no reference sizes by arcs; "
                                  "rebuild it (scripts.train_reward_model)")
        self.sizer, self.size_detector = sizer, size_detector
        self.template_reference, self.template_bandwidth = size_reference.double(), float(size_bandwidth)
        self.arcs_reference = None if arcs_reference is None else arcs_reference.double()
        self.arcs_bandwidth = None if arcs_bandwidth is None else float(arcs_bandwidth)
        arcs = size_detector == "arcs"
        self.size_reference = self.arcs_reference if arcs else self.template_reference  # log10 d̂(Y): (m,)
        self.size_bandwidth_scale = float(size_bandwidth_scale)
        self.size_bandwidth = self.size_bandwidth_scale * (self.arcs_bandwidth if arcs else self.template_bandwidth)
        self.size_instrument = RimDetector(**ARCS) if arcs else sizer
        self.pca = pca
        self.reference_pca = pca.project(self.reference)  # (m, k)
        ref_dists = pairwise_sq_dists(self.reference, self.reference).clamp_min(0).sqrt()  # (m, m)
        self.coverage_radii = knn_radii(ref_dists, min(COVERAGE_K, self.reference.shape[0] - 1))  # (m,)
        self.coverage_softness = float(coverage_softness)
        self.weights = dict(weights)
        self.mi_noise, self.knn_k = float(mi_noise), int(knn_k)
        self.ot_method, self.ot_reg = ot_method, float(ot_reg)
        if ot_match not in ("full", "minibatch"):
            raise CraterdiffError(f"OT match must be 'full' or 'minibatch', got {ot_match!r}")
        self.ot_match = ot_match
        self._generator = torch.Generator().manual_seed(0)  # reference subsets when no generator is passed
        self.realism = realism
        self.info = dict(info or {})
        if self.weights.get("realism", 0) > 0 and realism is None:
            raise CraterdiffError("reward.weights.realism > 0 but the artifact has no realism scorer; rebuild it "
                                  "with reward.realism.enabled: true")
        unknown = sorted(set(log or ()) - set(COMPONENTS))
        if unknown:
            raise CraterdiffError(f"reward.log names unknown components {unknown}; choose from {list(COMPONENTS)}")
        if log is not None and "realism" in log and realism is None:
            raise CraterdiffError("reward.log names realism but the artifact has no realism scorer; rebuild it with "
                                  "reward.realism.enabled: true or drop realism from reward.log")
        available = [c for c in COMPONENTS if c != "realism" or realism is not None]
        wanted = set(available if log is None else log) | {c for c, w in self.weights.items() if w > 0}
        self.computed = tuple(c for c in COMPONENTS if c in wanted)

    @property
    def extractor_name(self) -> str:
        return self.extractor.name

    def features(self, images: Tensor, *, batch_size: int = 64) -> Tensor:
        """φ(X): (n, D) float64 on the CPU."""
        return extract_features(self.extractor, images, batch_size=batch_size).double()

    def sizes(self, images: Tensor) -> Tensor:
        """s (n,) float64: log10 d̂(x), the crater diameter the size detector finds as a fraction of the tile
        width, or NO_CRATER_LOG10 where it finds none (texture alone then matches no reference size)."""
        return detected_log_sizes(self.size_instrument, images)

    def realism_logits(self, images: Tensor) -> Tensor:
        """(n,) logits of the realism scorer (higher = more like the reference craters)."""
        if self.realism is None:
            raise CraterdiffError("this reward artifact has no realism scorer")
        return realism_logits(self.realism, images).double()

    def ot_reference(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """The reference the batch is transported onto: all of φ(Y) (m, D) for `ot_match: full`, or a
        uniformly random subset of min(n, m) rows for `minibatch` (drawn from `generator`, a CPU
        torch.Generator, or the model's own when None).

        Why minibatch: with n < m and uniform marginals each sample carries mass to ~m/n references,
        and the plan's optimum puts it at their barycentre, between real craters; against n
        references the exact plan is a permutation (Birkhoff), so each sample is pulled toward one
        real crater, and the random subsets keep every reference in play across batches (minibatch
        OT, Fatras et al. 2020).
        """
        m = self.reference.shape[0]
        if self.ot_match == "full" or n >= m:
            return self.reference
        idx = torch.randperm(m, generator=generator or self._generator)[:n]
        return self.reference[idx.to(self.reference.device)]

    def score(self, feats: Tensor, *, sizes: Tensor | None = None, realism: Tensor | None = None,
              generator: torch.Generator | None = None) -> RewardOutput:
        """The reward of a batch from its features φ(X) (n, D) and, optionally, log sizes (n,)
        (`sizes`) and realism logits (n,): each component in `computed` whose input is given.

        `generator` draws the OT reference subset when `ot_match` is 'minibatch' (see `ot_reference`).
        With several processes, gather every process's features first: the components are
        set-level, so they must see the whole batch (docs/design.md, "Rewards").
        """
        x = feats.double()
        if x.shape[0] < max(4, self.knn_k + 2):
            raise CraterdiffError(f"a reward batch needs at least {max(4, self.knn_k + 2)} images for the set-level "
                                  f"metrics, got {x.shape[0]}")
        for name, given in (("size", sizes), ("realism", realism)):
            if given is None and self.weights.get(name, 0) > 0:
                raise CraterdiffError(f"the {name} component has a positive weight: pass `{name}=` to score")
        want = set(self.computed)
        z = self.pca.project(x) if want & {"knn_entropy", "fid"} else None  # (n, k)
        metrics = {
            "mmd": lambda: mmd2_unbiased_loo(x, self.reference, bandwidth=self.bandwidth),
            "mi": lambda: gp_mi_loo(x, bandwidth=self.bandwidth, noise=self.mi_noise),
            "knn_entropy": lambda: knn_entropy_loo(z, k=self.knn_k),
            "fid": lambda: fid_loo(z, self.reference_pca),
            "ot": lambda: ot_rewards(x, self.ot_reference(x.shape[0], generator=generator), method=self.ot_method,
                                     reg=self.ot_reg),
            "coverage": lambda: soft_coverage_loo(x, self.reference, radii=self.coverage_radii,
                                                  softness=self.coverage_softness),
            "size": lambda: mmd2_unbiased_loo(sizes.double()[:, None], self.size_reference[:, None],
                                              bandwidth=self.size_bandwidth),
        }
        results = {name: f() for name, f in metrics.items() if name in want and (name != "size" or sizes is not None)}
        components = {name: r.rewards.double() for name, r in results.items()}
        values = {name: float(r.value) for name, r in results.items()}
        if realism is not None and "realism" in want:
            components["realism"] = realism.double()
            values["realism"] = float(realism.double().mean())
        return RewardOutput(composite_reward(components, self.weights), components, values)

    def __call__(self, images: Tensor, *, generator: torch.Generator | None = None) -> RewardOutput:
        sizes = self.sizes(images) if "size" in self.computed else None
        logits = self.realism_logits(images) if "realism" in self.computed else None
        return self.score(self.features(images), sizes=sizes, realism=logits, generator=generator)


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------

def detected_log_sizes(sizer: TemplateMatcher | RimDetector, images: Tensor) -> Tensor:
    """s (n,) float64: log10 d̂ where the detector finds a crater, NO_CRATER_LOG10 elsewhere."""
    det = sizer.detect(images)
    return torch.where(det.found, det.log10_fraction, torch.full_like(det.log10_fraction, NO_CRATER_LOG10))


def check_reference(images: Tensor) -> None:
    """A reference a reward can be fitted to: at least 8 images, and at most half of its pairs exact duplicates
    (more, and the median pairwise distance, the kernels' bandwidth, is 0). images: (m, C, H, W)."""
    m = images.shape[0]
    if m < 8:
        raise CraterdiffError(f"the reward reference needs at least 8 images, got {m}: add reference images")
    _, counts = torch.unique(images.flatten(1), dim=0, return_counts=True)  # (distinct,)
    duplicate_pairs, pairs = int((counts * (counts - 1) // 2).sum()), m * (m - 1) // 2
    if 2 * duplicate_pairs > pairs:
        raise CraterdiffError(f"the reward reference has {m} images but only {counts.numel()} distinct: most pairs "
                              f"are duplicates, so the kernel bandwidth (their median distance) would be 0; add "
                              f"varied images or remove the copies")


def build_reward_model(cfg, *, reference_images: Tensor, fake_images: Tensor | None, device="cpu",
                       reference_info: dict | None = None, progress: bool = False,
                       extractor: FeatureExtractor | None = None) -> RewardModel:
    """Fit the frozen reward model of `cfg.reward` to reference images (N, C, H, W) in [-1, 1].

    The RBF bandwidth is `bandwidth_scale` × the median pairwise distance of φ(Y) (median heuristic,
    fixed here once); the PCA (for kNN entropy and FID) is fitted on φ(Y); the realism CNN is
    trained on reference vs. `fake_images` (base-model samples) when `reward.realism.enabled`.
    `extractor` reuses an extractor already built from `reward.features`.
    """
    r = cfg.reward
    if r.weights.realism > 0 and not r.realism.enabled:
        raise CraterdiffError("reward.weights.realism > 0 needs reward.realism.enabled: true")
    check_reference(reference_images)
    extractor = extractor or build_extractor(r.features.name, input_size=r.features.input_size,
                                             path=r.features.path, seed=cfg.seed, device=device)
    ref = extract_features(extractor, reference_images, batch_size=r.features.batch_size).double()
    m = ref.shape[0]
    bandwidth = r.bandwidth_scale * float(median_bandwidth(ref))
    pca = fit_pca(ref, k=min(r.pca_dim, m - 1, ref.shape[1]))
    sizer, peak = calibrated_matcher(reference_images, seed=cfg.seed)
    size_ref = detected_log_sizes(sizer, reference_images)
    size_bandwidth = size_median_bandwidth(size_ref)
    arcs_ref = detected_log_sizes(RimDetector(**ARCS), reference_images)
    realism, realism_info = None, {"enabled": False}
    if r.realism.enabled:
        from reward.realism import train_realism
        if fake_images is None:
            raise CraterdiffError("reward.realism.enabled needs base-model images: set model.pretrained or "
                                  "reward.realism.fake_dir")
        realism, metrics = train_realism(reference_images, fake_images, heldout_fraction=r.realism.heldout_fraction,
                                         epochs=r.realism.epochs, batch_size=r.realism.batch_size, lr=r.realism.lr,
                                         width=r.realism.width, seed=cfg.seed, progress=progress)
        realism_info = {"enabled": True, **{k: _plain(v) for k, v in vars(metrics).items()}}
    info = {"reference": dict(reference_info or {}, n=m), "realism": realism_info,
            "extractor_path": r.features.path, "extractor_seed": cfg.seed, "size_light_peak_ncc": peak}
    return RewardModel(extractor=extractor, reference=ref, bandwidth=bandwidth, pca=pca,
                       weights=vars(r.weights).copy(), mi_noise=r.mi_noise, knn_k=r.knn_k,
                       ot_method=r.ot_method, ot_reg=r.ot_reg, sizer=sizer, size_reference=size_ref,
                       size_bandwidth=size_bandwidth, ot_match=r.ot_match, realism=realism, info=info,
                       coverage_softness=r.coverage_softness, arcs_reference=arcs_ref,
                       arcs_bandwidth=size_median_bandwidth(arcs_ref), size_detector=r.size_detector)


def size_median_bandwidth(s: Tensor) -> float:
    """h = max(median_{i<j} |s_i - s_j|, LOG10_STEP): the median heuristic on the log sizes s (m,), floored at one
    template step, since references of one crater size (a procedural set with a fixed diameter) would give h = 0."""
    return max(float(torch.pdist(s[:, None]).median()), LOG10_STEP)


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_artifact(model: RewardModel, path: str | Path) -> Path:
    """Write the artifact directory atomically; see the module docstring for its files."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_array(tmp / "reference_features.npy", model.reference.numpy())
        save_array(tmp / "reference_sizes.npy", model.template_reference.numpy())
        if model.arcs_reference is not None:
            save_array(tmp / "reference_sizes_arcs.npy", model.arcs_reference.numpy())
        np.savez(tmp / "pca.npz", mean=model.pca.mean.numpy(), components=model.pca.components.numpy(),
                 explained_variance=model.pca.explained_variance.numpy(),
                 total_variance=np.float64(model.pca.total_variance))
        if model.realism is not None:
            save_realism(model.realism, tmp / "realism.safetensors")
        ex = model.extractor
        meta = {
            "format": REWARD_ARTIFACT_VERSION,
            "extractor": {"name": ex.name, "input_size": int(ex.input_size), "dim": int(ex.dim),
                          "path": model.info.get("extractor_path"), "seed": int(model.info.get("extractor_seed", 0))},
            "weights": model.weights,
            "bandwidth": model.bandwidth,
            "mi_noise": model.mi_noise,
            "pca": {"dim": int(model.pca.components.shape[0]),
                    "explained_variance_ratio": float(model.pca.explained_variance_ratio)},
            "knn_k": model.knn_k,
            "ot": {"method": model.ot_method, "reg": model.ot_reg, "match": model.ot_match},
            "coverage": {"softness": model.coverage_softness},
            "size": {"light_azimuth_deg": model.sizer.azimuth_deg, "light_elevation_deg": model.sizer.elevation_deg,
                     "z_threshold": model.sizer.threshold, "light_peak_ncc": model.info.get("size_light_peak_ncc"),
                     "bandwidth": model.template_bandwidth, "arcs_bandwidth": model.arcs_bandwidth,
                     "detector": model.size_detector},
            "reference": model.info.get("reference", {}),
            "realism": model.info.get("realism", {"enabled": False}),
            "sha256": {f: _sha256(tmp / f) for f in FILES if (tmp / f).is_file()},
        }
        (tmp / "reward.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


def artifact_dir(path: str | Path) -> Path:
    """Accept an artifact directory or a run directory that holds one in `reward/`."""
    path = Path(path)
    if not (path / "reward.yaml").is_file() and (path / "reward" / "reward.yaml").is_file():
        return path / "reward"
    return path


def _checked_meta(path: Path, expect_extractor: str | None) -> dict:
    """The artifact's reward.yaml, after checking its format, its extractor against `expect_extractor` and every
    file's checksum; each problem a one-line CraterdiffError."""
    meta_path = path / "reward.yaml"
    if not meta_path.is_file():
        raise CraterdiffError(f"no reward artifact at '{path}' (missing reward.yaml); build one with "
                              f"python -m scripts.train_reward_model --cfg CFG")
    try:
        meta = yaml.safe_load(meta_path.read_text())
        fmt, ex = meta["format"], meta["extractor"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise CraterdiffError(f"reward artifact file '{meta_path}' is corrupted; rebuild the artifact") from None
    if fmt != REWARD_ARTIFACT_VERSION:
        raise CraterdiffError(f"reward artifact '{path}' has format {fmt}, this craterdiff reads "
                              f"{REWARD_ARTIFACT_VERSION}; rebuild it")
    if expect_extractor is not None and ex["name"] != expect_extractor:
        raise CraterdiffError(f"reward artifact '{path}' was built with extractor '{ex['name']}' but the config asks "
                              f"for '{expect_extractor}'; rebuild it (scripts.train_reward_model) or set "
                              f"reward.features.name: {ex['name']}")
    for name, digest in meta.get("sha256", {}).items():
        f = path / name
        if not f.is_file():
            raise CraterdiffError(f"reward artifact file '{f}' is missing; rebuild the artifact")
        if _sha256(f) != digest:
            raise CraterdiffError(f"reward artifact file '{f}' is corrupted (checksum mismatch); rebuild the artifact")
    return meta


def _arrays(path: Path) -> tuple[Tensor, Tensor, Tensor | None, PCA]:
    """The artifact's reference features (m, d), template-detector sizes (m,), arcs-detector sizes (m,) if saved,
    and PCA."""
    def array(name: str) -> Tensor:
        return torch.from_numpy(np.load(path / name, allow_pickle=False))
    try:
        arcs = array("reference_sizes_arcs.npy") if (path / "reference_sizes_arcs.npy").is_file() else None
        with np.load(path / "pca.npz", allow_pickle=False) as z:
            pca = PCA(mean=torch.from_numpy(z["mean"]), components=torch.from_numpy(z["components"]),
                      explained_variance=torch.from_numpy(z["explained_variance"]),
                      total_variance=float(z["total_variance"]))
        return array("reference_features.npy"), array("reference_sizes.npy"), arcs, pca
    except (OSError, ValueError, KeyError) as e:
        raise CraterdiffError(f"reward artifact '{path}' cannot be read ({type(e).__name__}); rebuild it") from None


def load_artifact(path: str | Path, *, expect_extractor: str | None = None, device="cpu",
                  weights: Mapping[str, float] | None = None, ot_match: str | None = None,
                  log: Iterable[str] | None = None, size_bandwidth_scale: float = 1.0,
                  coverage_softness: float | None = None, size_detector: str | None = None) -> RewardModel:
    """Rebuild the frozen reward model saved by `save_artifact`, exactly.

    `weights` replaces the component weights saved in the artifact and `ot_match` its OT matching (None
    keeps the saved value); `size_detector` picks the size reward's detector (`SIZE_DETECTORS`; the artifact
    holds the reference sizes by each; None keeps the saved choice); `size_bandwidth_scale` multiplies that
    detector's saved bandwidth and `coverage_softness` sets the coverage reward's ball edge (`soft_coverage_loo`; None keeps the saved one, or the
    config's fallback for an artifact that saved none). Every
    component is computed from the same frozen features, reference and scorer, so none of them needs a
    rebuild (the reward ablation reuses one artifact). `log`:
    the unweighted components to compute as well (None: all of them; see RewardModel).

    Raises CraterdiffError (one line) for a missing directory or file, a corrupted file (checksum
    mismatch or unreadable), or an artifact built with another extractor than `expect_extractor`.
    """
    path = artifact_dir(path)
    meta = _checked_meta(path, expect_extractor)
    ex, size = meta["extractor"], meta.get("size")
    reference, size_reference, arcs_reference, pca = _arrays(path)
    try:
        sizer = TemplateMatcher(azimuth_deg=float(size["light_azimuth_deg"]),
                                elevation_deg=float(size["light_elevation_deg"]), threshold=float(size["z_threshold"]))
    except (KeyError, TypeError, ValueError):
        raise CraterdiffError(f"reward artifact file '{path / 'reward.yaml'}' is corrupted; rebuild the artifact") from None
    extractor = build_extractor(ex["name"], input_size=ex["input_size"], path=ex.get("path"), seed=ex.get("seed", 0),
                                device=device)
    if extractor.dim != reference.shape[1]:
        raise CraterdiffError(f"reward artifact '{path}': extractor '{ex['name']}' gives {extractor.dim}-d features "
                              f"but the reference has {reference.shape[1]}; rebuild the artifact")
    realism = load_realism(path / "realism.safetensors") if meta.get("realism", {}).get("enabled") else None
    info = {"reference": meta.get("reference", {}), "realism": meta.get("realism", {}),
            "extractor_path": ex.get("path"), "extractor_seed": ex.get("seed", 0),
            "size_light_peak_ncc": size.get("light_peak_ncc")}
    return RewardModel(extractor=extractor, reference=reference, bandwidth=meta["bandwidth"], pca=pca,
                       weights=dict(weights) if weights is not None else meta["weights"], mi_noise=meta["mi_noise"],
                       knn_k=meta["knn_k"],
                       ot_method=meta["ot"]["method"], ot_reg=meta["ot"]["reg"], sizer=sizer,
                       size_reference=size_reference, size_bandwidth=float(size["bandwidth"]),
                       ot_match=ot_match or meta["ot"].get("match", "full"), realism=realism, info=info, log=log,
                       coverage_softness=coverage_softness if coverage_softness is not None else
                       float(meta.get("coverage", {}).get("softness", RewardConfig.coverage_softness)),
                       arcs_reference=arcs_reference, arcs_bandwidth=size.get("arcs_bandwidth"),
                       size_detector=size_detector or size.get("detector", "templates"),
                       size_bandwidth_scale=size_bandwidth_scale)
