"""Stable Diffusion's parts for the latent-space policy: loading, prompts, text embeddings, decoding.

A Stable Diffusion directory is what `StableDiffusionPipeline.save_pretrained` writes (`unet/`,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json`), e.g. a local copy of SD 1.5.
It is read from local files only: `model.pretrained` names a directory, or a Hub repository id
(`owner/name`) that is already in the local Hugging Face cache (`locate_stable_diffusion`); anything
else is a clear error, never a download.
`build_tiny_sd` writes a randomly initialised one of the same layout (tests, CPU smoke runs).

Shapes: latents z (B, 4, H/8, W/8); prompt embeddings (N, L, D) with L the tokenizer's length and D
the text encoder's width; images (B, 3, H, W) in [-1, 1].
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from basics import CraterdiffError, first_line
from utils import atomic_directory, resolve_path

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class StableDiffusionParts:
    """The loaded parts; the VAE and the text encoder are frozen and in eval mode."""
    unet: "torch.nn.Module"            # UNet2DConditionModel
    vae: "torch.nn.Module"             # AutoencoderKL
    text_encoder: "torch.nn.Module"    # CLIPTextModel
    tokenizer: object                  # CLIPTokenizer
    scheduler: object                  # the pipeline's scheduler (its config gives β and the prediction type)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents the UNet denoises."""
        c = self.unet.config
        return c.in_channels, c.sample_size, c.sample_size

    @property
    def image_size(self) -> int:
        """Side of the decoded images: the latent side times the VAE's down-sampling factor."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def locate_stable_diffusion(pretrained: str | Path) -> Path:
    """The directory of `model.pretrained`: a local path (relative to the project root), else a Hub
    repository id looked up in the local Hugging Face cache only (HF_HOME / HF_HUB_CACHE)."""
    local = resolve_path(pretrained)
    if local.is_dir() or not _REPO_ID.match(str(pretrained)):
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(pretrained), local_files_only=True))
    except LocalEntryNotFoundError:
        raise CraterdiffError(f"model.pretrained '{pretrained}' is neither a local directory nor in the Hugging Face "
                              f"cache; fetch it yourself first (e.g. huggingface-cli download {pretrained} "
                              f"--local-dir models/sd) and point model.pretrained there: nothing is downloaded at "
                              f"run time") from None


def load_stable_diffusion(path: str | Path, *, dtype: torch.dtype = torch.float32) -> StableDiffusionParts:
    """The parts of the Stable Diffusion directory `path`, from local files only."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    missing = [p for p in SD_PARTS if not (path / p).is_dir()]
    if missing:
        raise CraterdiffError(f"no Stable Diffusion model at '{path}' (missing {', '.join(missing)}/); set "
                              f"model.pretrained to a local copy saved with StableDiffusionPipeline.save_pretrained "
                              f"(nothing is downloaded)")
    try:
        kw = dict(local_files_only=True, torch_dtype=dtype)
        src = str(path)  # a str, not a Path: peft writes the base model's name into its adapter's model card
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", local_files_only=True)
        # the DDPM scheduler carries the training β schedule; the policy builds its own DDIM steps from it
        scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise CraterdiffError(f"cannot load the Stable Diffusion model at '{path}': {first_line(e)}") from None
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler)


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty, non-comment lines of a prompt file."""
    path = Path(path)
    if not path.is_file():
        raise CraterdiffError(f"prompt file '{path}' does not exist; point model.prompts at a text file with one "
                              f"prompt per line (e.g. prompts/train/crater.txt)")
    prompts = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise CraterdiffError(f"prompt file '{path}' has no prompts; write one prompt per line")
    return prompts


@torch.no_grad()
def encode_prompts(parts: StableDiffusionParts, prompts: list[str], *, device: torch.device | str = "cpu"
                   ) -> Tensor:
    """Text-encoder hidden states of each prompt, padded to the tokenizer's length: (N, L, D)."""
    tok = parts.tokenizer(prompts, padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    enc = parts.text_encoder.to(device)
    return enc(tok.input_ids.to(device))[0]


def decode_latents(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """x = D(z / s) for the VAE's scaling factor s, clamped to [-1, 1]: (B, 4, h, w) -> (B, 3, H, W)."""
    scale = vae.config.scaling_factor
    return vae.decode(latents.to(next(vae.parameters()).dtype) / scale).sample.float().clamp(-1, 1)


def to_channels(images: Tensor, channels: int) -> Tensor:
    """RGB (B, 3, H, W) to the data's channels: unchanged for 3, ITU-R BT.601 luma for 1."""
    if channels == images.shape[1]:
        return images
    if channels == 1 and images.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        return (images * w.view(1, 3, 1, 1)).sum(1, keepdim=True)
    raise CraterdiffError(f"cannot turn {images.shape[1]}-channel images into {channels}-channel ones; "
                          f"set data.channels to 1 or 3")


# ----------------------------------------------------------------------------------------------
# A tiny random Stable Diffusion (tests and CPU smoke runs)
# ----------------------------------------------------------------------------------------------

TINY_WORDS = ("a", "an", "the", "crater", "craters", "on", "of", "with", "mars", "martian", "fresh", "old", "small",
              "large", "rim", "floor", "peak", "central", "ejecta", "dunes", "image", "orbital", "grayscale", "view")


def _tiny_tokenizer_files(folder: Path) -> None:
    """A word-level CLIP vocabulary (whole words, then single letters for anything else), no merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in TINY_WORDS:
        vocab[f"{w}</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.-'":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(f"{ch}</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_tiny_sd(path: str | Path, *, latent_size: int = 8, seed: int = 0) -> Path:
    """Write a randomly initialised Stable Diffusion of SD 1.5's layout and about 1M parameters to `path`.

    UNet2DConditionModel (4 latent channels, cross-attention width 32), a two-level AutoencoderKL
    (images 2·latent_size px), a two-layer CLIP text model and a word-level CLIP tokenizer (length 16),
    SD's scaled-linear β schedule with ε prediction.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    with atomic_directory(path) as tmp, tempfile.TemporaryDirectory() as vocab:
        _tiny_tokenizer_files(Path(vocab))
        tokenizer = CLIPTokenizer(str(Path(vocab) / "vocab.json"), str(Path(vocab) / "merges.txt"),
                                  model_max_length=16)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=2,
            num_hidden_layers=2, max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1,
            pad_token_id=1))
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, sample_size=2 * latent_size)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, prediction_type="epsilon", clip_sample=False, steps_offset=1)
        StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(tmp, safe_serialization=True)
    return Path(path)
