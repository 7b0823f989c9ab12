"""Shared test fixtures. Tests run from the project root (`make test`)."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import diffusers  # noqa: F401  (see below)
import pytest

# diffusers' log handler takes sys.stderr when diffusers is imported: imported here, that is the session's stream, not
# the capsys stream of whichever test imports it first, which closes after that test (its later warnings then fail).

ROOT = Path(__file__).resolve().parents[1]


class _ForkServer:
    """tests/zygote.py, running: requests go to its stdin, answers come back one JSON line each."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], cwd=ROOT, env=script_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pending = bytearray()  # what the server has written and no answer has consumed yet

    def request(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float | None = None) -> dict | None:
        """The next answer; None if none came within `timeout` seconds (None: wait for it). Reads the pipe's
        descriptor itself: a buffered reader could hold an answer that select() then never reports."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the test fork server (tests/zygote.py) died with status {self.proc.wait()}")
            self.pending.extend(chunk)
        line, _, rest = bytes(self.pending).partition(b"\n")
        self.pending[:] = rest
        return json.loads(line)


_ZYGOTE: list[_ForkServer] = []


def _zygote() -> _ForkServer:
    """The session's fork server, started on first use (again if it died)."""
    if not _ZYGOTE or _ZYGOTE[0].proc.poll() is not None:
        _ZYGOTE[:] = [_ForkServer()]
    return _ZYGOTE[0]


class ForkedLaunch:
    """One launch forked by tests/zygote.py, with the part of subprocess.Popen's interface the tests use:
    pid, returncode, poll(), wait(timeout). The launch leads its own process group (os.killpg(pid, ...)).
    The server runs one launch at a time: wait for a launch to end before forking the next."""

    def __init__(self, module: str, args: list[str], *, env: dict[str, str], stdout: Path, stderr: Path,
                 dump_after: float | None = None):
        self.args = [sys.executable, "-m", module, *args]
        self.returncode: int | None = None
        self._server = _zygote()
        self._server.request({"module": module, "args": args, "env": env, "cwd": str(ROOT),
                              "stdout": str(stdout), "stderr": str(stderr), "dump_after": dump_after})
        self.pid = self._server.answer()["pid"]

    def poll(self) -> int | None:
        if self.returncode is None and (answer := self._server.answer(0.0)) is not None:
            self.returncode = answer["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            answer = self._server.answer(timeout)
            if answer is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = answer["returncode"]
        return self.returncode


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a test's script launch: the tests' own, unbuffered, offline, plus `extra`."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}


TIMEOUT_SCALE = float(os.environ.get("CRATERDIFF_TIMEOUT_SCALE", "3"))
"""Every launch's guard time is multiplied by this: a loaded or slower machine must not turn into a red suite; a hung
launch still stops, and prints where it hung."""


def save_tiny_clip(path: Path) -> Path:
    """A tiny random CLIP vision tower (16-d projections, 32 px), saved as save_pretrained writes it, at `path`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(path)
    return path


def guard(seconds: float) -> float:
    """A subprocess's guard time on this machine: `seconds` × TIMEOUT_SCALE."""
    return seconds * TIMEOUT_SCALE


def run_script(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the project root, as a fork of tests/zygote.py, which has the
    libraries imported already (~5 s a launch saved); returns the completed process. The guard is
    `timeout` × TIMEOUT_SCALE seconds; a launch that outlives it fails the test with the end of its stderr,
    which holds every thread's stack as it was shortly before (where it hung)."""
    timeout = int(timeout * TIMEOUT_SCALE)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = ForkedLaunch(module, list(map(str, args)), env=script_env(), stdout=out, stderr=err,
                            dump_after=max(1.0, timeout - 10))
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"`python -m {module}` ran past its {timeout} s guard; its stderr ends:\n"
                        f"{err.read_text()[-6000:]}\nits stdout ends:\n{out.read_text()[-1500:]}")
        return subprocess.CompletedProcess(proc.args, code, out.read_text(), err.read_text())


def pytest_unconfigure(config):
    for server in _ZYGOTE:
        server.proc.stdin.close()
        server.proc.wait(timeout=60)


def smoke_argv(out: Path, *overrides: str) -> list[str]:
    """A script's arguments for configs/smoke.yaml: --cfg, --out OUT, then --set for each override."""
    return ["--cfg", str(ROOT / "configs" / "smoke.yaml"), "--out", str(out), *(a for o in overrides for a in ("--set", o))]


def algorithm_overrides(algo: str) -> list[str]:
    """The overrides that switch smoke.yaml, whose RL settings are the default's PPO recipe, to `algo`: TRPO and SAC
    refuse its last-step hold (rl.kl_final_coef), TRPO also its σ-weighted steps (config.check_finetune)."""
    return [f"rl.algorithm={algo}", *(["rl.kl_final_coef=0"] if algo in ("trpo", "sac") else []),
            *(["rl.step_weighting=uniform"] if algo == "trpo" else [])]


PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")
"""A tqdm progress bar as it is written to stderr."""


def error_line(stderr: str) -> str:
    """The one line a failed script printed, checked to be alone apart from progress bars (which tqdm
    draws with carriage returns): exactly one 'error: ' line, the last, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [s.strip() for s in re.split(r"[\r\n]", stderr) if s.strip()]
    others = [s for s in lines[:-1] if not PROGRESS_BAR.search(s) or "error" in s]
    assert lines and not others, stderr
    assert lines[-1].startswith("error: "), stderr
    return lines[-1]


def script_error(proc: subprocess.CompletedProcess, *fragments: str, progress_bars: bool = True) -> str:
    """The error line of a script that failed as a user mistake should: exit status 2, `error_line`'s
    one line (and nothing else at all on stderr unless `progress_bars`), holding every fragment."""
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    if not progress_bars:
        assert [s for s in proc.stderr.splitlines() if s.strip()] == [line], proc.stderr
    for f in fragments:
        assert f in line, line
    return line


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """In-process tests run tiny tensors, which are faster on one thread (and far faster when another
    job shares the two cores: two threads then wait on each other). Subprocesses keep the default."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def smoke_cfg() -> Path:
    return ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random 32 px DDPM saved as a pipeline: fast stand-in for the shipped base model."""
    import torch

    from ddpm.pipeline import save_pipeline
    from ddpm.schedulers import make_train_scheduler
    from ddpm.unet import build_unet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model"
    save_pipeline(build_unet("tiny", image_size=32, channels=1),
                  make_train_scheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"), path)
    return path


PLAIN_DIFFUSERS = """
import json, sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMPipeline

model, n, seed, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pipe = DDIMPipeline.from_pretrained(model)
call = json.loads((model / "sampler.json").read_text())
generator = torch.Generator().manual_seed(seed)
if not (model / "noise_scale.json").is_file():  # the call docs/design.md shows
    images = pipe(batch_size=n, generator=generator, output_type="np", **call).images
else:  # a SAC run: the scheduler's own loop, each step's noise times its learned scale
    scales = json.loads((model / "noise_scale.json").read_text())["scales"]
    sched, unet = pipe.scheduler, pipe.unet
    sched.set_timesteps(call["num_inference_steps"])
    x = torch.randn((n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size), generator=generator)
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            z = torch.randn(x.shape, generator=generator)
            x = sched.step(unet(x, t).sample, t, x, eta=call["eta"], variance_noise=scales[k] * z).prev_sample
    images = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
np.save(out, images)
"""
"""Sampling a fine-tuned RUN/model with diffusers alone, as docs/design.md ("Config, CLI, run directory") shows."""


def assert_plain_diffusers_reproduces_sample(model_dir: Path, tmp: Path, *, n: int = 4, seed: int = 7) -> None:
    """A fresh Python process with diffusers alone draws, for a seed, the images `scripts.sample` writes (8-bit PNGs:
    within one level)."""
    import numpy as np
    from PIL import Image

    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(model_dir), str(n), str(seed),
                           str(tmp / "plain.npy")], env=script_env(), capture_output=True, text=True,
                          timeout=guard(180))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = np.load(tmp / "plain.npy")  # (n, H, W, C) in [0, 1]
    proc = run_script("scripts.sample", "--ckpt", model_dir, "--n", str(n), "--seed", str(seed), "--out", tmp / "png")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = np.stack([np.asarray(Image.open(tmp / "png" / f"{i:05d}.png"), dtype=np.float64) for i in range(n)])
    assert np.abs(pngs - plain[..., 0] * 255).max() <= 0.5 + 1e-3, "diffusers alone samples another chain"
