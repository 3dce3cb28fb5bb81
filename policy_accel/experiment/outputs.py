"""Output directories claimed for a whole run, and files written so that no reader ever sees half of one.

Why a lock and not a check: two runs started at once into one directory both pass a check made before their first
episode, and the one that finishes last replaces the other's results.json. A run holds an exclusive lock on its
directory (``filelock``, ``flock`` underneath: the kernel drops it when the process dies, so a killed run leaves no
stale claim) from before it reads what the directory holds until its last write; a second run is refused at once
with the holder's pid. Every writer goes through a unique temporary file in the same directory, synced, then renamed
over the target: a killed process leaves the old file or the new one, and two writers never share a temporary file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from policy_accel.errors import ConfigError, OutDirInUseError

LOCK_FILE = ".out_dir.lock"  # stays in place on release (waiters must lock the same inode); always empty
OWNER_FILE = ".out_dir.owner.json"  # {"pid", "identity"} of the holder, for the refusal message
OWNER_WAIT_S = 2.0  # how long a refused run waits for a holder that has just locked to name itself


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's is 0600


def prepare_out_dir(out_dir: str | Path, key: str = "out_dir") -> Path:
    """Create ``out_dir`` and check that it can be written now, before any work runs."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{key}={str(out_dir)!r} cannot be written: {err.strerror or err}") from None
    return path


@contextlib.contextmanager
def claim_out_dir(out_dir: str | Path, identity: str) -> Iterator[Path]:
    """Create ``out_dir`` and hold it until the block ends, normally, on an error or on Ctrl-C.

    ``identity`` (the run's ``run_id``) only words the refusal: a holder with the same identity is this
    configuration started twice (wait for it, then the same command reuses or resumes its results), another one
    would mix its results with this run's. Raises :class:`~policy_accel.errors.OutDirInUseError` at once.
    """
    path = prepare_out_dir(out_dir)
    lock = FileLock(path / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise _in_use(out_dir, path, identity) from None
    try:
        write_json_atomic(path / OWNER_FILE, {"pid": os.getpid(), "identity": identity})
        yield path
    finally:
        (path / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def _in_use(out_dir: str | Path, path: Path, identity: str) -> OutDirInUseError:
    owner = _holder(path)
    pid = owner.get("pid", "unknown")
    if owner.get("identity") == identity:
        return OutDirInUseError(
            f"out_dir={str(out_dir)!r} is in use by another run of the same configuration (pid {pid}): wait for it "
            "to end, then the same command reuses or resumes its results"
        )
    return OutDirInUseError(
        f"out_dir={str(out_dir)!r} is in use by another run (pid {pid}), whose results this run would mix with its "
        "own: wait for it to end, or pass another out_dir=..."
    )


def _holder(path: Path) -> dict:
    """The holder's owner record; a holder that has just locked gets ``OWNER_WAIT_S`` to write it."""
    deadline = time.monotonic() + OWNER_WAIT_S
    while True:
        with contextlib.suppress(OSError, ValueError):
            owner = json.loads((path / OWNER_FILE).read_text())
            if isinstance(owner, dict) and _alive(owner.get("pid")):
                return owner
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


def _alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique, synced temporary file renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every file system lets a directory be synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a killed process leaves the old file or the new one, never half of one."""
    write_text_atomic(path, json.dumps(data, indent=2))


def save_figure_atomic(fig: Any, path: Path, **savefig: Any) -> None:
    """A matplotlib figure written like any other output (rendered in memory, then one atomic write)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    write_bytes_atomic(path, buffer.getvalue())


__all__ = [
    "LOCK_FILE",
    "OWNER_FILE",
    "claim_out_dir",
    "prepare_out_dir",
    "save_figure_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
