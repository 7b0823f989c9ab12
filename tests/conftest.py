"""Shared test fixtures. Tests run from the project root (`make test`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` from the project root; return the completed process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


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
