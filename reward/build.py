"""Building the reward artifact from a config: reference images, base-model images, fit, save."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from reward.artifact import RewardModel, build_reward_model, save_artifact
from reward.datasets import load_image_folder
from reward.features import build_extractor
from reward.sources import load_image_set
from utils import Config, CraterdiffError, resolve_device, resolve_path


def base_model_images(cfg: Config, n: int, *, seed: int, device: torch.device) -> torch.Tensor:
    """n samples (n, C, H, W) of the base model `model.pretrained` with the configured sampler."""
    if not cfg.model.pretrained:
        raise CraterdiffError("the realism scorer needs base-model images: set model.pretrained to the base model "
                              "or reward.realism.fake_dir to a folder of its samples")
    from rl.build import base_model_path, model_sampler

    # Stable Diffusion: over the training prompts, the prompts the policy is trained on
    sample = model_sampler(cfg, base_model_path(cfg), device, prompts=cfg.model.prompts,
                           name="the base model", progress=True)
    return sample(n, torch.Generator().manual_seed(seed))


def artifact_path(cfg: Config, run_dir: Path) -> Path:
    """`reward.artifact` if set, else <run dir>/reward."""
    return resolve_path(cfg.reward.artifact) if cfg.reward.artifact else run_dir / "reward"


def build_and_save(cfg: Config, out: Path) -> RewardModel:
    """Build the reward model of `cfg` on the train split and save the artifact to `out`."""
    device = resolve_device(cfg.device)
    f = cfg.reward.features
    extractor = build_extractor(f.name, input_size=f.input_size, path=f.path, seed=cfg.seed, device=device)
    ref = load_image_set(cfg.data, "train")
    fake = None
    if cfg.reward.realism.enabled:
        rc = cfg.reward.realism
        if rc.fake_dir:
            fake, _ = load_image_folder(resolve_path(rc.fake_dir), size=cfg.data.image_size, channels=cfg.data.channels)
        else:
            fake = base_model_images(cfg, rc.n_fake or len(ref), seed=cfg.seed + 1, device=device).cpu()
    tqdm.write(f"building the reward model: {len(ref)} reference images, extractor {cfg.reward.features.name}"
               + (f", realism on {len(fake)} base-model images" if fake is not None else ""))
    model = build_reward_model(cfg, reference_images=ref.images, fake_images=fake, device=device, progress=True,
                               extractor=extractor,
                               reference_info={"source": cfg.data.source, "split": "train",
                                               "image_size": cfg.data.image_size, "channels": cfg.data.channels})
    save_artifact(model, out)
    return model
