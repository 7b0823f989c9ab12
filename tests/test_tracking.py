"""Experiment trackers through accelerate: metrics.csv keeps flat columns, TensorBoard and W&B (offline, no network)
get grouped tags and the resolved config as hyperparameters."""
from __future__ import annotations

import csv

import pytest
from PIL import Image

from bench.faults import tensorboard_scalars
from config import LogConfig, config_to_dict, load_config
from utils import RunLogger, flat_hparams, tracker_tag

from .conftest import ROOT

ROW = {"reward_mean": 0.5, "reward_mmd": 0.25, "value_mmd": 0.01, "kl": 1e-3, "time_update_s": 2.0, "peak_mem_mb": 900}


@pytest.mark.parametrize("key, tag", [("reward_mmd", "reward/mmd"), ("value_mmd", "reward/value_mmd"),
                                      ("time_update_s", "time/update_s"), ("peak_mem_mb", "system/peak_mem_mb"),
                                      ("kl", "policy/kl"), ("clip_frac", "policy/clip_frac")])
def test_tags_are_grouped(key, tag):
    assert tracker_tag(key, "policy") == tag
    assert tracker_tag("loss", "pretrain") == "pretrain/loss"


def test_hparams_are_flat_scalars():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    flat = flat_hparams(config_to_dict(cfg))
    assert flat["rl.lr"] == cfg.rl.lr and flat["reward.weights.size"] == cfg.reward.weights.size
    assert flat["log.trackers"] == str(config_to_dict(cfg)["log"]["trackers"])
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_csv_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    settings = LogConfig(trackers=("csv", "tensorboard", "wandb"))
    log = RunLogger(tmp_path, settings, group="policy", hparams=config_to_dict(cfg))
    for step in (1, 2):
        log.log(step, {**ROW, "kl": step * 1e-3})
    log.add_image("samples", Image.new("L", (16, 16), 128), 2)
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"] and float(rows[1]["kl"]) == 2e-3 and "reward_mmd" in rows[0]
    scalars = tensorboard_scalars(tmp_path)  # volatile tags (time, memory) aside
    assert scalars["policy/kl"] == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert {"reward/mean", "reward/mmd", "reward/value_mmd"} <= set(scalars)
    hparams = list((tmp_path / "tb").glob("*/hparams.yml"))
    assert len(hparams) == 1 and f"rl.lr: {cfg.rl.lr}" in hparams[0].read_text()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "W&B offline writes its run under <run>/wandb"
    data = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"reward/mmd" in data and b"policy/kl" in data  # the history, grouped
    assert b"rl.lr" in data and b"reward.weights.size" in data  # the config
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    assert run_id in runs[0].name
    resumed = RunLogger(tmp_path, settings, group="policy", resume_step=2, hparams=config_to_dict(cfg))
    resumed.log(3, ROW)
    resumed.close()
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == run_id  # the same W&B run continues
    assert len(list((tmp_path / "tb").glob("*/hparams.yml"))) == 1  # hyperparameters are stored once
