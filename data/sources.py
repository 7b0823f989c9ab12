"""The image sets a config names: the embedded Mars craters, a user's folder, or procedural craters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from config import DataConfig
from basics import CraterdiffError
from utils import resolve_path

Split = Literal["train", "heldout"]


@dataclass
class ImageSet:
    """images: (N, C, H, W) in [-1, 1]; diameters_km: (N,) where known (the Mars set), else None."""
    images: Tensor
    diameters_km: Tensor | None = None
    names: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


def load_image_set(data: DataConfig, split: Split = "train") -> ImageSet:
    """The `split` images of the configured source at the configured size and channel count.

    'train' feeds pretraining, the reward reference and the realism scorer; 'heldout' is for
    evaluation only. For source='procedural' the two splits use different seeds.
    """
    from data.datasets import load_image_folder, load_mars_craters
    from data.procedural import procedural_set

    if data.source == "mars":
        images, rows = load_mars_craters(split=split, size=data.image_size, channels=data.channels)
        diam = torch.tensor([float(r["diameter_km"]) for r in rows])
        return ImageSet(images, diam, [str(r["file"]) for r in rows])
    if data.source == "folder":
        root = data.root if split == "train" else data.heldout_root
        if root is None:
            key = "data.root" if split == "train" else "data.heldout_root"
            raise CraterdiffError(f"data.source is 'folder' but {key} is not set; set it to a folder of images")
        images, paths = load_image_folder(resolve_path(root), size=data.image_size, channels=data.channels)
        return ImageSet(images, None, [p.name for p in paths])
    seed = 0 if split == "train" else 1
    images = procedural_set(data.procedural_n, size=data.image_size, channels=data.channels, seed=seed)
    return ImageSet(images)
