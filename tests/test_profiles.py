"""The GPU profiles (v100, h100, sd_lora, ddpm64): each loads with the settings it advertises, the
CUDA-only parts fail with one line on a CPU-only machine, and each runs end to end on the CPU once
shrunk (the same code paths: fp16 loss scaling, bf16 autocast, gradient checkpointing, LoRA on SD,
the large 64 px UNet)."""
from __future__ import annotations

import csv

import pytest
import torch

from config import load_config
from ddpm.stable_diffusion import build_tiny_sd

from .conftest import ROOT, run_script, script_error

CONFIGS = ROOT / "configs"
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
# shrinks a profile to seconds on the CPU; everything else (precision, checkpointing, modes) is kept
SMALL = ["device=cpu", "tf32=false", "log.trackers=[csv]", "data.image_size=32", "sampler.num_steps=2",
         "sampler.batch_size=8", "reward.features.input_size=32", "reward.realism.n_fake=8", "reward.realism.epochs=1",
         "rl.iterations=1", "rl.batch_size=6", "rl.sample_batch=3", "rl.microbatch=3", "rl.gradient_accumulation=1"]


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.parametrize("name, device, precision, tf32, checkpointing, kind", [
    ("sd_lora", "auto", "fp32", False, False, "sd"),
    ("v100", "cuda", "fp16", False, True, "sd"),
    ("h100", "cuda", "bf16", True, False, "sd"),
    ("ddpm64", "cuda", "bf16", True, False, "ddpm"),
])
def test_profile_loads_with_its_advertised_settings(name, device, precision, tf32, checkpointing, kind):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.device, cfg.precision, cfg.tf32, cfg.rl.gradient_checkpointing, cfg.model.kind) == \
        (device, precision, tf32, checkpointing, kind)
    assert cfg.rl.batch_size % cfg.rl.microbatch == 0 and cfg.rl.batch_size % (cfg.rl.sample_batch or 1) == 0
    if kind == "sd":
        assert cfg.rl.policy_mode == "lora" and cfg.rl.advantages.normalize == "per_prompt"
        assert (ROOT / cfg.model.prompts).is_file() and (ROOT / cfg.model.test_prompts).is_file()
    else:
        assert (cfg.model.preset, cfg.data.image_size) == ("large", 64)


def test_h100_takes_larger_batches_than_v100():
    v100, h100 = load_config(CONFIGS / "v100.yaml"), load_config(CONFIGS / "h100.yaml")
    assert h100.rl.batch_size > v100.rl.batch_size and h100.rl.microbatch > v100.rl.microbatch
    assert h100.rl.sample_batch > v100.rl.sample_batch


@NO_GPU
@pytest.mark.parametrize("script, name, extra, message", [
    ("scripts.finetune", "v100", [], "device 'cuda' requested but no CUDA GPU is visible"),
    ("scripts.finetune", "h100", [], "device 'cuda' requested but no CUDA GPU is visible"),
    ("scripts.finetune", "h100", ["device=cpu"], "tf32: true needs a CUDA GPU"),
    ("scripts.pretrain_ddpm", "ddpm64", [], "device 'cuda' requested but no CUDA GPU is visible"),
])
def test_cuda_parts_fail_with_one_line_on_a_cpu_only_machine(tmp_path, script, name, extra, message):
    proc = run_script(script, "--cfg", CONFIGS / f"{name}.yaml", "--out", tmp_path / "run", *_sets(extra))
    script_error(proc, message)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny_sd")


@pytest.mark.parametrize("name", ["v100", "h100"])
def test_sd_profiles_run_on_the_cpu_once_shrunk(tmp_path, tiny_sd, name):
    run = tmp_path / "run"
    proc = run_script("scripts.finetune", "--cfg", CONFIGS / f"{name}.yaml", "--out", run,
                      *_sets([*SMALL, f"model.pretrained={tiny_sd}"]), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    if name == "v100":  # fp16: loss-scaled steps
        assert float(row["loss_scale"]) > 0 and int(float(row["optimizer_steps"])) + int(float(row["scaler_skips"])) == 2
    else:  # bf16: no loss scaling
        assert "loss_scale" not in row and int(float(row["optimizer_steps"])) == 2
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "model" / "unet").is_dir()


def test_ddpm64_profile_pretrains_and_finetunes_on_the_cpu_once_shrunk(tmp_path):
    # fp32: bf16 on a CPU without native bf16 is emulated, tens of times slower (docs/design.md, "Scale");
    # the h100 test covers bf16
    small = [*SMALL, "precision=fp32", "data.image_size=64", "pretrain.steps=2", "pretrain.batch_size=2",
             "pretrain.sample_every=100"]
    proc = run_script("scripts.pretrain_ddpm", "--cfg", CONFIGS / "ddpm64.yaml", "--out", tmp_path / "base",
                      *_sets(small), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "base" / "model" / "unet" / "config.json").is_file()
    proc = run_script("scripts.finetune", "--cfg", CONFIGS / "ddpm64.yaml", "--out", tmp_path / "run",
                      *_sets([*small, f"model.pretrained={tmp_path / 'base' / 'model'}"]), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()
