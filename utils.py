"""Shared plumbing that needs torch, numpy or PIL: seeding, devices, precision, images, atomic directories and
checkpoints, safe loading, logging. The standard-library part (the error type, atomic text writes, checkpoint listing,
the scripts' entry points) is `basics.py`, importable before torch.

Everything a script needs besides the algorithm and its config (`config.py`) lives in these two, so that the scripts
stay thin and the library modules (`ddpm/`, `rl/`, `reward/`) take explicit arguments instead of reading globals or
environment variables.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import pickle
import random
import re
import resource
import secrets
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from basics import (CHECKPOINT_PREFIX, PROJECT_ROOT, CraterdiffError, _umask_mode, atomic_write_text, disk_full,
                    first_line, flat_keys, latest_checkpoint, list_checkpoints, remove_temporaries, replaced_file)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Map model-space images in [-1, 1] to uint8 HWC arrays.

    images: (B, C, H, W) float in [-1, 1], C in {1, 3}  ->  (B, H, W, C) uint8
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1|3, H, W) images, got shape {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _pil(array: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> PIL image ('L' for one channel, 'RGB' for three)."""
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_images(images: torch.Tensor, out_dir: str | Path, *, prefix: str = "", start: int = 0) -> list[Path]:
    """Write each image of a (B, C, H, W) batch in [-1, 1] as `out_dir/{prefix}{start+i:05d}.png`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(images)):
        paths.append(save_png(_pil(arr), out / f"{prefix}{start + i:05d}.png"))
    return paths


def image_grid(images: torch.Tensor, *, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile a (B, C, H, W) batch in [-1, 1] into one PIL image, `nrow` images per row.

    `scale` enlarges each tile by nearest-neighbour so that 32 px images stay readable.
    """
    arrays = to_uint8(images)
    b, h, w, c = arrays.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    hs, ws = h * scale, w * scale
    canvas = np.full((ncol * (hs + pad) + pad, nrow * (ws + pad) + pad, c), 255, dtype=np.uint8)
    for i, arr in enumerate(arrays):
        if scale > 1:
            arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
        r, col = divmod(i, nrow)
        y, x = pad + r * (hs + pad), pad + col * (ws + pad)
        canvas[y:y + hs, x:x + ws] = arr
    return _pil(canvas)


def save_image_grid(images: torch.Tensor, path: str | Path, **kwargs) -> Path:
    """Save `image_grid(images, **kwargs)` as a PNG at `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(image_grid(images, **kwargs), path)


def resolve_path(p: str | Path) -> Path:
    """Config paths are relative to the project root unless absolute."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


# ----------------------------------------------------------------------------------------------
# Seeding, device, precision
# ----------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def apply_threads(num_threads: int | None) -> None:
    """Set torch's CPU thread count to the config's `num_threads` (if given)."""
    if num_threads:
        torch.set_num_threads(num_threads)


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory in MB: the CUDA allocator's peak since its last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CraterdiffError("device 'cuda' requested but no CUDA GPU is visible; use --set device=cpu "
                              "or a CPU config (configs/default.yaml)")
    return torch.device(name)


AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def setup_precision(precision: str, tf32: bool, device: torch.device) -> torch.dtype | None:
    """Check the config's `precision` and `tf32` against the device, switch TF32 on if asked; return the
    autocast dtype (None for fp32). Parts that need CUDA fail here with one line on a CPU-only machine; bf16 on a
    CPU without native bf16 (oneDNN emulates it, tens of times slower than fp32) runs, with a warning."""
    if tf32:
        if device.type != "cuda":
            raise CraterdiffError(f"tf32: true needs a CUDA GPU (Ampere or newer) but the device is {device.type}; "
                                  f"set --set tf32=false to run this config on the CPU")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CraterdiffError(f"precision bf16 needs an Ampere or newer GPU; {torch.cuda.get_device_name(device)} "
                              f"has no bf16: use --set precision=fp16 (configs/v100.yaml) or fp32")
    if precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        warnings.warn("precision bf16 on a CPU without native bf16 is emulated, tens of times slower than fp32: "
                      "add --set precision=fp32", stacklevel=2)
    return AMP_DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on the device's type (CUDA or CPU); a no-op for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG state needed for an exact resume, as tensors/ints (safe for weights_only loading)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Inverse of `rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------
# Files: atomic writes and checkpoints
# ----------------------------------------------------------------------------------------------


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PIL image as PNG through `replaced_file`."""
    with replaced_file(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


class DiskFullError(CraterdiffError):
    """A full disk or quota while `atomic_directory` filled a directory (which it then removed)."""


@contextlib.contextmanager
def atomic_directory(final: str | Path):
    """Yield a temporary sibling directory to fill; on success it replaces `final` in one rename.

    An exception inside the block removes the temporary directory (a full disk then becomes a one-line
    DiskFullError); a killed process leaves it as a hidden `.tmp-*` directory (deleted by
    `remove_temporaries`). Either way readers see the old directory or the complete new one, never a
    half-written one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes it private (0700); give it normal directory rights
    try:
        yield tmp
        if final.exists():  # replacing (re-saving a step after a resume, rebuilding an artifact)
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".old-{final.name}-"))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and disk_full(e):
            raise DiskFullError(f"disk full while writing '{final}'; the partial copy was removed: free space, "
                                f"then rerun") from None
        raise


@contextlib.contextmanager
def atomic_checkpoint(checkpoint_dir: str | Path, step: int):
    """Yield a temporary directory to fill; on success it becomes `checkpoint_dir/step_N`.

    A `COMPLETE` marker is written last; `latest_checkpoint` only returns marked directories. A full
    disk becomes a one-line CraterdiffError naming the checkpoint that is kept.
    """
    try:
        with atomic_directory(Path(checkpoint_dir) / f"{CHECKPOINT_PREFIX}{step}") as tmp:
            yield tmp
            (tmp / "COMPLETE").write_text(json.dumps({"step": step}))
    except DiskFullError:
        last = latest_checkpoint(checkpoint_dir)
        then = (f"the last complete checkpoint '{last}' is kept: free space, then rerun with --resume" if last
                else "there is no earlier checkpoint: free space, then rerun")
        raise CraterdiffError(f"disk full while saving checkpoint {CHECKPOINT_PREFIX}{step} in '{checkpoint_dir}'; "
                              f"the partial copy was removed and {then}") from None


def prune_checkpoints(checkpoint_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` most recent complete checkpoints, and stale temporary dirs."""
    root = Path(checkpoint_dir)
    for p in list_checkpoints(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    remove_temporaries(root)


def save_array(path: str | Path, array: np.ndarray) -> None:
    """np.save through a Python file object: numpy's own writer reports a full disk as a bare short write (no errno)
    or not at all, Python's as OSError(ENOSPC)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def save_state(obj: dict, path: str | Path) -> None:
    """torch.save a dict of tensors / numbers / strings (loadable with weights_only=True).

    Written through a Python file object, so that a full disk raises OSError(ENOSPC) (torch's own
    file writer reports only 'file write failed').
    """
    with open(path, "wb") as f:
        torch.save(obj, f)


def load_state(path: str | Path) -> dict:
    """Load a state written by `save_state`; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CraterdiffError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, "
                              f"delete it or resume from an earlier one")
    return torch_load_safely(path, "checkpoint file", fix="delete that checkpoint directory to resume from "
                                                          "an earlier one")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore an optimizer's moments and step counts from `state`, keeping the hyperparameters (learning rate, weight
    decay...) it was built with from the config, so that a resume with --apply-changes takes the new ones."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, settings):
        group.update(kept)


def torch_load_safely(path: Path, what: str, *, fix: str) -> Any:
    """torch.load(weights_only=True): tensors and plain values only, so loading runs no code.

    A file holding other pickled objects is refused as such; a truncated or garbled one is reported as
    corrupt, with `fix` as what to do. Both are one-line CraterdiffErrors.
    """
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol other than its own: not the user's to act on
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the callable a hostile or foreign pickle asks for, or the opcode it
        # refused; its advice to load with weights_only=False is never passed on
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CraterdiffError(f"refused to load {what} '{path}': it holds a pickled object ({found[1]}) that "
                                  f"could run code; only tensors and plain values are loaded ({fix})") from None
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(e))
        if refused:
            raise CraterdiffError(f"cannot load {what} '{path}' ({refused[1][:120]}: not a file of tensors and plain "
                                  f"values); it is corrupt or truncated, or was made to run code: {fix}") from None
        raise _corrupt(path, what, fix, e) from None
    except Exception as e:  # a truncated or garbled file
        raise _corrupt(path, what, fix, e) from None


def _corrupt(path: Path, what: str, fix: str, e: Exception) -> CraterdiffError:
    reason = "not a file of tensors" if "weights_only" in str(e) else first_line(e, 160)
    return CraterdiffError(f"cannot load {what} '{path}' ({reason}); it is corrupt or truncated: {fix}")


# ----------------------------------------------------------------------------------------------
# Run directory and logging
# ----------------------------------------------------------------------------------------------

TAG_GROUPS = (("reward_", "reward/"), ("value_", "reward/value_"), ("time_", "time/"), ("peak_mem", "system/peak_mem"))
"""metrics.csv column prefix -> the tag group TensorBoard and W&B show it under; other columns go to the stage's own."""


def tracker_tag(key: str, group: str) -> str:
    """The grouped tag of a metrics.csv column: reward_mmd -> reward/mmd, value_mmd -> reward/value_mmd,
    time_update_s -> time/update_s, peak_mem_mb -> system/peak_mem_mb, kl -> <group>/kl."""
    for prefix, tag in TAG_GROUPS:
        if key.startswith(prefix):
            return tag + key[len(prefix):]
    return f"{group}/{key}"


def flat_hparams(tree: dict) -> dict[str, bool | int | float | str | None]:
    """A nested config as the flat {a.b: value} hyperparameters trackers take (sequences written out as text)."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat_keys(tree).items()}


class CSVTracker:
    """metrics.csv, with the columns' flat names: one row per logged step, the header the union of the keys seen so
    far (a new key rewrites the file with the wider header). On resume, rows after the checkpoint's step are dropped
    so that the file matches an uninterrupted run (accelerate has no CSV tracker)."""

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict] = []
        self.keys: list[str] = ["step"]
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.keys = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if int(float(r["step"])) <= resume_step]
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()

    def _rewrite(self) -> None:
        with replaced_file(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.keys, restval="")
            w.writeheader()
            w.writerows(self.rows)

    def log(self, values: dict, step: int) -> None:
        row = {"step": step, **{k: _fmt(v) for k, v in values.items()}}
        new = [k for k in row if k not in self.keys]
        self.rows.append(row)
        if new:
            self.keys += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.keys, restval="").writerow(row)


def _wandb_tracker(run_dir: Path, project: str, mode: str, resume: bool):
    """accelerate's W&B tracker for a run directory, its files under run_dir/wandb; a resumed run continues the W&B
    run of the same id (kept in run_dir/wandb/run_id)."""
    import importlib.util

    from accelerate.tracking import WandBTracker

    if importlib.util.find_spec("wandb") is None:
        raise CraterdiffError("log.trackers has wandb but the wandb package is not installed: pip install wandb, or "
                          "drop wandb from log.trackers")
    id_file = run_dir / "wandb" / "run_id"
    if resume and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(6)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(id_file, run_id + "\n")
    return WandBTracker(project, mode=mode, dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow")


class RunLogger:
    """A run's scalars and sample grids to the chosen trackers, through accelerate's (TensorBoard, W&B) and the CSV one
    above; the resolved config goes to each as hyperparameters on a fresh start.

    metrics.csv keeps flat column names; TensorBoard and W&B show them grouped (`tracker_tag`). On resume TensorBoard
    hides the events after the checkpoint's step (and, on a fresh start, those of an earlier attempt killed before its
    first checkpoint); W&B cannot rewind a run, so steps a killed run logged after its last checkpoint stay there.
    """

    def __init__(self, run_dir: str | Path, settings=None, *, group: str = "policy", resume_step: int | None = None,
                 hparams: dict | None = None):
        """`settings`: a config.LogConfig (None: metrics.csv and TensorBoard); `group`: the tag group of the stage's
        own columns; `hparams`: the resolved config as a nested dict."""
        from accelerate.tracking import TensorBoardTracker

        run_dir, self.group = Path(run_dir), group
        trackers = ("csv", "tensorboard") if settings is None else settings.trackers  # names checked by config
        self.csv = CSVTracker(run_dir, resume_step=resume_step) if "csv" in trackers else None
        self.trackers = []
        if "tensorboard" in trackers:
            # TensorBoard hides events at steps >= purge_step; the checkpoint's own step was logged before it was
            # saved and is not logged again, so it must stay.
            self.trackers.append(TensorBoardTracker("tb", run_dir, purge_step=0 if resume_step is None
                                                    else resume_step + 1))
        if "wandb" in trackers:
            self.trackers.append(_wandb_tracker(run_dir, settings.wandb_project, settings.wandb_mode,
                                                resume_step is not None))
        for t in self.trackers:
            t.start()
            if hparams is not None and resume_step is None:
                t.store_init_configuration(flat_hparams(hparams))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.csv is not None:
            self.csv.log(scalars, step)
        grouped = {tracker_tag(k, self.group): float(v) for k, v in scalars.items()}
        for t in self.trackers:
            t.log(grouped, step=step)  # TensorBoard flushes: on disk before the next checkpoint, as the CSV is

    def add_image(self, tag: str, grid: Image.Image, step: int) -> None:
        for t in self.trackers:
            if t.name == "tensorboard":
                t.log_images({tag: np.asarray(grid.convert("RGB"))[None]}, step=step, dataformats="NHWC")
                t.writer.flush()
            else:
                t.log_images({tag: [grid]}, step=step)

    def close(self) -> None:
        for t in self.trackers:
            t.finish()


def _fmt(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
