"""The build directory's manifest: atomic writing, hashing and integrity checks. No torch, no numpy."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from mass_export.core.errors import BuildExists, BuildIntegrityError

FORMAT = "mass-export/1"
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_records(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under root except the manifest, by posix relative path."""
    records = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        records[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return records


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, **manifest, "files": file_records(root)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST)


def update_manifest(root: Path, **sections) -> dict:
    """Merge sections into an existing manifest (hashes of data files untouched; the manifest is not hashed)."""
    manifest = read_manifest(root, verify=False)
    manifest.update(sections)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(root: Path, verify: bool = True) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BuildIntegrityError(f"{root}: not a build directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BuildIntegrityError(f"{path}: unreadable manifest ({error})") from None
    if manifest.get("format") != FORMAT:
        raise BuildIntegrityError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Refuse a build whose files differ from the hashes recorded at build time, naming every bad file."""
    problems = []
    for name, record in manifest["files"].items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {record['bytes']}")
        elif sha256_file(path) != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (modified after build)")
    if problems:
        raise BuildIntegrityError(f"{root}: refusing a changed build:\n  " + "\n  ".join(problems))


@contextlib.contextmanager
def staged_directory(output: Path, force: bool = False):
    """Yield a temp dir beside ``output``; on success it replaces ``output``, on any failure it is removed.

    Nothing half-written is ever visible at ``output``.
    """
    output = Path(output)
    if output.exists() and not force:
        raise BuildExists(f"{output} exists; pass --force to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        retired = output.with_name(f".{output.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(output, retired)
        os.replace(staging, output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, output)
