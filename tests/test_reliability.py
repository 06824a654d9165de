"""Nothing lost, nothing wrong passes (issue 11; docs/reliability.md lists every case).

Each case runs the real command in a real process (subprocess, with a timeout) on real files: a small real build
(tests/_tinybuild.py), real images, real pickles. Each asserts the exit code, that the message names the file and
the problem, and that the user's data is intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _tinybuild import CLASSES, make_tiny_build, sample_images
from mass_export.core.manifest import MANIFEST, manifest_digest
from mass_export.core.outputs import locked

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_build(tmp_path_factory.getbasetemp() / "reliability_tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return sample_images(tmp_path_factory.getbasetemp() / "reliability_images")


@pytest.fixture
def env(tmp_path):
    """The command's environment: its own lock folder, one thread."""
    return {**os.environ, "MASS_EXPORT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def cli(*args, env=None, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mass_export_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=cwd or REPO, **kwargs)


def one_line_error(result) -> str:
    """The error output: one 'error:' line, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines, result.stderr
    return lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_build(tiny: Path, tmp_path: Path) -> Path:
    out = tmp_path / "build"
    shutil.copytree(tiny, out)
    return out


def edit_manifest(build: Path, change, resign: bool = False) -> None:
    manifest = json.loads((build / MANIFEST).read_text())
    change(manifest)
    if resign:  # as someone who knows the format would: the later checks must hold on their own
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (build / MANIFEST).write_text(json.dumps(manifest, indent=2))


def build_args(tiny: Path, out: Path, *extra) -> list:
    tree = tiny.with_name(tiny.name + "-checkpoints")
    return ["build", "--model", tree / "tiny.json", "--checkpoints", tree, "--tasks", ",".join(CLASSES),
            "--routing-layer", 2, "--threads", 1, "-o", out, *extra]


# --- 1. build -o --force replaces only a mass-export build; never an input -----------------------------------

def test_force_refuses_a_folder_that_is_not_a_build(tiny, tmp_path, env):
    thesis = tmp_path / "thesis"
    (thesis / "data").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("\\chapter{One}")
    (thesis / "data" / "results.csv").write_text("a,b\n1,2\n")
    before = tree_digest(thesis)
    result = cli(*build_args(tiny, thesis, "--force"), env=env)
    assert result.returncode == 2
    line = one_line_error(result)
    assert str(thesis) in line and "not a mass-export build" in line
    assert tree_digest(thesis) == before


def test_force_refuses_a_build_holding_user_files(tiny, tmp_path, env):
    build = copy_build(tiny, tmp_path)
    (build / "notes.txt").write_text("mine")
    before = tree_digest(build)
    result = cli(*build_args(tiny, build, "--force"), env=env)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "notes.txt" in line and "did not write" in line
    assert tree_digest(build) == before


@pytest.mark.parametrize("where", ["checkpoints", "inside checkpoints", "holds checkpoints"])
def test_output_over_an_input_is_refused_before_any_work(tiny, tmp_path, env, where):
    tree = tiny.with_name(tiny.name + "-checkpoints")
    before = tree_digest(tree)
    out = {"checkpoints": tree, "inside checkpoints": tree / "build", "holds checkpoints": tree.parent}[where]
    result = cli(*build_args(tiny, out, "--force"), env=env)
    assert result.returncode == 2
    line = one_line_error(result)
    assert str(out) in line and ("input" in line)
    assert tree_digest(tree) == before
    assert not (tree / "build").exists()


def test_duplicate_tasks_refused_up_front(tiny, tmp_path, env):
    out = tmp_path / "dup"
    result = cli(*build_args(tiny, out)[:-2], "--tasks", "Alpha,Beta,alpha", "-o", out, env=env)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "Alpha/alpha" in line and "more than once" in line and ".partial" not in line
    assert not out.exists() and not list(tmp_path.glob(".dup.*"))


def test_a_build_in_progress_refuses_a_second_build_and_a_validate(tiny, tmp_path, env, monkeypatch):
    out = copy_build(tiny, tmp_path)
    before = tree_digest(out)
    monkeypatch.setenv("MASS_EXPORT_CACHE", env["MASS_EXPORT_CACHE"])  # this process's lock folder = the command's
    with locked(out):  # as a running build holds it
        second = cli(*build_args(tiny, out, "--force"), env=env)
        check = cli("validate", out, env=env)
    for result in (second, check):
        assert result.returncode == 75, result.stderr
        assert str(out) in one_line_error(result) and "another mass-export process" in result.stderr
    assert tree_digest(out) == before


def test_force_rebuild_replaces_a_build_and_cleans_stale_staging(tiny, tmp_path, env):
    build = copy_build(tiny, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60).stdout.strip()
    stale = tmp_path / f".build.{dead}.abcd_123.partial"
    (stale / "graphs").mkdir(parents=True)
    (stale / "factors.safetensors").write_bytes(b"half-written")
    alive = tmp_path / f".build.{os.getpid()}.live_123.partial"  # a live process's: not ours to remove
    alive.mkdir()
    lookalike = tmp_path / ".build.notapid.partial"  # not our name pattern
    lookalike.mkdir()
    result = cli(*build_args(tiny, build, "--force"), env=env)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and alive.exists() and lookalike.exists()
    manifest = json.loads((build / MANIFEST).read_text())
    assert manifest["tasks"] == list(CLASSES)
    check = cli("inspect", build, env=env)
    assert check.returncode == 0, check.stderr


# --- 3. NaN never passes; never written as JSON -------------------------------------------------------------

def test_validation_diff_is_nan_aware():
    from mass_export.export.validate import max_abs_diff, worse

    assert max(0.0, float("nan")) == 0.0  # why a plain max() cannot be used
    assert np.isnan(worse(0.0, max_abs_diff(np.array([1.0, np.nan]), np.array([1.0, 2.0]))))
    assert np.isnan(worse(max_abs_diff(np.array([np.inf]), np.array([np.inf])), 0.0))
    assert np.isnan(worse(float("nan"), 0.5)) and worse(0.25, 0.5) == 0.5
    assert max_abs_diff(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == 0.5


def test_build_refuses_non_finite_weights():
    import torch

    from mass_export.core.errors import ConfigError
    from mass_export.pipeline.build import require_finite

    with pytest.raises(ConfigError, match=r"factors.safetensors: NaN/Inf in b\.V"):
        require_finite({"a.U": torch.ones(2), "b.V": torch.tensor([1.0, float("inf")])}, "factors.safetensors")


def test_runtime_refuses_a_nan_weight_even_with_matching_hashes(tiny, tmp_path, env, images):
    from safetensors.numpy import load_file, save_file

    from mass_export.core.manifest import file_records

    build = copy_build(tiny, tmp_path)
    heads = load_file(str(build / "heads.safetensors"))
    heads["heads"][0, 0] = np.nan
    save_file(heads, str(build / "heads.safetensors"))
    edit_manifest(build, lambda m: m.update(files=file_records(build)), resign=True)
    result = cli("run", images[0], "--build", build, env=env)
    assert result.returncode == 3
    line = one_line_error(result)
    assert "heads.safetensors" in line and "NaN/Inf" in line
    assert result.stdout == ""


def test_a_nan_score_becomes_an_error_row_not_json_nan():
    from mass_export.runtime import Prediction
    from mass_export_cli.run_cmd import ROW_FORMATS, output_row

    row = output_row(Prediction(task="Alpha", class_name="0", score=float("nan"), top_k=[("0", float("nan"))],
                                path="x.png"))
    assert row["score"] is None and "NaN/Inf" in row["error"] and row["class"] is None
    import csv

    assert json.loads(ROW_FORMATS["jsonl"]().line(row), parse_constant=lambda c: pytest.fail(c))["score"] is None
    fields = next(csv.DictReader([ROW_FORMATS["csv"]().header(), ROW_FORMATS["csv"]().line(row)]))
    assert fields["score"] == "" and fields["top_k"] == "[]"


def test_strict_json_names_the_key():
    from mass_export.core.errors import MassExportError
    from mass_export.core.jsonout import strict_dumps

    with pytest.raises(MassExportError, match=r"report: refusing to write NaN/Inf \(not JSON\) at method\.alpha"):
        strict_dumps({"method": {"alpha": float("nan"), "eta": 0.2}}, "report")


# --- 4. the manifest is verified; every file listed; no path leaves the build ------------------------------

MANIFEST_EDITS = {
    "task order": lambda m: m.update(tasks=m["tasks"][::-1]),
    "routing layer": lambda m: m["method"].update(routing_layer=m["method"]["routing_layer"] - 1),
    "head offset": lambda m: m["heads"]["Beta"].update(offset=m["heads"]["Beta"]["offset"] + 1),
    "deleted file entry": lambda m: m["files"].pop("deltas.safetensors"),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_an_edited_manifest_is_refused(tiny, tmp_path, env, images, edit):
    build = copy_build(tiny, tmp_path)
    edit_manifest(build, MANIFEST_EDITS[edit])
    result = cli("run", images[0], "--build", build, env=env)
    assert result.returncode == 3
    line = one_line_error(result)
    assert str(build / MANIFEST) in line and "does not match" in line


def test_a_deleted_entry_is_refused_even_when_the_manifest_is_resigned(tiny, tmp_path, env, images):
    build = copy_build(tiny, tmp_path)
    edit_manifest(build, MANIFEST_EDITS["deleted file entry"], resign=True)
    result = cli("run", images[0], "--build", build, env=env)
    assert result.returncode == 3
    assert "does not list deltas.safetensors" in one_line_error(result)


def test_an_unlisted_file_is_refused(tiny, tmp_path, env, images):
    build = copy_build(tiny, tmp_path)
    (build / "graphs" / "extra.onnx").write_bytes((build / "graphs" / "heads.onnx").read_bytes())
    result = cli("run", images[0], "--build", build, env=env)
    assert result.returncode == 3
    assert "graphs/extra.onnx: not listed in the manifest" in result.stderr


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/hostname", "graphs/../../outside.onnx"])
def test_a_graph_path_leaving_the_build_is_refused(tiny, tmp_path, env, images, path):
    build = copy_build(tiny, tmp_path)
    shutil.copy(build / "graphs" / "heads.onnx", tmp_path / "outside.onnx")

    def point_outside(manifest):
        manifest["graphs"]["heads"]["file"] = path
        manifest["files"][path] = manifest["files"]["graphs/heads.onnx"]

    edit_manifest(build, point_outside, resign=True)
    result = cli("run", images[0], "--build", build, env=env)
    assert result.returncode == 3
    line = one_line_error(result)
    assert repr(path) in line and "leaves the build" in line


def test_a_symlink_leaving_the_build_is_refused(tiny, tmp_path, env, images):
    build = copy_build(tiny, tmp_path)
    outside = tmp_path / "classes.json"
    shutil.move(build / "classes.json", outside)
    (build / "classes.json").symlink_to(outside)
    result = cli("run", images[0], "--build", build, env=env)
    assert result.returncode == 3
    assert "'classes.json' resolves outside the build directory" in one_line_error(result)


def test_onnx_external_data_outside_the_build_is_refused(tiny, tmp_path, env, images):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mass_export.core.manifest import file_records

    build = copy_build(tiny, tmp_path)
    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = onnx.load(str(build / "graphs" / "heads.onnx"))
    weight = numpy_helper.from_array(np.zeros(4, np.float32), "smuggled")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../secret.bin"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    model.graph.initializer.append(weight)
    model.graph.node.append(helper.make_node("Identity", ["smuggled"], ["smuggled_out"]))
    onnx.save(model, str(build / "graphs" / "heads.onnx"))
    edit_manifest(build, lambda m: m.update(files=file_records(build)), resign=True)
    result = cli("run", images[0], "--build", build, env=env)
    assert result.returncode == 3
    assert "graphs/heads.onnx: external data '../../secret.bin' is not a listed file of the build" in result.stderr


def test_inspect_memory_and_validate_do_not_rewrite_the_build(tiny, tmp_path, env):
    build = copy_build(tiny, tmp_path)
    before = tree_digest(build)
    result = cli("inspect", build, "--memory", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runtime_memory"]["peak_rss_mib"] > 0
    report = tmp_path / "validation.json"
    result = cli("validate", build, "--report", report, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["passed"] is True
    refused = cli("validate", build, "--report", build / "v.json", env=env)
    assert refused.returncode == 2 and "never modifies" in one_line_error(refused)
    assert tree_digest(build) == before


# --- 5. 16-bit images: one fixed mapping ------------------------------------------------------------------

def test_16_bit_images_use_a_fixed_mapping(tmp_path):
    from mass_export.runtime import load_image

    values = np.array([[0, 257, 1000, 65535]], dtype=np.uint16)
    dark = np.full((4, 4), 1000, dtype=np.uint16)  # near black: must stay near black, not become white
    Image.fromarray(values).save(tmp_path / "ramp.png")
    Image.fromarray(dark).save(tmp_path / "dark.png")
    ramp = np.asarray(load_image(tmp_path / "ramp.png").image)[..., 0]
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    assert ramp.tolist() == [[0, 1, 4, 255]]
    assert np.asarray(load_image(tmp_path / "dark.png").image).max() == 4
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32), "F")
    from mass_export.runtime.images import to_rgb

    assert np.asarray(to_rgb(floats)[0])[..., 0].tolist() == [[0, 128, 255, 255]]


# --- weak spots: decoded pixels bounded; restricted unpickler bounded -------------------------------------

def test_a_decompression_bomb_is_one_error_row_and_the_run_goes_on(tiny, tmp_path, env, images):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 8000)).save(bomb, optimize=True)  # 72 megapixels in a small file
    assert bomb.stat().st_size < 200_000
    out = tmp_path / "rows.jsonl"
    result = cli("run", bomb, images[0], "--build", tiny, "-o", out, env=env)
    assert result.returncode == 1, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "72.0 megapixels" in rows[0]["error"] and "--max-megapixels" in rows[0]["error"]
    assert rows[1]["error"] is None and rows[1]["class"] is not None


@pytest.mark.parametrize("name,payload", [
    ("bytearray", b"c__builtin__\nbytearray\n(J\xff\xff\xff\x7ftR."),
    ("set", b"c__builtin__\nset\n(c__builtin__\nrange\n(J\x00\x00\x00\x04tRtR."),
    ("torch.Size", b"ctorch\nSize\n(c__builtin__\nrange\n(J\x00\x00\x00\x04tRtR."),
])
def test_a_tiny_pickle_cannot_make_the_unpickler_allocate_gigabytes(tmp_path, name, payload):
    from mass_export.core.errors import CheckpointError
    from mass_export.merging.checkpoints import read_checkpoint

    path = tmp_path / "finetuned.pt"
    path.write_bytes(payload)
    assert len(payload) < 50
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value) and f"asks for {name} of" in str(error.value)


def test_a_storage_larger_than_its_file_is_refused(tmp_path):
    import io
    import pickletools
    import zipfile

    import torch

    from mass_export.core.errors import CheckpointError
    from mass_export.merging.checkpoints import read_checkpoint

    path = tmp_path / "finetuned.pt"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    ops = list(pickletools.genops(entries[name]))
    numel = next(op for op in ops if op[0].name == "BININT1" and op[1] == 4)  # the storage's numel
    data = bytearray(entries[name])
    data[numel[2]:numel[2] + 2] = b"J" + b"\x00"  # BININT1 4 -> BININT 2**30 (same offsets after it shift)
    data[numel[2] + 2:numel[2] + 2] = b"\x00\x00\x40"
    entries[name] = bytes(data)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for entry, content in entries.items():
            archive.writestr(entry, content)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value) and "tensor storage of 4294967296 bytes" in str(error.value)


# --- 2 and 6. run's output ---------------------------------------------------------------------------------

def test_run_output_naming_an_input_image_is_refused(tiny, tmp_path, env, images):
    target = tmp_path / "photo.png"
    shutil.copy(images[0], target)
    before = target.read_bytes()
    result = cli("run", target, images[1], "--build", tiny, "-o", target, "--force", env=env)
    assert result.returncode == 2
    line = one_line_error(result)
    assert str(target) in line and "is the input" in line
    assert target.read_bytes() == before


def test_run_refuses_an_existing_output_without_force_and_keeps_it(tiny, tmp_path, env, images):
    out = tmp_path / "rows.jsonl"
    out.write_text("previous results\n")
    result = cli("run", images[0], "--build", tiny, "-o", out, env=env)
    assert result.returncode == 2
    assert str(out) in one_line_error(result) and "--force" in result.stderr
    assert out.read_text() == "previous results\n"
    result = cli("run", images[0], "--build", tiny, "-o", out, "--force", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text().splitlines()[0])["path"] == str(images[0])


def test_a_refused_build_leaves_a_forced_output_intact(tiny, tmp_path, env, images):
    out = tmp_path / "rows.jsonl"
    out.write_text("previous results\n")
    result = cli("run", images[0], "--build", tmp_path / "nope", "-o", out, "--force", env=env)
    assert result.returncode == 3
    assert out.read_text() == "previous results\n"
    fresh = tmp_path / "fresh.jsonl"
    result = cli("run", images[0], "--build", tmp_path / "nope", "-o", fresh, env=env)
    assert result.returncode == 3 and not fresh.exists()


@pytest.mark.parametrize("where", ["read-only file", "proc", "inside the build"])
def test_an_unwritable_output_fails_in_one_line_before_the_build_loads(tiny, tmp_path, env, images, where):
    if where == "read-only file" and os.geteuid() == 0:
        pytest.skip("root writes read-only files")  # checked by os.access, which root passes
    out = {"read-only file": tmp_path / "ro.jsonl", "proc": Path("/proc/mass-export.jsonl"),
           "inside the build": tiny / "rows.jsonl"}[where]
    if where == "read-only file":
        out.write_text("keep\n")
        out.chmod(0o444)
    before = tree_digest(tiny)
    result = cli("run", images[0], "--build", tiny, "-o", out, "--force", env=env)
    assert result.returncode == 2
    line = one_line_error(result)
    assert str(out) in line
    assert "images:" not in result.stderr  # refused before loading, nothing classified
    assert tree_digest(tiny) == before


def test_a_full_disk_keeps_whole_rows_and_says_so(tiny, tmp_path, env, images):
    result = cli("run", *images, "--build", tiny, "-o", "/dev/full", "--batch-size", 2, env=env)
    assert result.returncode == 7
    assert "/dev/full: writing failed after 0 rows (No space left on device)" in result.stderr
    assert "output incomplete: 0 rows written" in result.stderr and "Traceback" not in result.stderr


def test_a_torn_write_is_cut_back_to_the_last_whole_row(tiny, tmp_path, env, images):
    out = tmp_path / "rows.jsonl"
    limit = 700  # bytes: a few rows, then the file size limit (as a full disk) cuts a row in the middle

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = cli("run", *images, "--build", tiny, "-o", out, "--batch-size", 2, "--json", env=env,
                 preexec_fn=small_files)
    assert result.returncode == 7, result.stderr
    lines = out.read_text().splitlines(keepends=True)
    rows = [json.loads(line) for line in lines]
    assert all(line.endswith("\n") for line in lines) and 0 < len(rows) < len(images)
    summary = json.loads(result.stdout)
    assert summary["rows_written"] == len(rows) and str(out) in summary["output_error"]
    assert [r["path"] for r in rows] == list(map(str, images[:len(rows)]))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_non_utf8_file_name_is_written_not_crashed_on(tiny, tmp_path, env, images, fmt):
    import csv

    folder = tmp_path / "photos"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    with open(raw, "wb") as handle:
        handle.write(images[0].read_bytes())
    shutil.copy(images[1], folder / "plain.png")
    out = tmp_path / f"rows.{fmt}"
    result = cli("run", folder, "--build", tiny, "-o", out, env=env)
    assert result.returncode == 0, result.stderr
    text = out.read_text(encoding="utf-8")  # valid UTF-8
    rows = list(csv.DictReader(text.splitlines())) if fmt == "csv" else [json.loads(x) for x in text.splitlines()]
    assert [r["path"] for r in rows] == [f"{folder}/caf\\xe9.png", f"{folder}/plain.png"]
    assert "not valid UTF-8" in rows[0]["warning"] and rows[0]["class"]


def test_two_runs_to_one_output_the_second_is_refused(tiny, tmp_path, env, images, monkeypatch):
    out = tmp_path / "rows.jsonl"
    monkeypatch.setenv("MASS_EXPORT_CACHE", env["MASS_EXPORT_CACHE"])
    with locked(out):  # as a first `run -o rows.jsonl` holds it
        result = cli("run", images[0], "--build", tiny, "-o", out, env=env)
    assert result.returncode == 75
    assert str(out) in one_line_error(result) and "being written" in result.stderr
    assert not out.exists()


# --- exit codes -------------------------------------------------------------------------------------------

def test_total_failure_has_its_own_code(tiny, tmp_path, env):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = cli("run", tmp_path / "broken.png", tmp_path / "missing.jpg", "--build", tiny, env=env)
    assert result.returncode == 6
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(r["error"] for r in rows)


def test_a_closed_stdout_stops_quietly_with_141(tiny, env, images):
    process = subprocess.Popen([sys.executable, "-m", "mass_export_cli", "run", *map(str, images * 20), "--build",
                                str(tiny), "--batch-size", "1", "--no-progress"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=REPO)
    watchdog = threading.Timer(TIMEOUT, process.kill)  # the first row's read has a timeout too
    watchdog.start()
    try:
        first = process.stdout.readline()
    finally:
        watchdog.cancel()
    process.stdout.close()  # as `| head -1` does
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert json.loads(first)["path"] == str(images[0])
    assert process.returncode == 141
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr


CRASH = ("import sys\nfrom mass_export_cli.main import main\n"
         "@main.command()\ndef boom():\n    {}\nmain(sys.argv[1:], prog_name='mass-export')\n")


def test_an_internal_error_is_one_line_and_70_traceback_on_request(env):
    code = CRASH.format("raise RuntimeError('a bug')")
    result = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True, text=True, env=env,
                            timeout=120, cwd=REPO)
    assert result.returncode == 70
    assert "internal error (RuntimeError: a bug)" in one_line_error(result) and "--debug" in result.stderr
    result = subprocess.run([sys.executable, "-c", code, "--debug", "boom"], capture_output=True, text=True,
                            env=env, timeout=120, cwd=REPO)
    assert result.returncode == 1 and "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr


@pytest.mark.parametrize("command", [["build", "--model", "ViT-B-16"], ["validate", "."], ["eval"],
                                     ["bench"], ["zoo", "build"], ["demo"]])
def test_build_commands_without_torch_say_which_extra(tmp_path, env, command):
    # torch absent as in an environment without the [build] extra (None in sys.modules: import fails)
    code = ("import sys\nsys.modules['torch'] = None\nfrom mass_export_cli.main import main\n"
            "main(sys.argv[1:], prog_name='mass-export')\n")
    result = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert f"`mass-export {command[0]}` needs the [build] extra: pip install 'mass-export[build]'" in line


# --- bench: the runtime's own peak --------------------------------------------------------------------------

def test_runtime_memory_is_the_runtime_process_own_peak(tiny):
    from mass_export.evaluation.bench import runtime_memory

    ballast = np.ones(2**27)  # 1 GiB resident in this (parent) process
    memory = runtime_memory(tiny, batch=4, threads=1)
    assert ballast.sum() == 2**27
    assert memory["peak_rss_mib"] < 700, memory  # the parent's 1 GiB + is not counted
    assert memory["torch_imported"] is False


# --- 7. the declared onnxruntime floor runs a build --------------------------------------------------------

def declared_floor(package: str) -> str:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split(">=")[1] for d in deps if d.startswith(package + ">="))


def runtime_requirements(floor: str, numpy_spec: str) -> list[str]:
    """pyproject's runtime dependencies, with onnxruntime pinned at its declared floor and numpy as asked."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {"onnxruntime": f"onnxruntime=={floor}", "numpy": numpy_spec}
    return [pinned.get(d.split(">=")[0].split("=")[0].strip(), d) for d in deps]


PREDICT = ("import json, sys\nsys.path.insert(0, sys.argv[1])\nimport onnxruntime\n"
           "from mass_export.runtime import MassRuntime, expand_paths\n"
           "rows = MassRuntime.load(sys.argv[2], threads=1).classify(expand_paths(sys.argv[3:]), batch_size=4)\n"
           "print(json.dumps({'ort': onnxruntime.__version__, 'rows': [[p.task, p.class_name, p.score] "
           "for p in rows]}))\n")


@pytest.mark.slow
@pytest.mark.parametrize("numpy_spec", ["numpy<2", "numpy>=2"])
def test_the_declared_onnxruntime_floor_runs_a_build(tiny, images, tmp_path, numpy_spec):
    floor = declared_floor("onnxruntime")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              *runtime_requirements(floor, numpy_spec)], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-500:]
    args = [str(REPO), str(tiny), *map(str, images)]
    old = subprocess.run([str(python), "-c", PREDICT, *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert old.returncode == 0, old.stderr[-800:]
    new = subprocess.run([sys.executable, "-c", PREDICT, *args], capture_output=True, text=True, timeout=600)
    old, new = json.loads(old.stdout), json.loads(new.stdout)
    assert old["ort"] == floor or old["ort"].startswith(floor + ".")  # pip: ==1.19 installs 1.19.0
    assert [r[:2] for r in old["rows"]] == [r[:2] for r in new["rows"]]
    worst = max(abs(a[2] - b[2]) for a, b in zip(old["rows"], new["rows"]))
    print(f"onnxruntime {floor} ({numpy_spec}) vs {new['ort']}: identical tasks and classes, max |score diff| "
          f"{worst:.1e}")
    assert worst < 1e-4
