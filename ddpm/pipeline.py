"""Saving and loading a DDPM as a diffusers pipeline directory (`unet/` + `scheduler/`, safetensors).

A saved model loads with diffusers alone: `DDPMPipeline.from_pretrained(path)`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from basics import CraterdiffError, first_line
from utils import atomic_directory

SHIPPED_MODEL = Path(__file__).resolve().parent / "pretrained" / "mars32"
NOISE_SCALE_FILE = "noise_scale.json"
"""Beside a saved model: the per-step std factors e^ζ_k a SAC run learned, used wherever it is sampled."""


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


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | Path, *,
                  step_scales: torch.Tensor | None = None) -> Path:
    """Write `DDPMPipeline(unet, scheduler)` to `path` atomically (temp dir, then rename), with a SAC
    run's per-step std factors (`noise_scale.json`) when given."""
    with atomic_directory(path) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
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
