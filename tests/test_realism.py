"""The realism scorer: it learns an easy split, is deterministic, round-trips through safetensors,
rejects bad files and bad inputs, and its augmentation never changes the light direction."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.procedural import procedural_set
from reward.realism import (
    REALISM_FILENAME,
    RealismCNN,
    RealismArchitecture,
    RealismMetrics,
    augment,
    load_realism,
    realism_logits,
    save_realism,
    train_realism,
)
from basics import CraterdiffError

SIZE, N = 16, 48
# Small and fast: about 0.5 s per training on one free core. Chosen so that every seed tried
# (0-3) reaches held-out accuracy >= 0.95 and AUC 1.0 on the split below.
TRAIN = dict(epochs=15, batch_size=16, lr=3e-3, width=8)




def smooth_noise(n: int, size: int, seed: int) -> torch.Tensor:
    """Fake images: white noise blurred by a 3x3 box, scaled to about the craters' spread."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, size, size, generator=g)
    z = torch.nn.functional.conv2d(torch.nn.functional.pad(z, (1, 1, 1, 1), mode="reflect"),
                                   torch.ones(1, 1, 3, 3) / 9)
    return (z / z.std() * 0.35).clamp(-1, 1)


@pytest.fixture(scope="module")
def easy_split() -> tuple[torch.Tensor, torch.Tensor]:
    """real = procedural craters (shaded relief), fake = smooth noise: easy to tell apart."""
    return procedural_set(N, size=SIZE, seed=0), smooth_noise(N, SIZE, seed=1)


@pytest.fixture(scope="module")
def trained(easy_split) -> tuple[RealismCNN, RealismMetrics]:
    return train_realism(*easy_split, seed=0, **TRAIN)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def test_learns_easy_split_better_than_chance(trained):
    model, m = trained
    assert m.heldout_accuracy > 0.8 and m.heldout_auc > 0.85, m
    assert m.train_accuracy > 0.8, m
    # round(0.25 * 48) = 12 held out per class
    assert (m.n_real_train, m.n_fake_train, m.n_real_heldout, m.n_fake_heldout, m.epochs) == (36, 36, 12, 12, 15)


def test_returned_model_is_frozen_and_in_eval_mode(trained):
    model, _ = trained
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config == RealismArchitecture(channels=1, width=8)


def test_same_seed_same_model_and_global_rng_untouched(easy_split, trained):
    model, metrics = trained
    state = torch.get_rng_state()
    again, metrics2 = train_realism(*easy_split, seed=0, **TRAIN)
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.cat(easy_split)
    assert torch.equal(realism_logits(model, x), realism_logits(again, x))
    assert metrics == metrics2
    other, _ = train_realism(*easy_split, seed=1, **TRAIN)
    assert not torch.equal(realism_logits(model, x), realism_logits(other, x))


def test_too_few_images_is_a_user_error(easy_split):
    real, fake = easy_split
    with pytest.raises(CraterdiffError, match="at least 8 real images, got 7"):
        train_realism(real[:7], fake, **TRAIN)
    with pytest.raises(CraterdiffError, match="at least 8 fake images"):
        train_realism(real, fake[:3], **TRAIN)


@pytest.mark.parametrize("bad_fake", [
    torch.zeros(N, 1, 24, 24),  # other size
    torch.zeros(N, 3, SIZE, SIZE),  # other channels
])
def test_mismatched_sets_are_a_user_error(easy_split, bad_fake):
    with pytest.raises(CraterdiffError, match="same size and channels") as e:
        train_realism(easy_split[0], bad_fake, **TRAIN)
    assert "\n" not in str(e.value)


def test_too_small_or_nonfinite_images_are_user_errors(easy_split):
    real, fake = easy_split
    with pytest.raises(CraterdiffError, match="at least 16 px"):
        train_realism(real[..., :8, :8], fake[..., :8, :8], **TRAIN)
    with pytest.raises(CraterdiffError, match="NaN"):
        train_realism(real, torch.full_like(fake, float("nan")), **TRAIN)


# ----------------------------------------------------------------------------------------------
# Network and logits
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,h,w", [(1, 16, 16), (1, 32, 32), (3, 40, 24)])
def test_forward_gives_one_logit_per_image_for_any_size(channels, h, w):
    model = RealismCNN(channels=channels, width=8)
    assert model(torch.zeros(3, channels, h, w)).shape == (3,)


def test_forward_rejects_wrong_channels_or_tiny_images():
    model = RealismCNN(channels=1, width=8)
    with pytest.raises(ValueError):
        model(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError):
        model(torch.zeros(2, 1, 8, 8))


def test_realism_logits_chunking_and_mode(easy_split):
    model = RealismCNN(channels=1, width=8).train()
    x = torch.cat(easy_split)
    whole = realism_logits(model, x)
    chunked = realism_logits(model, x, batch_size=5)
    assert whole.shape == (len(x),) and whole.device.type == "cpu"
    torch.testing.assert_close(chunked, whole)  # same images, different batch composition
    assert model.training  # mode restored
    with torch.no_grad():
        torch.testing.assert_close(whole, model.eval()(x))


# ----------------------------------------------------------------------------------------------
# Artifact
# ----------------------------------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_logits(trained, easy_split, tmp_path):
    model, _ = trained
    path = save_realism(model, tmp_path / REALISM_FILENAME)
    assert path == tmp_path / REALISM_FILENAME and not list(tmp_path.glob("*.tmp"))
    with safe_open(path, framework="pt") as f:  # the config lives in the safetensors metadata
        assert json.loads(f.metadata()["config"]) == {"channels": 1, "width": 8}
    for where in (path, tmp_path):  # the file, or the artifact directory holding it
        loaded = load_realism(where)
        assert loaded.config == model.config
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        x = torch.cat(easy_split)
        assert torch.equal(realism_logits(loaded, x), realism_logits(model, x))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(CraterdiffError, match="not found") as e:
        load_realism(tmp_path / REALISM_FILENAME)
    assert REALISM_FILENAME in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign", "wrong_shapes"])
def test_damaged_file_is_a_user_error_naming_it(damage, tmp_path):
    path = save_realism(RealismCNN(channels=1, width=8), tmp_path / REALISM_FILENAME)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":  # valid safetensors, but not ours (no metadata)
        save_file({"w": torch.zeros(3)}, str(path))
    else:  # our metadata, weights of another width
        state = RealismCNN(channels=1, width=16).state_dict()
        save_file(state, str(path), metadata={"format": "craterdiff.realism", "version": "1",
                                             "config": json.dumps({"channels": 1, "width": 8})})
    with pytest.raises(CraterdiffError) as e:
        load_realism(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------

def test_augment_keeps_shape_and_range_and_is_deterministic_by_generator():
    x = procedural_set(8, size=32, seed=2)
    a = augment(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= -1 and a.max() <= 1
    assert (a - x).abs().mean() < 0.3  # small perturbations, not a new image
    assert torch.equal(a, augment(x, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augment(x, generator=torch.Generator().manual_seed(1)))


def test_augment_translation_is_a_reflect_padded_shift_of_at_most_max_shift():
    # Reference: with photometric jitter off, each output must equal one of the (2s+1)^2 crops of
    # the reflect-padded image, built here independently by slicing.
    s = 3
    x = procedural_set(6, size=20, seed=4)
    a = augment(x, generator=torch.Generator().manual_seed(0), max_shift=s,
                brightness=0.0, contrast=0.0, noise_std=0.0)
    xp = torch.nn.functional.pad(x, (s, s, s, s), mode="reflect")
    for i in range(len(x)):
        crops = [xp[i, :, dy:dy + 20, dx:dx + 20] for dy in range(2 * s + 1) for dx in range(2 * s + 1)]
        assert any(torch.allclose(a[i], c, atol=1e-6) for c in crops)  # m + (x - m) rounds


def test_augment_never_flips_the_light_direction():
    # A ramp lit from the left (bright left half) must stay brighter on the left; the same ramp
    # transposed (lit from the top) must stay brighter on top. A flip or rotation would fail one.
    left_lit = torch.linspace(0.8, -0.8, 32).expand(16, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    for to_left in (lambda t: t, lambda t: t.transpose(-1, -2)):  # identity, or top <-> left
        for _ in range(20):
            a = to_left(augment(to_left(left_lit).contiguous(), generator=g))
            assert (a[..., :16].mean(dim=(1, 2, 3)) > a[..., 16:].mean(dim=(1, 2, 3))).all()
