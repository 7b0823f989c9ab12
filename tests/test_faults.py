"""Kill and resume (bench/faults.py): SIGKILLed training scripts resume to the uninterrupted result.

Each script runs on configs/smoke.yaml: once uninterrupted, once killed while a checkpoint is being
written and then twice after seeded random delays, relaunched after every kill. The expected final
weights, metrics.csv and TensorBoard scalars are those of the uninterrupted run with the same seed.
Two fast tests pin the run-directory fixes the bench depends on: a relaunch removes the temporary
directories killed writes left, and TensorBoard keeps the checkpoint's own step after a resume.
"""
from __future__ import annotations

import pytest

from bench.faults import SCRIPTS, bench_script, tensorboard_scalars
from utils import RunLogger, atomic_checkpoint, latest_checkpoint, load_config, prepare_run_dir


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, name):
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
    the final model and one of a checkpoint whose COMPLETE marker was written but not yet renamed)."""
    cfg = load_config(smoke_cfg)
    with atomic_checkpoint(tmp_path / "checkpoints", 1) as tmp:
        (tmp / "state").write_text("step 1")
    for stale in (tmp_path / ".tmp-model-x1", tmp_path / "checkpoints" / ".tmp-step_2-x2"):
        stale.mkdir()
        (stale / "COMPLETE").write_text('{"step": 2}')
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
    assert tensorboard_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]
