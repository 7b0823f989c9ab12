"""Kill and resume (bench/faults.py): SIGKILLed training scripts resume to the uninterrupted result.

Each script runs on configs/smoke.yaml: once uninterrupted, once killed while a checkpoint is being
written and then twice after seeded random delays, relaunched after every kill. The expected final
weights, metrics.csv and TensorBoard scalars are those of the uninterrupted run with the same seed.
Those launches are forks of the tests' fork server (tests/zygote.py); one short test runs the bench's own
launcher, a fresh interpreter. Two fast tests pin the run-directory fixes the bench depends on: a relaunch
removes the temporary directories killed writes left, and TensorBoard keeps the checkpoint's own step after
a resume.
"""
from __future__ import annotations

import re

import pytest

from config import load_config, prepare_run_dir, save_config
from bench import faults
from bench.faults import SCRIPTS, bench_script, tensorboard_scalars
from basics import latest_checkpoint
from utils import RunLogger, atomic_checkpoint

from .conftest import ForkedLaunch, guard


def forked_start(module, args, *, trace, pause_step, log, threads):
    """bench.faults.start, but forked from the tests' fork server (the same traced child, its own process
    group, output to `log`) instead of a fresh interpreter: ~5 s of imports saved on each of the ~10 launches."""
    return ForkedLaunch("bench.faults", faults.child_args(module, args, trace=trace, pause_step=pause_step),
                        env=faults.launch_env(threads), stdout=log, stderr=log)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, name):
    monkeypatch.setattr(faults, "start", forked_start)
    r = bench_script(name, tmp_path, kills=2, seed=0)
    assert r.finished, r.problems
    # deterministic: the child holds the write open until it is killed (the random kills may miss a short launch)
    assert r.kills_during_checkpoint_write == 1, r.problems
    assert r.kills_survived == r.kills, r.problems  # no half-written checkpoint; each relaunch took the latest
    assert r.weights_equal, r.problems
    assert r.metrics_equal, r.problems
    assert r.tensorboard_equal, r.problems
    assert not r.leftover_temporaries
    assert r.ok, r.problems


def test_relaunch_removes_what_killed_writes_left(tmp_path, smoke_cfg):
    """A process killed inside utils.atomic_directory leaves its hidden temporary directory (here one of
    the final model and one of a checkpoint whose COMPLETE marker was written but not yet renamed), one killed inside
    basics.replaced_file its hidden file."""
    cfg = load_config(smoke_cfg)
    save_config(cfg, tmp_path / "config.yaml")  # what the killed run's start saved
    with atomic_checkpoint(tmp_path / "checkpoints", 1) as tmp:
        (tmp / "state").write_text("step 1")
    for stale in (tmp_path / ".tmp-model-x1", tmp_path / "checkpoints" / ".tmp-step_2-x2"):
        stale.mkdir()
        (stale / "COMPLETE").write_text('{"step": 2}')
    (tmp_path / ".tmp-metrics-x3.csv").write_text("step\n")  # a file basics.replaced_file was writing
    prepare_run_dir(tmp_path, cfg, resume=True)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_1"
    assert not list(tmp_path.rglob(".tmp-*"))


def test_tensorboard_after_resume_shows_each_step_once(tmp_path):
    """Steps up to the checkpoint stay as first logged; later ones, logged again after the resume, replace the
    killed run's (the killed logger is never closed: what it logged must already be on disk)."""
    killed = RunLogger(tmp_path)
    for step in (1, 2, 3):
        killed.log(step, {"loss": float(step)})
    resumed = RunLogger(tmp_path, resume_step=2)  # the checkpoint was at step 2
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    assert tensorboard_scalars(tmp_path)["policy/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_start_runs_the_traced_child_in_a_fresh_interpreter_of_its_own_group(tmp_path):
    """The bench's own launcher (the kill test above forks its launches instead): `python -m bench.faults
    --child` runs the module with its arguments, in a process group of its own, output to the log."""
    log = tmp_path / "launch.log"
    proc = faults.start("timeit", ["-n", "1", "-r", "1", "import os; print('group', os.getpgid(0), os.getpid())"],
                        trace=tmp_path / "trace.jsonl", pause_step=None, log=log, threads=1)
    assert proc.wait(timeout=guard(120)) == 0, log.read_text()
    group, pid = re.search(r"group (\d+) (\d+)", log.read_text()).groups()
    assert group == pid == str(proc.pid)
