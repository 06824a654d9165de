"""The build directory's manifest: atomic writing, hashing and integrity checks. No torch, no numpy.

Integrity (docs/reliability.md): the manifest carries ``manifest_sha256``, the sha256 of its own canonical JSON
(sorted keys, compact separators, without that field), so an edit to any of its fields (task order, routing
layer, head offsets, a deleted file entry) is refused. Every file under the build is listed with its sha256 and
size; an unlisted file, a missing one, a path leaving the build (``..``, absolute, a symlink pointing out, an
ONNX external-data location) is refused. The digest detects edits and corruption; it is not a signature:
whoever can write the build can also recompute it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from mass_export.core.errors import BuildExists, BuildIntegrityError, OutputRefused
from mass_export.core.jsonout import strict_dumps
from mass_export.core.outputs import pid_alive

FORMAT = "mass-export/1"
MANIFEST = "manifest.json"
DIGEST = "manifest_sha256"
# The runtime opens these besides the graphs: they must be listed (and so hashed).
DATA_FILES = ("pretrained.safetensors", "factors.safetensors", "deltas.safetensors", "heads.safetensors",
              "classes.json")


def head_table(classes_per_task: dict[str, int]) -> dict[str, dict]:
    """The manifest's ``heads`` section: each task's rows in the stacked heads matrix, in task order
    (``{"offset": first row, "classes": rows}``)."""
    table, offset = {}, 0
    for task, classes in classes_per_task.items():
        table[task] = {"offset": offset, "classes": int(classes)}
        offset += int(classes)
    return table


def head_slices(manifest: dict) -> list[slice]:
    """Each task's rows of the stacked heads (and columns of the heads graph's logits), in manifest task order."""
    records = [manifest["heads"][task] for task in manifest["tasks"]]
    return [slice(record["offset"], record["offset"] + record["classes"]) for record in records]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without the digest field itself."""
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
                          .encode()).hexdigest()


def build_files(root: Path) -> list[str]:
    """Every file (and symlink) under root except the manifest, as sorted posix relative paths."""
    found = []
    for folder, dirs, names in os.walk(root):  # symlinked folders are listed as names below, not entered
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        dirs[:] = [d for d in dirs if d not in links]
        found += [Path(folder, n).relative_to(root).as_posix() for n in names + links]
    return sorted(f for f in found if f != MANIFEST)


def file_records(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under root except the manifest, by posix relative path."""
    return {name: {"sha256": sha256_file(root / name), "bytes": (root / name).stat().st_size}
            for name in build_files(root)}


def _write(root: Path, manifest: dict) -> dict:
    manifest = {**manifest, DIGEST: manifest_digest(manifest)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(strict_dumps(manifest, f"{root / MANIFEST}", indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)
    return manifest


def write_manifest(root: Path, manifest: dict) -> dict:
    return _write(root, {"format": FORMAT, **manifest, "files": file_records(root)})


def update_manifest(root: Path, **sections) -> dict:
    """Merge sections into the manifest of a build being written (its staging directory); data files untouched."""
    manifest = read_manifest(root, verify=False)
    manifest.update(sections)
    return _write(root, manifest)


def read_manifest(root: Path, verify: bool = True) -> dict:
    """The manifest, its own digest and paths checked; with ``verify`` every file of the build too."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BuildIntegrityError(f"{root}: not a build directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise BuildIntegrityError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BuildIntegrityError(f"{path}: format {found!r}, this version reads {FORMAT!r}")
    if manifest.get(DIGEST) != manifest_digest(manifest):
        raise BuildIntegrityError(f"{path}: {DIGEST} does not match the manifest's content (edited after the "
                                  "build, or written by an older version): rebuild")
    check_paths(root, manifest)
    if verify:
        verify_files(root, manifest)
    return manifest


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def check_relative(root: Path, name: str, what: str) -> Path:
    """root/name, refusing names that leave the build: absolute, '..', or resolving outside (symlinks)."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or name != pure.as_posix():
        raise BuildIntegrityError(f"{root / MANIFEST}: {what} {name!r} leaves the build directory")
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise BuildIntegrityError(f"{root}: {what} {name!r} resolves outside the build directory "
                                  f"({path.resolve()})")
    return path


def check_paths(root: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BuildIntegrityError(f"{root / MANIFEST}: no 'files' table")
    for name in files:
        check_relative(root, name, "file")
    for graph, record in (manifest.get("graphs") or {}).items():
        check_relative(root, record.get("file", ""), f"graph {graph!r} file")
        if record["file"] not in files:
            raise BuildIntegrityError(f"{root / MANIFEST}: graph {graph!r} file {record['file']} is not in 'files'")
    missing = [name for name in DATA_FILES if name not in files]
    if missing:
        raise BuildIntegrityError(f"{root / MANIFEST}: 'files' does not list {', '.join(missing)}")


def verify_files(root: Path, manifest: dict) -> None:
    """Refuse a build whose files differ from the hashes recorded at build time, naming every bad file."""
    from mass_export.core.onnxfiles import SUPPLIED_AT_LOAD, external_data_locations

    problems = []
    listed = manifest["files"]
    for name, record in listed.items():
        path = root / name
        if path.is_symlink():
            problems.append(f"{name}: a symlink (a build holds only regular files)")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {record['bytes']}")
        elif sha256_file(path) != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (modified after build)")
        elif name.endswith(".onnx"):
            for location in set(external_data_locations(path)) - {SUPPLIED_AT_LOAD}:
                target = PurePosixPath(name).parent / location
                inside = (location and not PurePosixPath(location).is_absolute() and ".." not in target.parts
                          and (root / target).resolve().is_relative_to(root.resolve()))
                if not inside or target.as_posix() not in listed:
                    problems.append(f"{name}: external data {location!r} is not a listed file of the build")
    problems += [f"{name}: not listed in the manifest (added after build)"
                 for name in build_files(root) if name not in listed]
    if problems:
        raise BuildIntegrityError(f"{root}: refusing a changed build:\n  " + "\n  ".join(problems))


def replaceable(output: Path) -> None:
    """Refuse to replace ``output`` unless it is a mass-export build holding only the files its manifest lists
    (so --force never deletes anything the user put there)."""
    if output.is_symlink() or not output.is_dir():
        raise OutputRefused(f"{output}: exists and is not a build directory; --force replaces only a mass-export "
                            "build: remove it yourself or choose another --output")
    try:
        manifest = json.loads((output / MANIFEST).read_text())
        assert isinstance(manifest, dict) and manifest.get("format") == FORMAT and isinstance(manifest["files"], dict)
    except (OSError, ValueError, KeyError, AssertionError):
        raise OutputRefused(f"{output}: exists and is not a mass-export build (no readable {MANIFEST} of format "
                            f"{FORMAT}); --force will not replace it: remove it yourself or choose another "
                            "--output") from None
    foreign = [name for name in build_files(output) if name not in manifest["files"]]
    if foreign:
        raise OutputRefused(f"{output}: holds files the build did not write ({', '.join(foreign[:5])}); "
                            "--force will not delete them: move them out or choose another --output")


def check_output(output: Path, force: bool) -> None:
    if output.exists() or output.is_symlink():
        if not force:
            raise BuildExists(f"{output} exists; pass --force to overwrite it")
        replaceable(output)


def _staging_pattern(output: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(output.name)}\.(\d+)\.[A-Za-z0-9_]{{8}}\.partial$")


def clean_stale(output: Path) -> list[Path]:
    """Remove staging dirs of killed builds of ``output`` (ours by name, their pid no longer running) and restore
    or drop a build retired by an interrupted swap. Call with the output's lock held."""
    removed = []
    pattern = _staging_pattern(output)
    for entry in output.parent.iterdir() if output.parent.is_dir() else ():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    retired = output.with_name(f".{output.name}.old")
    if retired.is_dir() and (retired / MANIFEST).is_file():
        if not output.exists():
            os.replace(retired, output)  # killed between the two renames of a swap: the old build comes back
        else:
            shutil.rmtree(retired, ignore_errors=True)
            removed.append(retired)
    return removed


@contextlib.contextmanager
def staged_directory(output: Path, force: bool = False):
    """Yield a temp dir beside ``output``; on success it replaces ``output``, on any failure it is removed.

    Nothing half-written is ever visible at ``output``; only a mass-export build is ever replaced. The caller
    holds the output's lock (core.outputs.locked) so stale staging dirs can be cleaned safely.
    """
    output = Path(output)
    clean_stale(output)
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.{os.getpid()}.", suffix=".partial",
                                        dir=output.parent))
    except OSError as error:
        raise OutputRefused(f"{output.parent}: cannot create the build here ({error.strerror})") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        replaceable(output)  # again: checked before minutes of work, things may have changed since
        retired = output.with_name(f".{output.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(output, retired)
        os.replace(staging, output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, output)
