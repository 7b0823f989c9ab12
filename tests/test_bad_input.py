"""Bad input, one row per case: a non-zero exit and one 'error: ...' line naming what is wrong and what
to do, never a traceback (docs/design.md, "Reliability and security").

Each row runs a script's `main` in-process through `utils.run_main`, as `python -m scripts.X` does;
tests/test_scripts.py runs a few of the same errors as real subprocesses. Images of mixed modes and
sizes are the one input here that must be accepted.
"""
from __future__ import annotations

import errno
import io
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import reward.artifact
from config import load_config, save_config
from reward.artifact import build_reward_model, save_artifact
from data.datasets import load_image_folder
from data.procedural import procedural_set
from scripts import eval as eval_script
from scripts import finetune, pretrain_ddpm, sample, train_reward_model
from basics import PROJECT_ROOT, list_checkpoints, png_bytes_at_most, run_main
from utils import save_array

from .conftest import error_line, save_tiny_clip, smoke_argv

SMOKE = PROJECT_ROOT / "configs" / "smoke.yaml"
TINY_PRETRAIN = ("log.trackers=[csv]", "pretrain.steps=2", "pretrain.checkpoint_every=1", "pretrain.log_every=1")
"""A two-step pretraining run of the smoke config's tiny UNet, checkpointed at both steps."""


@dataclass
class Env:
    """What a case's setup may use: a fresh directory, monkeypatch, and the module's fixtures."""
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest


@dataclass(frozen=True)
class Case:
    """One bad input: the script, its arguments built in `env`, and what its error line must say."""
    id: str
    main: Callable[[list[str] | None], None]
    argv: Callable[[Env], list[str]]
    expect: tuple[str, ...]
    after: Callable[[Env], None] | None = None  # checks on the files the failed run left


def _args(env: Env, *overrides: str, out: str = "run", extra: tuple[str, ...] = ()) -> list[str]:
    """--cfg smoke.yaml --out TMP/out, the overrides, then `extra`."""
    return [*smoke_argv(env.tmp / out, *overrides), *extra]


def _folder(env: Env, name: str, files: dict[str, bytes] | None = None) -> str:
    """The data.root override for TMP/name, a folder holding `files` (None: no folder at all)."""
    root = env.tmp / name
    if files is not None:
        root.mkdir()
        for fname, content in files.items():
            (root / fname).write_bytes(content)
    return f"data.root={root}"


def _config_file(env: Env, text: str) -> list[str]:
    """A config file in TMP that extends the smoke config with `text`."""
    path = env.tmp / "mine.yaml"
    path.write_text(f"base: {SMOKE}\n{text}")
    return ["--cfg", str(path), "--out", str(env.tmp / "run")]


def _tiny_on_mixed(folder: Path) -> tuple[str, ...]:
    """The tiny pretraining run on an RGB folder of images."""
    return ("data.source=folder", f"data.root={folder}", "data.channels=3", *TINY_PRETRAIN)


def _truncated_checkpoint(env: Env) -> list[str]:
    """A copy of the tiny run whose newest checkpoint's training state is cut in half, resumed."""
    run = shutil.copytree(env.request.getfixturevalue("tiny_run"), env.tmp / "run")
    state = list_checkpoints(run / "checkpoints")[-1] / "training_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    return _args(env, *_tiny_on_mixed(env.request.getfixturevalue("mixed_folder")), extra=("--resume",))


def _hostile_checkpoint(env: Env) -> list[str]:
    """A copy of the tiny run whose newest training state is a protocol-0 pickle that would run code (its INST opcode
    is one torch's weights-only unpickler reports only by number, with advice to load it unsafely)."""
    run = shutil.copytree(env.request.getfixturevalue("tiny_run"), env.tmp / "run")
    code = f"open({str(env.tmp / 'ran')!r}, 'w').write('code ran')"
    (list_checkpoints(run / "checkpoints")[-1] / "training_state.pt").write_bytes(
        f"(i__builtin__\nexec\n(S{code!r}\ntR.".encode())
    return _args(env, *_tiny_on_mixed(env.request.getfixturevalue("mixed_folder")), extra=("--resume",))


def _clip_with_pickled_weights(env: Env) -> list[str]:
    """A CLIP directory (config.json as save_pretrained writes it) whose weights are a pickle, pytorch_model.bin,
    instead of safetensors."""
    clip = save_tiny_clip(env.tmp / "clip")
    (clip / "model.safetensors").unlink()
    torch.save({"vision_model.post_layernorm.weight": torch.ones(16)}, clip / "pytorch_model.bin")
    return _args(env, "reward.features.name=clip", f"reward.features.path={clip}")


def _resume_tiny_run(env: Env, *overrides: str, extra: tuple[str, ...] = ()) -> list[str]:
    """A copy of the tiny pretraining run, resumed with `overrides` on top of its own settings."""
    shutil.copytree(env.request.getfixturevalue("tiny_run"), env.tmp / "run")
    return _args(env, *_tiny_on_mixed(env.request.getfixturevalue("mixed_folder")), *overrides,
                 extra=("--resume", *extra))


def _resume_finetune_run(env: Env, *overrides: str, extra: tuple[str, ...] = ()) -> list[str]:
    """A fine-tuning run directory on smoke.yaml (its saved config and one complete checkpoint; the check comes
    before anything is loaded), resumed with `overrides`."""
    run = env.tmp / "run"
    save_config(load_config(SMOKE), run / "config.yaml")
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "checkpoints" / "step_1" / "COMPLETE").touch()
    return _args(env, *overrides, extra=("--resume", *extra))


def _locked(env: Env) -> Path:
    """TMP/locked, a read-only directory: chmod 0o500, or (as root, which ignores permissions) a mkdir that fails
    there the way it would."""
    locked = env.tmp / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        mkdir = Path.mkdir

        def denied(self: Path, *args, **kwargs):
            if locked in self.parents:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return mkdir(self, *args, **kwargs)
        env.monkeypatch.setattr(Path, "mkdir", denied)
    else:
        locked.chmod(0o500)
        env.request.addfinalizer(lambda: locked.chmod(0o700))
    return locked


def _unwritable_out(env: Env) -> list[str]:
    """--out inside a read-only directory."""
    _locked(env)
    return _args(env, out="locked/run")


def _sample(env: Env, *extra: str, out: Path | None = None, n: int = 2) -> list[str]:
    """scripts.sample of `n` images of the shipped model into `out` (TMP/samples), then `extra`."""
    return ["--ckpt", str(PROJECT_ROOT / "ddpm" / "pretrained" / "mars32"), "--n", str(n),
            "--out", str(out or env.tmp / "samples"), *extra]


def _disk_full_at_second_checkpoint(env: Env) -> list[str]:
    """torch.save fails with ENOSPC from its second call on: step_1's checkpoint is written, step_2's is not."""
    save, calls = torch.save, []

    def save_until_full(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(*args, **kwargs)
    env.monkeypatch.setattr(torch, "save", save_until_full)
    return _args(env, *TINY_PRETRAIN)


def _disk_full_writing_samples(env: Env) -> list[str]:
    """Saving an image (the sample grid) fails with ENOSPC: outside any checkpoint write."""
    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
    env.monkeypatch.setattr(Image.Image, "save", full)
    return _args(env, *TINY_PRETRAIN)


def _reward_build_on_a_full_disk(env: Env) -> list[str]:
    """The reward artifact's arrays are written to /dev/full, which fails every write with ENOSPC as a full
    filesystem does (numpy's own writer turned that into an errno-less short write, or lost it)."""
    env.monkeypatch.setattr(reward.artifact, "save_array", lambda path, array: save_array("/dev/full", array))
    return _args(env, "reward.features.name=pixels", "reward.realism.enabled=false")


def _no_partial_artifact(env: Env) -> None:
    assert not (env.tmp / "run" / "reward").exists() and not list((env.tmp / "run").glob(".tmp-*"))


def _only_step_1_remains(env: Env) -> None:
    """The failed save left no partial directory: step_1 is the only entry, and it is complete."""
    ckpts = env.tmp / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_1"]
    assert list_checkpoints(ckpts) == [ckpts / "step_1"]


def _other_extractor_artifact(env: Env) -> list[str]:
    """A reward artifact built with the 'pixels' extractor, used by a config that asks for EfficientNet."""
    cfg = load_config(SMOKE, ["reward.features.name=pixels", "reward.realism.enabled=false"])
    model = build_reward_model(cfg, reference_images=procedural_set(16, size=32, channels=1, seed=0),
                               fake_images=None)
    path = save_artifact(model, env.tmp / "pixels_reward")
    return _args(env, f"reward.artifact={path}")


def _png(seed: int, shape: tuple[int, ...] = (40, 40)) -> bytes:
    """A PNG of noise: grayscale for a (height, width) shape, RGB for (height, width, 3)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _folders_of_other_formats(env: Env) -> list[str]:
    """scripts.eval's folder mode on 64 px grayscale real images and 17x23 RGB generated ones."""
    _folder(env, "real", {f"{i}.png": _png(i, (64, 64)) for i in range(6)})
    _folder(env, "generated", {f"{i}.png": _png(i, (23, 17, 3)) for i in range(6)})
    return ["--real", str(env.tmp / "real"), "--generated", str(env.tmp / "generated"), "--out", str(env.tmp / "ev"),
            "--features", "pixels"]


CORRUPT = {"a.png": b"\x89PNG\r\n\x1a\n not really", "b.jpg": b"\xff\xd8\xff garbage", "c.tif": b""}
"""Image files that no reader can decode: a PNG and a JPEG cut after their signatures, an empty TIFF."""

CASES = [
    Case("unknown-key", pretrain_ddpm.main, lambda env: _config_file(env, "sampler:\n  num_step: 5\n"),
         ("mine.yaml", "unknown key 'sampler.num_step'", "did you mean 'sampler.num_steps'")),
    Case("wrong-type", pretrain_ddpm.main, lambda env: _args(env, "sampler.num_steps=ten"),
         ("key 'sampler.num_steps' must be int", "got 'ten'")),
    Case("channels-not-1-or-3", pretrain_ddpm.main, lambda env: _args(env, "data.channels=2"),
         ("key 'data.channels' must be one of 1, 3", "got 2")),
    Case("negative-learning-rate", finetune.main, lambda env: _args(env, "rl.lr=-3e-5"),
         ("key 'rl.lr' must be > 0.0", "got -3e-05")),
    Case("clip-zero", finetune.main, lambda env: _args(env, "rl.ppo.clip_range=0"),
         ("key 'rl.ppo.clip_range' must be > 0.0", "got 0.0")),
    Case("eta-zero-with-rl", finetune.main, lambda env: _args(env, "sampler.eta=0"),
         ("sampler.eta is 0", "deterministic", "set sampler.eta > 0")),
    Case("sigma-floor-zero", finetune.main, lambda env: _args(env, "sampler.sigma_floor=0"),
         ("key 'sampler.sigma_floor' must be > 0.0", "got 0.0")),
    Case("trpo-with-kl-base", finetune.main, lambda env: _args(env, "rl.algorithm=trpo", "rl.kl_base_coef=0.1"),
         ("rl.kl_base_coef is 0.1 but rl.algorithm trpo ignores it", "set rl.kl_base_coef=0")),
    Case("trpo-with-kl-final", finetune.main, lambda env: _args(env, "rl.algorithm=trpo", "rl.kl_final_coef=1"),
         ("rl.kl_final_coef is 1.0 but rl.algorithm trpo ignores it", "set rl.kl_final_coef=0")),
    Case("trpo-with-step-weighting", finetune.main,
         lambda env: _args(env, "rl.algorithm=trpo", "rl.kl_final_coef=0", "rl.step_weighting=sigma"),
         ("rl.step_weighting is sigma but rl.algorithm trpo ignores it", "set rl.step_weighting=uniform")),
    Case("trpo-curvature-draw-with-too-few-states", finetune.main,
         lambda env: _args(env, "rl.algorithm=trpo", "rl.kl_final_coef=0", "rl.step_weighting=uniform",
                           "rl.trpo.state_draw=curvature", "rl.trpo.kl_states=3"),
         ("rl.trpo.kl_states is 3 but rl.trpo.state_draw curvature draws at least one state a step",
          "set rl.trpo.kl_states >= 4 or 0")),
    Case("data-root-unset", pretrain_ddpm.main, lambda env: _args(env, "data.source=folder"),
         ("data.root is not set", "set it to a folder of images")),
    Case("missing-data-folder", pretrain_ddpm.main,
         lambda env: _args(env, "data.source=folder", _folder(env, "absent")),
         ("absent does not exist", "check the path")),
    Case("empty-data-folder", pretrain_ddpm.main,
         lambda env: _args(env, "data.source=folder", _folder(env, "empty", {"notes.txt": b"no images"})),
         ("holds no image files", "add images or fix the path")),
    Case("only-corrupt-images", pretrain_ddpm.main,
         lambda env: _args(env, "data.source=folder", _folder(env, "corrupt", CORRUPT)),
         ("holds 3 image files but none could be read", "replace the corrupt files")),
    Case("reference-of-identical-images", train_reward_model.main,
         lambda env: _args(env, "data.source=folder", _folder(env, "same", {f"{i}.png": _png(0) for i in range(20)})),
         ("reward reference has 20 images but only 1 distinct", "bandwidth", "would be 0", "add varied images")),
    Case("missing-base-model", finetune.main, lambda env: _args(env, f"model.pretrained={env.tmp / 'no_model'}"),
         ("no DDPM model at", "no_model", "set model.pretrained to a saved model directory")),
    Case("reward-artifact-of-other-extractor", finetune.main, _other_extractor_artifact,
         ("was built with extractor 'pixels' but the config asks for 'efficientnet_lite0'", "rebuild it")),
    Case("truncated-checkpoint", pretrain_ddpm.main, _truncated_checkpoint,
         ("training_state.pt", "corrupt or truncated", "delete that checkpoint directory")),
    Case("hostile-checkpoint", pretrain_ddpm.main, _hostile_checkpoint,
         ("cannot load checkpoint file", "training_state.pt", "Unsupported operand", "was made to run code"),
         after=lambda env: not (env.tmp / "ran").exists() or pytest.fail("the checkpoint's code ran")),
    Case("feature-model-with-pickled-weights", train_reward_model.main, _clip_with_pickled_weights,
         ("clip: cannot load the weights in", "no file named model.safetensors", "pickled .bin weights are never loaded")),
    Case("unwritable-out-dir", pretrain_ddpm.main, _unwritable_out,
         ("cannot write to run directory", "Permission denied", "choose a writable --out")),
    Case("disk-full-while-saving", pretrain_ddpm.main, _disk_full_at_second_checkpoint,
         ("disk full while saving checkpoint step_2", "step_1' is kept", "free space, then rerun with --resume"),
         after=_only_step_1_remains),
    Case("disk-full-while-writing-samples", pretrain_ddpm.main, _disk_full_writing_samples,
         ("disk full while writing", "samples", "free space, then rerun with --resume")),
    Case("disk-full-while-saving-the-reward-artifact", train_reward_model.main, _reward_build_on_a_full_disk,
         ("disk full while writing", "run/reward'", "the partial copy was removed", "free space, then rerun"),
         after=_no_partial_artifact),
    Case("eval-folders-of-other-sizes-and-channels", eval_script.main, _folders_of_other_formats,
         ("--real images are 64x64 grayscale but --generated ones 17x23 colour", "pass --allow-mismatch")),
    Case("resume-with-nothing-to-resume", finetune.main, lambda env: _args(env, extra=("--resume",)),
         ("--resume: no complete checkpoint", "start without --resume")),
    Case("seed-too-large", finetune.main, lambda env: _args(env, "seed=1180591620717411303424"),
         ("key 'seed' must be <= 4294967295", "got 1180591620717411303424")),
    Case("key-set-twice", pretrain_ddpm.main, lambda env: _config_file(env, "rl:\n  iterations: 2\n  iterations: 3\n"),
         ("mine.yaml", "key 'iterations' is set twice (lines 3 and 4)", "keep one")),
    Case("run-name-with-a-path", finetune.main, lambda env: _args(env, "name=../../../../tmp/escaped"),
         ("key 'name' must be one plain name", "'../../../../tmp/escaped'", "use --out")),
    Case("artifact-path-leaving-the-project", finetune.main, lambda env: _args(env, "reward.artifact=../../.."),
         ("key 'reward.artifact' ('../../..') leads outside the project directory", "give an absolute path")),
    Case("sample-seed-too-large", sample.main, lambda env: _sample(env, "--seed", str(2**70)),
         ("--seed must be 0 to 4294967295", str(2**70))),
    Case("resume-with-changed-settings", pretrain_ddpm.main, lambda env: _resume_tiny_run(env, "pretrain.lr=0.5"),
         ("--resume: the settings differ from the run's", "config.yaml': pretrain.lr (0.002 -> 0.5)",
          "pass --apply-changes to apply them")),
    Case("resume-with-another-seed", pretrain_ddpm.main,
         lambda env: _resume_tiny_run(env, "seed=5", extra=("--apply-changes",)),
         ("--resume: seed cannot change on resume", "start a new run with --out NEW_DIR")),
    Case("resume-with-another-policy-mode", finetune.main,
         lambda env: _resume_finetune_run(env, "rl.policy_mode=latent", extra=("--apply-changes",)),
         ("--resume: rl.policy_mode cannot change on resume", "resume with the values in")),
    Case("apply-changes-without-resume", finetune.main, lambda env: _args(env, extra=("--apply-changes",)),
         ("--apply-changes applies to a resumed run only", "add --resume")),
    Case("sample-more-than-the-disk-holds", sample.main, lambda env: _sample(env, n=10**12),
         ("--n 1000000000000 images of 1x32x32 take up to 1.31 PB", "free; lower --n or free space")),
    Case("sample-into-a-read-only-folder", sample.main, lambda env: _sample(env, out=_locked(env) / "samples"),
         ("--out", "locked/samples' is not a writable directory", "pick another with --out")),
]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Images of every common mode at different sizes and aspect ratios, one of them 16-bit."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i, (mode, size) in enumerate([("L", (40, 40)), ("RGB", (64, 48)), ("RGBA", (33, 57)), ("P", (128, 96)),
                                      ("LA", (20, 31)), ("I;16", (50, 50)), ("1", (36, 36)), ("CMYK", (45, 60))]):
        rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        img = (Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16)) if mode == "I;16"
               else rgb.convert(mode))
        img.save(root / f"{i}_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mixed_folder) -> Path:
    """A finished two-step pretraining run on `mixed_folder` (the truncated-checkpoint case copies it)."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    run_main(pretrain_ddpm.main, smoke_argv(run, *_tiny_on_mixed(mixed_folder)))
    return run


TABLE = PROJECT_ROOT / "docs" / "bad_input.md"
"""The published table of these cases, written from a full run of this file by
`CRATERDIFF_WRITE_TABLE=1 python -m pytest tests/test_bad_input.py` and checked against every full run."""

SEEN: dict[str, tuple[str, str]] = {}
"""Case id -> (the command, the error line) as this run saw them, with its temporary paths written TMP."""

VOLATILE = ((re.compile(r"has [\d.]+ [KMGTP]?B free"), "has (the disk's free space) free"),)
"""Parts of an error line that differ from machine to machine."""


def _published(text: str, *tmp_dirs: Path) -> str:
    """`text` with the temporary directories written TMP, the project's own paths relative, volatile parts named."""
    for tmp in tmp_dirs:
        text = text.replace(str(tmp), "TMP")
    text = text.replace(f"{PROJECT_ROOT}/", "")
    for pattern, name in VOLATILE:
        text = pattern.sub(name, text)
    return text


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_a_nonzero_exit(case, tmp_path, tmp_path_factory, monkeypatch, request, capsys):
    env = Env(tmp_path, monkeypatch, request)
    argv = case.argv(env)
    capsys.readouterr()  # only what the script prints
    with pytest.raises(SystemExit) as exit_:
        run_main(case.main, argv)
    assert exit_.value.code not in (0, None)
    line = error_line(capsys.readouterr().err)
    for fragment in case.expect:
        assert fragment in line, line
    assert "weights_only" not in line, line  # never the advice to load a refused file unsafely
    if case.after:
        case.after(env)
    command = " ".join(["python", "-m", case.main.__module__, *map(shlex.quote, argv)])
    SEEN[case.id] = tuple(_published(t, tmp_path, tmp_path_factory.getbasetemp()) for t in (command, line))


def bad_input_table(seen: dict[str, tuple[str, str]]) -> str:
    """docs/bad_input.md: one row per case, in CASES' order."""
    def cell(text: str) -> str:
        return "`" + text.replace("|", "\\|").replace("`", "'") + "`"
    def setup(case: Case) -> str:  # the first line of the argv builder's docstring, where it is a named helper
        doc = case.argv.__doc__ if case.argv.__name__ != "<lambda>" else None
        return " ".join((doc or "").split("\n\n")[0].split()).replace("|", "\\|")
    rows = [f"| {c.id} | {setup(c)} | {cell(seen[c.id][0])} | {cell(seen[c.id][1])} |" for c in CASES]
    return "\n".join([
        "# Bad input: what each script says", "",
        "Every row is a case of `tests/test_bad_input.py`, run in-process as `python -m scripts.X` runs it: the "
        "command (TMP is the test's temporary directory, where its setup planted what the case needs: a truncated "
        "or hostile checkpoint, a read-only folder, a full disk...) and the one line the script printed before it "
        "exited with status 2. Generated by `CRATERDIFF_WRITE_TABLE=1 python -m pytest tests/test_bad_input.py`; "
        "every full run of that file checks this table against what it saw.", "",
        "| case | what the test sets up | command | error line |", "|---|---|---|---|", *rows, ""])


def test_the_published_table_is_what_the_cases_print():
    if set(SEEN) != {c.id for c in CASES}:
        pytest.skip("the table is checked only when every case ran (the whole file, all passing)")
    table = bad_input_table(SEEN)
    if os.environ.get("CRATERDIFF_WRITE_TABLE"):
        TABLE.write_text(table)
    assert TABLE.is_file() and TABLE.read_text() == table, (
        f"{TABLE.relative_to(PROJECT_ROOT)} is not what the cases print now; rewrite it with "
        f"CRATERDIFF_WRITE_TABLE=1 python -m pytest tests/test_bad_input.py")


@pytest.mark.parametrize("channels", [1, 3])
def test_images_of_mixed_modes_and_sizes_are_all_read(mixed_folder, channels):
    images, kept = load_image_folder(mixed_folder, size=32, channels=channels)
    assert len(kept) == 8 and images.shape == (8, channels, 32, 32)
    assert images.min() >= -1 and images.max() <= 1


def test_pretraining_on_images_of_mixed_modes_and_sizes_succeeds(tiny_run):
    assert (tiny_run / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(tiny_run / "checkpoints")] == ["step_1", "step_2"]
    with Image.open(tiny_run / "samples" / "step_2.png") as grid:
        assert grid.mode == "RGB"


@pytest.mark.parametrize("shape", [(32, 32), (64, 64), (17, 23, 3), (64, 64, 3)])
def test_png_size_bound_holds_for_incompressible_images(shape, tmp_path):
    """utils.png_bytes_at_most, which scripts.sample's disk check multiplies by --n, against real PNGs of noise."""
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(path)
    channels = shape[2] if len(shape) == 3 else 1
    assert shape[0] * shape[1] * channels < path.stat().st_size <= png_bytes_at_most(channels, shape[0], shape[1])
