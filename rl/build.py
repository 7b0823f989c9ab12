"""The policy of a config: the pixel DDPM (`model.kind: ddpm`) or Stable Diffusion (`sd`), from `model.pretrained`."""
from __future__ import annotations

import torch

from rl.policy import DiffusionPolicy
from utils import Config, CraterdiffError, resolve_path


def build_policy(cfg: Config, device: torch.device) -> DiffusionPolicy:
    """π_θ at the base model, on `device`; keeps a frozen base when a KL-to-base term needs one."""
    if not cfg.model.pretrained:
        raise CraterdiffError("model.pretrained is not set: the policy stage fine-tunes a saved base model "
                              "(e.g. ddpm/pretrained/mars32, or a local Stable Diffusion directory for model.kind sd)")
    r = cfg.rl
    keep_base = (r.kl_base_coef > 0 or r.kl_final_coef > 0) and r.policy_mode == "full"
    if cfg.model.kind == "sd":
        from ddpm.stable_diffusion import load_stable_diffusion, read_prompts
        from rl.sd_policy import StableDiffusionPolicy

        parts = load_stable_diffusion(resolve_path(cfg.model.pretrained))
        policy = StableDiffusionPolicy(parts, cfg.sampler, prompts=read_prompts(resolve_path(cfg.model.prompts)),
                                       guidance_scale=cfg.model.guidance_scale, image_size=cfg.data.image_size,
                                       channels=cfg.data.channels, mode=r.policy_mode, lora=r.lora,
                                       keep_base=keep_base)
    else:
        from ddpm.pipeline import load_matching_pipeline

        unet, scheduler = load_matching_pipeline(resolve_path(cfg.model.pretrained), image_size=cfg.data.image_size,
                                                 channels=cfg.data.channels, name="the base model")
        policy = DiffusionPolicy(unet, scheduler, cfg.sampler, mode=r.policy_mode, lora=r.lora, keep_base=keep_base)
    return policy.to(device)
