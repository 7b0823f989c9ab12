"""Building the reward artifact from a config and the images it is given: fit, save.

The reward stage never samples a diffusion model itself: the base-model images its realism scorer is
trained against come from the caller (`rl.build.build_reward_artifact`, which samples `model.pretrained`),
or from the folder `reward.realism.fake_dir`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from config import Config
from data.datasets import load_image_folder
from data.sources import ImageSet, load_image_set
from reward.artifact import RewardModel, build_reward_model, save_artifact
from reward.features import FeatureExtractor, build_extractor
from utils import resolve_device, resolve_path


def artifact_path(cfg: Config, run_dir: Path) -> Path:
    """`reward.artifact` if set, else <run dir>/reward."""
    return resolve_path(cfg.reward.artifact) if cfg.reward.artifact else run_dir / "reward"


def reward_extractor(cfg: Config, device: torch.device) -> FeatureExtractor:
    """The feature extractor φ of `reward.features` (built first, so a bad extractor fails before any sampling)."""
    f = cfg.reward.features
    return build_extractor(f.name, input_size=f.input_size, path=f.path, seed=cfg.seed, device=device)


def needs_base_images(cfg: Config) -> bool:
    """Whether the realism scorer must be handed base-model images (enabled, and no `fake_dir`)."""
    return cfg.reward.realism.enabled and not cfg.reward.realism.fake_dir


def n_base_images(cfg: Config, reference: ImageSet) -> int:
    """How many base-model images the realism scorer is trained against: `n_fake`, else as many as references."""
    return cfg.reward.realism.n_fake or len(reference)


def build_and_save(cfg: Config, out: Path, *, base_images: torch.Tensor | None = None,
                   reference: ImageSet | None = None, extractor: FeatureExtractor | None = None) -> RewardModel:
    """Build the reward model of `cfg` on the train split (`reference`, loaded if not given) and save the
    artifact to `out`. `base_images` (n, C, H, W) in [-1, 1]: the base model's samples for the realism
    scorer, required when it is enabled without `reward.realism.fake_dir`."""
    device = resolve_device(cfg.device)
    extractor = extractor or reward_extractor(cfg, device)
    ref = reference if reference is not None else load_image_set(cfg.data, "train")
    rc = cfg.reward.realism
    fake = base_images.cpu() if base_images is not None else None
    if rc.enabled and rc.fake_dir:
        fake, _ = load_image_folder(resolve_path(rc.fake_dir), size=cfg.data.image_size, channels=cfg.data.channels)
    tqdm.write(f"building the reward model: {len(ref)} reference images, extractor {cfg.reward.features.name}"
               + (f", realism on {len(fake)} base-model images" if fake is not None else ""))
    model = build_reward_model(cfg, reference_images=ref.images, fake_images=fake, device=device, progress=True,
                               extractor=extractor,
                               reference_info={"source": cfg.data.source, "split": "train",
                                               "image_size": cfg.data.image_size, "channels": cfg.data.channels})
    save_artifact(model, out)
    return model
