"""Image loading: modes, sizes, bad files and folders, and the embedded Mars crater set."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import IMAGE_EXTENSIONS, load_image, load_image_folder, load_mars_craters
from basics import CraterdiffError


def _gradient(h: int, w: int) -> np.ndarray:
    """(h, w) uint8 horizontal ramp 0..255."""
    return np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))


def _write_mixed_folder(root) -> None:
    """Five readable images of different modes and sizes, one in a subfolder."""
    root.mkdir(exist_ok=True)
    (root / "sub").mkdir()
    Image.fromarray(_gradient(30, 40)).save(root / "a_gray.png")
    Image.fromarray(np.stack([_gradient(50, 20)] * 3, -1)).save(root / "b_rgb.JPG")
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(root / "c_rgba.png")
    Image.fromarray(np.stack([_gradient(33, 33)] * 3, -1)).convert("P").save(root / "d_palette.bmp")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(root / "sub" / "e_16bit.tif")


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_modes_and_sizes_load_to_one_shape(tmp_path, channels):
    _write_mixed_folder(tmp_path / "imgs")
    images, paths = load_image_folder(tmp_path / "imgs", size=16, channels=channels)
    assert images.shape == (5, channels, 16, 16)
    assert images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert [p.name for p in paths] == ["a_gray.png", "b_rgb.JPG", "c_rgba.png", "d_palette.bmp", "e_16bit.tif"]


def test_non_recursive_skips_subfolders(tmp_path):
    _write_mixed_folder(tmp_path / "imgs")
    images, paths = load_image_folder(tmp_path / "imgs", size=8, channels=1, recursive=False)
    assert len(paths) == images.shape[0] == 4
    assert all(p.parent == tmp_path / "imgs" for p in paths)


def test_grayscale_values_map_to_minus_one_one(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "white.png")
    assert torch.all(load_image(tmp_path / "black.png", size=8, channels=1) == -1)
    assert torch.all(load_image(tmp_path / "white.png", size=8, channels=3) == 1)


def test_rgb_to_gray_and_rgba_over_black(tmp_path):
    # Expected gray of pure red from PIL's ITU-R 601-2 luma, L = 0.299 R (+ 0.587 G + 0.114 B).
    Image.fromarray(np.full((8, 8, 3), (255, 0, 0), np.uint8)).save(tmp_path / "red.png")
    gray = load_image(tmp_path / "red.png", size=8, channels=1)
    assert torch.allclose(gray, torch.full_like(gray, round(0.299 * 255) / 127.5 - 1), atol=1 / 127.5)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white but fully transparent -> composited over black
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert torch.all(load_image(tmp_path / "clear.png", size=8, channels=3) == -1)


def test_16bit_uses_full_range(tmp_path):
    # A 16-bit ramp 0..65535: PIL's own I -> L conversion would clip it to nearly all white.
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    x = load_image(tmp_path / "ramp16.png", size=32, channels=1)
    assert x.min() == -1 and x.max() == 1
    assert torch.all(x[0, :, 1:] >= x[0, :, :-1])  # still a ramp


def test_center_crop_keeps_the_middle(tmp_path):
    # 30 x 10: black | white | black bands, size 10 -> no resize, the crop is the white band.
    a = np.zeros((10, 30), np.uint8)
    a[:, 10:20] = 255
    Image.fromarray(a).save(tmp_path / "bands.png")
    assert torch.all(load_image(tmp_path / "bands.png", size=10, channels=1) == 1)


def test_extensions_are_case_insensitive(tmp_path):
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"} == set(IMAGE_EXTENSIONS)
    Image.fromarray(_gradient(8, 8)).save(tmp_path / "UPPER.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    _, paths = load_image_folder(tmp_path, size=8, channels=1)
    assert [p.name for p in paths] == ["UPPER.PNG"]


def test_corrupt_file_is_skipped_and_named_once(tmp_path):
    Image.fromarray(_gradient(8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "noise.jpg").write_bytes(b"definitely not a jpeg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, paths = load_image_folder(tmp_path, size=8, channels=1)
    assert images.shape == (1, 1, 8, 8) and [p.name for p in paths] == ["good.png"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "broken.png" in message and "noise.jpg" in message and "2" in message


def test_missing_folder_raises(tmp_path):
    with pytest.raises(CraterdiffError, match=r"nowhere.*does not exist"):
        load_image_folder(tmp_path / "nowhere", size=8, channels=1)


def test_file_instead_of_folder_raises(tmp_path):
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(CraterdiffError, match="not a directory"):
        load_image_folder(tmp_path / "file.png", size=8, channels=1)


def test_empty_folder_raises(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(CraterdiffError, match=r"holds no image files.*add images"):
        load_image_folder(tmp_path, size=8, channels=1)


def test_only_corrupt_files_raises(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    (tmp_path / "y.tif").write_bytes(b"junk")
    with pytest.raises(CraterdiffError, match=r"none could be read") as info:
        load_image_folder(tmp_path, size=8, channels=1)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# The embedded crater set (data/mars_craters, built by data.mars.build_crater_set)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
def test_embedded_splits_are_disjoint_and_complete(size):
    train, train_rows = load_mars_craters(split="train", size=size)
    held, held_rows = load_mars_craters(split="heldout", size=size)
    _, all_rows = load_mars_craters(split="all", size=size)
    assert train.shape[1:] == held.shape[1:] == (1, size, size)
    assert train.min() >= -1 and train.max() <= 1
    assert len(train_rows) >= 100 and len(held_rows) >= 100
    train_files = {r["file"] for r in train_rows}
    held_files = {r["file"] for r in held_rows}
    assert not train_files & held_files
    assert train_files | held_files == {r["file"] for r in all_rows}
    assert {r["split"] for r in all_rows} == {"train", "heldout"}


def test_embedded_splits_span_the_same_diameters():
    _, train_rows = load_mars_craters(split="train", size=32)
    _, held_rows = load_mars_craters(split="heldout", size=32)
    d_train = np.array([r["diameter_km"] for r in train_rows])
    d_held = np.array([r["diameter_km"] for r in held_rows])
    # Stratified by diameter: each quartile of the whole set holds about half of each split.
    edges = np.quantile(np.concatenate([d_train, d_held]), [0, 0.25, 0.5, 0.75, 1])
    h_train, _ = np.histogram(d_train, edges)
    h_held, _ = np.histogram(d_held, edges)
    assert np.all(np.abs(h_train - h_held) <= 2)
    assert abs(np.median(d_train) - np.median(d_held)) < 0.05 * np.median(d_train)


def test_embedded_rgb_and_unbuilt_size():
    images, rows = load_mars_craters(split="heldout", size=48, channels=3)
    assert images.shape == (len(rows), 3, 48, 48)
    assert torch.equal(images[:, 0], images[:, 2])


def test_bad_split_and_missing_metadata(tmp_path):
    with pytest.raises(CraterdiffError, match="unknown crater split 'test'"):
        load_mars_craters(split="test", size=32)
    with pytest.raises(CraterdiffError, match=r"metadata.csv is missing.*make_dataset"):
        load_mars_craters(split="train", size=32, root=tmp_path)
