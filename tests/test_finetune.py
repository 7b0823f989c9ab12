"""The policy stage end to end: resume exactness, the non-finite guard, and scripts.finetune on smoke.yaml."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from diffusers import DDIMPipeline
from safetensors.torch import load_file

from config import load_config, prepare_run_dir
from bench.faults import metric_rows
from rl.trainer import Finetuner
from basics import CraterdiffError, latest_checkpoint

from .conftest import ROOT, algorithm_overrides, assert_plain_diffusers_reproduces_sample, run_script


def _cfg(base, *over):
    return load_config(ROOT / "configs" / "smoke.yaml",
                       [f"model.pretrained={base}", "reward.features.name=pixels", "reward.realism.enabled=false",
                        "log.trackers=[csv]", "rl.iterations=4", "rl.batch_size=8", "rl.microbatch=4",
                        "sampler.num_steps=3", "num_threads=1", *over])


@pytest.mark.parametrize("algo", ["ppo", "trpo", "sac"])
def test_resume_is_exact(tmp_path, tiny_base, algo):
    # GAE's critic for PPO and TRPO; SAC brings its own critic, target critic and temperature
    cfg = _cfg(tiny_base, *algorithm_overrides(algo), "rl.checkpoint_every=100",
               f"rl.advantages.gae={'false' if algo == 'sac' else 'true'}", "rl.trpo.kl_states=8", "rl.trpo.cg_iters=2")
    full = Finetuner(cfg, prepare_run_dir(tmp_path / "full", cfg, resume=False)).run(resume=False)
    split_dir = tmp_path / "split"
    assert Finetuner(cfg, prepare_run_dir(split_dir, cfg, resume=False)).run(resume=False, stop_at=2) is None
    resumed = Finetuner(cfg, prepare_run_dir(split_dir, cfg, resume=True)).run(resume=True)
    a = load_file(full.parent / "checkpoints" / "step_4" / "policy.safetensors")
    b = load_file(resumed.parent / "checkpoints" / "step_4" / "policy.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = metric_rows(tmp_path / "full" / "metrics.csv")
    assert rows == metric_rows(split_dir / "metrics.csv")
    if algo == "sac":  # α and ζ moved, so the resumed run had to restore the temperature and the noise scales
        assert "log_noise_scale" in a
        assert len({r["alpha"] for r in rows}) > 1 and len({r["noise_scale_max"] for r in rows}) > 1


def test_resume_with_apply_changes_takes_the_new_learning_rate(tmp_path, tiny_base):
    cfg = _cfg(tiny_base, "rl.checkpoint_every=1", "rl.advantages.gae=true")
    assert Finetuner(cfg, prepare_run_dir(tmp_path, cfg, resume=False)).run(resume=False, stop_at=1) is None
    changed = _cfg(tiny_base, "rl.checkpoint_every=1", "rl.advantages.gae=true", "rl.lr=0.5", "rl.critic.lr=0.25")
    with pytest.raises(CraterdiffError, match=r"rl\.lr \(0\.0001 -> 0\.5\)"):
        prepare_run_dir(tmp_path, changed, resume=True)
    ft = Finetuner(changed, prepare_run_dir(tmp_path, changed, resume=True, apply_changes=True))
    ft.load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert [g["lr"] for g in ft.optimizer.param_groups] == [0.5]
    assert [g["lr"] for g in ft.critic_opt.param_groups] == [0.25]
    assert ft.optimizer.state and all(int(s["step"]) >= 1 for s in ft.optimizer.state.values())  # from the checkpoint


def test_nonfinite_rewards_skip_the_update_and_keep_the_weights(tmp_path, tiny_base, monkeypatch):
    cfg = _cfg(tiny_base, "rl.max_nonfinite=2")
    ft = Finetuner(cfg, prepare_run_dir(tmp_path, cfg, resume=False))
    real_score = type(ft.reward).score  # the trainer scores the (gathered) features of the set

    def poisoned(self, feats, **kwargs):
        out = real_score(self, feats, **kwargs)
        out.rewards[0] = float("nan")
        return out

    before = ft.policy.trainable_state()
    monkeypatch.setattr(type(ft.reward), "score", poisoned)
    row, _ = ft.iteration()
    assert row["skipped"] == 1.0
    for k, v in ft.policy.trainable_state().items():
        assert torch.equal(v, before[k])
    with pytest.raises(CraterdiffError, match="non-finite"):
        ft.run(resume=False)
    monkeypatch.setattr(type(ft.reward), "score", real_score)


def test_nonfinite_gradient_restores_weights(tmp_path, tiny_base, monkeypatch):
    cfg = _cfg(tiny_base)
    ft = Finetuner(cfg, prepare_run_dir(tmp_path, cfg, resume=False))
    before = ft.policy.trainable_state()
    import rl.trainer as trainer

    def nan_update(batch, state):
        for p in batch.policy.trainable_parameters():
            p.data.fill_(float("nan"))
        return trainer.UpdateStats()
    monkeypatch.setitem(trainer.UPDATES, "ppo", nan_update)
    row, _ = ft.iteration()
    assert row["skipped"] == 1.0
    for k, v in ft.policy.trainable_state().items():
        assert torch.equal(v, before[k])


@pytest.fixture(scope="module")
def smoke_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward_run")
    proc = run_script("scripts.train_reward_model", "--cfg", ROOT / "configs" / "smoke.yaml", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out / "reward"


REQUIRED_COLUMNS = {"step", "reward_mean", "reward_std", "reward_mmd", "reward_mi", "reward_size", "value_mmd",
                    "kl", "clip_frac", "grad_norm", "time_sample_s", "time_reward_s", "time_update_s", "peak_mem_mb"}


@pytest.mark.parametrize("algo, mode", [("ppo", "full"), ("trpo", "full"), ("reinforce", "full"), ("ppo", "lora"),
                                        ("trpo", "lora")])
def test_finetune_script_smoke(tmp_path, smoke_artifact, algo, mode):
    # the weighted components (mmd, mi, size, coverage) are logged; of the others only those in reward.log are computed
    logged = ["ot", "realism"] if (algo, mode) == ("ppo", "full") else []
    trackers = "[csv,tensorboard,wandb]" if (algo, mode) == ("ppo", "full") else "[csv,tensorboard]"
    proc = run_script("scripts.finetune", "--cfg", ROOT / "configs" / "smoke.yaml", "--out", tmp_path,
                      *(a for o in algorithm_overrides(algo) for a in ("--set", o)), "--set", f"rl.policy_mode={mode}",
                      "--set", f"reward.artifact={smoke_artifact}", "--set", f"reward.log=[{','.join(logged)}]", "--set", f"log.trackers={trackers}")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and REQUIRED_COLUMNS <= set(rows[0])
    components = {c.removeprefix("reward_") for c in rows[0] if c.startswith("reward_")} - {"mean", "std"}
    assert components == {"mmd", "mi", "size", "coverage", *logged}
    assert all(float(r["skipped"]) == 0 for r in rows)
    assert "iter 2/2" in proc.stderr + proc.stdout
    for f in ("config.yaml", "samples/iter_2.png", "checkpoints/step_2/COMPLETE", "checkpoints/step_2/policy.safetensors",
              "checkpoints/step_2/training_state.pt", "model/model_index.json"):
        assert (tmp_path / f).is_file(), f
    assert any((tmp_path / "tb").iterdir())
    assert ("wandb" in trackers) == any((tmp_path / "wandb").glob("offline-run-*/*.wandb"))  # W&B offline
    pipe = DDIMPipeline.from_pretrained(tmp_path / "model")  # diffusers alone, with the trained DDIM chain
    assert pipe.unet.config.sample_size == 32 and pipe.scheduler.config.timestep_spacing == "trailing"
    if (algo, mode) == ("ppo", "full"):
        assert_plain_diffusers_reproduces_sample(tmp_path / "model", tmp_path)
    if mode == "lora":  # the adapter loads with peft onto the base it records, and is the merged model
        from peft import PeftModel
        from diffusers import UNet2DModel
        recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert recorded == str((ROOT / "ddpm" / "pretrained" / "mars32" / "unet").resolve())
        lora = PeftModel.from_pretrained(UNet2DModel.from_pretrained(recorded), tmp_path / "adapter").eval()
        assert any("lora_B" in n and p.abs().max() > 0 for n, p in lora.named_parameters())  # trained, not B = 0
        x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 900])
        with torch.no_grad():
            torch.testing.assert_close(lora(x, t).sample, pipe.unet(x, t).sample, rtol=1e-4, atol=1e-5)
    if algo == "trpo":
        assert "accepted" in rows[0] and "backtrack_iters" in rows[0] and "cg_residual" in rows[0]


def test_finetune_builds_missing_artifact_and_resumes(tmp_path):
    over = ["--set", "reward.realism.epochs=1", "--set", "rl.iterations=1"]
    proc = run_script("scripts.finetune", "--cfg", ROOT / "configs" / "smoke.yaml", "--out", tmp_path, *over)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "reward" / "reward.yaml").is_file()
    proc = run_script("scripts.finetune", "--cfg", ROOT / "configs" / "smoke.yaml", "--out", tmp_path, "--resume",
                      "--set", "reward.realism.epochs=1", "--set", "rl.iterations=2")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2"]
