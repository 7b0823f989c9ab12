"""UNet presets: diffusers `UNet2DModel` configurations for each scale of the toolkit.

| preset | parameters | use |
|---|---|---|
| tiny  | ~0.05M | unit tests |
| small | ~1.1M  | the embedded CPU default (32 px, channels 32/64/64, attention at 16 px) |
| base  | ~17M   | GPU, 32 px |
| large | ~71M   | GPU, 64 px (the DDPM-64 profile) |
"""
from __future__ import annotations

from diffusers import UNet2DModel

PRESETS: dict[str, dict] = {
    "tiny": dict(
        block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    ),
    "small": dict(
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=16,
    ),
    "base": dict(
        block_out_channels=(64, 128, 128, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, attention_head_dim=32,
    ),
    "large": dict(
        block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32, attention_head_dim=64,
    ),
}


def build_unet(preset: str, *, image_size: int, channels: int) -> UNet2DModel:
    """A freshly initialised `UNet2DModel` of the named preset.

    image_size must be divisible by 2**(levels - 1) so every down-sampling step is exact.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose one of {sorted(PRESETS)}")
    kw = PRESETS[preset]
    factor = 2 ** (len(kw["block_out_channels"]) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} must be divisible by {factor} for preset {preset!r}")
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, **kw)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
