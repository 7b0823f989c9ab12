"""The Stable Diffusion policy: CFG log-probs, gradients only in the LoRA adapters, per-prompt
advantages, and scripts.finetune end to end on a tiny random SD built in code."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from config import LoRASettings, RLConfig, SamplerConfig, config_from_dict
from ddpm.ddim import ddim_step_logprob
from ddpm.stable_diffusion import build_tiny_sd, load_stable_diffusion
from rl.ppo import ppo_update
from rl.sd_policy import StableDiffusionPolicy
from rl.update import UpdateBatch

from .conftest import ROOT, run_script
from .test_rl import PLAIN

PROMPTS = ["a fresh crater on mars", "an old crater with dunes", "a large crater with a central peak"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny_sd")


def _policy(path, *, w=3.0, mode="lora"):
    torch.manual_seed(0)
    return StableDiffusionPolicy(load_stable_diffusion(path), SamplerConfig(num_steps=3, clip_sample=False),
                                 prompts=PROMPTS, guidance_scale=w, image_size=32, channels=1, mode=mode)


def test_cfg_output_and_logprob_match_a_hand_built_step(tiny_sd):
    policy = _policy(tiny_sd)
    traj = policy.sample(4, generator=torch.Generator().manual_seed(0))
    assert traj.states.shape == (4, 4, 4, 8, 8) and traj.images.shape == (4, 1, 32, 32)
    assert traj.prompt_ids.shape == (4,) and traj.images.abs().max() <= 1
    k, idx = 1, torch.arange(4)
    unet = policy.unet
    t = policy.schedule.timesteps[k].expand(4)
    cond = policy.prompt_embeds[traj.prompt_ids]
    with torch.no_grad():
        eps_c = unet(traj.x_t[k], t, encoder_hidden_states=cond).sample
        eps_u = unet(traj.x_t[k], t, encoder_hidden_states=policy.uncond_embed.expand_as(cond)).sample
        ref = ddim_step_logprob(eps_u + 3.0 * (eps_c - eps_u), traj.x_t[k], alpha_bar_t=policy.schedule.alpha_bar_t[k],
                                alpha_bar_prev=policy.schedule.alpha_bar_prev[k], eta=1.0, sigma_floor=0.05,
                                x_prev=traj.x_prev[k], clip_range=None)
        got = policy.step_at(traj, k, idx)
    torch.testing.assert_close(got.logp, ref.logp, rtol=1e-4, atol=1e-5)
    # the log-prob recomputed at θ_old equals the one recorded while sampling
    torch.testing.assert_close(got.logp, traj.logp[k], rtol=1e-4, atol=1e-5)


def test_ppo_update_trains_only_the_adapters(tiny_sd):
    policy = _policy(tiny_sd)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    traj = policy.sample(6, generator=torch.Generator().manual_seed(1))
    cfg = config_from_dict({**PLAIN, "lr": 1e-2, "microbatch": 3, "gradient_accumulation": 2}, cls=RLConfig)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    ppo_update(UpdateBatch(policy, opt, traj, torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]), cfg,
                           torch.Generator().manual_seed(0)))
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # UNet, VAE, text encoder unchanged
    assert any(not torch.equal(after[n], v) for n, v in lora.items())


def test_finetune_script_on_a_tiny_sd(tmp_path, tiny_sd):
    out = tmp_path / "run"
    over = ["--set", f"model.pretrained={tiny_sd}", "--set", "reward.features.name=pixels",
            "--set", "log.trackers=[csv]"]
    proc = run_script("scripts.finetune", "--cfg", ROOT / "configs" / "sd_tiny.yaml", "--out", out, *over)
    assert proc.returncode == 0, proc.stderr
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["skipped"]) == 0 for r in rows)
    for f in ("checkpoints/step_2/policy.safetensors", "adapter/adapter_config.json", "model/model_index.json",
              "reward/reward.yaml", "samples/iter_2.png"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoints" / "step_2" / "model").exists()  # checkpoints keep θ only
    # the saved model is a Stable Diffusion pipeline with the fine-tuned UNet merged in
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(out / "model", local_files_only=True, safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == 32
    # resume continues from the checkpoint
    proc = run_script("scripts.finetune", "--cfg", ROOT / "configs" / "sd_tiny.yaml", "--out", out, "--resume",
                      *over, "--set", "rl.iterations=3")
    assert proc.returncode == 0, proc.stderr
    with open(out / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]
    # scripts.eval samples the base SD and the fine-tuned one over the test prompts
    proc = run_script("scripts.eval", "--cfg", ROOT / "configs" / "sd_tiny.yaml", "--out", tmp_path / "eval", *over,
                      "--set", f"eval.run_dir={out}", "--set", "eval.n=8", "--set", "eval.seeds=[0]",
                      "--set", "eval.extractors=[pixels]", "--set", "eval.tsne=false", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert {"base", "finetuned"} <= set(report["models"])
    base, tuned = report["models"]["base"]["pixels"], report["models"]["finetuned"]["pixels"]
    assert report["settings"]["n_generated"] == 8 and base != tuned  # same seeds, different weights


def test_saved_lora_loads_into_the_base_pipeline_and_samples_the_trained_chain(tmp_path, tiny_sd):
    """RUN/adapter in diffusers' format: `load_lora_weights` on the base pipeline loads every LoRA weight (rank and α
    kept), and with RUN/model's scheduler and sampler.json it draws what the merged RUN/model and the policy draw."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    policy = StableDiffusionPolicy(load_stable_diffusion(tiny_sd), SamplerConfig(num_steps=3, clip_sample=False),
                                   prompts=PROMPTS, guidance_scale=3.0, image_size=32, channels=1, mode="lora",
                                   lora=LoRASettings(rank=4, alpha=16.0))
    with torch.no_grad():  # trained adapters: B ≠ 0, so the LoRA changes every output
        for n, p in policy.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    policy.save(tmp_path)
    call = json.loads((tmp_path / "model" / "sampler.json").read_text())
    assert call == {"num_inference_steps": 3, "eta": 1.0, "guidance_scale": 3.0}
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True, safety_checker=None)
    base.scheduler = DDIMScheduler.from_pretrained(tmp_path / "model", subfolder="scheduler")
    assert base.scheduler.config.timestep_spacing == "trailing"
    base.load_lora_weights(tmp_path / "adapter")
    n_lora = sum("lora_" in n for n, _ in policy.unet.named_parameters())
    assert n_lora > 0 and sum("lora_" in n for n, _ in base.unet.named_parameters()) == n_lora
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True, safety_checker=None)
    assert isinstance(merged.scheduler, DDIMScheduler)

    def latents(pipe):
        return pipe(PROMPTS[1], generator=torch.Generator().manual_seed(5), output_type="latent", **call).images

    ours = policy.sample(1, generator=torch.Generator().manual_seed(5), prompt_ids=torch.tensor([1])).states[-1]
    torch.testing.assert_close(latents(base), ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(latents(merged), ours, rtol=1e-4, atol=1e-5)
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True, safety_checker=None)
    plain.scheduler = base.scheduler
    assert not torch.allclose(latents(plain), ours, atol=1e-3)  # the adapter is what makes them agree
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tiny_sd / "unet").resolve())
