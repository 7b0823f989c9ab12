"""Saving and loading a DDPM as a diffusers pipeline directory (`unet/` + `scheduler/`, safetensors).

A saved model loads with diffusers alone: `DDPMPipeline.from_pretrained(path)`.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from utils import CraterdiffError, atomic_directory, first_line

SHIPPED_MODEL = Path(__file__).resolve().parent / "pretrained" / "mars32"


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, path: str | Path) -> Path:
    """Write `DDPMPipeline(unet, scheduler)` to `path` atomically (temp dir, then rename)."""
    with atomic_directory(path) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
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
