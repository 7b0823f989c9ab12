"""Shared plumbing: errors, seeding, devices, atomic files and checkpoints, logging, images, script entry.

Everything a script needs besides the algorithm and its config (`config.py`) lives here, so that the scripts stay thin
and the library modules (`ddpm/`, `rl/`, `reward/`) take explicit arguments instead of reading
globals or environment variables.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import sys
import tempfile
import typing
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


class CraterdiffError(Exception):
    """A user-facing error: bad config, bad data, missing file.

    Scripts catch it and print its message as one line (no traceback) and exit with status 2.
    The message names what is wrong and what to do about it.
    """


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type's name if it has none), at most
    `limit` characters: how a library's multi-line error is quoted inside a one-line CraterdiffError."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


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


PROJECT_ROOT = Path(__file__).resolve().parent



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

def _umask_mode(mode: int) -> int:
    """`mode` less the process umask: the rights an ordinary new file or directory would get."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create directory `path` if needed and prove it takes a file, before any work is done; a CraterdiffError
    naming `what` (e.g. "--out") otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as e:
        raise CraterdiffError(f"{what} '{path}' is not a writable directory ({e.strerror or type(e).__name__}); "
                              f"pick another with {what}") from None
    return path


def png_bytes_at_most(channels: int, height: int, width: int) -> int:
    """An upper bound on one 8-bit PNG's size: the raw pixels, one filter byte a row, and the chunks' overhead
    (zlib never grows data by more than a few bytes per 16 KB block)."""
    raw = height * (width * channels + 1)
    return raw + raw // 1000 + 256


def check_free_space(directory: Path, needed: int, what: str, fix: str) -> None:
    """A one-line CraterdiffError, before any work, when `what` (`needed` bytes) cannot fit in `directory`."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise CraterdiffError(f"{what} take up to {_bytes(needed)} but '{directory}' has {_bytes(free)} free; {fix}")


def _bytes(n: float) -> str:
    """1.16e12 -> '1.16 TB' (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


@contextlib.contextmanager
def replaced_file(path: str | Path) -> typing.Iterator[Path]:
    """Yield the path of a new hidden file beside `path` (same suffix) to write; on success one rename puts it at
    `path`. Readers see the old file or the complete new one, and whatever was at `path`, a planted symlink
    included, is replaced rather than written through."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        os.chmod(tmp, _umask_mode(0o666))  # mkstemp makes it private (0600); give it normal file rights
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename == tmp:
            e.filename = str(path)  # the error names the file meant, not the removed temporary
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through `replaced_file`, synced to disk before the rename."""
    with replaced_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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


CHECKPOINT_PREFIX = "step_"


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


def disk_full(e: BaseException) -> bool:
    """Whether `e` reports a full disk or quota: an OSError ENOSPC/EDQUOT, or safetensors' wrapped one."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(s in str(e) for s in ("No space left on device", "Disk quota exceeded"))


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints `step_N` under `checkpoint_dir`, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "COMPLETE").is_file():
            with contextlib.suppress(ValueError):
                found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(checkpoint_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(checkpoint_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` most recent complete checkpoints, and stale temporary dirs."""
    root = Path(checkpoint_dir)
    for p in list_checkpoints(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    remove_temporaries(root)


def remove_temporaries(directory: str | Path) -> None:
    """Delete the hidden `.tmp-*` / `.old-*` directories that `atomic_directory` leaves when killed."""
    for pattern in (".tmp-*", ".old-*"):
        for p in Path(directory).glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


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

class RunLogger:
    """Scalars to `metrics.csv` (one row per logged step) and to TensorBoard under `tb/`.

    The CSV header is the union of keys seen so far; a new key rewrites the file with the wider
    header. On resume, rows after the checkpoint's step are dropped so that the file matches an
    uninterrupted run; TensorBoard hides them the same way (and, on a fresh start, the events of an
    earlier attempt that was killed before its first checkpoint).
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None):
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
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # TensorBoard hides events at steps >= purge_step; the checkpoint's own step was logged
            # before it was saved and is not logged again, so it must stay.
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"),
                                        purge_step=0 if resume_step is None else resume_step + 1)

    def _rewrite(self) -> None:
        with replaced_file(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.keys, restval="")
            w.writeheader()
            w.writerows(self.rows)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        row = {"step": step, **{k: _fmt(v) for k, v in scalars.items()}}
        new = [k for k in row if k not in self.keys]
        self.rows.append(row)
        if new:
            self.keys += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.keys, restval="").writerow(row)
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step)
            self.writer.flush()  # on disk before the next checkpoint: a killed run keeps what that resumes

    def add_image(self, tag: str, grid: Image.Image, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(grid.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ----------------------------------------------------------------------------------------------
# Script entry points
# ----------------------------------------------------------------------------------------------

def script_parser(description: str, *, cfg_required: bool = True, resume: bool = False,
                  out_help: str = "run directory (default runs/<config name>)") -> argparse.ArgumentParser:
    """The arguments every script shares: --cfg, --set, --out (`out_help` says what it is for this script); --resume
    and --apply-changes for those that checkpoint (`resume`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--cfg", required=cfg_required, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pretrain.lr=3e-4 (repeatable)")
    p.add_argument("--out", default=None, help=out_help)
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
        p.add_argument("--apply-changes", action="store_true",
                       help="with --resume: apply settings that differ from the run's config.yaml (recorded in "
                            "resume_changes.yaml) instead of refusing them")
    return p


def run_main(main: typing.Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's main; a CraterdiffError becomes one 'error: ...' line and exit status 2."""
    try:
        main(argv)
    except CraterdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if not disk_full(e):
            raise
        where = f" while writing '{e.filename}'" if getattr(e, "filename", None) else ""
        print(f"error: disk full{where}; free space, then rerun with --resume (complete checkpoints are kept)",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        sys.exit(130)
