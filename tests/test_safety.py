"""Checkpoint safety: no code runs from a checkpoint or weights file, YAML is read safely, and the
smoke pipeline runs with networking blocked."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from basics import run_main

from .conftest import ROOT, error_line, guard, save_tiny_clip, smoke_argv

SOURCE_DIRS = ("bench", "ddpm", "reward", "rl", "scripts")


class _Payload:
    """Unpickling this runs `exec`, which writes a marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def plant(path: Path, marker: Path) -> Path:
    """Write a pickle at `path` whose loading with plain `torch.load` would run code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "state": _Payload(marker)}, path)
    return path


def _one_line_error(capsys, main, argv) -> str:
    capsys.readouterr()  # drop what earlier runs printed
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(a) for a in argv])
    assert e.value.code == 2
    return error_line(capsys.readouterr().err)


def test_the_planted_pickle_really_runs_code(tmp_path):
    """The hostile file is real: an unsafe load executes it (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    path = plant(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


# each script's smallest run with a checkpoint at `step`, and the arguments that make --resume go on from it (a longer
# pretraining run stretches its learning-rate schedule: a change applied only when asked)
RESUMABLE = {
    "finetune": (("reward.features.name=pixels", "reward.realism.enabled=false", "rl.iterations=1",
                  "rl.batch_size=8", "rl.microbatch=4", "sampler.num_steps=2"), 1, ("--set", "rl.iterations=2")),
    "pretrain_ddpm": (("pretrain.steps=2", "pretrain.checkpoint_every=2", "pretrain.sample_every=100",
                       "pretrain.batch_size=4"), 2, ("--set", "pretrain.steps=4", "--apply-changes")),
}


@pytest.mark.parametrize("script", sorted(RESUMABLE))
def test_resume_refuses_a_pickled_training_state(tmp_path, tiny_base, capsys, script):
    main = importlib.import_module(f"scripts.{script}").main
    overrides, step, longer = RESUMABLE[script]
    run, marker = tmp_path / "run", tmp_path / "ran"
    args = smoke_argv(run, "num_threads=1", "log.trackers=[csv]", f"model.pretrained={tiny_base}", *overrides)
    run_main(main, args)
    plant(run / "checkpoints" / f"step_{step}" / "training_state.pt", marker)
    err = _one_line_error(capsys, main, [*args, "--resume", *longer])
    assert "refused to load checkpoint file" in err and "training_state.pt" in err and "pickled object (exec)" in err
    assert not marker.exists()


def test_model_with_pickled_weights_is_refused(tmp_path, tiny_base, capsys):
    """A model directory whose UNet weights are a pickle (`.bin`) instead of safetensors."""
    import shutil

    from scripts import sample

    model, marker = tmp_path / "model", tmp_path / "ran"
    shutil.copytree(tiny_base, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    plant(model / "unet" / "diffusion_pytorch_model.bin", marker)
    err = _one_line_error(capsys, sample.main, ["--ckpt", model, "--n", 2, "--out", tmp_path / "s"])
    assert "cannot load the DDPM model" in err
    assert not marker.exists()


def test_feature_weights_with_pickled_code_are_refused(tmp_path):
    from reward.features import build_extractor
    from basics import CraterdiffError

    marker = tmp_path / "ran"
    path = plant(tmp_path / "efficientnet.pt", marker)
    with pytest.raises(CraterdiffError, match=r"refused to load efficientnet_lite0 weights .* pickled object \(exec\)"):
        build_extractor("efficientnet_lite0", path=str(path))
    assert not marker.exists()


def test_transformers_extractor_with_pickled_weights_is_refused(tmp_path):
    """A CLIP directory whose weights are a pickle (`pytorch_model.bin`) instead of safetensors."""
    from basics import CraterdiffError
    from reward.features import build_extractor

    model, marker = save_tiny_clip(tmp_path / "clip"), tmp_path / "ran"
    (model / "model.safetensors").unlink()
    plant(model / "pytorch_model.bin", marker)
    with pytest.raises(CraterdiffError, match=r"clip: cannot load the weights .*safetensors weights: pickled \.bin"):
        build_extractor("clip", path=str(model))
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            yield owner, node.func.attr, {k.arg: k.value for k in node.keywords}, node


def _source_files():
    files = [ROOT / "utils.py"]
    for d in SOURCE_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return files


def test_no_unsafe_loader_in_the_source():
    """Every deserialisation in the toolkit is one that cannot run code: torch.load with
    weights_only=True, numpy with allow_pickle=False, yaml.safe_load; no pickle, no remote code."""
    bad = []
    for path in _source_files():
        for owner, name, kw, node in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and name == "load":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                bad += [] if ok else [f"{where} torch.load without weights_only=True"]
            if owner == "np" and name == "load":
                ok = isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
                bad += [] if ok else [f"{where} np.load without allow_pickle=False"]
            if owner == "yaml" and name in {"load", "load_all", "unsafe_load", "full_load", "full_load_all"}:
                bad.append(f"{where} yaml.{name} (use yaml.safe_load)")
            if owner == "pickle" and name in {"load", "loads"}:
                bad.append(f"{where} pickle.{name}")
            if isinstance(kw.get("trust_remote_code"), ast.Constant) and kw["trust_remote_code"].value is not False:
                bad.append(f"{where} trust_remote_code")
    assert not bad, bad
    assert len(_source_files()) > 30  # the scan saw the toolkit


def test_smoke_pipeline_runs_with_networking_blocked(tmp_path):
    """Reward building, fine-tuning and evaluation on smoke.yaml in one process whose sockets and
    DNS lookups all fail, without HF_HUB_OFFLINE: nothing is fetched, nothing even tries."""
    log, run = tmp_path / "network.log", tmp_path / "run"
    smoke = ["--cfg", ROOT / "configs" / "smoke.yaml", "--set", "reward.realism.epochs=1"]
    argv = ["scripts.finetune", *smoke, "--set", "rl.iterations=1", "--out", run,
            "--then", "scripts.eval", *smoke, "--set", "eval.n=16", "--set", "eval.seeds=[0]",
            "--set", "eval.extractors=[efficientnet_lite0]", "--set", f"eval.run_dir={run}",
            "--model", f"finetuned={run / 'model'}", "--out", tmp_path / "eval"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_"))}
    proc = subprocess.run([sys.executable, "-m", "tests.no_network", str(log), *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=guard(600))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "eval" / "report.json").is_file()
    assert not log.exists(), log.read_text()


def test_symlinks_planted_in_the_run_directory_are_replaced_not_followed(tmp_path, tiny_base):
    """A run's sample grids and metrics.csv are written beside their path and renamed over it: a symlink waiting at
    RUN/samples/step_2.png or RUN/metrics.csv is replaced, and the file it points to is left as it was."""
    from scripts import pretrain_ddpm

    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    for name in ("samples/step_2.png", "metrics.csv"):
        (outside / Path(name).name).write_text("precious")
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).symlink_to(outside / Path(name).name)
    run_main(pretrain_ddpm.main, smoke_argv(run, "num_threads=1", "log.trackers=[csv]", "pretrain.steps=2",
                                            "pretrain.sample_every=2", "pretrain.log_every=1"))
    for name in ("samples/step_2.png", "metrics.csv"):
        assert not (run / name).is_symlink() and (outside / Path(name).name).read_text() == "precious"
    assert (run / "samples" / "step_2.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in (run / "samples").iterdir() if p.name.startswith(".tmp-")]
