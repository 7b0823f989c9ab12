"""The frozen-UNet policy modes (rl/modes.py): latent drift and sampler schedule. Log-probs against
torch.distributions, gradients only in the head, a short run raises a reward, save -> load gives the
same samples, and the scripts train, resume and evaluate each mode."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.distributions import Normal

from config import LatentSettings, SamplerConfig, ScheduleSettings, config_from_dict
from ddpm.schedulers import make_train_scheduler
from ddpm.unet import build_unet
from rl.advantages import standardize
from rl.build import _policy_sampler, model_sampler
from rl.modes import policy_class
from rl.policy import DiffusionPolicy
from rl.ppo import ppo_update, reinforce_update
from rl.states import state_subsample
from rl.trpo import old_means, subsample_kl, trpo_update
from rl.update import UpdateBatch

from .conftest import ROOT, run_script
from .test_rl import rl_cfg

SAMPLER = dict(num_steps=3, eta=1.0, sigma_floor=0.1)


def mode_policy(mode: str, seed: int = 0, **settings) -> DiffusionPolicy:
    torch.manual_seed(seed)
    unet = build_unet("tiny", image_size=8, channels=1)
    sched = make_train_scheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    kw = {"latent": LatentSettings(**settings)} if mode == "latent" else {"schedule": ScheduleSettings(**settings)}
    return policy_class(mode, DiffusionPolicy)(unet, sched, SamplerConfig(**SAMPLER), **kw)


def _perturb_head(policy, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_latent_logprob_is_the_drifted_gaussian():
    policy = mode_policy("latent", max_drift=0.2)
    _perturb_head(policy)
    traj = policy.sample(4, generator=torch.Generator().manual_seed(0))
    for k in range(traj.num_steps):
        with torch.no_grad():
            out = policy.step_at(traj, k, torch.arange(4))
            base = policy.step(k, traj.x_t[k], traj.x_prev[k], with_drift=False)
            drift = policy.drift(traj.x_t[k], policy.schedule.timesteps[k].expand(4))
        assert drift.abs().max() <= 0.2 * policy.sigma_tilde(k) * (1 + 1e-6) and drift.abs().max() > 0
        torch.testing.assert_close(out.mu, base.mu + drift)
        ref = Normal(base.mu + drift, policy.sigma_tilde(k)).log_prob(traj.x_prev[k]).mean((1, 2, 3))
        torch.testing.assert_close(out.logp, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logp, traj.logp[k], rtol=1e-5, atol=1e-5)  # as recorded while sampling


def test_schedule_logprob_settings_and_bounds():
    policy = mode_policy("schedule", std=0.7)
    _perturb_head(policy)
    traj = policy.sample(6, generator=torch.Generator().manual_seed(0))
    assert traj.num_steps == 1 and traj.states.shape == (2, 6, 2) and traj.images.shape == (6, 1, 8, 8)
    u = traj.x_prev[0]
    with torch.no_grad():
        out = policy.step_at(traj, 0, torch.arange(6))
    ref = Normal(policy.head(None, 6), 0.7).log_prob(u).mean(1)
    torch.testing.assert_close(out.logp, ref)
    torch.testing.assert_close(out.logp, traj.logp[0])
    p = policy.settings(u)
    assert ((p["eta"] > 0.2) & (p["eta"] < 1.2)).all() and ((p["noise_scale"] > 0.8) & (p["noise_scale"] < 1.2)).all()
    # the untrained policy's mean action is the configured sampler (η = 1, noise scale 1)
    start = policy.settings(mode_policy("schedule").head(None, 1))
    torch.testing.assert_close(torch.stack([start["eta"], start["noise_scale"]]).flatten(), torch.tensor([1.0, 1.0]))


def test_schedule_settings_drive_the_sampler():
    # noise scale 0 at η > 0 would be deterministic; here: a larger noise scale gives more varied images
    low = mode_policy("schedule", noise_scale=(0.1, 1.01), std=1e-3)
    high = mode_policy("schedule", noise_scale=(0.99, 3.0), std=1e-3)
    for policy, target in ((low, 0.1001), (high, 2.999)):
        with torch.no_grad():
            policy.head.bias[1] = torch.logit((target - policy.low[1]) / (policy.high[1] - policy.low[1]))
    spread = [pol.sample(32, generator=torch.Generator().manual_seed(0)).images.std(0).mean() for pol in (low, high)]
    assert spread[1] > spread[0] + 0.05


@pytest.mark.parametrize("mode", ["latent", "schedule"])
@pytest.mark.parametrize("algorithm", ["ppo", "reinforce", "trpo"])
def test_updates_train_only_the_head(mode, algorithm):
    policy = mode_policy(mode)
    unet = {n: p.detach().clone() for n, p in policy.unet.named_parameters()}
    head = {n: p.detach().clone() for n, p in policy.head.named_parameters()}
    assert not any(p.requires_grad for p in policy.unet.parameters())
    gen = torch.Generator().manual_seed(0)
    traj = policy.sample(8, generator=gen)
    adv = standardize(traj.images.mean((1, 2, 3)))
    cfg = rl_cfg(lr=1e-2, microbatch=4, gradient_accumulation=1, trpo={"max_kl": 1e-2, "kl_states": 0})
    if algorithm == "trpo":
        states = state_subsample(traj.num_steps, traj.batch_size, 0, generator=gen)
        mu_old = old_means(policy, traj, states)
        stats = trpo_update(UpdateBatch(policy, None, traj, adv, cfg, gen))
        assert stats.extra["accepted"] and subsample_kl(policy, traj, states, mu_old) <= 1e-2 * (1 + 1e-6)
    else:
        opt = torch.optim.Adam(policy.trainable_parameters(), lr=cfg.lr)
        update = ppo_update if algorithm == "ppo" else reinforce_update
        stats = update(UpdateBatch(policy, opt, traj, adv, cfg, gen))
        assert stats.optimizer_steps == 2 and not stats.nonfinite
    assert all(torch.equal(p, unet[n]) for n, p in policy.unet.named_parameters())
    assert any(not torch.equal(p, head[n]) for n, p in policy.head.named_parameters())


@pytest.mark.parametrize("mode, lr", [("latent", 3e-3), ("schedule", 0.1)])
def test_short_ppo_run_raises_the_reward(mode, lr):
    # reward = mean brightness (latent: the drift pushes pixels up) or the images' spread (schedule:
    # more noise, η) -- each mode must raise its reward within a few iterations
    policy = mode_policy(mode, **({"max_drift": 0.2} if mode == "latent" else {}))
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=lr)
    cfg = rl_cfg(microbatch=16, gradient_accumulation=1, ppo={"clip_range": 0.2, "epochs": 2})
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(15):
        traj = policy.sample(32, generator=gen)
        x = traj.images.flatten(1)
        reward = x.mean(1) if mode == "latent" else (x - x.mean(1, keepdim=True)).abs().mean(1)
        history.append(reward.mean().item())
        ppo_update(UpdateBatch(policy, opt, traj, standardize(reward), cfg, gen))
    assert sum(history[-3:]) / 3 > sum(history[:3]) / 3 + 0.02, history


@pytest.mark.parametrize("mode", ["latent", "schedule"])
def test_save_then_load_gives_identical_samples(tmp_path, mode):
    # non-default settings: the saved head brings its own (the config below has the defaults)
    settings = {"max_drift": 0.2, "width": 8} if mode == "latent" else {"std": 0.7, "eta": (0.3, 1.1)}
    policy = mode_policy(mode, **settings)
    _perturb_head(policy)
    policy.save(tmp_path)
    assert json.loads((tmp_path / "model" / "policy_head" / "config.json").read_text())["mode"] == mode
    cfg = config_from_dict({"data": {"image_size": 8, "channels": 1}, "sampler": {**SAMPLER, "batch_size": 5},
                            "rl": {"policy_mode": mode}})
    loaded = model_sampler(cfg, tmp_path / "model", torch.device("cpu"))(7, torch.Generator().manual_seed(3))
    direct = _policy_sampler(policy.eval(), 5)(7, torch.Generator().manual_seed(3))
    fresh = _policy_sampler(mode_policy(mode, **settings).eval(), 5)(7, torch.Generator().manual_seed(3))
    assert torch.equal(loaded, direct) and not torch.equal(loaded, fresh)


@pytest.mark.parametrize("mode", ["latent", "schedule"])
def test_finetune_resume_and_eval_scripts(tmp_path, mode):
    fast = ["--set", "reward.features.name=pixels", "--set", "reward.realism.enabled=false", "--set",
            "log.trackers=[csv]", "--set", f"rl.policy_mode={mode}", "--set", "rl.lr=1e-2"]
    run = tmp_path / "run"
    proc = run_script("scripts.finetune", "--cfg", ROOT / "configs" / "smoke.yaml", "--out", run, *fast)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script("scripts.finetune", "--cfg", ROOT / "configs" / "smoke.yaml", "--out", run, "--resume", *fast,
                      "--set", "rl.iterations=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]
    assert (run / "model" / "policy_head" / "head.safetensors").is_file()
    proc = run_script("scripts.eval", "--cfg", ROOT / "configs" / "smoke.yaml", "--out", tmp_path / "eval", *fast,
                      "--set", f"eval.run_dir={run}", "--set", "eval.n=16", "--set", "eval.seeds=[0]",
                      "--set", "eval.extractors=[pixels]", "--set", "eval.tsne=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert {"base", "finetuned"} <= set(report["models"])
    # the head changed the samples: base and fine-tuned differ at the same seed
    assert report["models"]["base"]["pixels"] != report["models"]["finetuned"]["pixels"]


@pytest.mark.parametrize("mode", ["latent", "schedule"])
def test_stable_diffusion_modes_train_only_the_head(tmp_path, mode):
    from ddpm.stable_diffusion import build_tiny_sd, load_stable_diffusion
    from rl.sd_policy import StableDiffusionPolicy

    torch.manual_seed(0)
    kw = {"latent": LatentSettings()} if mode == "latent" else {"schedule": ScheduleSettings()}
    policy = policy_class(mode, StableDiffusionPolicy)(
        load_stable_diffusion(build_tiny_sd(tmp_path / "sd")), SamplerConfig(num_steps=2, clip_sample=False),
        prompts=["a fresh crater", "an old crater", "a crater with a central peak"], guidance_scale=3.0,
        image_size=32, channels=1, **kw)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not n.startswith(("head.", "base_head."))}
    head = {n: p.detach().clone() for n, p in policy.head.named_parameters()}
    traj = policy.sample(6, generator=torch.Generator().manual_seed(0), chunk=4)
    assert traj.images.shape == (6, 1, 32, 32) and traj.prompt_ids.shape == (6,)
    if mode == "schedule":  # (guidance, η) per trajectory, conditioned on the prompt
        p = policy.settings(traj.x_prev[0])
        assert ((p["guidance_scale"] > 1) & (p["guidance_scale"] < 10)).all() and traj.states.shape == (2, 6, 2)
    cfg = rl_cfg(lr=1e-2, microbatch=3, gradient_accumulation=2)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=cfg.lr)
    stats = ppo_update(UpdateBatch(policy, opt, traj, standardize(traj.images.mean((1, 2, 3))), cfg,
                                   torch.Generator().manual_seed(1)))
    assert stats.optimizer_steps == 1 and not stats.nonfinite
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if n in frozen)
    changed = [n for n, p in policy.head.named_parameters() if not torch.equal(p, head[n])]
    assert changed and (mode == "latent" or any(n.startswith("mlp.") for n in changed))
