"""Saving and loading a DDPM as a diffusers pipeline directory (`unet/` + `scheduler/`, safetensors).

A saved model loads with diffusers alone. A pretrained model is a `DDPMPipeline` (its scheduler the training
schedule); a fine-tuned one is a `DDIMPipeline` whose scheduler is the DDIM chain the policy was trained on
(trailing spacing, clipping) and whose `sampler.json` holds the call's other arguments, so

    pipe = DDIMPipeline.from_pretrained(path)
    images = pipe(batch_size=8, generator=torch.Generator().manual_seed(0), **json.load(open(path / "sampler.json")))

samples the trained chain, draw for draw as `scripts.sample` does (a SAC run's learned noise scales: docs/design.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel

from basics import CraterdiffError, first_line
from ddpm.schedulers import sampler_scheduler
from utils import atomic_directory

SHIPPED_MODEL = Path(__file__).resolve().parent / "pretrained" / "mars32"
NOISE_SCALE_FILE = "noise_scale.json"
"""Beside a saved model: the per-step std factors e^ζ_k a SAC run learned, used wherever it is sampled."""
SAMPLER_FILE = "sampler.json"
"""Beside a fine-tuned model: the arguments of the pipeline call that samples the trained chain (steps, η, CFG)."""


def save_sampler_call(model_dir: str | Path, sampler, **extra: float) -> None:
    """Write model_dir/sampler.json: `num_inference_steps` and `eta` of a `SamplerConfig`, plus `extra` call
    arguments (the Stable Diffusion policy's `guidance_scale`)."""
    call = {"num_inference_steps": int(sampler.num_steps), "eta": float(sampler.eta), **extra}
    (Path(model_dir) / SAMPLER_FILE).write_text(json.dumps(call, indent=1))


def load_sampler_call(model_dir: str | Path) -> dict | None:
    """The pipeline-call arguments saved beside a fine-tuned model (None for a model without them)."""
    path = Path(model_dir) / SAMPLER_FILE
    if not path.is_file():
        return None
    try:
        call = json.loads(path.read_text())
        steps, eta = int(call["num_inference_steps"]), float(call["eta"])
    except (ValueError, KeyError, TypeError) as e:
        raise CraterdiffError(f"cannot read '{path}' ({first_line(e)}); delete it to sample with the config's "
                              f"sampler settings") from None
    if steps < 1 or not eta >= 0:
        raise CraterdiffError(f"'{path}' holds {steps} steps and eta {eta}; delete it or retrain")
    return call


def trained_sampler_overrides(model_dir: str | Path, scheduler_config) -> list[str]:
    """`--set` overrides giving a `SamplerConfig` the chain a fine-tuned model was trained on: steps and η from its
    sampler.json, clipping from its saved DDIM scheduler's config; none for a model without sampler.json. Given
    before the user's own, so that theirs win."""
    call = load_sampler_call(model_dir)
    if call is None:
        return []
    return [f"sampler.num_steps={int(call['num_inference_steps'])}", f"sampler.eta={float(call['eta'])!r}",
            f"sampler.clip_sample={str(bool(scheduler_config.clip_sample)).lower()}",
            f"sampler.clip_range={float(scheduler_config.clip_sample_range)!r}"]


def unet_folder(unet) -> str | None:
    """The absolute `unet/` folder a UNet was loaded from (None for one built in code): an adapter's recorded base."""
    source = unet.config.get("_name_or_path") or ""
    return str((Path(source) / "unet").resolve()) if source and (Path(source) / "unet").is_dir() else None


def save_step_scales(model_dir: str | Path, scales: torch.Tensor) -> None:
    """Write the (T,) std factors of each DDIM step to model_dir/noise_scale.json."""
    path = Path(model_dir) / NOISE_SCALE_FILE
    path.write_text(json.dumps({"num_steps": int(scales.numel()), "scales": [float(s) for s in scales]}, indent=1))


def load_step_scales(model_dir: str | Path, num_steps: int) -> torch.Tensor | None:
    """The (T,) std factors saved beside a model (None if it has none); a model trained with another
    number of DDIM steps is refused, since its factors belong to those steps."""
    path = Path(model_dir) / NOISE_SCALE_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        scales = torch.tensor([float(s) for s in saved["scales"]], dtype=torch.float64)
    except (ValueError, KeyError, TypeError) as e:
        raise CraterdiffError(f"cannot read '{path}' ({first_line(e)}); delete it to sample with the plain "
                              f"DDIM noise") from None
    if scales.numel() != num_steps:
        raise CraterdiffError(f"the model at '{model_dir}' learned noise scales for {scales.numel()} DDIM steps "
                              f"({path.name}); sample it with --set sampler.num_steps={scales.numel()}")
    if not (torch.isfinite(scales).all() and (scales > 0).all()):
        raise CraterdiffError(f"'{path}' holds non-positive or non-finite noise scales; delete it or retrain")
    return scales


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | Path, *, sampler=None,
                  step_scales: torch.Tensor | None = None) -> Path:
    """Write the model to `path` atomically (temp dir, then rename): `DDPMPipeline(unet, scheduler)`, or with
    `sampler` (a `SamplerConfig`) the `DDIMPipeline` of that chain and its `sampler.json`; a SAC run's per-step
    std factors (`noise_scale.json`) when given."""
    with atomic_directory(path) as tmp:
        if sampler is None:
            DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        else:
            DDIMPipeline(unet=unet, scheduler=sampler_scheduler(scheduler.config, sampler)).save_pretrained(tmp, safe_serialization=True)
            save_sampler_call(tmp, sampler)
        if step_scales is not None:
            save_step_scales(tmp, step_scales.cpu())
    return Path(path)


def load_matching_pipeline(path: str | Path, *, image_size: int, channels: int, name: str = "model"
                           ) -> tuple[UNet2DModel, DDPMScheduler]:
    """`load_pipeline`, refusing a model whose images are not channels x image_size px (the data's)."""
    unet, scheduler = load_pipeline(path)
    c, size = unet.config.in_channels, unet.config.sample_size
    if (size, c) != (image_size, channels):
        raise CraterdiffError(f"{name} at '{path}' makes {c}x{size}px images but data is {channels}x{image_size}px; "
                              f"match data.image_size and data.channels to the model")
    return unet, scheduler


def load_pipeline(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load (unet, scheduler) from a pipeline directory, from local files only.

    A missing or incomplete directory is a CraterdiffError naming it; nothing is ever downloaded.
    """
    path = Path(path)
    if not (path / "unet" / "config.json").is_file():
        raise CraterdiffError(f"no DDPM model at '{path}' (expected {path}/unet/config.json); train one "
                              f"with scripts.pretrain_ddpm or set model.pretrained to a saved model directory")
    try:
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", local_files_only=True, use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise CraterdiffError(f"cannot load the DDPM model at '{path}': {first_line(e)}") from None
    return unet, scheduler
