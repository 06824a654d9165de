"""Batch jobs: input lists (stdin, @list, globs), shards, resume, filterable rows, the columnar predictor, and a
real local Ray cluster writing the same rows as a local run."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mass_export.runtime import MassRuntime
from mass_export.runtime.images import PathProblem
from mass_export.runtime.predictor import MassPredictor, row_from_columns
from mass_export.runtime.sources import done_paths, expand_arguments, parse_shard, pending, shard
from mass_export.core.errors import ConfigError


@pytest.fixture()
def folder(tmp_path, images):
    """24 real images in nested folders (copies of the sample photos)."""
    root = tmp_path / "photos"
    for n in range(24):
        target = root / f"part{n % 3}" / f"img{n:02d}{images[n % len(images)].suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(images[n % len(images)], target)
    return root


def test_inputs_from_stdin_lists_and_globs(folder, tmp_path):
    every = sorted(folder.rglob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\n\n" + "\n".join(str(p) for p in every[:5]) + "\n")
    assert expand_arguments([f"@{listing}"]) == every[:5]
    assert expand_arguments(["-"], stdin=io.StringIO("\n".join(str(p) for p in every[5:8]))) == every[5:8]
    assert expand_arguments([str(folder / "**" / "*.png")]) == every
    assert expand_arguments([str(folder / "part1" / "*.png")]) == sorted((folder / "part1").glob("*.png"))
    problems = expand_arguments([str(folder / "*.jpeg"), f"@{tmp_path / 'absent.txt'}"])
    assert all(isinstance(p, PathProblem) for p in problems)
    assert "no file matches" in problems[0].error and "cannot read the path list" in problems[1].error
    with pytest.raises(ConfigError, match="standard input"):
        expand_arguments(["-"], stdin=None)


def test_shards_cover_a_folder_exactly_once(folder):
    items = expand_arguments([str(folder)])
    parts = [shard(items, i, 3) for i in (1, 2, 3)]
    assert sorted(p for part in parts for p in part) == sorted(items)
    assert sum(len(p) for p in parts) == len(items) and all(parts)
    # Membership depends on the path alone, not on what else is listed or in which order.
    assert shard(list(reversed(items[:7])), 2, 3) == list(reversed([p for p in items[:7] if p in parts[1]]))
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_resume_skips_written_rows_and_cuts_a_torn_tail(tmp_path, folder):
    items = expand_arguments([str(folder)])
    out = tmp_path / "rows.jsonl"
    out.write_text("".join(json.dumps({"path": str(p), "task": "x"}) + "\n" for p in items[:10])
                   + '{"path": "' + str(items[10]) + '", "ta')  # killed mid-row
    done = done_paths(out, "jsonl")
    assert done == {str(p) for p in items[:10]}
    assert out.read_text().endswith("\n") and len(out.read_text().splitlines()) == 10
    assert pending(items, done) == items[10:]
    csv_out = tmp_path / "rows.csv"
    csv_out.write_text("path,task\n" + "".join(f"{p},x\n" for p in items[:4]))
    assert done_paths(csv_out, "csv") == {str(p) for p in items[:4]}
    assert done_paths(tmp_path / "none.jsonl", "jsonl") == set()


def test_rows_carry_router_probabilities_and_a_class_confidence(tiny_build, images):
    runtime = MassRuntime.load(tiny_build, threads=1)
    for p in runtime.classify(images, batch_size=4):
        row = p.to_row()
        assert set(row["task_probs"]) == set(row["task_set"])
        assert all(0.0 <= v <= 1.0 for v in row["task_probs"].values())
        assert 0.0 < row["confidence"] <= 1.0
        # The confidence is the winning class's softmax share: the largest of the head's classes.
        assert row["confidence"] >= 1.0 / len(runtime.classes[row["task"]])


def test_predictor_columns_equal_the_runtime_rows_without_ray(tiny_build, images):
    predictor = MassPredictor(tiny_build, threads=1, batch_size=4)
    expected = [p.to_row() for p in predictor.runtime.classify(images, batch_size=4)]
    encoded = [p.read_bytes() for p in images] + [b"not an image"]
    columns = predictor({"bytes": np.asarray(encoded, dtype=object),
                         "path": np.asarray([str(p) for p in images] + ["junk.png"], dtype=object)})
    got = [row_from_columns(columns, i) for i in range(len(encoded))]
    assert got[-1]["error"] and got[-1]["path"] == "junk.png" and got[-1]["task"] is None
    for a, b in zip(got, expected):
        assert (a["path"], a["task"], a["class"], a["task_set"]) == (b["path"], b["task"], b["class"], b["task_set"])
        assert abs(a["score"] - b["score"]) < 1e-4
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images[:3]]
    columns = predictor({"image": np.asarray(arrays + [arrays[0]], dtype=object), "id": np.asarray(list("abcd"))})
    assert list(columns["id"]) == list("abcd") and list(columns["class"][:3]) == [r["class"] for r in expected[:3]]
    named = predictor.runtime.classify(arrays, ids=["frame-1", "frame-2", 3])
    assert [p.id for p in named] == ["frame-1", "frame-2", "3"] and all(p.path is None for p in named)
    with pytest.raises(ValueError, match="2 ids for 3 items"):
        predictor.runtime.classify(arrays, ids=["a", "b"])


def test_predictor_refuses_oversized_images_as_a_local_run_does(tiny_build, images):
    """`run --max-megapixels` reaches the Ray workers' predictor: an image over the limit is an error row there
    too, with the same message as a local run's."""
    encoded = [p.read_bytes() for p in images[:2]]
    columns = MassPredictor(tiny_build, threads=1, max_pixels=1000)({"bytes": np.asarray(encoded, dtype=object)})
    runtime = MassRuntime.load(tiny_build, threads=1)
    runtime.max_pixels = 1000
    local = runtime.classify(images[:2])
    assert list(columns["error"]) == [p.error for p in local] and all("megapixels" in p.error for p in local)
    assert all(task is None for task in columns["task"])


def test_ray_local_cluster_writes_the_same_rows_as_a_local_run(tiny_build, folder, tmp_path):
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    from mass_export.distributed.ray_job import classify_on_ray

    items = expand_arguments([str(folder), str(tmp_path / "missing.png")])
    (folder / "part0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    items = expand_arguments([str(folder), str(tmp_path / "missing.png")])
    local = [p.to_row() for p in MassRuntime.load(tiny_build, threads=1).classify(items, batch_size=4)]
    try:
        rows = list(classify_on_ray(items, tiny_build, "local", workers=2, batch_size=4, threads=1))
    finally:
        ray.shutdown()
    assert [r["path"] for r in rows] == [r["path"] for r in local]
    for a, b in zip(rows, local):
        assert (a["task"], a["class"], a["task_set"], bool(a["error"])) == \
            (b["task"], b["class"], b["task_set"], bool(b["error"])), a["path"]
        if a["score"] is not None:
            assert abs(a["score"] - b["score"]) < 1e-4 and abs(a["confidence"] - b["confidence"]) < 1e-4
    assert sum(bool(r["error"]) for r in rows) == 2  # the missing path and the broken file, as rows


# --- the run command: shards, resume, lists, Parquet, --ray ------------------------------------------------------

def run_cli(*args, stdin: str | None = None, timeout: int = 600):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mass_export_cli", "run", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_shards_cover_a_folder_exactly_once(tiny_build, folder, tmp_path):
    whole = tmp_path / "all.jsonl"
    assert run_cli(folder, "--build", tiny_build, "-o", whole, "--threads", 1).returncode == 0
    parts = []
    for index in (1, 2):
        out = tmp_path / f"shard{index}.jsonl"
        result = run_cli(folder, "--build", tiny_build, "-o", out, "--shard", f"{index}/2", "--threads", 1)
        assert result.returncode == 0, result.stderr
        parts.append(rows_of(out))
    assert all(parts) and sorted(r["path"] for part in parts for r in part) == sorted(r["path"] for r in rows_of(whole))
    by_path = {r["path"]: r for r in rows_of(whole)}
    assert all(r["class"] == by_path[r["path"]]["class"] for part in parts for r in part)
    assert run_cli(folder, "--build", tiny_build, "--shard", "3/2").returncode == 2


def test_resume_after_a_killed_run_ends_with_every_image_once(tiny_build, folder, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    for n in range(24, 60):  # enough images that the run is still going when it is killed
        shutil.copy(next(folder.rglob("*.png")), folder / "part0" / f"more{n}.png")
    out = tmp_path / "rows.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "mass_export_cli", "run", str(folder), "--build",
                                str(tiny_build), "-o", str(out), "--batch-size", "1", "--threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while (not out.exists() or out.read_text().count("\n") < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    written = out.read_text().count("\n")
    assert 3 <= written < 60, "the run was not interrupted part way"
    with open(out, "a") as handle:  # what a kill in the middle of a write leaves
        handle.write('{"path": "torn')
    result = run_cli(folder, "--build", tiny_build, "-o", out, "--resume", "--json", "--threads", 1)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["skipped_done"] == written
    paths = [r["path"] for r in rows_of(out)]
    expected = [str(p) for p in expand_arguments([str(folder)])]
    assert sorted(paths) == sorted(expected) and len(paths) == len(set(paths))
    # A second resume finds nothing to do; resume without --output or with --force is a usage error.
    again = run_cli(folder, "--build", tiny_build, "-o", out, "--resume", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["images"] == 0
    assert run_cli(folder, "--build", tiny_build, "--resume").returncode == 2
    assert run_cli(folder, "--build", tiny_build, "-o", out, "--resume", "--force").returncode == 2


def test_run_reads_paths_from_stdin_and_lists_and_writes_parquet(tiny_build, folder, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed")
    every = [str(p) for p in expand_arguments([str(folder)])]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(every[:6]) + "\n")
    out = tmp_path / "rows.jsonl"
    result = run_cli("-", f"@{listing}", "--build", tiny_build, "-o", out, stdin="\n".join(every[6:9]) + "\n")
    assert result.returncode == 0, result.stderr
    assert [r["path"] for r in rows_of(out)] == every[6:9] + every[:6]
    table = tmp_path / "rows.parquet"
    result = run_cli(folder, "--build", tiny_build, "-o", table, "--threads", 1)
    assert result.returncode == 0, result.stderr
    read = pq.read_table(table).to_pylist()
    jsonl = tmp_path / "same.jsonl"
    run_cli(folder, "--build", tiny_build, "-o", jsonl, "--threads", 1)
    for a, b in zip(read, rows_of(jsonl), strict=True):
        assert (a["path"], a["task"], a["class"], json.loads(a["task_set"])) == \
            (b["path"], b["task"], b["class"], b["task_set"])
        assert abs(a["confidence"] - b["confidence"]) < 1e-9
    assert not list(tmp_path.glob(".rows.parquet.*"))


def test_run_on_a_local_ray_cluster_writes_the_rows_of_a_local_run(tiny_build, folder, tmp_path):
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    local, distributed = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert run_cli(folder, "--build", tiny_build, "-o", local, "--threads", 1).returncode == 0
    result = run_cli(folder, "--build", tiny_build, "-o", distributed, "--ray", "local", "--ray-workers", 2,
                     "--threads", 1, "--json", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["providers"] == ["ray:local x2"]
    for a, b in zip(rows_of(distributed), rows_of(local), strict=True):
        assert (a["path"], a["task"], a["class"], a["task_set"]) == (b["path"], b["task"], b["class"], b["task_set"])
        assert abs(a["score"] - b["score"]) < 1e-4 and set(a["task_probs"]) == set(b["task_probs"])
