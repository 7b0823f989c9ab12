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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


_ZYGOTE: list[subprocess.Popen] = []


def _zygote() -> subprocess.Popen:
    """The session's fork server (tests/zygote.py), started on first use."""
    if not _ZYGOTE or _ZYGOTE[0].poll() is not None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        _ZYGOTE[:] = [subprocess.Popen([sys.executable, "-m", "tests.zygote"], cwd=ROOT, env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)]
    return _ZYGOTE[0]


def _answer(server: subprocess.Popen, timeout: float | None = None) -> dict:
    if timeout is not None and not select.select([server.stdout], [], [], timeout)[0]:
        raise TimeoutError
    line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"the test fork server (tests/zygote.py) died with status {server.wait()}")
    return json.loads(line)


def run_script(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the project root, as a fork of tests/zygote.py, which has the
    libraries imported already (~5 s a launch saved); returns the completed process."""
    argv = [sys.executable, "-m", module, *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    server = _zygote()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        server.stdin.write(json.dumps({"module": module, "args": argv[3:], "env": env, "cwd": str(ROOT),
                                       "stdout": str(out), "stderr": str(err)}) + "\n")
        server.stdin.flush()
        pid = _answer(server)["pid"]
        try:
            code = _answer(server, timeout)["returncode"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            _answer(server)
            raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text()) from None
        return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())


def pytest_unconfigure(config):
    for server in _ZYGOTE:
        server.stdin.close()
        server.wait(timeout=60)


def smoke_argv(out: Path, *overrides: str) -> list[str]:
    """A script's arguments for configs/smoke.yaml: --cfg, --out OUT, then --set for each override."""
    return ["--cfg", str(ROOT / "configs" / "smoke.yaml"), "--out", str(out), *(a for o in overrides for a in ("--set", o))]


def algorithm_overrides(algo: str) -> list[str]:
    """The overrides that switch smoke.yaml, whose RL settings are the default's PPO recipe, to `algo`: TRPO and SAC
    refuse its last-step hold (rl.kl_final_coef), TRPO also its σ-weighted steps (rl.trainer.check_config)."""
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
