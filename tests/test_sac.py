"""The SAC-style algorithm (rl/sac.py): the soft Bellman target against a hand computation, the entropy
against torch.distributions, the learned noise scale in sampling and log-probs, Polyak averaging and
the temperature's direction, a short run that raises a reward, and the scripts end to end (exact resume:
tests/test_finetune.py::test_resume_is_exact)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import Normal

from config import SACConfig, SamplerConfig, config_from_dict
from ddpm.pipeline import load_step_scales
from ddpm.schedulers import make_train_scheduler
from ddpm.unet import build_unet
from rl.advantages import Critic, standardize
from rl.build import _policy_sampler, model_sampler
from rl.policy import DiffusionPolicy
from rl.sac import (SoftActorCritic, action_entropies, gaussian_entropy, polyak_update, sac_update, soft_lambda_return,
                    soft_bellman_target, temperature_loss)
from rl.update import UpdateBatch

from .conftest import algorithm_overrides, assert_plain_diffusers_reproduces_sample, run_script, script_error
from .test_rl import rl_cfg

SAMPLER = dict(num_steps=3, eta=1.0, sigma_floor=0.1)


def tiny_policy(seed: int = 0, **sampler) -> DiffusionPolicy:
    torch.manual_seed(seed)
    unet = build_unet("tiny", image_size=8, channels=1)
    sched = make_train_scheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return DiffusionPolicy(unet, sched, SamplerConfig(**{**SAMPLER, **sampler}))


def test_soft_bellman_target_against_a_hand_computation():
    # T = 3 steps, B = 2; the reward arrives at the last step; V̄(s_3) = 0 (the image is terminal)
    rewards = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.5, -0.5]])
    next_target = torch.tensor([[0.2, -0.1], [0.4, 0.3], [0.0, 0.0]])  # V̄(s_1), V̄(s_2), V̄(s_3) = 0
    entropy = torch.tensor([1.0, 0.5, 0.0])  # the deterministic last step has no entropy term
    y = soft_bellman_target(rewards, next_target, entropy, alpha=0.1, gamma=0.9)
    # y_k = r_k + α H_k + γ V̄(s_{k+1}), worked by hand:
    expected = torch.tensor([[0.0 + 0.1 * 1.0 + 0.9 * 0.2, 0.0 + 0.1 * 1.0 + 0.9 * -0.1],
                             [0.0 + 0.1 * 0.5 + 0.9 * 0.4, 0.0 + 0.1 * 0.5 + 0.9 * 0.3],
                             [1.5, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.7])
def test_entropy_matches_torch_distributions(sigma):
    ref = Normal(0.0, sigma).entropy()
    torch.testing.assert_close(gaussian_entropy(sigma, dims=64, reduction="mean"), ref)
    # 'sum': the entropy of N(μ, σ² I_64) is 64 independent 1-d entropies
    torch.testing.assert_close(gaussian_entropy(sigma, dims=64, reduction="sum"), 64 * ref)


def test_action_entropies_follow_the_learned_scale_and_skip_deterministic_steps():
    policy = tiny_policy()
    policy.enable_noise_scale(max_log_scale=0.5)
    with torch.no_grad():
        policy.log_noise_scale.copy_(torch.tensor([0.2, -0.3, 0.4]))
    h = action_entropies(policy)
    for k in range(3):
        if policy.deterministic(k):
            assert h[k] == 0  # the last DDIM step draws no noise
        else:
            ref = Normal(0.0, policy.sigma_tilde(k) * math.exp([0.2, -0.3, 0.4][k])).entropy()
            torch.testing.assert_close(h[k], ref)
    assert policy.deterministic(2) and not policy.deterministic(0)


def test_noise_scale_enters_sampling_and_the_logprob():
    policy = tiny_policy()
    policy.enable_noise_scale(max_log_scale=0.5)
    with torch.no_grad():
        policy.log_noise_scale.copy_(torch.tensor([0.9, -0.3, 0.0]))  # 0.9 is clamped to 0.5
    traj = policy.sample(4, generator=torch.Generator().manual_seed(0))
    plain = tiny_policy().sample(4, generator=torch.Generator().manual_seed(0))
    for k in range(2):
        with torch.no_grad():
            out = policy.step_at(traj, k, torch.arange(4))
        scale = math.exp([0.5, -0.3][k])
        ref = Normal(out.mu, policy.sigma_tilde(k) * scale).log_prob(traj.x_prev[k]).mean((1, 2, 3))
        torch.testing.assert_close(out.logp, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logp, traj.logp[k], rtol=1e-5, atol=1e-5)  # as recorded while sampling
    # the same noise z, scaled: the first step's deviation from its mean is e^0.5 times the plain one's
    with torch.no_grad():
        mu0 = policy.step_at(traj, 0, torch.arange(4)).mu
    torch.testing.assert_close(traj.x_prev[0] - mu0, math.exp(0.5) * (plain.x_prev[0] - mu0), rtol=1e-4, atol=1e-5)


def test_polyak_update_and_the_temperature_direction():
    a, b = Critic(1, width=4), Critic(1, width=4)
    before = [p.detach().clone() for p in a.parameters()]
    polyak_update(a, b, tau=0.25)
    for p, q, s in zip(a.parameters(), before, b.parameters()):
        torch.testing.assert_close(p, 0.75 * q + 0.25 * s)
    # entropy above its target: the gradient step on log α lowers α; below: raises it
    for entropy, sign in ((1.2, -1), (0.8, 1)):
        log_alpha = torch.zeros((), requires_grad=True)
        temperature_loss(log_alpha, entropy, 1.0).backward()
        assert -log_alpha.grad.sign() == sign


def test_short_sac_run_raises_the_reward():
    # reward = mean brightness of the final images; the actor and its noise scales learn from the
    # critic's soft advantages
    policy = tiny_policy()
    policy.enable_noise_scale(max_log_scale=0.5)
    cfg = rl_cfg(algorithm="sac", microbatch=16, gradient_accumulation=1, sac={"critic_steps": 2})
    sac = SoftActorCritic(policy, cfg.sac, cfg.critic)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(15):
        traj = policy.sample(32, generator=gen)
        reward = traj.images.flatten(1).mean(1)
        history.append(reward.mean().item())
        stats = sac_update(UpdateBatch(policy, opt, traj, standardize(reward), cfg, gen), sac)
        assert not stats.nonfinite and math.isfinite(stats.extra["critic_loss"])
    assert sum(history[-3:]) / 3 > sum(history[:3]) / 3 + 0.05, history


def test_saved_noise_scales_are_used_wherever_the_model_is_sampled(tmp_path):
    policy = tiny_policy()
    policy.enable_noise_scale(max_log_scale=0.5)
    with torch.no_grad():
        policy.log_noise_scale.copy_(torch.tensor([0.4, -0.2, 0.0]))
    policy.save(tmp_path)
    saved = json.loads((tmp_path / "model" / "noise_scale.json").read_text())
    assert saved["num_steps"] == 3 and saved["scales"][2] == 1.0  # the deterministic step keeps its (zero) noise
    cfg = config_from_dict({"data": {"image_size": 8, "channels": 1}, "sampler": {**SAMPLER, "batch_size": 5}})
    loaded = model_sampler(cfg, tmp_path / "model", torch.device("cpu"))(7, torch.Generator().manual_seed(3))
    direct = _policy_sampler(policy.eval(), 5)(7, torch.Generator().manual_seed(3))
    plain = _policy_sampler(tiny_policy().eval(), 5)(7, torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded, direct, rtol=0, atol=1e-6)
    assert not torch.allclose(loaded, plain, atol=1e-3)
    with pytest.raises(Exception, match="sampler.num_steps=3"):
        load_step_scales(tmp_path / "model", 10)


SAC = [a for o in algorithm_overrides("sac") for a in ("--set", o)]


def test_finetune_and_eval_scripts_run_sac_on_smoke(tmp_path, smoke_cfg):
    run = tmp_path / "run"
    proc = run_script("scripts.finetune", "--cfg", smoke_cfg, "--out", run, *SAC,
                      "--set", "reward.realism.enabled=false", "--set", "log.trackers=[csv]")
    assert proc.returncode == 0, proc.stderr
    assert (run / "model" / "noise_scale.json").is_file()
    assert_plain_diffusers_reproduces_sample(run / "model", tmp_path)  # the learned noise scales included
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"critic_loss", "alpha", "entropy", "noise_scale_min", "noise_scale_max"} <= set(header)
    proc = run_script("scripts.eval", "--cfg", smoke_cfg, "--out", tmp_path / "eval", "--set", f"eval.run_dir={run}",
                      "--set", "eval.n=8", "--set", "eval.seeds=[0]", "--set", "eval.extractors=[pixels]",
                      "--set", "eval.tsne=false", "--models", "finetuned")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert "finetuned" in report["models"]


@pytest.mark.parametrize("extra, message", [
    ("rl.policy_mode=schedule", "per-step image states"),
    ("rl.kl_base_coef=0.1", "rl.kl_base_coef is 0.1 but rl.algorithm sac ignores it"),
    ("rl.advantages.gae=true", "brings its own soft critic"),
])
def test_sac_refuses_what_it_cannot_run(tmp_path, smoke_cfg, extra, message):
    script_error(run_script("scripts.finetune", "--cfg", smoke_cfg, "--out", tmp_path / "r",
                            *SAC, "--set", extra), message)


def test_sac_config_fields_are_documented():
    # every SAC hyperparameter carries its meaning (the config loader's help text)
    import dataclasses
    for f in dataclasses.fields(SACConfig):
        assert f.metadata.get("help"), f.name


def test_soft_lambda_return_spans_one_step_to_monte_carlo():
    g = torch.Generator().manual_seed(0)
    rewards = torch.zeros(4, 3, dtype=torch.float64)
    rewards[-1] = torch.randn(3, generator=g, dtype=torch.float64)
    values = torch.randn(4, 3, generator=g, dtype=torch.float64)
    next_target = torch.randn(4, 3, generator=g, dtype=torch.float64)
    next_target[-1] = 0.0
    entropy = torch.tensor([0.7, 0.5, 0.3, 0.0], dtype=torch.float64)
    one = soft_bellman_target(rewards, next_target, entropy, alpha=0.2, gamma=1.0)
    # λ = 0: the one-step soft Bellman target itself
    torch.testing.assert_close(soft_lambda_return(one, values, gamma=1.0, lam=0.0), one)
    # λ = 1, γ = 1: y_k = V̄(s_{k+1}) terms telescope with the V's away, leaving the Monte-Carlo soft
    # return Σ_{l≥k} (r_l + α H_l) plus Σ_{l>k} (V̄(s_l) − V(s_l)) (target and critic differ): by brute force
    mc = torch.stack([sum(rewards[l] + 0.2 * entropy[l] for l in range(k, 4))
                      + sum(next_target[l - 1] - values[l] for l in range(k + 1, 4)) for k in range(4)])
    torch.testing.assert_close(soft_lambda_return(one, values, gamma=1.0, lam=1.0), mc)
    # 0 < λ < 1 against the recursion written out for k = 2: y_2 = y_2^(1) + λ (y_3^(1) − V(s_3))
    y = soft_lambda_return(one, values, gamma=1.0, lam=0.5)
    torch.testing.assert_close(y[2], one[2] + 0.5 * (one[3] - values[3]))
