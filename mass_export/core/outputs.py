"""Where mass-export writes: locks beside an output, and refusing an output that would overwrite an input.

A lock is ``fcntl.flock`` on ``.NAME.lock`` beside the output (never inside a build: a build holds only the
files its manifest lists). The file stays after use (deleting lock files races); the kernel drops the lock when
its holder exits, however it ends, so a killed process never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mass_export.core.errors import Busy, OutputRefused

try:
    import fcntl
except ImportError:  # Windows: no flock; runs unlocked (documented in docs/reliability.md)
    fcntl = None


def lock_path(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def locked(target: Path, shared: bool = False, what: str = "in use"):
    """Hold the lock of ``target`` (shared: readers such as `validate`; exclusive: writers) or raise Busy.

    Where the lock file cannot be created (a read-only folder) readers go on unlocked: nobody can write there.
    """
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        if not shared:
            raise OutputRefused(f"{target}: cannot write here ({error.strerror})") from None
        fd = None
    if fd is None:
        yield None
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise Busy(f"{target}: {what} by another mass-export process (pid {holder}); "
                           "try again when it ends") from None
            if not shared:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_overlap(output: Path, inputs, option: str = "--output") -> None:
    """Refuse an output that is an input, holds an input, or lies inside an input folder (symlinks resolved)."""
    out = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if is_within(source, out):
            raise OutputRefused(f"{option} {output}: it is (or holds) the input {given}; choose another output")
        if Path(given).is_dir() and is_within(out, source):
            raise OutputRefused(f"{option} {output}: it lies inside the input folder {given}; choose another output")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
