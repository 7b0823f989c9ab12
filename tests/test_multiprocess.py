"""Two CPU processes under `accelerate launch`: the script runs end to end, every process ends with
the same weights (PPO's averaged gradients, TRPO's averaged g, F v and line search), the set-level
reward is computed on the gathered set, and only the main process writes the run directory."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, algorithm_overrides, guard

pytestmark = pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None
                                and shutil.which("accelerate") is None, reason="accelerate's launcher is not installed")

FAST = ["--set", "reward.features.name=pixels", "--set", "reward.realism.enabled=false", "--set", "log.trackers=[csv]",
        "--set", "num_threads=1", "--set", "device=cpu"]


def launch(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2`: torchrun's launcher, which on a machine without
    GPUs starts CPU processes joined by gloo (accelerate's `--cpu` launcher starts several processes
    only through MPI)."""
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=guard(timeout))


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_two_processes_keep_identical_weights_and_score_the_gathered_set(tmp_path, algo):
    proc = launch("-m", "tests.mp_worker", ROOT / "configs" / "smoke.yaml", tmp_path, *FAST[1::2],
                  *algorithm_overrides(algo), "rl.iterations=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["start"] == r1["start"]  # same initial weights
    assert r0["end"] == r1["end"] and r0["end"] != r0["start"]  # trained, and identical everywhere
    assert r0["batch"] == r1["batch"] == 8 and r0["set"] == 16  # each samples half; the reward sees all
    assert r0["reward_max_abs_diff"] < 1e-9
    with open(tmp_path / "metrics.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["1", "2"]  # one writer


def slurm_job(tmp_path, *args: str, gpus_per_node: int = 2) -> subprocess.CompletedProcess:
    """jobs/finetune.slurm as sbatch would run it on a one-node allocation, with stand-ins for SLURM's
    `srun` (runs the command once: one task on one node) and `scontrol` (names this host)."""
    shims = tmp_path / "slurm_bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (shims / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for f in shims.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "node001", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "GPUS_PER_NODE": str(gpus_per_node), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "jobs" / "finetune.slurm"), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=guard(400))


def test_finetune_script_under_the_slurm_job_and_resume(tmp_path):
    run = tmp_path / "run"
    proc = slurm_job(tmp_path, "configs/smoke.yaml", "--out", run, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout + proc.stderr
    tmp_path = run
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert (tmp_path / "checkpoints" / "step_2" / "COMPLETE").is_file()
    proc = launch("-m", "scripts.finetune", "--cfg", ROOT / "configs" / "smoke.yaml", "--out", tmp_path, "--resume",
                  *FAST, "--set", "rl.iterations=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "metrics.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["1", "2", "3"]
    # a checkpoint written by two processes is refused by one, with the fix in the message
    single = subprocess.run([sys.executable, "-m", "scripts.finetune", "--cfg", str(ROOT / "configs" / "smoke.yaml"),
                             "--out", str(tmp_path), "--resume", *FAST, "--set", "rl.iterations=4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=guard(300),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert single.returncode == 2 and "written by 2 process(es)" in single.stderr


def test_accelerate_cpu_launcher_says_it_started_one_process(tmp_path):
    # accelerate's --cpu launcher needs MPI for several processes; without it the run goes on as one,
    # with a notice naming the command that starts several
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    cmd = [exe, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "scripts.finetune", "--cfg", str(ROOT / "configs" / "smoke.yaml"),
           "--out", str(tmp_path), *FAST, "--set", "rl.iterations=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=guard(400),
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate launch --cpu started one process" in proc.stderr
    assert "--multi_gpu --num_processes N" in proc.stderr
    assert (tmp_path / "model" / "model_index.json").is_file()
