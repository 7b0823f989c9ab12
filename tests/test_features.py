"""Tests of reward.features: the extractor registry, its shared contract and each extractor.

Where expected values come from:
- EfficientNet weights: scikit-image's bundled photo `chelsea` is a cat; ImageNet classes 281-285
  are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat). The same check on a
  randomly initialised network must fail (near-uniform softmax), so the test can fail.
- CLIP / DINOv2: tiny random models built in code are the reference; features loaded back from
  their save_pretrained directory must equal the in-memory model's output on the same input,
  preprocessed by hand (resize, then CLIP's / ImageNet's mean and std).
- pixels: an image already at the input size must come back as itself, flattened.
- inception: a tiny TorchScript stand-in with the FID file's interface, whose features are the
  per-channel means, so the [0, 255] input scaling can be checked by hand.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from reward import features as feat
from reward.features import EXTRACTORS, FeatureExtractor, build_extractor, extract_features
from basics import CraterdiffError

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


# ----------------------------------------------------------------------------------------------
# Fixtures: tiny models written to disk once per module
# ----------------------------------------------------------------------------------------------

class FakeFIDInception(torch.nn.Module):
    """Stand-in for the TorchScript FID Inception: (B, 3, H, W) in [0, 255] -> per-channel means."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        means = img.mean(dim=(2, 3))
        return means if return_features else means[:, :1]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION, image_size=32, patch_size=8,
                                                           projection_dim=16)).eval()
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY_VISION, image_size=28, patch_size=14)).eval()
    path = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "fake_inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; the FID file format still uses it
        torch.jit.script(FakeFIDInception()).save(str(path))
    return path


# name -> (build kwargs, expected dim); clip / dinov2 / inception get their path from the fixtures
CASES = {
    "efficientnet_lite0": ({}, 1280),
    "random_cnn": ({}, 512),
    "pixels": ({}, 3 * 16 * 16),
    "radial_profile": ({}, 51),
    "clip": ({}, 16),
    "dinov2": ({"input_size": 28}, 32),
    "inception": ({"input_size": 32}, 3),
}


@pytest.fixture(scope="module")
def extractors(clip_dir, dinov2_dir, inception_file) -> dict[str, FeatureExtractor]:
    paths = {"clip": str(clip_dir[0]), "dinov2": str(dinov2_dir[0]), "inception": str(inception_file)}
    return {name: build_extractor(name, path=paths.get(name), **kw) for name, (kw, _) in CASES.items()}


def _images(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------
# The shared contract
# ----------------------------------------------------------------------------------------------

def test_registry_lists_every_extractor():
    assert set(EXTRACTORS) == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (3, 3, 40, 40)])
def test_output_shape_dim_and_dtype(extractors, name, shape):
    ext = extractors[name]
    assert ext.name == name and ext.dim == CASES[name][1]
    f = extract_features(ext, _images(shape))
    assert f.shape == (shape[0], ext.dim) and f.dtype == torch.float32 and f.device.type == "cpu"
    assert torch.isfinite(f).all()


@pytest.mark.parametrize("name", list(CASES))
def test_grayscale_equals_its_rgb_repeat(extractors, name):
    gray = _images((2, 1, 32, 32), seed=1)
    a = extract_features(extractors[name], gray)
    b = extract_features(extractors[name], gray.repeat(1, 3, 1, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_frozen_and_stays_in_eval_mode(extractors, name):
    ext = extractors[name]
    assert all(not p.requires_grad for p in ext.parameters())
    ext.train()
    assert not any(m.training for m in ext.modules())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "random_cnn", "pixels", "clip", "dinov2"])
def test_batching_matches_one_batch(extractors, name):
    x = _images((5, 1, 24, 24), seed=2)
    one = extract_features(extractors[name], x, batch_size=64)
    torch.testing.assert_close(extract_features(extractors[name], x, batch_size=2), one, rtol=1e-4, atol=1e-5)


def test_extract_features_edge_cases(extractors):
    ext = extractors["pixels"]
    assert extract_features(ext, torch.zeros(0, 3, 16, 16)).shape == (0, ext.dim)
    with pytest.raises(ValueError):
        extract_features(ext, torch.zeros(2, 3, 16, 16), batch_size=0)
    with pytest.raises(ValueError, match="B, 1\\|3, H, W"):
        ext(torch.zeros(2, 2, 16, 16))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "random_cnn", "pixels"])
def test_requires_grad_reaches_the_input_only(extractors, name):
    ext = extractors[name]
    x = _images((2, 1, 32, 32), seed=3).requires_grad_(True)
    assert not extract_features(ext, x).requires_grad  # no graph unless asked
    f = extract_features(ext, x, requires_grad=True, batch_size=1)
    assert f.requires_grad
    f.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in ext.parameters())


# ----------------------------------------------------------------------------------------------
# Each extractor
# ----------------------------------------------------------------------------------------------

def _cat_photo() -> torch.Tensor:
    """scikit-image's bundled `chelsea` (300 x 451 RGB, a cat) as a (1, 3, H, W) tensor in [-1, 1]."""
    from skimage import data

    return torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 127.5 - 1


def _sees_a_cat(logits: torch.Tensor) -> bool:
    """A cat class among the top 5 and most of the probability on the cat classes."""
    p = logits.softmax(dim=-1)[0]
    top5 = set(p.topk(5).indices.tolist())
    return bool(top5 & set(CAT_CLASSES)) and float(p[list(CAT_CLASSES)].sum()) > 0.5


def test_efficientnet_weights_loaded_classify_cat():
    from efficientnet_lite_pytorch import EfficientNet

    ext = build_extractor("efficientnet_lite0", input_size=224)
    img = _cat_photo()
    with torch.no_grad():
        assert _sees_a_cat(ext.classify(img))
        # the same check must fail without the ImageNet weights
        torch.manual_seed(0)
        untrained = copy.deepcopy(ext)
        untrained.net = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
        assert not _sees_a_cat(untrained.classify(img))


def test_efficientnet_default_input_size_and_weights_path():
    assert feat.efficientnet_lite0_weights_path().is_file()
    assert build_extractor("efficientnet_lite0").input_size == 64


def test_random_cnn_deterministic_by_seed():
    x = _images((3, 1, 32, 32), seed=4)
    rng = torch.get_rng_state()
    a = extract_features(build_extractor("random_cnn", seed=7), x)
    assert torch.equal(torch.get_rng_state(), rng)  # private generator: global RNG untouched
    assert torch.equal(a, extract_features(build_extractor("random_cnn", seed=7), x))
    assert not torch.allclose(a, extract_features(build_extractor("random_cnn", seed=8), x))


def test_pixels_are_the_image_itself(extractors):
    x = _images((2, 3, 16, 16), seed=5)
    torch.testing.assert_close(extract_features(extractors["pixels"], x), x.flatten(1), rtol=0, atol=1e-6)
    assert build_extractor("pixels", input_size=8).dim == 3 * 8 * 8


def test_radial_profile_is_the_ring_statistics_of_the_tile(extractors):
    """At the native size the extractor is reward/profiles.py's φ of the tile itself; a grayscale tile and
    its 3-channel copy give the same features."""
    from reward.profiles import radial_profile_features

    x = _images((3, 1, 32, 32), seed=6)
    got = extract_features(extractors["radial_profile"], x)
    torch.testing.assert_close(got, radial_profile_features(x).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extract_features(extractors["radial_profile"], x.expand(-1, 3, -1, -1)), got)


def _by_hand(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """The documented preprocessing, written out: 3 channels, resize, [-1, 1] -> [0, 1], mean/std."""
    x = F.interpolate(x.expand(-1, 3, -1, -1), size=(size, size), mode="bilinear", antialias=True)
    return ((x + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_clip_round_trips_through_a_directory(clip_dir, extractors):
    path, model = clip_dir
    ext = extractors["clip"]
    assert ext.input_size == 32 and ext.use_projection
    x = _images((2, 1, 40, 40), seed=6)
    with torch.no_grad():
        expected = model(pixel_values=_by_hand(x, 32, feat.CLIP_MEAN, feat.CLIP_STD)).image_embeds
    torch.testing.assert_close(extract_features(ext, x), expected, rtol=1e-4, atol=1e-5)


def test_clip_without_projection_and_full_clip_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    vision = dict(TINY_VISION, image_size=32, patch_size=8)
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "vision_only")
    ext = build_extractor("clip", path=str(tmp_path / "vision_only"))
    assert not ext.use_projection and ext.dim == 32  # pooled output, no random projection
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)).eval()
    full.save_pretrained(tmp_path / "full")
    ext = build_extractor("clip", path=str(tmp_path / "full"))
    assert ext.dim == 24  # projection_dim from the top-level CLIP config
    x = _images((2, 3, 32, 32), seed=7)
    with torch.no_grad():
        expected = full.get_image_features(pixel_values=_by_hand(x, 32, feat.CLIP_MEAN, feat.CLIP_STD))
    expected = getattr(expected, "pooler_output", expected)
    torch.testing.assert_close(extract_features(ext, x), expected, rtol=1e-4, atol=1e-5)


def test_dinov2_round_trips_through_a_directory(dinov2_dir, extractors):
    path, model = dinov2_dir
    ext = extractors["dinov2"]
    x = _images((2, 3, 40, 40), seed=8)
    with torch.no_grad():
        expected = model(pixel_values=_by_hand(x, 28, feat.IMAGENET_MEAN, feat.IMAGENET_STD)).last_hidden_state[:, 0]
    torch.testing.assert_close(extract_features(ext, x), expected, rtol=1e-4, atol=1e-5)
    assert build_extractor("dinov2", path=str(path)).input_size == 224


def test_inception_scales_to_0_255(extractors):
    ext = extractors["inception"]
    x = _images((2, 3, 32, 32), seed=9)  # already at input size: no resize
    torch.testing.assert_close(extract_features(ext, x), ((x + 1) * 127.5).mean(dim=(2, 3)), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

def test_unknown_name_suggests_the_closest():
    with pytest.raises(CraterdiffError, match="did you mean 'efficientnet_lite0'") as e:
        build_extractor("efficientnet")
    assert all(name in str(e.value) for name in EXTRACTORS)


@pytest.mark.parametrize("name", ["clip", "dinov2"])
def test_missing_model_directory(tmp_path, monkeypatch, name):
    with pytest.raises(CraterdiffError, match="set reward.features.path to a local"):
        build_extractor(name, path=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CraterdiffError, match="reward.features.path"):
        build_extractor(name, path=str(tmp_path / "empty"))
    # no path: the default model id, looked up in the cache only (made absent here, to be sure)
    monkeypatch.setattr(feat, "DEFAULT_CLIP_ID" if name == "clip" else "DEFAULT_DINOV2_ID", "craterdiff-test/absent")
    with pytest.raises(CraterdiffError, match="not in the Hugging Face cache"):
        build_extractor(name)


def test_wrong_model_type(dinov2_dir):
    with pytest.raises(CraterdiffError, match="'dinov2' model, not clip"):
        build_extractor("clip", path=str(dinov2_dir[0]))


def test_inception_needs_a_file(tmp_path):
    with pytest.raises(CraterdiffError, match="no weights file given"):
        build_extractor("inception")
    with pytest.raises(CraterdiffError, match="not found"):
        build_extractor("inception", path=str(tmp_path / "pt_inception-2015-12-05.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CraterdiffError, match="not a loadable TorchScript file"):
        build_extractor("inception", path=str(tmp_path / "junk.pt"))


def test_efficientnet_bad_weights_file(tmp_path):
    with pytest.raises(CraterdiffError, match="weights file not found"):
        build_extractor("efficientnet_lite0", path=str(tmp_path / "absent.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(CraterdiffError, match="cannot load efficientnet_lite0 weights .* corrupt or truncated"):
        build_extractor("efficientnet_lite0", path=str(tmp_path / "junk.pth"))
    torch.save({"_fc.weight": torch.zeros(1000, 1280)}, tmp_path / "partial.pth")
    with pytest.raises(CraterdiffError, match="missing keys"):
        build_extractor("efficientnet_lite0", path=str(tmp_path / "partial.pth"))


def test_bad_input_size():
    with pytest.raises(CraterdiffError, match="input_size"):
        build_extractor("pixels", input_size=4)
