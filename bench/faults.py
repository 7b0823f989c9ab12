"""Kill and resume: SIGKILL the training scripts mid-run, resume them, and check that nothing is lost.

    python -m bench.faults --out DIR [--kills N] [--seed S] [--threads T] [--scripts NAME ...] [--set KEY=VALUE ...]

For `scripts.finetune` and `scripts.pretrain_ddpm` on configs/smoke.yaml (CPU, T torch threads):

1. an uninterrupted reference run, which also records the steps its checkpoints are written at;
2. a run of the same config and seed that is SIGKILLed and relaunched until it exits cleanly:
   first while a checkpoint is being written (its files and COMPLETE marker are in the hidden
   temporary directory, the rename has not happened; the step is drawn with the seed from the
   reference's checkpoint steps), then N times at a random moment of the launch's remaining work
   (drawn with the seed: mostly once the next checkpoint is written, a delay within one checkpoint
   interval of the reference; else from the start, a delay within the reference's time to its first
   checkpoint; a launch that finishes first lets the kill miss).
   Each relaunch passes --resume when a complete checkpoint exists and starts afresh otherwise.

After every kill: each visible `checkpoints/step_N/` is complete (COMPLETE marker, every file loads
with the project's loaders) and the next launch reports resuming from the latest of them. At the end:
the final weights (`model/`, `adapter/`) are bit-equal to the reference's, `metrics.csv` and the
TensorBoard scalars are equal but for the columns that measure the machine (`is_volatile`), and no
temporary directory is left behind. Writes DIR/faults.json, prints a table, exits 1 if anything
failed. DIR/<script>/ is replaced on every call: reference/ and killed/ runs, logs/, traces/.

Each launch of the killed run goes through `python -m bench.faults --child --trace FILE
[--pause-step N] MODULE ARGS...`, which runs MODULE unchanged except that checkpoint writes are
traced and, for step N, held open until the parent kills the process (`instrument_checkpoints`).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from safetensors.torch import load_file

import utils
from basics import CHECKPOINT_PREFIX, PROJECT_ROOT
from utils import load_state

SCRIPTS = {"finetune": "scripts.finetune", "pretrain_ddpm": "scripts.pretrain_ddpm"}
FINAL_DIRS = ("model", "adapter")  # where the scripts put the final weights (adapter/: LoRA only)
PAUSE_S = 120.0  # a held checkpoint write carries on after this long if nobody killed it
LAUNCH_TIMEOUT_S = 900.0  # a launch running longer than this has hung: the bench fails
RESUME_LINE = re.compile(rf"resuming from \S*{CHECKPOINT_PREFIX}(\d+)")  # printed by both scripts on --resume


# ----------------------------------------------------------------------------------------------
# The child: one launch of a script with its checkpoint writes traced
# ----------------------------------------------------------------------------------------------

def checkpoint_step(final: Path) -> int | None:
    """N for a `checkpoints/step_N` directory, None for any other atomically written directory."""
    m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", final.name)
    return int(m.group(1)) if m and final.parent.name == "checkpoints" else None


def append_record(trace: Path, record: dict) -> None:
    """One JSON line; a single small write, so that the parent never reads half a record."""
    with open(trace, "a") as f:
        f.write(json.dumps(record) + "\n")


def instrument_checkpoints(trace: Path, pause_step: int | None) -> None:
    """Wrap `utils.atomic_directory`, through which `utils.atomic_checkpoint` writes every checkpoint.

    Each finished checkpoint write appends {"step": N, "time": wall-clock seconds} to `trace`. The write of step `pause_step`
    appends {"step": N, "paused": true} once its files and COMPLETE marker are in the temporary
    directory and then sleeps before the rename, so that the parent kills it exactly there.
    """
    real = utils.atomic_directory

    @contextlib.contextmanager
    def traced(final):
        step = checkpoint_step(Path(final))
        with real(final) as tmp:
            yield tmp
            if step is not None and step == pause_step:
                append_record(trace, {"step": step, "paused": True, "tmp": Path(tmp).name})
                time.sleep(PAUSE_S)
        if step is not None:
            append_record(trace, {"step": step, "time": time.time()})

    utils.atomic_directory = traced


def child_main(argv: list[str]) -> None:
    """`--child`: run one launch of a script with its checkpoint writes instrumented."""
    p = argparse.ArgumentParser(prog="python -m bench.faults --child")
    p.add_argument("--trace", type=Path, required=True, help="JSON-lines file the checkpoint writes go to")
    p.add_argument("--pause-step", type=int, default=None, help="hold the write of this checkpoint step")
    p.add_argument("module", help="the script, e.g. scripts.finetune")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    a = p.parse_args(argv)
    instrument_checkpoints(a.trace, a.pause_step)
    sys.argv = [a.module, *a.args]
    runpy.run_module(a.module, run_name="__main__", alter_sys=True)


def read_trace(trace: Path) -> list[dict]:
    """The complete records of a trace file (a line still being written is skipped)."""
    if not trace.is_file():
        return []
    return [json.loads(line) for line in trace.read_text().splitlines(keepends=True) if line.endswith("\n")]


# ----------------------------------------------------------------------------------------------
# The parent: launches, kills, checks
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kill:
    """A planned kill: while checkpoint `pause_step` is being written, or `delay_s` after the launch
    has written checkpoint `after_step` (None: `delay_s` after the launch started)."""
    kind: Literal["checkpoint_write", "random"]
    pause_step: int | None = None
    delay_s: float | None = None
    after_step: int | None = None


@dataclass
class Launch:
    """One process of the killed run."""
    resume_from: int | None  # latest complete checkpoint step when launched (None: started afresh)
    kill: Kill | None  # None: left to finish
    seconds: float = 0.0  # until it exited or was killed
    returncode: int | None = None
    killed: bool = False  # SIGKILL reached the running process as planned
    held_write: str | None = None  # the temporary directory of the checkpoint write it was killed in
    reported_resume: int | None = None  # the step of its "resuming from .../step_N" line
    checkpoints: list[int] = field(default_factory=list)  # complete checkpoint steps after it ended
    temporaries: list[str] = field(default_factory=list)  # hidden temporary dirs in checkpoints/ after it
    checkpoint_problems: list[str] = field(default_factory=list)  # half-written or unreadable checkpoints
    resume_problem: str | None = None  # it did not start from the latest complete checkpoint


@dataclass
class ScriptResult:
    """faults.json's entry for one script."""
    script: str
    reference_seconds: float
    reference_checkpoints: list[int]
    kills_attempted: int  # launches that had a kill planned
    kills: int  # kills that reached a running process
    kills_survived: int  # kills after which every checkpoint was whole and the next launch resumed right
    kills_during_checkpoint_write: int
    kill_times_s: list[float]  # seconds into their launch, in order
    runs_to_finish: int  # launches of the killed run, the last one finishing
    finished: bool
    weights_equal: bool
    metrics_equal: bool
    tensorboard_equal: bool
    leftover_temporaries: list[str]
    problems: list[str]
    launches: list[Launch]

    @property
    def ok(self) -> bool:
        return not self.problems


def script_args(cfg: Path, run_dir: Path, *, threads: int, overrides: list[str], resume: bool) -> list[str]:
    """The script's command line; CPU and an explicit thread count make the runs bit-reproducible."""
    sets = ["device=cpu", f"num_threads={threads}", *overrides]
    return ["--cfg", str(cfg), "--out", str(run_dir), *(a for s in sets for a in ("--set", s)),
            *(["--resume"] if resume else [])]


def child_args(module: str, args: list[str], *, trace: Path, pause_step: int | None) -> list[str]:
    """The arguments of `python -m bench.faults` for one traced launch of `module args`."""
    return ["--child", "--trace", str(trace), *(["--pause-step", str(pause_step)] if pause_step is not None else []),
            module, *args]


def launch_env(threads: int) -> dict[str, str]:
    """A launch's environment: this one, offline, unbuffered, `threads` OpenMP/MKL threads."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def start(module: str, args: list[str], *, trace: Path, pause_step: int | None, log: Path,
          threads: int) -> subprocess.Popen:
    """Launch the script through the tracing child in its own process group, output to `log`."""
    cmd = [sys.executable, "-m", "bench.faults", *child_args(module, args, trace=trace, pause_step=pause_step)]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=launch_env(threads), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launch's process group (the script and anything it started) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_until(proc: subprocess.Popen, deadline: float) -> None:
    """Wait for the launch to exit, at most until `deadline` (time.monotonic())."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def wait_for_trace(proc: subprocess.Popen, trace: Path, seen, deadline: float) -> None:
    """Return once a record of `trace` satisfies `seen`, or the child has exited, or at `deadline`."""
    while proc.poll() is None and time.monotonic() < deadline:
        if any(seen(r) for r in read_trace(trace)):
            return
        time.sleep(0.02)


def run_launch(module: str, args: list[str], plan: Kill | None, *, trace: Path, log: Path,
               threads: int) -> tuple[float, int, bool]:
    """Run one launch until it exits or its planned kill; return (seconds, return code, killed as planned).

    A launch still running at LAUNCH_TIMEOUT_S is killed too, but as a hang: not `killed as planned`.
    """
    t0 = time.monotonic()
    timeout = t0 + LAUNCH_TIMEOUT_S
    proc = start(module, args, trace=trace, log=log, threads=threads, pause_step=plan.pause_step if plan else None)
    if plan is None:
        wait_until(proc, timeout)
    elif plan.kind == "checkpoint_write":
        wait_for_trace(proc, trace, lambda r: r.get("paused") and r["step"] == plan.pause_step, timeout)
    else:
        if plan.after_step is not None:
            wait_for_trace(proc, trace, lambda r: not r.get("paused") and r["step"] >= plan.after_step, timeout)
        wait_until(proc, min(timeout, time.monotonic() + plan.delay_s))
    seconds = time.monotonic() - t0
    if proc.poll() is None:
        kill(proc)
    killed = plan is not None and proc.returncode == -signal.SIGKILL and seconds < LAUNCH_TIMEOUT_S
    return seconds, proc.returncode, killed


def load_checkpoint_files(path: Path) -> None:
    """Load every file of a checkpoint with the project's loaders; raise on the first that fails."""
    for f in sorted(path.rglob("*")):
        if f.suffix == ".pt":
            load_state(f)
        elif f.suffix == ".safetensors":
            load_file(f)
        elif f.suffix == ".json":
            json.loads(f.read_text())


def checkpoint_problem(path: Path, step: int) -> str | None:
    """Why a visible checkpoint is not whole: no COMPLETE marker for its step, or a file that does not load."""
    marker = path / "COMPLETE"
    if not marker.is_file() or json.loads(marker.read_text()).get("step") != step:
        return f"{path.name} is visible without a COMPLETE marker for step {step}"
    try:
        load_checkpoint_files(path)
    except Exception as e:  # whatever a loader raises for a truncated or garbled file
        return f"{path.name} does not load: {(str(e).splitlines() or [type(e).__name__])[0][:200]}"
    return None


def check_checkpoints(checkpoint_dir: Path) -> tuple[list[int], list[str]]:
    """(steps of the visible checkpoints, problems): every `step_N` must be complete and load."""
    steps, problems = [], []
    for p in sorted(checkpoint_dir.iterdir()) if checkpoint_dir.is_dir() else []:
        step = checkpoint_step(p)
        if step is None:
            continue  # hidden temporaries (.tmp-*, .old-*) are invisible to list_checkpoints and so to --resume
        problem = checkpoint_problem(p, step)
        if problem:
            problems.append(problem)
        else:
            steps.append(step)
    return sorted(steps), problems


def reported_resume(log: Path) -> int | None:
    """The checkpoint step a launch said it resumed from (the last such line), if it got that far."""
    found = RESUME_LINE.findall(log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def resume_problem(launch: Launch) -> str | None:
    """Whether a launch started from the latest complete checkpoint (or afresh when there was none)."""
    said, expected = launch.reported_resume, launch.resume_from
    if expected is None and said is not None:
        return f"started afresh but reported resuming from step {said}"
    if expected is not None and said is not None and said != expected:
        return f"resumed from step {said}, but the latest complete checkpoint was step {expected}"
    if expected is not None and said is None and launch.returncode == 0:
        return f"finished without reporting that it resumed from step {expected}"
    return None


def checkpoint_write_problems(launch: Launch, checkpoint_dir: Path) -> list[str]:
    """After a kill inside the write of step N: its hidden copy holds every file, COMPLETE included,
    yet step N is not visible, so that the next launch resumes from the checkpoint before it."""
    step = launch.kill.pause_step
    if launch.held_write is None:
        return [f"the kill planned inside the write of step {step} did not land there"]
    problems = [f"step {step} became visible although its write was killed before the rename"] \
        if step in launch.checkpoints else []
    if not (checkpoint_dir / launch.held_write / "COMPLETE").is_file():
        problems.append(f"the killed write of step {step} left no complete hidden copy to ignore")
    return problems


# ----------------------------------------------------------------------------------------------
# Comparing the killed run with the reference
# ----------------------------------------------------------------------------------------------

def is_volatile(column: str) -> bool:
    """Columns that measure the machine, not the training, and so differ between equal runs: wall-clock
    seconds (the trainers' `time_sample_s`, `time_reward_s`, `time_update_s`, pretraining's `time_step_s`)
    and the process's peak memory (`peak_mem_mb`: peak RSS, which depends on what the process did before); in
    metrics.csv and as TensorBoard groups them (`time/…`, `system/peak_mem_mb`)."""
    return column.startswith(("time_", "time/")) or column in ("peak_mem_mb", "system/peak_mem_mb")


def final_tensors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of the final weights, by path relative to the run directory."""
    return {str(f.relative_to(run_dir)): load_file(f)
            for d in FINAL_DIRS for f in sorted((run_dir / d).rglob("*.safetensors"))}


def weights_problems(reference: Path, run: Path) -> list[str]:
    """Differences between the final weights of two runs (bit-exact: same files, keys, dtypes, values)."""
    a, b = final_tensors(reference), final_tensors(run)
    if not a:
        return [f"the reference has no final weights under {', '.join(FINAL_DIRS)}"]
    if a.keys() != b.keys():
        return [f"final weight files differ: {sorted(a)} vs {sorted(b)}"]
    problems = []
    for name in a:
        if a[name].keys() != b[name].keys():
            problems.append(f"{name}: tensor names differ")
            continue
        unequal = [k for k, t in a[name].items() if t.dtype != b[name][k].dtype or not torch.equal(t, b[name][k])]
        if unequal:
            problems.append(f"{name}: {len(unequal)} tensors differ, e.g. {unequal[0]}")
    return problems


def metric_rows(path: Path) -> list[dict[str, str]]:
    """metrics.csv as rows, without the volatile columns."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if not is_volatile(k)} for row in csv.DictReader(f)]


def metrics_problems(reference: Path, run: Path) -> list[str]:
    """Differences between two runs' metrics.csv: the same steps, the same value strings (volatile columns aside)."""
    a, b = metric_rows(reference / "metrics.csv"), metric_rows(run / "metrics.csv")
    if not a:
        return ["the reference wrote no metrics.csv rows"]
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return [f"metrics.csv steps differ: {[r['step'] for r in a]} vs {[r['step'] for r in b]}"]
    for ra, rb in zip(a, b):
        if ra != rb:
            cols = [k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k)]
            return [f"metrics.csv differs at step {ra['step']} in {sorted(cols)}"]
    return []


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars TensorBoard shows for a run (restarts purged as TensorBoard purges them), by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run_dir / "tb").is_dir():
        return {}
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its purge warnings are the restarts we expect
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"] if not is_volatile(tag)}


def tensorboard_problems(reference: Path, run: Path) -> list[str]:
    """Differences between the scalars TensorBoard shows for two runs (volatile tags aside)."""
    a, b = tensorboard_scalars(reference), tensorboard_scalars(run)
    if a.keys() != b.keys():
        return [f"TensorBoard tags differ: {sorted(a.keys() ^ b.keys())}"]
    return [f"TensorBoard '{tag}' differs: steps {[s for s, _ in a[tag]]} vs {[s for s, _ in b[tag]]}"
            for tag in sorted(a) if a[tag] != b[tag]]


def leftover_temporaries(run_dir: Path) -> list[str]:
    """Hidden temporary directories of atomic writes (utils.atomic_directory) still in the run."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.startswith((".tmp-", ".old-")))


# ----------------------------------------------------------------------------------------------
# One script, all scripts
# ----------------------------------------------------------------------------------------------

def first_kill(rng: random.Random, checkpoint_steps: list[int]) -> Kill | None:
    """The checkpoint-write kill comes first, while every checkpoint step is still ahead of the run."""
    return Kill("checkpoint_write", pause_step=rng.choice(checkpoint_steps)) if checkpoint_steps else None


@dataclass(frozen=True)
class Pace:
    """When the reference run wrote its checkpoints: the first one `first_s` after its launch, then one
    every `interval_s`."""
    first_s: float
    interval_s: float

    @classmethod
    def of(cls, records: list[dict], launched: float, seconds: float) -> "Pace":
        times = sorted(r["time"] for r in records if not r.get("paused"))
        if not times:
            return cls(seconds, seconds)
        interval = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else seconds - (times[0] - launched)
        return cls(times[0] - launched, max(interval, 0.01))


def random_kill(rng: random.Random, pace: Pace, checkpoint_steps: list[int], resume_from: int | None) -> Kill:
    """A kill at a random moment of a launch that resumes from `resume_from`.

    Three times in four: once the next checkpoint is written, a delay within one checkpoint interval
    (mid-training, sometimes inside the following write or the final export); else a delay from the
    launch's start within the reference's time to its first checkpoint (start-up, loading, the first
    steps). Delays drawn over the whole run would mostly miss a resumed launch, which has only the
    rest of the run to do.
    """
    ahead = [s for s in checkpoint_steps if s > (resume_from or 0)]
    if ahead and rng.random() < 0.75:
        return Kill("random", delay_s=round(rng.uniform(0.0, pace.interval_s), 2), after_step=ahead[0])
    return Kill("random", delay_s=round(rng.uniform(0.0, pace.first_s), 2))


def run_killed(module: str, run_dir: Path, rng: random.Random, kills: int, pace: Pace,
               reference_steps: list[int], *, cfg: Path, threads: int, overrides: list[str], logs: Path,
               traces: Path) -> list[Launch]:
    """Launch, kill (one kill inside a checkpoint write, then `kills` random ones), check, relaunch,
    until a launch exits (cleanly or not)."""
    launches: list[Launch] = []
    first = first_kill(rng, reference_steps)
    planned = kills + (first is not None)
    while True:
        i = len(launches)
        latest = utils.latest_checkpoint(run_dir / "checkpoints")
        resume_from = checkpoint_step(latest) if latest else None
        kill = (first if i == 0 and first is not None
                else random_kill(rng, pace, reference_steps, resume_from) if i < planned else None)
        launch = Launch(resume_from=resume_from, kill=kill)
        args = script_args(cfg, run_dir, threads=threads, overrides=overrides, resume=latest is not None)
        log, trace = logs / f"launch_{i + 1}.log", traces / f"launch_{i + 1}.jsonl"
        launch.seconds, launch.returncode, launch.killed = run_launch(module, args, launch.kill, trace=trace,
                                                                      log=log, threads=threads)
        launch.reported_resume = reported_resume(log)
        launch.resume_problem = resume_problem(launch)
        launch.checkpoints, launch.checkpoint_problems = check_checkpoints(run_dir / "checkpoints")
        launch.temporaries = leftover_temporaries(run_dir / "checkpoints")
        if launch.killed and launch.kill.kind == "checkpoint_write":
            launch.held_write = next((r["tmp"] for r in read_trace(trace) if r.get("paused")), None)
            launch.checkpoint_problems += checkpoint_write_problems(launch, run_dir / "checkpoints")
        launches.append(launch)
        if not launch.killed:
            return launches


def count_survived(launches: list[Launch]) -> int:
    """Kills after which every checkpoint was whole and the next launch started where it should."""
    return sum(1 for this, after in zip(launches, launches[1:])
               if this.killed and not this.checkpoint_problems and after.resume_problem is None)


def last_line(log: Path) -> str:
    """The last line a launch printed (its error, when it failed)."""
    return (log.read_text(errors="replace").strip().splitlines() or [""])[-1]


def launch_problems(launches: list[Launch], logs: Path) -> list[str]:
    """Half-written checkpoints, wrong resumes, and a last launch that failed instead of finishing."""
    problems = []
    for i, launch in enumerate(launches, 1):
        problems += [f"launch {i}: {p}" for p in launch.checkpoint_problems]
        if launch.resume_problem:
            problems.append(f"launch {i}: {launch.resume_problem}")
    if launches[-1].returncode != 0:
        n = len(launches)
        problems.append(f"launch {n} exited with status {launches[-1].returncode}: "
                        f"{last_line(logs / f'launch_{n}.log')}")
    return problems


def bench_script(name: str, out: Path, *, kills: int, seed: int, threads: int = 1,
                 cfg: Path = PROJECT_ROOT / "configs" / "smoke.yaml", overrides: Sequence[str] = ()) -> ScriptResult:
    """Reference run, then the killed run, then the comparison, for one of `SCRIPTS` (out/<name>/ is replaced)."""
    module, root = SCRIPTS[name], out / name
    shutil.rmtree(root, ignore_errors=True)
    logs, traces = root / "logs", root / "traces"
    logs.mkdir(parents=True)
    traces.mkdir()
    reference, killed = root / "reference", root / "killed"
    overrides = list(overrides)
    launched = time.time()
    ref_s, ref_rc, _ = run_launch(module, script_args(cfg, reference, threads=threads, overrides=overrides,
                                                      resume=False),
                                  None, trace=traces / "reference.jsonl", log=logs / "reference.log", threads=threads)
    if ref_rc != 0:
        raise RuntimeError(f"the reference run of {module} failed with status {ref_rc}: "
                           f"{last_line(logs / 'reference.log')}")
    ref_trace = read_trace(traces / "reference.jsonl")
    ref_steps = sorted({r["step"] for r in ref_trace})
    pace = Pace.of(ref_trace, launched, ref_s)
    launches = run_killed(module, killed, random.Random(f"{seed}:{name}"), kills, pace, ref_steps, cfg=cfg,
                          threads=threads, overrides=overrides, logs=logs, traces=traces)
    finished = launches[-1].returncode == 0
    problems = launch_problems(launches, logs)
    weights = weights_problems(reference, killed) if finished else ["not finished"]
    metrics = metrics_problems(reference, killed) if finished else ["not finished"]
    tensorboard = tensorboard_problems(reference, killed) if finished else ["not finished"]
    leftovers = leftover_temporaries(killed)
    problems += weights + metrics + tensorboard + [f"temporary left behind: {t}" for t in leftovers]
    return ScriptResult(
        script=module, reference_seconds=round(ref_s, 2), reference_checkpoints=ref_steps,
        kills_attempted=sum(launch.kill is not None for launch in launches),
        kills=sum(launch.killed for launch in launches), kills_survived=count_survived(launches),
        kills_during_checkpoint_write=sum(launch.held_write is not None for launch in launches),
        kill_times_s=[round(launch.seconds, 2) for launch in launches if launch.killed],
        runs_to_finish=len(launches), finished=finished, weights_equal=not weights, metrics_equal=not metrics,
        tensorboard_equal=not tensorboard, leftover_temporaries=leftovers, problems=list(dict.fromkeys(problems)),
        launches=launches)


def print_table(results: list[ScriptResult]) -> None:
    """One row per script (kills: reached / planned), then every problem found."""
    cols = ("script", "kills", "in ckpt write", "survived", "launches", "weights", "metrics", "tensorboard", "result")
    rows = [(r.script, f"{r.kills}/{r.kills_attempted}", str(r.kills_during_checkpoint_write), str(r.kills_survived),
             str(r.runs_to_finish), "equal" if r.weights_equal else "DIFFER", "equal" if r.metrics_equal else "DIFFER",
             "equal" if r.tensorboard_equal else "DIFFER", "ok" if r.ok else "FAILED") for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    for row in (cols, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    for r in results:
        for p in r.problems:
            print(f"{r.script}: {p}")


def main(argv: list[str] | None = None) -> int:
    """The bench (exit status 1 if any script failed a check), or with --child one launch of a script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory for faults.json and the runs")
    p.add_argument("--kills", type=int, default=3, help="random kills per script, besides the checkpoint-write one")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill plan (the runs use the config's seed)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of every run (equal runs need equal)")
    p.add_argument("--cfg", type=Path, default=PROJECT_ROOT / "configs" / "smoke.yaml")
    p.add_argument("--scripts", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. --set pretrain.checkpoint_every=5")
    args = p.parse_args(argv)
    results = [bench_script(name, args.out, kills=args.kills, seed=args.seed, threads=args.threads, cfg=args.cfg,
                            overrides=args.overrides) for name in args.scripts]
    report = {"seed": args.seed, "kills": args.kills, "threads": args.threads, "cfg": str(args.cfg),
              "overrides": args.overrides,
              "scripts": {name: {**asdict(r), "ok": r.ok} for name, r in zip(args.scripts, results)}}
    (args.out / "faults.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out / 'faults.json'}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
