"""The policy of a config: the pixel DDPM (`model.kind: ddpm`) or Stable Diffusion (`sd`), from `model.pretrained`."""
from __future__ import annotations

from pathlib import Path

import torch

from config import Config
from ddpm.pipeline import load_step_scales
from reward.artifact import RewardModel, check_reference
from reward.build import build_and_save, n_base_images, needs_base_images, reward_extractor
from rl.modes import load_head, saved_head
from rl.policy import FROZEN_UNET_MODES, DiffusionPolicy
from basics import CraterdiffError
from utils import autocast, resolve_device, resolve_path, setup_precision


def base_model_path(cfg: Config) -> Path:
    """Where `model.pretrained` lives: a directory (relative to the project root); for Stable Diffusion
    also a Hub id already in the local Hugging Face cache."""
    if cfg.model.kind == "sd":
        from ddpm.stable_diffusion import locate_stable_diffusion

        return locate_stable_diffusion(cfg.model.pretrained)
    return resolve_path(cfg.model.pretrained)


def base_model_images(cfg: Config, n: int, *, seed: int, device: torch.device) -> torch.Tensor:
    """n samples (n, C, H, W) of the base model `model.pretrained` with the configured sampler (Stable
    Diffusion: over the training prompts, the prompts the policy is trained on)."""
    if not cfg.model.pretrained:
        raise CraterdiffError("the realism scorer needs base-model images: set model.pretrained to the base model "
                              "or reward.realism.fake_dir to a folder of its samples")
    sample = model_sampler(cfg, base_model_path(cfg), device, prompts=cfg.model.prompts,
                           name="the base model", progress=True)
    return sample(n, torch.Generator().manual_seed(seed))


def build_reward_artifact(cfg: Config, out: Path) -> RewardModel:
    """The reward stage of `cfg`, saved to `out`, with the base model's samples for its realism scorer.

    Sampling a saved model is this layer's job, so the base-model images are drawn here and handed
    to `reward.build.build_and_save`; the extractor is built first, so a bad one fails before sampling."""
    from data.sources import load_image_set

    device = resolve_device(cfg.device)
    extractor = reward_extractor(cfg, device)
    reference = load_image_set(cfg.data, "train")
    check_reference(reference.images)  # before the base model is sampled
    base = (base_model_images(cfg, n_base_images(cfg, reference), seed=cfg.seed + 1, device=device)
            if needs_base_images(cfg) else None)
    return build_and_save(cfg, out, base_images=base, reference=reference, extractor=extractor)


def build_policy(cfg: Config, device: torch.device) -> DiffusionPolicy:
    """π_θ at the base model, on `device`, with the config's precision and gradient checkpointing; keeps
    a frozen base when a KL-to-base term needs one."""
    amp_dtype = setup_precision(cfg.precision, cfg.tf32, device)
    if not cfg.model.pretrained:
        raise CraterdiffError("model.pretrained is not set: the policy stage fine-tunes a saved base model "
                              "(e.g. ddpm/pretrained/mars32, or a local Stable Diffusion directory for model.kind sd)")
    r = cfg.rl
    keep_base = (r.kl_base_coef > 0 or r.kl_final_coef > 0) and r.policy_mode == "full"
    if cfg.model.kind == "sd":
        policy = _sd_policy(cfg, base_model_path(cfg), prompts=cfg.model.prompts, mode=r.policy_mode,
                            keep_base=keep_base)
    else:
        policy = _ddpm_policy(cfg, base_model_path(cfg), mode=r.policy_mode, keep_base=keep_base,
                              name="the base model")
    policy.amp_dtype = amp_dtype
    if r.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy.to(device)


def model_sampler(cfg: Config, path, device: torch.device, *, prompts: str | None = None, name: str | None = None,
                  progress: bool = False):
    """(n, generator) -> n images (n, C, H, W) in [-1, 1] of the saved model at `path`, in the data's shape.

    `ddpm`: a DDPM pipeline directory. `sd`: a Stable Diffusion directory (the base, or a run's `model/`
    with the fine-tuned UNet merged in), sampled with CFG over `prompts` (default `model.test_prompts`),
    sample j getting prompt j mod N so every prompt is used equally. `name` names the model in errors.
    The UNet runs under autocast to the config's `precision`. A model saved by a `latent` or
    `schedule` run (its frozen model plus `policy_head/`) is sampled through that policy.
    """
    amp_dtype = setup_precision(cfg.precision, cfg.tf32, device)
    mode, settings = saved_head(path) or (None, None)
    if cfg.model.kind == "sd" or mode is not None:
        policy = (_sd_policy(cfg, path, prompts=prompts or cfg.model.test_prompts, mode=mode or "full",
                             settings=settings) if cfg.model.kind == "sd"
                  else _ddpm_policy(cfg, path, mode=mode, settings=settings, name=name or f"the model at '{path}'"))
        if mode is not None:
            load_head(policy, path)
        policy.to(device).eval().requires_grad_(False)
        scales = load_step_scales(path, cfg.sampler.num_steps)
        if scales is not None:
            policy.use_step_scales(scales)
        policy.amp_dtype = amp_dtype
        return _policy_sampler(policy, cfg.sampler.batch_size)

    from ddpm.pipeline import load_matching_pipeline
    from ddpm.sampling import sample_model

    unet, scheduler = load_matching_pipeline(path, image_size=cfg.data.image_size, channels=cfg.data.channels,
                                             name=name or f"the model at '{path}'")
    unet.to(device).eval()
    scales = load_step_scales(path, cfg.sampler.num_steps)

    def sample_ddpm(n: int, generator: torch.Generator) -> torch.Tensor:
        with autocast(device, amp_dtype):
            return sample_model(unet, scheduler.config, cfg.sampler, n=n, generator=generator, device=device,
                                progress=progress, step_scales=scales)
    return sample_ddpm


def _policy_sampler(policy: DiffusionPolicy, batch: int):
    """(n, generator) -> n images of the policy, `batch` at a time; prompt j mod N for sample j (SD)."""
    @torch.no_grad()
    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        prompts = getattr(policy, "prompts", None)
        ids = torch.arange(n) % len(prompts) if prompts else None
        return torch.cat([policy.sample(min(batch, n - i), generator=generator,
                                        prompt_ids=None if ids is None else ids[i:i + batch]).images.cpu()
                          for i in range(0, n, batch)])
    return sample


def _mode_class(cfg: Config, base: type[DiffusionPolicy], mode: str, keep_base: bool, settings=None
                ) -> tuple[type, dict]:
    """The policy class for `mode` on top of `base`, and its mode arguments (a frozen-UNet mode's
    `settings` default to the config's rl.latent / rl.schedule; a saved head brings its own)."""
    if mode in FROZEN_UNET_MODES:
        from rl.modes import policy_class

        return policy_class(mode, base), {mode: settings or getattr(cfg.rl, mode)}
    return base, dict(mode=mode, lora=cfg.rl.lora, keep_base=keep_base)


def _ddpm_policy(cfg: Config, path, *, mode: str, keep_base: bool = False, settings=None,
                 name: str) -> DiffusionPolicy:
    """The pixel-DDPM policy of the pipeline directory `path`."""
    from ddpm.pipeline import load_matching_pipeline

    unet, scheduler = load_matching_pipeline(path, image_size=cfg.data.image_size, channels=cfg.data.channels,
                                             name=name)
    cls, kw = _mode_class(cfg, DiffusionPolicy, mode, keep_base, settings)
    return cls(unet, scheduler, cfg.sampler, **kw)


def _sd_policy(cfg: Config, path, *, prompts: str, mode: str, keep_base: bool = False, settings=None):
    """The Stable Diffusion policy of the directory `path`, conditioned on the prompt file `prompts`."""
    from ddpm.stable_diffusion import load_stable_diffusion, read_prompts
    from rl.sd_policy import StableDiffusionPolicy

    cls, kw = _mode_class(cfg, StableDiffusionPolicy, mode, keep_base, settings)
    return cls(load_stable_diffusion(Path(path)), cfg.sampler, prompts=read_prompts(resolve_path(prompts)),
               guidance_scale=cfg.model.guidance_scale, image_size=cfg.data.image_size, channels=cfg.data.channels,
               **kw)
