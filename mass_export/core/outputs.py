"""Where mass-export writes: locks on outputs and builds, and refusing an output that would overwrite an input.

A lock is ``fcntl.flock`` on a file named by the sha256 of the target's resolved path, in
``$MASS_EXPORT_CACHE/locks`` (default ``~/.cache/mass-export/locks``): never inside a build (a build holds only
the files its manifest lists) and never beside the user's files. Writers (`build`, `run --output`) take it
exclusively, readers (`validate`, `run` loading a build) shared. The kernel drops a lock when its holder exits,
however it ends, so a killed process never leaves a stale lock. Where the lock folder cannot be created the
command runs unlocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from mass_export.core.errors import Busy, OutputRefused

try:
    import fcntl
except ImportError:  # Windows: no flock; runs unlocked (docs/reliability.md)
    fcntl = None


def lock_folder() -> Path:
    return Path(os.environ.get("MASS_EXPORT_CACHE") or Path.home() / ".cache" / "mass-export") / "locks"


def lock_path(target: Path) -> Path:
    resolved = str(Path(target).resolve())
    return lock_folder() / f"{hashlib.sha256(os.fsencode(resolved)).hexdigest()[:32]}.lock"


@contextlib.contextmanager
def locked(target: Path, shared: bool = False, what: str = "in use"):
    """Hold the lock of ``target`` (shared: readers; exclusive: writers) or raise Busy naming the holder."""
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        fd = None
    if fd is None or fcntl is None:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").split("\n")[0].strip()
            # readers do not write their pid: the file may name a writer that has ended
            who = f" (pid {holder})" if holder.isdigit() and pid_alive(int(holder)) else ""
            raise Busy(f"{target}: {what} by another mass-export process{who}; try again when it ends") from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{Path(target).resolve()}\n".encode(), 0)
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
