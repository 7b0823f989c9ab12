"""Mixed precision and memory options: autocast in the UNet passes, fp16 loss scaling, gradient
checkpointing, fp32 Fisher products, chunked sampling, and the clear errors of CUDA-only settings."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from config import load_config
from rl.ppo import ppo_update
from rl.fisher import fisher_vector_product
from rl.states import state_subsample
from rl.trpo import old_means
from rl.update import UpdateBatch
from basics import CraterdiffError
from utils import setup_precision

from .conftest import ROOT, algorithm_overrides
from .test_rl import rl_cfg, tiny_policy

CPU = torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_setup_precision_on_cpu():
    assert setup_precision("fp32", False, CPU) is None
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert setup_precision("bf16", False, CPU) is torch.bfloat16
    assert [str(w.message).startswith("precision bf16 on a CPU without native bf16") for w in caught] == \
        ([] if native else [True])
    assert setup_precision("fp16", False, CPU) is torch.float16
    with pytest.raises(CraterdiffError, match="tf32: true needs a CUDA GPU.*--set tf32=false"):
        setup_precision("fp32", True, CPU)


def test_autocast_runs_the_unet_in_low_precision_and_plain_restores_fp32():
    policy = tiny_policy()
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((4,), 500)
    with torch.no_grad():
        ref = policy.model_output(x, t)
        policy.amp_dtype = torch.bfloat16
        low = policy.model_output(x, t)
        with policy.plain():
            exact = policy.model_output(x, t)
        low_again = policy.model_output(x, t)
    assert low.dtype == torch.float32  # cast back before the Gaussian log-prob
    assert not torch.equal(low, ref)  # autocast really ran (bf16 keeps 8 mantissa bits)
    torch.testing.assert_close(low, ref, rtol=0.1, atol=0.05)
    assert torch.equal(exact, ref) and torch.equal(low_again, low)


def _grads(policy, traj, k=1):
    policy.zero_grad(set_to_none=True)
    policy.step_at(traj, k, torch.arange(traj.batch_size)).logp.sum().backward()
    return [p.grad.clone() for p in policy.trainable_parameters()]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_recomputes_activations_and_keeps_the_gradients(mode):
    policy = tiny_policy(mode=mode)
    traj = policy.sample(3, generator=torch.Generator().manual_seed(0))
    plain = _grads(policy, traj)
    policy.enable_gradient_checkpointing()
    assert policy.network.is_gradient_checkpointing
    calls = []
    resnet = policy.network.down_blocks[0].resnets[0]
    handle = resnet.register_forward_pre_hook(lambda *a: calls.append(1))  # pre: recomputation stops early
    checkpointed = _grads(policy, traj)
    handle.remove()
    assert len(calls) == 2  # the forward, then its recomputation in backward
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fisher_products_run_in_fp32_without_checkpointing():
    # the same product whether or not the policy's passes are autocast and checkpointed
    policy = tiny_policy()
    traj = policy.sample(3, generator=torch.Generator().manual_seed(0))
    states = state_subsample(traj.num_steps, traj.batch_size, 0, generator=torch.Generator().manual_seed(0))
    mu_old = old_means(policy, traj, states)
    v = torch.randn(sum(p.numel() for p in policy.trainable_parameters()), generator=torch.Generator().manual_seed(1))
    ref = fisher_vector_product(policy, traj, states, mu_old, v, damping=0.0)
    policy.amp_dtype = torch.bfloat16
    policy.enable_gradient_checkpointing()
    got = fisher_vector_product(policy, traj, states, mu_old, v, damping=0.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)
    assert policy.network.is_gradient_checkpointing and policy.amp_dtype is torch.bfloat16  # restored


def _ppo_pair(scaler):
    a = tiny_policy()
    b = copy.deepcopy(a)
    traj = a.sample(8, generator=torch.Generator().manual_seed(0))
    adv = torch.randn(8, generator=torch.Generator().manual_seed(1)).double()
    cfg = rl_cfg(lr=1e-2, microbatch=4, gradient_accumulation=1)
    outs = []
    for policy, sc in ((a, None), (b, scaler)):
        opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr)
        outs.append(ppo_update(UpdateBatch(policy, opt, traj, adv, cfg, torch.Generator().manual_seed(2), sc)))
    return a, b, outs


def test_loss_scaling_leaves_the_update_unchanged():
    # gradients are scaled by a power of two and unscaled before clipping: the same step
    a, b, (plain, scaled) = _ppo_pair(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    for p, q in zip(a.trainable_parameters(), b.trainable_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert scaled.optimizer_steps == plain.optimizer_steps == 2
    assert scaled.extra["loss_scale"] == 2.0 ** 12 and scaled.extra["scaler_skips"] == 0
    assert "loss_scale" not in plain.extra


@pytest.mark.parametrize("scaled", [True, False])
def test_overflow_under_loss_scaling_skips_the_step_without_counting_as_a_failure(scaled):
    # an overflow of the scaled fp16 gradients, simulated by a hook that makes one gradient infinite;
    # without a scaler the same gradient is a real non-finite update
    policy = tiny_policy()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    traj = policy.sample(8, generator=torch.Generator().manual_seed(0))
    policy.trainable_parameters()[0].register_hook(lambda g: g * float("inf"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if scaled else None
    cfg = rl_cfg(lr=1e-2, microbatch=4, gradient_accumulation=1)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr)
    stats = ppo_update(UpdateBatch(policy, opt, traj, torch.randn(8).double(), cfg, torch.Generator().manual_seed(2),
                                   scaler))
    assert stats.optimizer_steps == 0 and stats.nonfinite is not scaled
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    if scaled:
        assert stats.extra["scaler_skips"] == 2 and stats.extra["loss_scale"] == 2.0 ** 10  # halved twice


def test_chunked_sampling_keeps_consistent_log_probs():
    policy = tiny_policy()
    traj = policy.sample(5, generator=torch.Generator().manual_seed(0), chunk=2)
    assert traj.states.shape == (4, 5, 1, 8, 8) and traj.logp.shape == (3, 5) and traj.images.shape == (5, 1, 8, 8)
    with torch.no_grad():
        for k in range(traj.num_steps):
            torch.testing.assert_close(policy.step_at(traj, k, torch.arange(5)).logp, traj.logp[k],
                                       rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traj.images, traj.states[-1].clamp(-1, 1))


def test_trpo_in_fp16_is_refused_before_any_work(tmp_path):
    from rl.trainer import Finetuner

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [*algorithm_overrides("trpo"), "precision=fp16", "device=cpu"])
    with pytest.raises(CraterdiffError, match="fp16 can underflow.*precision=bf16"):
        Finetuner(cfg, tmp_path)
    assert not (tmp_path / "reward").exists()


def test_fp16_pretraining_checkpoints_its_loss_scale(tmp_path):
    from ddpm.pretrain import build_trainer, load_checkpoint, pretrain
    from utils import load_state

    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["precision=fp16", "device=cpu", "pretrain.steps=2",
                                                         "pretrain.sample_every=100", "log.trackers=[csv]"])
    assert pretrain(cfg, tmp_path, resume=False, stop_at=1) is None
    state = load_state(tmp_path / "checkpoints" / "step_1" / "training_state.pt")
    assert state["scaler"]["scale"] > 0
    assert state["scaler"]["_growth_tracker"] == 1  # one successful step since the last scale change
    tr = build_trainer(cfg, CPU)
    assert tr.scaler.is_enabled() and tr.scaler.state_dict()["_growth_tracker"] == 0
    load_checkpoint(tr, tmp_path / "checkpoints" / "step_1")
    assert tr.scaler.state_dict() == state["scaler"] and tr.step == 1
    assert pretrain(cfg, tmp_path, resume=True) == tmp_path / "model"
