"""Writing output files so that a reader never sees half of one, and a failed write says so.

* :func:`atomic_write_bytes` writes a temporary file in the target's directory, fsyncs it, gives it
  the permissions an ordinary ``open(path, "w")`` would (``0o666`` minus the umask; ``mkstemp``
  alone creates ``0o600``) and renames it into place.
* :class:`StagedOutputs` holds a run's outputs as such temporary files until they are verified,
  then renames them all into place (:meth:`StagedOutputs.commit`) or deletes them
  (:meth:`StagedOutputs.discard`): nothing unverified ever sits at an output path.
* Every ``OSError`` while writing (disk full, quota, I/O error, permission lost mid-run) becomes an
  :class:`~dfq.common.errors.OutputError` (exit code 6) naming the file and the cause; the partial
  temporary file is removed first.
"""
from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

from dfq.common.errors import OutputError


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)   # elsewhere: set and restore (not thread-safe, but only read here)
    os.umask(mask)
    return mask


def _write_and_sync(fd: int, data: bytes) -> None:
    """Write ``data`` to the open file ``fd`` completely and flush it to the device."""
    with os.fdopen(fd, "wb", closefd=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_error(path: Path, exc: OSError) -> OutputError:
    """The one-paragraph error for a failed write of ``path``."""
    why = exc.strerror or str(exc)
    return OutputError(f"Could not write {path}: {why} (errno {exc.errno}). Free space on that file system, "
                       "check its permissions, or choose another --out. No partial file was left at the output "
                       "paths.")


def write_temporary(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` in a new hidden temporary file beside ``path`` (``.NAME.*.tmp``), synced, with the
    umask's permissions; returns its path. Raises :class:`OutputError` on any write failure."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        _write_and_sync(fd, data)
    except BaseException as exc:
        os.close(fd)
        _unlink(Path(tmp))
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    os.close(fd)
    return Path(tmp)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _rename(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        raise write_error(path, exc) from exc


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a crash leaves the old file or the new one, never a
    partial file; a failed write raises :class:`OutputError` and leaves the old file."""
    path = Path(path)
    _rename(write_temporary(path, data), path)


def remove_orphaned_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`write_temporary` leaves beside ``path`` when a run is
    killed (SIGKILL, power loss) between creating and renaming them; returns what was removed."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    removed = []
    for tmp in parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        _unlink(tmp)
        removed.append(tmp)
    return removed


class StagedOutputs:
    """A run's output files, written as temporaries and renamed into place together once verified.

    ``stage(path, data)`` writes and returns the temporary path (read it back to verify the
    artifact exactly as it will be deployed); ``commit(last=...)`` renames every staged file into
    place, ``last`` after all others (the artifact: once it appears, its companions are in place);
    ``discard()`` deletes them. Use as a context manager: leaving the block by
    an exception discards whatever was not committed."""

    def __init__(self) -> None:
        self.staged: dict[Path, Path] = {}    # final path -> temporary path

    def stage(self, path: str | os.PathLike, data: bytes) -> Path:
        path = Path(path)
        if path in self.staged:
            _unlink(self.staged.pop(path))
        self.staged[path] = write_temporary(path, data)
        return self.staged[path]

    def commit(self, last: str | os.PathLike | None = None) -> list[Path]:
        order = sorted(self.staged, key=lambda p: last is not None and p == Path(last))
        for path in order:
            _rename(self.staged.pop(path), path)
        return order

    def discard(self) -> None:
        for tmp in self.staged.values():
            _unlink(tmp)
        self.staged.clear()

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
