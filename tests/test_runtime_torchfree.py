"""The runtime needs no torch: nothing it imports pulls torch in, and `mass-export run` works in a fresh venv
holding only the runtime dependencies, giving the same predictions as the runtime in the full environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _tinybuild import make_tiny_build, sample_images

REPO = Path(__file__).resolve().parents[1]
RUNTIME_DEPS = ["numpy", "onnxruntime", "protobuf", "pillow", "safetensors", "click", "tqdm",
                "threadpoolctl"]  # pyproject's dependencies
HEAVY = ("torch", "torchvision", "open_clip", "onnx", "onnxscript")


def test_runtime_modules_import_no_torch():
    code = ("import sys, mass_export.runtime, mass_export.core.lowrank, mass_export.core.taskweights, mass_export.core.manifest, "
            "mass_export.core.errors, mass_export_cli.main, mass_export_cli.run_cmd\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def build_and_images(request, tmp_path_factory):
    """The lead's ``zoo_build`` fixture where conftest provides it, else the small build of _tinybuild."""
    try:
        value = request.getfixturevalue("zoo_build")
    except pytest.FixtureLookupError:
        value = None
    base = tmp_path_factory.getbasetemp()
    if value is None:
        return make_tiny_build(base / "runtime_tiny_build"), sample_images(base / "runtime_images")
    build, images = (value["build"], value["images"]) if isinstance(value, dict) else (
        value if isinstance(value, (tuple, list)) else (value, None))
    if images is None:
        images = sample_images(base / "runtime_images")
    return Path(build), [Path(images)] if isinstance(images, (str, os.PathLike)) else [Path(p) for p in images]


def _pip(python: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    """A fresh venv with only the runtime dependencies and a non-editable install of this repository."""
    root = tmp_path_factory.mktemp("torchfree")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    result = _pip(python, "-c", str(REPO / "constraints.txt"), *RUNTIME_DEPS)
    assert result.returncode == 0, f"cannot install the runtime dependencies: {result.stderr[-400:]}"
    # Install from a copy so building the wheel writes nothing into the working tree.
    source = root / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*")
    for name in ("pyproject.toml", "README.md", "mass_export", "cli", "models"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        elif (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    if not (source / "README.md").exists():
        (source / "README.md").write_text("mass-export\n")
    result = _pip(python, "--no-deps", str(source))

    assert result.returncode == 0, result.stderr
    return venv


def test_run_in_a_venv_without_torch(runtime_venv, build_and_images, tmp_path):
    build, images = build_and_images
    python, command = runtime_venv / "bin" / "python", runtime_venv / "bin" / "mass-export"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([str(python), "-c", "import mass_export, sys; print(mass_export.__file__)\nimport torch"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert "No module named 'torch'" in probe.stderr, probe.stderr
    assert str(runtime_venv) in probe.stdout  # the installed copy, not the working tree

    out = tmp_path / "predictions.jsonl"
    result = subprocess.run([str(command), "run", *map(str, images), "--build", str(build), "-o", str(out),
                             "--json", "--batch-size", "4"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode in (0, 1), result.stderr
    summary = json.loads(result.stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["images"] == len(rows) and summary["classified"] > 0

    from mass_export.runtime import MassRuntime, expand_paths

    expected = MassRuntime.load(build).classify(expand_paths(images), batch_size=4)
    assert [r["path"] for r in rows] == [p.path for p in expected]
    assert [(r["task"], r["class"], tuple(r["task_set"]), r["error"]) for r in rows] == \
           [(p.task, p.class_name, p.task_set, p.error) for p in expected]
    worst = max((abs(r["score"] - p.score) for r, p in zip(rows, expected) if p.ok), default=0.0)
    print(f"torch-free venv vs main env: {len(rows)} images, identical task sets and classes, "
          f"max |score diff| {worst:.1e}")
    assert worst < 1e-5


def test_build_in_a_venv_without_torch_names_the_extra(runtime_venv, tmp_path):
    command = runtime_venv / "bin" / "mass-export"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(command), "build", "--model", "ViT-B-16", "-o", str(tmp_path / "b")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "`mass-export build` needs the [build] extra: pip install 'mass-export[build]'" in result.stderr
