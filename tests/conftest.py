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


@pytest.fixture
def smoke_cfg() -> Path:
    return ROOT / "configs" / "smoke.yaml"
