"""The same seed on CPU gives the same results: pretraining and fine-tuning write identical
`metrics.csv` files and weights, reward building writes an identical artifact."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from bench.faults import metric_rows  # metrics.csv less its wall-clock and memory columns
from basics import run_main

from .conftest import smoke_argv


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _twice(tmp_path, main, over: list[str]) -> tuple[Path, Path]:
    runs = (tmp_path / "a", tmp_path / "b")
    for run in runs:
        run_main(main, smoke_argv(run, "num_threads=1", "log.trackers=[csv]", *over))
    return runs


def test_pretraining_is_deterministic(tmp_path):
    from scripts import pretrain_ddpm

    a, b = _twice(tmp_path, pretrain_ddpm.main, ["pretrain.steps=6", "pretrain.log_every=2",
                                                  "pretrain.checkpoint_every=3", "pretrain.batch_size=4"])
    rows = metric_rows(a / "metrics.csv")
    assert len(rows) == 3 and rows == metric_rows(b / "metrics.csv")
    weights = "checkpoints/step_6/train_unet/diffusion_pytorch_model.safetensors"
    assert_same_tensors(a / weights, b / weights)


def test_reward_building_is_deterministic(tmp_path):
    """Features, PCA, realism scorer (trained on base-model samples drawn with the seed) and its
    held-out figures: all equal."""
    from scripts import train_reward_model

    a, b = (r / "reward" for r in _twice(tmp_path, train_reward_model.main,
                                          ["reward.realism.epochs=2", "reward.realism.n_fake=16"]))
    assert np.array_equal(np.load(a / "reference_features.npy"), np.load(b / "reference_features.npy"))
    with np.load(a / "pca.npz") as za, np.load(b / "pca.npz") as zb:
        assert za.files == zb.files and all(np.array_equal(za[k], zb[k]) for k in za.files)
    assert_same_tensors(a / "realism.safetensors", b / "realism.safetensors")
    meta_a, meta_b = (yaml.safe_load((r / "reward.yaml").read_text()) for r in (a, b))
    # realism.safetensors' bytes may differ: safetensors writes its string metadata from an unordered
    # map, so the header's key order varies between runs (its tensors are compared above)
    for meta in (meta_a, meta_b):
        meta["sha256"].pop("realism.safetensors")
    assert meta_a == meta_b


def test_finetuning_is_deterministic(tmp_path, tiny_base):
    from scripts import finetune

    a, b = _twice(tmp_path, finetune.main, [f"model.pretrained={tiny_base}", "reward.features.name=pixels",
                                            "reward.realism.epochs=1", "reward.realism.n_fake=16",
                                            "rl.iterations=2", "rl.batch_size=8", "rl.microbatch=4",
                                            "sampler.num_steps=3"])
    rows = metric_rows(a / "metrics.csv")
    assert len(rows) == 2 and rows == metric_rows(b / "metrics.csv")
    assert float(rows[-1]["kl"]) > 0  # the policy moved, so equal weights are not equal by staying put
    assert_same_tensors(a / "checkpoints/step_2/policy.safetensors", b / "checkpoints/step_2/policy.safetensors")
