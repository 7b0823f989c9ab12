"""Building the reward artifact from a config: reference images, base-model images, fit, save."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddpm.pipeline import load_matching_pipeline
from ddpm.sampling import sample_model
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
    if cfg.model.kind == "sd":
        return sd_base_images(cfg, n, seed=seed, device=device)
    unet, scheduler = load_matching_pipeline(resolve_path(cfg.model.pretrained), image_size=cfg.data.image_size,
                                             channels=cfg.data.channels, name="the base model")
    unet.to(device).eval()
    return sample_model(unet, scheduler.config, cfg.sampler, n=n, generator=torch.Generator().manual_seed(seed),
                        device=device, progress=True)


@torch.no_grad()
def sd_base_images(cfg: Config, n: int, *, seed: int, device: torch.device) -> torch.Tensor:
    """n decoded Stable Diffusion samples (n, C, H, W) in the data's shape, prompts drawn from `model.prompts`."""
    from rl.build import build_policy

    policy = build_policy(cfg, device)  # at the base model: a fresh LoRA adapter is the identity
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in tqdm(range(0, n, cfg.sampler.batch_size), desc="sampling the base model", leave=False):
        out.append(policy.sample(min(cfg.sampler.batch_size, n - start), generator=gen).images.cpu())
    return torch.cat(out)


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
