"""Image sets: a user's folder of images, and the embedded Mars crater set.

Every loader returns model-space tensors: (N, C, size, size) float32 in [-1, 1], C in {1, 3}.

Notation
--------
N      number of images
C      channels (1 = grayscale 'L', 3 = 'RGB')
size   side of the square output, in pixels
x      an image in model space, x = 2 * v / 255 - 1 for an 8-bit value v
"""
from __future__ import annotations

import csv
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from basics import CraterdiffError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
"""Lower-case file suffixes treated as images (matching is case-insensitive)."""

MARS_CRATERS_DIR: Path = Path(__file__).parent / "mars_craters"
"""The embedded crater set: `{size}/{index:04d}.png` and `metadata.csv` (see its README.md)."""

Split = Literal["train", "heldout", "all"]
SPLITS: tuple[str, ...] = ("train", "heldout", "all")


# ----------------------------------------------------------------------------------------------
# Single images
# ----------------------------------------------------------------------------------------------

def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to 'L' (channels=1) or 'RGB' (channels=3).

    Transparency (RGBA, LA, P with a transparent index) is composited over black so that
    transparent pixels do not carry arbitrary colour values. High bit-depth modes ('I;16', 'I',
    'F') are rescaled linearly from their own min..max to 0..255 before conversion, since PIL's
    direct 'I' -> 'L' conversion clips everything above 255 to white.
    """
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(np.round(a).astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB")


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is `size` (Lanczos), then centre-crop to size x size."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(path: str | Path, *, size: int, channels: int) -> torch.Tensor:
    """Read one image file as a model-space tensor.

    path: any format PIL reads; any mode (L, RGB, RGBA, P, I;16, ...).
    Returns x: (C, size, size) float32 in [-1, 1], x = v / 127.5 - 1 for 8-bit values v.
    Raises OSError / PIL.UnidentifiedImageError / ValueError for an unreadable file.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    with Image.open(path) as img:
        img.load()
        img = _resize_center_crop(_to_mode(img, channels), size)
    v = np.asarray(img, dtype=np.float32)
    if v.ndim == 2:
        v = v[None]
    else:
        v = v.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(v / 127.5 - 1.0))


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------

def list_image_files(root: Path, *, recursive: bool = True) -> list[Path]:
    """Image files under `root` (by suffix, case-insensitive), sorted by relative path."""
    pattern = root.rglob("*") if recursive else root.glob("*")
    files = [p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
"""PIL modes read as one channel."""


def folder_format(root: Path) -> tuple[int, int, int] | None:
    """The most common (width, height, channels) of the image files under `root`, from their headers (channels 1 for
    GRAY_MODES, else 3); None if no file there can be opened."""
    formats = Counter()
    for path in list_image_files(root) if root.is_dir() else []:
        try:
            with Image.open(path) as img:
                formats[(img.width, img.height, 1 if img.mode in GRAY_MODES else 3)] += 1
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            continue
    return formats.most_common(1)[0][0] if formats else None


def load_image_folder(
    root: str | Path, *, size: int, channels: int, recursive: bool = True
) -> tuple[torch.Tensor, list[Path]]:
    """Load every image in a folder, in sorted order.

    Returns (images, paths): images (N, C, size, size) float32 in [-1, 1]; paths[i] is the file
    of images[i]. Unreadable files are skipped and named together in one warning.
    Raises CraterdiffError if `root` is missing, not a folder, holds no image files, or holds
    only unreadable ones.
    """
    root = Path(root)
    if not root.exists():
        raise CraterdiffError(f"image folder {root} does not exist: check the path in the config")
    if not root.is_dir():
        raise CraterdiffError(f"image folder {root} is not a directory: point the config at a folder of images")
    files = list_image_files(root, recursive=recursive)
    if not files:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise CraterdiffError(f"image folder {root} holds no image files ({exts}): add images or fix the path")
    images, kept, skipped = [], [], []
    for p in files:
        try:
            images.append(load_image(p, size=size, channels=channels))
            kept.append(p)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            skipped.append(f"{p.relative_to(root).as_posix()} ({type(exc).__name__})")
    if not images:
        raise CraterdiffError(
            f"image folder {root} holds {len(files)} image files but none could be read: "
            f"replace the corrupt files (e.g. {skipped[0]})"
        )
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {root}: {', '.join(skipped)}", stacklevel=2)
    return torch.stack(images), kept


# ----------------------------------------------------------------------------------------------
# The embedded Mars crater set
# ----------------------------------------------------------------------------------------------

def read_metadata(root: Path) -> list[dict]:
    """Read `root/metadata.csv` into dicts: file (str), diameter_km, lat, lon (float), split (str)."""
    path = root / "metadata.csv"
    if not path.is_file():
        raise CraterdiffError(
            f"crater metadata {path} is missing: rebuild the set with "
            f"`python -m scripts.make_dataset --cfg configs/make_dataset.yaml`"
        )
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        {"file": r["file"], "diameter_km": float(r["diameter_km"]), "lat": float(r["lat"]),
         "lon": float(r["lon"]), "split": r["split"]}
        for r in rows
    ]


def load_mars_craters(
    *, split: Split, size: int, channels: int = 1, root: str | Path = MARS_CRATERS_DIR
) -> tuple[torch.Tensor, list[dict]]:
    """Load the embedded Mars crater tiles of one split.

    split: 'train' (pretraining, reward reference, realism scorer), 'heldout' (evaluation only)
    or 'all'. size: the tile side; `root/{size}/` is used when it exists (32 and 64 are built),
    otherwise the 64 px tiles are resized to `size`.
    Returns (images (N, C, size, size) float32 in [-1, 1], rows) with rows[i] the metadata of
    images[i] (keys file, diameter_km, lat, lon, split), in metadata.csv order.
    """
    if split not in SPLITS:
        raise CraterdiffError(f"unknown crater split {split!r}: use one of {', '.join(SPLITS)}")
    root = Path(root)
    rows = [r for r in read_metadata(root) if split == "all" or r["split"] == split]
    if not rows:
        raise CraterdiffError(f"crater set {root} has no images in split {split!r}: rebuild it with scripts.make_dataset")
    sub = root / str(size) if (root / str(size)).is_dir() else root / "64"
    missing = [r["file"] for r in rows if not (sub / r["file"]).is_file()]
    if missing:
        raise CraterdiffError(
            f"crater set {sub} lacks {len(missing)} tile(s) listed in metadata.csv (e.g. {missing[0]}): "
            f"rebuild it with scripts.make_dataset"
        )
    images = torch.stack([load_image(sub / r["file"], size=size, channels=channels) for r in rows])
    return images, rows
