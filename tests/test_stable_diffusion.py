"""Stable Diffusion parts: a tiny random SD written in code loads from local files, encodes prompts,
decodes latents; a missing model or prompt file is a clear error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpm.stable_diffusion import (build_tiny_sd, decode_latents, encode_prompts, load_stable_diffusion, read_prompts,
                                   to_channels)
from basics import PROJECT_ROOT, CraterdiffError


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny_sd")


def test_tiny_sd_loads_offline_and_runs_with_diffusers(tiny_sd):
    from diffusers import StableDiffusionPipeline

    parts = load_stable_diffusion(tiny_sd)
    assert parts.latent_shape == (4, 8, 8) and parts.image_size == 16
    assert not any(p.requires_grad for p in parts.vae.parameters())
    assert not any(p.requires_grad for p in parts.text_encoder.parameters())
    # the same directory is an ordinary diffusers pipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True, safety_checker=None)
    out = pipe("a crater on mars", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert out.shape == (1, 3, 16, 16)


def test_prompt_embeddings_and_decoding(tiny_sd):
    parts = load_stable_diffusion(tiny_sd)
    emb = encode_prompts(parts, ["a fresh crater on mars", "an old crater with dunes", ""])
    assert emb.shape == (3, 16, 32)
    assert not torch.allclose(emb[0], emb[1])  # different prompts, different conditioning
    torch.testing.assert_close(encode_prompts(parts, ["a fresh crater on mars"])[0], emb[0])
    x = decode_latents(parts.vae, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    gray = to_channels(x, 1)
    torch.testing.assert_close(gray[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])


def test_shipped_prompt_files():
    train = read_prompts(PROJECT_ROOT / "prompts" / "train" / "crater.txt")
    test = read_prompts(PROJECT_ROOT / "prompts" / "test" / "crater.txt")
    assert len(train) == 25 and len(set(train)) == 25 and len(test) >= 5
    assert not set(train) & set(test)  # the test prompts are held out


def test_missing_model_and_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(CraterdiffError, match="no Stable Diffusion model at .*nothing is downloaded"):
        load_stable_diffusion(tmp_path / "nowhere")
    with pytest.raises(CraterdiffError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(CraterdiffError, match="has no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    # the Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}
    import huggingface_hub.constants

    from ddpm.stable_diffusion import locate_stable_diffusion

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--mars-lab--tiny-sd"
    build_tiny_sd(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    found = locate_stable_diffusion("mars-lab/tiny-sd")
    assert found == repo / "snapshots" / "0123abcd"
    assert load_stable_diffusion(found).unet.config.in_channels == 4
    with pytest.raises(CraterdiffError, match="neither a local directory nor in the Hugging Face cache.*nothing is "
                                              "downloaded"):
        locate_stable_diffusion("mars-lab/not-cached")
    assert locate_stable_diffusion("configs") == PROJECT_ROOT / "configs"  # local directories first
