"""Every script end to end on configs/smoke.yaml, as a subprocess, and its one-line errors."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from .conftest import ROOT, guard, run_script, script_error


def test_make_dataset_smoke(tmp_path, smoke_cfg):
    out = tmp_path / "craters"
    proc = run_script("scripts.make_dataset", "--cfg", smoke_cfg, "--out", out)
    assert proc.returncode == 0, proc.stderr
    with open(out / "metadata.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 200 and {r["split"] for r in rows} == {"train", "heldout"}
    tiles = sorted((out / "16").glob("*.png"))
    assert len(tiles) == len(rows)
    assert Image.open(tiles[0]).size == (16, 16) and (out / "grid.png").is_file()


def test_pretrain_then_sample_smoke(tmp_path, smoke_cfg):
    run = tmp_path / "run"
    proc = run_script("scripts.pretrain_ddpm", "--cfg", smoke_cfg, "--out", run)
    assert proc.returncode == 0, proc.stderr
    for f in ("config.yaml", "metrics.csv", "model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors",
              "checkpoints/step_20/COMPLETE", "samples/step_20.png"):
        assert (run / f).is_file(), f
    assert any((run / "tb").iterdir())
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20] and float(rows[-1]["loss"]) < float(rows[0]["loss"])

    # a second start into the same directory is refused rather than clobbering the run
    script_error(run_script("scripts.pretrain_ddpm", "--cfg", smoke_cfg, "--out", run), "--resume", progress_bars=False)
    # --resume with more steps (which stretches the learning-rate schedule) is refused unless applied on purpose;
    # applied, it continues from step 20 and the change is recorded
    longer = ("--cfg", smoke_cfg, "--out", run, "--resume", "--set", "pretrain.steps=30")
    script_error(run_script("scripts.pretrain_ddpm", *longer), "pretrain.steps (20 -> 30)", progress_bars=False)
    proc = run_script("scripts.pretrain_ddpm", *longer, "--apply-changes")
    assert proc.returncode == 0, proc.stderr
    assert (run / "checkpoints" / "step_30" / "COMPLETE").is_file()
    assert "pretrain.steps" in yaml.safe_load((run / "resume_changes.yaml").read_text())[0]["changed"]

    samples = tmp_path / "samples"
    proc = run_script("scripts.sample", "--cfg", smoke_cfg, "--ckpt", run / "model", "--n", 5, "--out", samples)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(samples.glob("0*.png"))
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (32, 32) and (samples / "grid.png").is_file()
    # a pretraining checkpoint directory samples too (its EMA weights)
    proc = run_script("scripts.sample", "--cfg", smoke_cfg, "--ckpt", run / "checkpoints" / "step_30", "--n", 2,
                      "--out", tmp_path / "from_ckpt")
    assert proc.returncode == 0, proc.stderr


def test_sample_shipped_model(tmp_path):
    proc = run_script("scripts.sample", "--ckpt", "ddpm/pretrained/mars32", "--n", 4, "--out", tmp_path,
                      "--set", "sampler.num_steps=3")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "00000.png").size == (32, 32)


def test_script_errors_are_one_line(tmp_path, smoke_cfg):
    script_error(run_script("scripts.pretrain_ddpm", "--cfg", smoke_cfg, "--out", tmp_path / "a",
                               "--set", "pretrain.lrr=1"), "unknown key 'pretrain.lrr'", "did you mean 'pretrain.lr'", progress_bars=False)
    script_error(run_script("scripts.pretrain_ddpm", "--cfg", tmp_path / "missing.yaml"), "not found", progress_bars=False)
    script_error(run_script("scripts.sample", "--ckpt", tmp_path / "nothing", "--out", tmp_path / "s"),
                    "no DDPM model at", progress_bars=False)
    script_error(run_script("scripts.pretrain_ddpm", "--cfg", smoke_cfg, "--out", tmp_path / "b", "--resume"),
                    "no complete checkpoint", progress_bars=False)
    (tmp_path / "no_images").mkdir()
    script_error(run_script("scripts.pretrain_ddpm", "--cfg", smoke_cfg, "--out", tmp_path / "c",
                               "--set", "data.source=folder", "--set", f"data.root={tmp_path / 'no_images'}"),
                    "holds no image files", progress_bars=False)
    script_error(run_script("scripts.pretrain_ddpm", "--cfg", smoke_cfg, "--out", tmp_path / "d",
                               "--set", "data.source=folder", "--set", f"data.root={tmp_path / 'absent'}"),
                    "does not exist", progress_bars=False)


@pytest.mark.parametrize("script, args", [
    ("finetune", ["--cfg", "configs/smoke.yaml", "--set", "rl.lr=-1"]),
    ("finetune", ["--cfg", "configs/smoke.yaml", "--set", "sampler.eta=0"]),
    ("pretrain_ddpm", ["--cfg", "configs/smoke.yaml", "--set", "pretrain.stepz=3"]),
    ("train_reward_model", ["--cfg", "configs/absent.yaml"]),
    ("eval", ["--cfg", "configs/smoke.yaml", "--set", "eval.n=many"]),
    ("sample", ["--ckpt", "ddpm/pretrained/mars32", "--n", "0"]),
    ("make_dataset", ["--cfg", "configs/smoke.yaml", "--set", "dataset.percentiles=[9,1]"]),
])
def test_config_and_argument_errors_come_before_torch_is_imported(script, args):
    """Each script parses its config and arguments before it imports torch (seconds on a cold start): Python's
    import log (-X importtime) of a refused call lists no torch module."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", f"scripts.{script}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=guard(120))
    log = [ln for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in log[1:]]
    assert "config" in imported and not [m for m in imported if m.split(".")[0] in ("torch", "diffusers", "numpy")]
