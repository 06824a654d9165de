"""The runtime piece by piece: preprocessing parity, image reading, providers, cache, build integrity, and the
whole two-pass flow against the torch reference on a small real build. Max differences print with -s."""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from _cli import cli
from _tinybuild import make_tiny_build
from mass_export.core.errors import BuildIntegrityError, ConfigError, ProviderError
from mass_export.runtime import MassRuntime, TaskSetCache, OrtRunner, PathProblem, Preprocessor, expand_paths, load_image
from mass_export.runtime.backends import make_runner
from mass_export.runtime.images import as_image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def runtime(tiny_build):
    return MassRuntime.load(tiny_build, threads=1, cache_size=2)


# --- preprocessing -------------------------------------------------------------------------------------------

def _photos():
    from skimage import data

    rng = np.random.default_rng(0)
    photos = {name: Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")}
    photos["coins (grey, 303x384)"] = Image.fromarray(data.coins())
    photos["tiny 32x32"] = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    photos["3x500"] = Image.fromarray(rng.integers(0, 256, (3, 500, 3), dtype=np.uint8))
    return photos


@pytest.mark.parametrize("size,mode,interpolation", [(224, "shortest", "bicubic"), (32, "shortest", "bicubic"),
                                                     (224, "shortest", "bilinear"), (224, "squash", "bicubic"),
                                                     (224, "longest", "bicubic"), ((224, 160), "shortest", "bicubic")])
def test_preprocessing_equals_open_clip(size, mode, interpolation):
    from open_clip.transform import image_transform

    reference = image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation=interpolation,
                                resize_mode=mode)
    ours = Preprocessor(size, OPENAI_MEAN, OPENAI_STD, interpolation, mode)
    worst = {}
    for name, photo in _photos().items():
        if mode == "longest" and name == "3x500":
            continue  # open_clip itself fails: the short side rounds to 0 pixels
        expected = reference(photo).numpy()
        got = ours(photo)
        assert got.shape == expected.shape and got.dtype == np.float32
        worst[name] = float(np.abs(got - expected).max())
        # The loader's convert-then-resize order gives the same pixels for RGB and greyscale inputs.
        worst[name + " via loader"] = float(np.abs(ours(as_image(photo).image) - expected).max())
    print(f"preprocess {size} {mode} {interpolation}: max |diff| vs open_clip {max(worst.values()):.1e}")
    assert max(worst.values()) == 0.0


def test_preprocessor_from_manifest_and_bad_parameters():
    pre = Preprocessor.from_manifest({"image_size": [224, 224], "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)})
    assert pre.image_size == (224, 224) and pre.interpolation == "bicubic" and pre.resize_mode == "shortest"
    with pytest.raises(ConfigError):
        Preprocessor(224, OPENAI_MEAN, OPENAI_STD, resize_mode="stretch")


# --- image files ------------------------------------------------------------------------------------------------

def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_unreadable_files_become_errors(tmp_path):
    good = _save(Image.new("RGB", (40, 30), (10, 200, 30)), tmp_path / "good.png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is text, not a JPEG\n")
    cases = {"truncated.jpg": "truncated", "empty.png": "empty", "notes.jpg": "not an image",
             "missing.png": "no such file"}
    assert load_image(good).image.size == (40, 30) and load_image(good).error is None
    for name, words in cases.items():
        loaded = load_image(tmp_path / name)
        assert loaded.image is None and words in loaded.error, (name, loaded.error)
    assert "directory" in load_image(tmp_path).error
    if os.geteuid() != 0:  # root reads everything
        locked = _save(Image.new("RGB", (4, 4)), tmp_path / "locked.png")
        locked.chmod(0)
        assert "permission" in load_image(locked).error


def test_unusual_modes_convert_to_rgb_with_a_warning(tmp_path):
    grey16 = np.array([[0, 65535], [257 * 128, 1000]], dtype=np.uint16)
    rgba = Image.new("RGBA", (8, 8), (200, 100, 50, 0))
    palette = Image.new("RGB", (8, 8), (1, 2, 3)).convert("P")
    paths = {
        "cmyk.jpg": _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"),
        "grey16.png": _save(Image.fromarray(grey16), tmp_path / "grey16.png"),
        "palette.gif": _save(palette, tmp_path / "palette.gif"),
        "palette_transparent.png": _save(palette, tmp_path / "palette_transparent.png", transparency=0),
        "rgba.png": _save(rgba, tmp_path / "rgba.png"),
        "la.png": _save(Image.new("LA", (8, 8), (90, 10)), tmp_path / "la.png"),
        "bilevel.tif": _save(Image.new("1", (8, 8), 1), tmp_path / "bilevel.tif"),
    }
    for name, path in paths.items():
        loaded = load_image(path)
        assert loaded.error is None and loaded.image.mode == "RGB" and loaded.warning, (name, loaded)
    assert "alpha" in load_image(paths["rgba.png"]).warning
    # alpha is dropped (as PIL's convert and open_clip), not composited
    assert load_image(paths["rgba.png"]).image.getpixel((0, 0)) == (200, 100, 50)
    # 16-bit greyscale is scaled, not clipped at 255 as PIL's convert would
    scaled = np.asarray(load_image(paths["grey16.png"]).image)[..., 0]
    assert scaled.tolist() == [[0, 255], [128, 4]]
    assert load_image(_save(Image.new("L", (5, 5), 7), tmp_path / "grey.png")).warning is None


def test_arrays_and_pil_images_are_accepted():
    array = np.zeros((5, 6, 3), np.uint8)
    assert as_image(array).image.size == (6, 5)
    assert as_image(np.zeros((5, 6), np.uint8)).image.mode == "RGB"
    assert as_image(Image.new("RGBA", (3, 3))).warning
    with pytest.raises(ValueError):
        as_image(np.zeros((5, 6, 3), np.float32))
    with pytest.raises(TypeError):
        as_image(42)


def test_expand_paths(tmp_path):
    for rel in ("b/2.png", "b/1.JPG", "a.webp", "b/c/3.tiff", "b/notes.txt", "b/.hidden.png", ".cache/x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    explicit = tmp_path / "b" / "notes.txt"
    items = expand_paths([tmp_path / "b", explicit, tmp_path / "missing.jpg", tmp_path / "empty"])
    names = [p.path.name if isinstance(p, PathProblem) else p.relative_to(tmp_path).as_posix() for p in items]
    assert names == ["b/1.JPG", "b/2.png", "b/c/3.tiff", "b/notes.txt", "missing.jpg", "empty"]
    assert [type(p).__name__ for p in items[-2:]] == ["PathProblem", "PathProblem"]
    assert "no such file" in items[-2].error and "no image files" in items[-1].error


# --- backends -------------------------------------------------------------------------------------------------

def _add_graph() -> bytes:
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "add",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_runner_runs_and_uploads_on_cpu():
    runner = OrtRunner(_add_graph(), ("cpu",), threads=1)
    weights = runner.upload({"w": np.arange(3, dtype=np.float32), "unused": np.zeros(1)})
    assert list(weights) == ["w"] and runner.providers == ["CPUExecutionProvider"] and runner.device == "cpu"
    out = runner.run({"x": np.ones((2, 3), np.float32), **weights}, keep=("y",))
    assert out["y"].tolist() == [[1, 2, 3], [1, 2, 3]]
    with pytest.raises(ValueError, match="missing inputs: w"):
        runner.run({"x": np.ones((2, 3), np.float32)})


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="CUDA is available here: nothing falls back")
def test_provider_fallback_is_detected():
    with pytest.raises(ProviderError, match="requested providers CUDAExecutionProvider.*running on CPUExecutionProvider"):
        OrtRunner(_add_graph(), ("cuda",), strict_providers=True)
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider unavailable"):
        runner = OrtRunner(_add_graph(), "cuda:0,cpu")
    assert runner.providers == ["CPUExecutionProvider"]
    assert runner.run({"x": np.zeros((1, 3), np.float32), "w": np.ones(3, np.float32)})["y"].tolist() == [[1, 1, 1]]


def test_provider_names_and_backends():
    with pytest.raises(ConfigError, match="unknown provider"):
        OrtRunner(_add_graph(), ("gpu",))
    with pytest.raises(ConfigError, match="device"):
        OrtRunner(_add_graph(), ("cuda:x",))
    with pytest.raises(ProviderError, match="[Tt]ensor[Rr][Tt]"):
        make_runner(Path("unused.onnx"), backend="tensorrt")


# --- cache ----------------------------------------------------------------------------------------------------

def test_task_set_cache_is_bounded_in_bytes():
    made = []
    cache = TaskSetCache(lambda key: made.append(key) or np.zeros(key[0], np.uint8), capacity_bytes=250)
    for key in [(100,), (101,), (100,), (102,), (101,)]:
        assert cache.get(key).nbytes == key[0]
    assert made == [(100,), (101,), (102,), (101,)]  # (101,) was evicted by (102,) after (100,) was used again
    info = cache.info()
    assert info["keys"] == [(102,), (101,)] and info["hits"] == 1 and info["misses"] == 4
    assert info["bytes"] == 203 <= info["capacity_bytes"] and info["evictions"] == 2 and info["preparations"] == 4
    assert cache.get((300,)).nbytes == 300 and cache.info()["uncached"] == 1  # larger than the budget: not kept
    counted = TaskSetCache(lambda key: np.zeros(1), capacity_bytes=1 << 20, max_entries=0)
    counted.get((0,))
    assert counted.info()["entries"] == 0
    with pytest.raises(ConfigError):
        TaskSetCache(lambda key: key, capacity_bytes=-1)


# --- the build directory --------------------------------------------------------------------------------------

def test_changed_build_is_refused_by_name(tiny_build, tmp_path):
    copy = Path(shutil.copytree(tiny_build, tmp_path / "build"))
    data = bytearray((copy / "factors.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "factors.safetensors").write_bytes(bytes(data))
    with pytest.raises(BuildIntegrityError, match="factors.safetensors: sha256 differs"):
        MassRuntime.load(copy)
    (copy / "graphs" / "heads.onnx").unlink()
    with pytest.raises(BuildIntegrityError, match="graphs/heads.onnx: missing"):
        MassRuntime.load(copy)
    result = cli("run", tmp_path, "--build", copy)
    assert result.exit_code == 3 and "refusing a changed build" in result.output


def test_build_without_graphs_is_refused(tiny_build, tmp_path):
    from mass_export.core.manifest import update_manifest

    copy = Path(shutil.copytree(tiny_build, tmp_path / "build"))
    update_manifest(copy, graphs={})
    with pytest.raises(BuildIntegrityError, match="no prefix, router, encoder, heads graph"):
        MassRuntime.load(copy)


# --- the two passes -------------------------------------------------------------------------------------------

def test_runtime_equals_the_torch_reference(runtime, tiny_build, images):
    import torch

    from mass_export.merging.stored import reference_from_build

    reference = reference_from_build(tiny_build)
    pixels = np.stack([runtime.preprocessor(load_image(p).image) for p in images])
    expected = reference.predict(torch.from_numpy(pixels))
    assert len({p.task_set for p in expected}) >= 3, "the fixture should exercise several task sets"
    for batch_size in (1, 4, len(images)):
        got = runtime.classify(images, batch_size=batch_size)
        assert [p.task_index for p in got] == [p.task_index for p in expected]
        assert [p.class_index for p in got] == [p.class_index for p in expected]
        assert [p.task_set for p in got] == [tuple(runtime.tasks[t] for t in p.task_set) for p in expected]
        worst = max(abs(g.score - e.score) for g, e in zip(got, expected))
        print(f"runtime vs torch reference, batch {batch_size}: max |winning logit diff| {worst:.2e}")
        assert worst < 1e-4
    probs, task_sets = runtime.route(pixels)
    ref_probs, _, ref_sets = reference.route(torch.from_numpy(pixels))
    assert task_sets == ref_sets and np.abs(probs - ref_probs.numpy()).max() < 1e-5
    for task_set in {p.task_set for p in expected}:
        features = runtime.encode(pixels, task_set)
        diff = np.abs(features - reference.encode(torch.from_numpy(pixels), task_set).numpy()).max()
        assert diff < 1e-4, (task_set, diff)


def test_predictions_are_complete_and_grouped(runtime, images):
    calls, originals = [], {}
    for name in ("encoder", "lowrank"):  # the planner picks one of the two exact forms per group
        runner = originals[name] = runtime.runners[name]
        runner.run = (lambda original: lambda feeds, keep=(): calls.append(len(feeds["pixel_values"]))
                      or original(feeds, keep))(runner.run)
    try:
        predictions = runtime.classify(images, batch_size=len(images), top_k=3)
    finally:
        for runner in originals.values():
            del runner.run
    sets = {p.task_set for p in predictions}
    assert len(calls) == len(sets) and sum(calls) == len(images)  # one second pass per task set in the batch
    for p, path in zip(predictions, images):
        assert p.ok and p.path == str(path) and p.task in p.task_set
        assert len(p.top_k) == min(3, len(runtime.classes[p.task]))
        assert p.top_k[0] == (p.class_name, p.score) and p.class_name == runtime.classes[p.task][p.class_index]
        assert abs(sum(p.probs.values()) - 1) < 1e-5 and set(p.probs) == set(runtime.tasks)
    assert runtime.cache.info()["entries"] <= 2


def test_mixed_inputs_keep_order_and_failures(runtime, images, tmp_path):
    (tmp_path / "bad.jpg").write_text("not an image")
    array = np.asarray(Image.open(images[1]).convert("RGB"))
    items = [images[0], tmp_path / "bad.jpg", array, Image.open(images[2]), str(tmp_path / "gone.png")]
    out = runtime.classify(items, batch_size=2)
    assert [p.ok for p in out] == [True, False, True, True, False]
    assert out[1].path.endswith("bad.jpg") and "not an image" in out[1].error and out[2].path is None
    assert out[2].class_name == runtime.classify([images[1]])[0].class_name


# --- the command ----------------------------------------------------------------------------------------------

def test_run_command(tiny_build, images, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in images[:5]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = cli("run", folder, "--build", tiny_build, "--batch-size", 2, "--top-k", 2)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1, result.output
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in folder.iterdir())
    assert sum(r["error"] is not None for r in rows) == 1 and all(len(r["top_k"]) == 2 for r in rows if not r["error"])
    assert "1 failed" in result.stderr

    out = tmp_path / "preds.csv"
    result = cli("run", *images[:3], "--build", tiny_build, "-o", out, "--json", "--window", 3, "--batch-size", 2,
                 "--cache-bytes", 64 << 20)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["classified"] == 3 and summary["failed"] == 0 and sum(summary["per_task"].values()) == 3
    cache = summary["cache"]
    grams = summary["gram_blocks"]  # --cache-bytes bounds the task sets, their cores and the Gram blocks together
    assert cache["capacity_bytes"] + grams["capacity_bytes"] + summary["cores"]["capacity_bytes"] == 64 << 20
    assert grams["blocks"] >= 1 and summary["cores"]["misses"] >= 1
    assert cache["misses"] >= 1 and cache["bytes"] <= cache["capacity_bytes"] and grams["bytes"] <= 16 << 20
    assert cache["preparations"] >= 1 and cache["prepare_seconds"] > 0 and sum(summary["second_pass"].values()) >= 2
    lines = out.read_text().splitlines()
    assert lines[0] == "path,task,class,score,confidence,top_k,task_set,task_probs,error,warning" and len(lines) == 4

    result = cli("run", folder, "--build", tiny_build, "--json")
    assert result.exit_code == 2 and "--output" in result.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = cli("run", images[0], "--build", tiny_build, "--providers", "nope")
    assert result.exit_code == 2 and "unknown provider" in result.output


def test_single_task_build_skips_the_router(tmp_path_factory, images):
    import torch

    from mass_export.merging.stored import reference_from_build

    build = make_tiny_build(tmp_path_factory.getbasetemp() / "runtime_tiny_build_1task", num_tasks=1)
    runtime = MassRuntime.load(build, threads=1)
    calls = []
    runtime.runners["prefix"].run = lambda *args, **kwargs: calls.append(1)
    got = runtime.classify(images[:4])
    expected = reference_from_build(build).predict(torch.from_numpy(np.stack(
        [runtime.preprocessor(load_image(p).image) for p in images[:4]])))
    assert not calls and all(p.task_set == ("Alpha",) and p.probs == {"Alpha": 1.0} for p in got)
    assert [p.class_index for p in got] == [p.class_index for p in expected]
