"""What a batch job classifies: PATH arguments expanded into image files, split into shards, minus what is done.

- ``-`` reads paths from standard input, ``@list.txt`` from a file (one path a line; blank lines and lines
  starting with ``#`` are skipped), arguments with glob characters are expanded (``**`` recurses), folders are
  searched as :func:`mass_export.runtime.images.expand_paths` does, and anything else is a file path.
- ``shard(items, index, count)`` keeps the items whose path hashes to ``index`` of ``count``: the same path lands in
  the same shard whatever else the listing holds and in whatever order, so ``count`` machines or cron jobs that each
  take one shard cover a folder exactly once. sha1 of the path as listed, not Python's ``hash`` (salted per process).
- ``done_paths(output)`` reads the paths already written to an output (JSONL, CSV or Parquet), so ``--resume``
  skips them; a torn last line (a run killed mid-write) is not counted and is cut off before appending.
- ``batched(items, size)``: the batches every runner (local, Ray, the Python API) reads its items in.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from mass_export.core.errors import ConfigError
from mass_export.runtime.images import PathProblem, expand_paths

GLOB_CHARACTERS = "*?["


def read_path_list(handle: TextIO) -> list[str]:
    """Paths one a line; blank lines and ``#`` comments skipped; surrounding whitespace kept out."""
    return [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]


def expand_arguments(arguments: Iterable[str], stdin: TextIO | None = None) -> list[Path | PathProblem]:
    """Image files named by the arguments, in argument order (see the module docstring for the forms)."""
    out: list[Path | PathProblem] = []
    for argument in map(os.fspath, arguments):
        if argument == "-":
            if stdin is None:
                raise ConfigError("'-' reads paths from standard input, but none is available")
            out += expand_paths(read_path_list(stdin))
        elif argument.startswith("@") and len(argument) > 1:
            listing = Path(argument[1:])
            try:
                with open(listing, encoding="utf-8", errors="surrogateescape") as handle:
                    out += expand_paths(read_path_list(handle))
            except OSError as error:
                out.append(PathProblem(listing, f"cannot read the path list ({error.strerror or error})"))
        elif any(c in argument for c in GLOB_CHARACTERS) and not Path(argument).exists():
            matches = sorted(glob.glob(argument, recursive=True))
            out += expand_paths(matches) if matches else [PathProblem(Path(argument), "no file matches this pattern")]
        else:
            out += expand_paths([argument])
    return out


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` (1-based, as users count machines) -> (i, n)."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: write it as i/n, e.g. 1/4") from None
    if count < 1 or not 1 <= index <= count:
        raise ConfigError(f"--shard {spec!r}: need 1 <= i <= n")
    return index, count


def shard_of(path, count: int) -> int:
    """1-based shard of a path among ``count``."""
    digest = hashlib.sha1(os.fsencode(os.fspath(path))).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def shard(items: list, index: int, count: int) -> list:
    return items if count == 1 else [item for item in items if shard_of(item, count) == index]


def _repair_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (written by a run that was killed mid-row)."""
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(max(0, size - 1))
        if handle.read(1) == b"\n":
            return
        # Walk back to the previous newline; rows are short, so read the tail in one piece.
        tail_start = max(0, size - (1 << 20))
        handle.seek(tail_start)
        tail = handle.read()
        cut = tail.rfind(b"\n")
        handle.truncate(tail_start + cut + 1 if cut >= 0 else tail_start)


def done_paths(output: Path, fmt: str) -> set[str]:
    """Paths that already have a row in ``output`` (missing file: none). Torn tails are cut off first."""
    output = Path(output)
    if not output.exists():
        return set()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return {p for p in pq.read_table(output, columns=["path"]).column("path").to_pylist() if p is not None}
    _repair_torn_tail(output)
    with open(output, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        if fmt == "csv":
            return {row["path"] for row in csv.DictReader(handle) if row.get("path")}
        paths = set()
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{output}: line {number} is not a JSON row; cannot resume into it") from None
            if row.get("path"):
                paths.add(row["path"])
        return paths


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items (the last one shorter), read as they are asked for: the one batch loop
    of the runtime's ``classify_batches``, of `run` and of `run --ray`. No batch is kept once handed out."""
    items = iter(items)
    return iter(lambda: list(itertools.islice(items, size)), [])


def pending(items: list, done: set[str]) -> list:
    """Items whose path has no row yet, in order."""
    return [item for item in items if os.fsdecode(os.fspath(item)) not in done]
