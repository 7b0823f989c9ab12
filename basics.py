"""What the scripts and the config need before torch is imported: the error type, the project root, atomic file
writes, the checkpoint listing, and the scripts' shared arguments and error handling. Standard library only, so that
a bad config or argument is reported before any heavy import; the library imports these from here too.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any


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


PROJECT_ROOT = Path(__file__).resolve().parent


def flat_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'rl': {'lr': 1}} -> {'rl.lr': 1}: a nested config as dotted keys."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------
# Files: atomic writes
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


# ----------------------------------------------------------------------------------------------
# Checkpoints on disk
# ----------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "step_"


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


def remove_temporaries(directory: str | Path) -> None:
    """Delete the hidden `.tmp-*` / `.old-*` directories that `atomic_directory` leaves when killed, and the
    `.tmp-*` files `replaced_file` leaves."""
    for pattern in (".tmp-*", ".old-*"):
        for p in Path(directory).glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


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
