"""DDPM pretraining: the skewed mix, the loss, and exact resume."""
from __future__ import annotations

import csv

import pytest
import torch
import yaml
from diffusers import UNet2DModel

from config import load_config, prepare_run_dir
from ddpm.pretrain import build_trainer, ddpm_loss, load_checkpoint, pretrain, skew_weights, warmup_cosine
from ddpm.schedulers import make_train_scheduler
from ddpm.unet import PRESETS, build_unet, count_parameters
from basics import CraterdiffError, latest_checkpoint
from utils import load_state

from .conftest import ROOT


def test_skew_weights_give_the_requested_fraction():
    d = torch.tensor([50.0, 60.0, 70.0, 150.0, 200.0, 80.0, 300.0])
    w = skew_weights(d, diameter_km=100.0, small_fraction=0.9)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[d < 100].sum().item() == pytest.approx(0.9)
    assert torch.allclose(w[d < 100], w[d < 100][0].expand(4).double())  # uniform within the group
    assert torch.allclose(skew_weights(d, diameter_km=100.0, small_fraction=None), torch.full((7,), 1 / 7).double())
    assert torch.allclose(skew_weights(d, diameter_km=10.0, small_fraction=0.9), torch.full((7,), 1 / 7).double())


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, warmup=10, total=100) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup=10, total=100) == pytest.approx(1.0)
    assert warmup_cosine(100, warmup=10, total=100) == pytest.approx(0.1)


def test_ddpm_loss_is_the_noise_mse():
    # A "UNet" that returns the true noise has zero loss; one that returns zeros has loss E[ε²] ≈ 1.
    sched = make_train_scheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    x0 = torch.rand(64, 1, 8, 8) * 2 - 1

    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return type("Out", (), {"sample": torch.zeros_like(x)})()
    loss = ddpm_loss(Zero(), x0, sched, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.0, abs=0.05)
    # v-prediction: the target is v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0 (diffusers' get_velocity); a network
    # that outputs exactly v has zero loss
    vsched = make_train_scheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction")

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t):
            a = vsched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
            return type("Out", (), {"sample": a.sqrt() * eps - (1 - a).sqrt() * x0})()
    assert ddpm_loss(Oracle(), x0, vsched, generator=torch.Generator().manual_seed(0)).item() < 1e-10


def test_presets_build_and_small_is_about_one_million():
    assert count_parameters(build_unet("small", image_size=32, channels=1)) == pytest.approx(1.1e6, rel=0.05)
    assert set(PRESETS) == {"tiny", "small", "base", "large"}
    with pytest.raises(ValueError, match="divisible"):
        build_unet("small", image_size=30, channels=1)


def _rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in csv.DictReader(f)]


def test_resume_is_exact(tmp_path):
    # Reference: one uninterrupted run of N steps. Candidate: k steps, stop, resume to N.
    over = ["pretrain.steps=8", "pretrain.checkpoint_every=100", "pretrain.sample_every=100",
            "pretrain.log_every=2", "log.trackers=[csv]"]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", over)
    full = pretrain(cfg, prepare_run_dir(tmp_path / "full", cfg, resume=False), resume=False)
    assert pretrain(cfg, prepare_run_dir(tmp_path / "split", cfg, resume=False), resume=False, stop_at=3) is None
    resumed = pretrain(cfg, prepare_run_dir(tmp_path / "split", cfg, resume=True), resume=True)

    a = UNet2DModel.from_pretrained(full / "unet").state_dict()
    b = UNet2DModel.from_pretrained(resumed / "unet").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    sa = load_state(tmp_path / "full" / "checkpoints" / "step_8" / "training_state.pt")
    sb = load_state(tmp_path / "split" / "checkpoints" / "step_8" / "training_state.pt")
    assert torch.equal(sa["rng"]["generator"], sb["rng"]["generator"])
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    for pa, pb in zip(sa["ema"]["shadow_params"], sb["ema"]["shadow_params"]):
        assert torch.equal(pa, pb)
    assert _rows(tmp_path / "full" / "metrics.csv") == _rows(tmp_path / "split" / "metrics.csv")
    assert [r["step"] for r in _rows(tmp_path / "split" / "metrics.csv")] == ["2", "4", "6", "8"]


def test_resume_applies_changed_settings_only_when_asked(tmp_path):
    over = ["pretrain.steps=4", "pretrain.warmup_steps=2", "pretrain.checkpoint_every=100", "pretrain.sample_every=100",
            "pretrain.log_every=1", "log.trackers=[csv]"]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", over)
    changed = load_config(ROOT / "configs" / "smoke.yaml", [*over, "pretrain.lr=0.5", "pretrain.ema_decay=0.9"])
    run = tmp_path / "run"
    assert pretrain(cfg, prepare_run_dir(run, cfg, resume=False), resume=False, stop_at=2) is None
    with pytest.raises(CraterdiffError, match=r"pretrain\.lr \(0\.002 -> 0\.5\), pretrain\.ema_decay"):
        prepare_run_dir(run, changed, resume=True, stage="pretrain")
    pretrain(changed, prepare_run_dir(run, changed, resume=True, stage="pretrain", apply_changes=True), resume=True)
    # from the resumed step on, the learning rate is the changed run's own schedule at those steps
    reference = tmp_path / "changed_from_the_start"
    pretrain(changed, prepare_run_dir(reference, changed, resume=False), resume=False)
    lrs = [float(r["lr"]) for r in _rows(run / "metrics.csv")]
    assert lrs[2:] == [float(r["lr"]) for r in _rows(reference / "metrics.csv")][2:] and lrs[1] < 0.01
    tr = build_trainer(changed, torch.device("cpu"))
    load_checkpoint(tr, latest_checkpoint(run / "checkpoints"))
    assert tr.ema.decay == 0.9 and tr.step == 4
    assert yaml.safe_load((run / "resume_changes.yaml").read_text()) == [
        {"resumed_from": "step_2", "changed": {"pretrain.lr": {"from": 0.002, "to": 0.5},
                                               "pretrain.ema_decay": {"from": 0.999, "to": 0.9}}}]
    assert load_config(run / "config.yaml").pretrain.lr == 0.5
