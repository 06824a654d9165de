"""`mass-export bench`: what MASS costs against one plain encoder pass, measured side by side on the same inputs.

Every variant runs interleaved (round-robin) so machine noise hits them alike; the result is each variant's
ratio to the plain pass of the same run. Torch variants import torch lazily and can be skipped.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mass_export.core import options
from mass_export.evaluation import (BENCH_BATCH_SIZES, BENCH_ITERATIONS, BENCH_SEED, BENCH_STREAMS,
                                   BENCH_WARMUP)
from mass_export.core.lowrank import group_by_task_set
from mass_export.core.manifest import read_manifest

# Dense fp32 peak (TFLOP/s) of GPUs we may meet; --peak-tflops overrides. Figures are the vendors' data sheets.
PEAK_FP32_TFLOPS = {"H100": 67.0, "H200": 67.0, "A100": 19.5, "L4": 30.3, "A10": 31.2, "T4": 8.1}


def tower_macs(manifest: dict, layers: int | None = None, tap: bool = False) -> float:
    """Multiply-accumulates of one image through the tower (or through the router prefix)."""
    vision = manifest["model"]["config"]["vision_cfg"]
    width, patch, size = vision["width"], vision["patch_size"], manifest["model"]["image_size"]
    mlp = int(width * vision.get("mlp_ratio", 4.0))
    tokens = (size // patch) ** 2 + 1
    blocks = vision["layers"] if layers is None else layers
    per_block = tokens * (4 * width * width + 2 * width * mlp) + 2 * tokens * tokens * width
    macs = (tokens - 1) * 3 * patch * patch * width + blocks * per_block
    if tap:  # the tap block's attention only
        macs += tokens * 4 * width * width + 2 * tokens * tokens * width
    else:
        macs += width * manifest["model"]["config"]["embed_dim"]
    return float(macs)


def sample_pixels(preprocessor, batch: int, images=()) -> np.ndarray:
    """Preprocessed real photos (scikit-image samples unless images are given), repeated to the batch size."""
    if not images:
        from mass_export.runtime.images import sample_photos

        images = sample_photos()
    pixels = np.stack([preprocessor(runtime_image(i)) for i in images])
    return np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))


def runtime_image(item):
    from mass_export.runtime.images import as_image

    loaded = as_image(item)
    if loaded.error:
        raise ValueError(loaded.error)
    return loaded.image


def plain_graph(build_dir: Path, manifest: dict, out: Path) -> Path:
    """One ordinary encoder (weights as constants) of the pretrained tower: the floor MASS is compared to."""
    import torch
    from safetensors.torch import load_file

    from mass_export.merging.stored import vision_tower
    from mass_export.nn.tower import FullTower
    from mass_export.export.graphs import _export

    visual = vision_tower(manifest)
    visual.load_state_dict(load_file(str(build_dir / "pretrained.safetensors")))
    size = manifest["model"]["image_size"]
    batch = torch.export.Dim("batch", min=1, max=65536)
    _export(FullTower(visual).eval(), (torch.zeros(2, 3, size, size),), None, out, ["image_features"],
            {"images": {0: batch}}, manifest.get("opset", options.default("opset")))
    return out


# The mixed stream's task sets, drawn per image: own task uniform over the T tasks, set size 1 / 2 / 3 with these
# probabilities (the router's mix on the demo zoo's 4,200 test images), partners uniform among the other tasks.
MIXED_SET_SIZES = (1, 2, 3)
MIXED_SIZE_PROBABILITIES = (0.28, 0.63, 0.09)
STREAMS = BENCH_STREAMS


def draw_task_sets(rng: np.random.Generator, num_tasks: int, count: int) -> list[tuple[int, ...]]:
    """``count`` task sets from the mixed stream's distribution (above)."""
    sets = []
    for _ in range(count):
        own = int(rng.integers(num_tasks))
        size = min(int(rng.choice(MIXED_SET_SIZES, p=MIXED_SIZE_PROBABILITIES)), num_tasks)
        others = [t for t in range(num_tasks) if t != own]
        partners = rng.choice(others, size - 1, replace=False).tolist() if size > 1 else []
        sets.append(tuple(sorted([own, *partners])))
    return sets


class Stream:
    """Batches of a named stream: ``homogeneous`` (the same real photos every round, routed by the router),
    ``mixed`` (those photos with task sets drawn from the mixed distribution, forced through
    ``predict(task_sets=...)`` after the first pass and router have run as for any stream) or a folder / file
    list (real images in the given order, cycled, routed by the router)."""

    def __init__(self, name: str, runtime, pixels: np.ndarray, seed: int = 0):
        self.name, self.runtime, self.pixels, self.batch = name, runtime, pixels, len(pixels)
        self.rng = np.random.default_rng(seed)
        self.images, self.position = None, 0
        if name not in STREAMS:
            from mass_export.runtime.images import PathProblem, expand_paths

            paths = [p for p in expand_paths([Path(name)]) if not isinstance(p, PathProblem)]
            if not paths:
                raise ValueError(f"stream {name!r}: no images there (give homogeneous, mixed or a folder of images)")
            self.images = paths

    def next_batch(self) -> tuple[np.ndarray, list | None]:
        if self.name == "homogeneous":
            return self.pixels, None
        if self.name == "mixed":
            return self.pixels, draw_task_sets(self.rng, self.runtime.num_tasks, self.batch)
        chosen = [self.images[(self.position + i) % len(self.images)] for i in range(self.batch)]
        self.position += self.batch
        return np.stack([self.runtime.preprocessor(runtime_image(path)) for path in chosen]), None


def mass_call(runtime, stream: Stream, window_batches: int, record: list) -> tuple[callable, callable]:
    """One round of the stream as `run` meets it: ``window_batches`` batches are routed batch by batch, then their
    images' second passes run grouped by task set across the window, in chunks of at most one batch
    (``MassRuntime.classify_batches``' schedule). Appends each batch's distinct task-set count to ``record``.
    Decoding a PATH stream's images happens before the timed call."""
    pending = {}

    def prepare():
        pending["batches"] = [stream.next_batch() for _ in range(window_batches)]

    def call():
        batches = pending.pop("batches")
        routed = [runtime.route(pixels) for pixels, _ in batches]  # a real stream routes every image
        # The mixed stream's drawn sets replace the router's (predict's task_sets, the API for known tasks).
        task_sets = [s for (_, forced), (_, sets) in zip(batches, routed) for s in (forced or sets)]
        pixels = np.concatenate([pixels for pixels, _ in batches])
        probs = np.concatenate([probs for probs, _ in routed])
        predictions = runtime.predict(pixels, task_sets=task_sets, probs=probs, batch_size=stream.batch)
        for start in range(0, len(predictions), stream.batch):
            record.append(len({p.task_set for p in predictions[start:start + stream.batch]}))

    return prepare, call


def stage_calls(runtime, pixels: np.ndarray) -> dict:
    """The two-pass runtime's stages through its public API, on the homogeneous batch."""
    # Blank stage inputs of the right shapes (costs do not depend on values): nothing is prepared here.
    feature = np.zeros((len(pixels), runtime.feature_width), np.float32)
    features = np.zeros((len(pixels), runtime.embed_dim), np.float32)
    _, task_sets = runtime.route(pixels)
    groups = group_by_task_set(task_sets)

    def second_pass():
        for task_set, indices in groups.items():
            runtime.second_pass(pixels[indices], task_set)

    return {"first_pass": lambda: runtime.first_pass(pixels), "router": lambda: runtime.router(feature),
            "second_pass": second_pass, "heads": lambda: runtime.heads(features)}


def preparation_calls(runtime, seed: int = 0) -> dict:
    """Preparing one task set of each size from the stored factors, uncached, a new random set every call:
    dense weights (factors, then the products) and the low-rank factors alone, as the runtime prepares them."""
    rng = np.random.default_rng(seed)

    def draw(size):
        return tuple(sorted(rng.choice(runtime.num_tasks, size, replace=False).tolist()))

    def timed(prepare, size):
        def call():
            task_set = draw(size)
            with runtime.preparation_threads():
                return prepare(task_set)
        return call

    out = {}
    for size in range(1, min(3, runtime.num_tasks) + 1):
        out[f"prepare_dense.size{size}"] = timed(lambda t: runtime.prepare_task_set(t, reuse_factors=False), size)
        if runtime.has_lowrank:
            out[f"prepare_lowrank.size{size}"] = timed(lambda t: runtime.prepare_factors(t, reuse_cores=False), size)
    return out


def torch_calls(build_dir: Path, pixels: np.ndarray, threads) -> dict:
    import torch

    from mass_export.merging.stored import reference_from_build

    if threads:
        torch.set_num_threads(threads)
    reference = reference_from_build(build_dir)
    x = torch.from_numpy(pixels)
    reference.predict(x)  # the reference's own task-set cache, as before this bench timed it
    return {"torch_naive": lambda: reference.predict_naive(x), "torch_early_exit_cached": lambda: reference.predict(x)}


# The peak is VmHWM of /proc/self/status, the high-water mark of this process's own address space. Not
# getrusage's ru_maxrss: Linux carries a parent's peak into a child across fork (and vfork) + exec, so a child of a
# 1 GiB parent reports 1 GiB whatever it uses itself (measured: 1055 MiB from ru_maxrss, 10.6 MiB VmHWM).
_MEASURE_RUNTIME = """
import json, resource, sys, time
import numpy as np

def peak_rss_mib():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux: ru_maxrss (bytes on macOS, KiB elsewhere)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024

from mass_export.runtime import MassRuntime
started = time.perf_counter()
runtime = MassRuntime.load(sys.argv[1], threads=int(sys.argv[3]) or None)
loaded = time.perf_counter() - started
height, width = runtime.preprocessor.image_size
pixels = np.random.default_rng(0).standard_normal((int(sys.argv[2]), 3, height, width), dtype=np.float32)
runtime.predict(pixels)
print(json.dumps({"load_seconds": round(loaded, 2), "batch": int(sys.argv[2]),
                  "peak_rss_mib": round(peak_rss_mib(), 1), "measured_by": "VmHWM of the runtime process",
                  "torch_imported": "torch" in sys.modules}))
"""


def runtime_memory(build_dir, batch: int = 16, threads: int | None = None) -> dict:
    """Peak resident memory of the torch-free runtime loading the build and classifying one batch, measured in
    a fresh process (this one may hold torch and the reference)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEASURE_RUNTIME, str(build_dir), str(batch), str(threads or 0)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        from mass_export.core.errors import MassExportError

        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MassExportError(f"{build_dir}: the runtime memory measurement failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_name() -> str | None:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip().splitlines()[0] or None
    except (OSError, IndexError, Exception):
        return None


def _timing_row(batch: int, name: str, values: list[float], images: int, plain_per_image: float) -> dict:
    """A variant's row: ``images`` per timed call, ratios against the plain pass on as many images."""
    ordered = sorted(values)
    median = statistics.median(values)
    plain = plain_per_image * images
    return {"batch": batch, "variant": name, "images_per_s": round(images / median, 3),
            "p50_ms": round(1000 * median, 3),
            "p90_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
            "time_ratio_to_plain": round(median / plain, 3), "throughput_ratio_to_plain": round(plain / median, 3)}


def _counter_delta(before: dict, after: dict) -> dict:
    cache_b, cache_a = before["cache"], after["cache"]
    delta = {key: cache_a[key] - cache_b[key] for key in ("hits", "misses", "waits", "preparations", "evictions")}
    delta["prepare_seconds"] = round(cache_a["prepare_seconds"] - cache_b["prepare_seconds"], 4)
    delta["cache_bytes"] = cache_a["bytes"]
    choices_b, choices_a = before["second_pass"]["choices"], after["second_pass"]["choices"]
    delta["second_pass_groups"] = {key: choices_a[key] - choices_b[key] for key in choices_a}
    delta["cores"] = {key: after["cores"][key] - before["cores"][key] for key in ("hits", "misses", "evictions")}
    delta["gram_matrices_computed"] = after["gram_blocks"]["computed"] - before["gram_blocks"]["computed"]
    return delta


def bench_stream(build_dir: Path, stream_name: str, batch: int, window_batches: int, pixels: np.ndarray, plain,
                 warmup: int, iterations: int, load, extras: dict, seed: int, progress: bool) -> list[dict]:
    """Rows of one stream at one batch size, from a freshly loaded runtime (nothing prepared but what its
    load calibration measures and drops): ``cold`` = the warm-up rounds, ``steady`` = the timed rounds after.
    A round is one window of ``window_batches`` batches for the plain pass and the two-pass runtime (rows per
    round); the extras (stages, preparation, torch) run once per round on one batch."""
    from tqdm.auto import tqdm

    runtime = load()
    stream = Stream(stream_name, runtime, pixels, seed)
    sets_per_batch: list[int] = []
    prepare, mass = mass_call(runtime, stream, window_batches, sets_per_batch)
    counters = {}

    def counted_mass():  # counters of the stream's own calls only (stage rows share the runtime)
        before = runtime.stats()
        mass()
        for key, value in _counter_delta(before, runtime.stats()).items():
            if isinstance(value, dict):
                counters[key] = {k: counters.get(key, {}).get(k, 0) + v for k, v in value.items()}
            elif key == "cache_bytes":
                counters[key] = value
            else:
                counters[key] = round(counters.get(key, 0) + value, 4)

    def plain_window():
        for _ in range(window_batches):
            plain()

    window = window_batches * batch
    calls = [("plain_pass", plain_window, window), ("mass_onnx", counted_mass, window),
             *((name, call, batch) for name, call in extras.items())]
    rows = []
    for phase, rounds in (("cold", warmup), ("steady", iterations)):
        if rounds == 0:
            continue
        timed = {name: [] for name, _, _ in calls}
        counts_from = len(sets_per_batch)
        counters.clear()
        for _ in tqdm(range(rounds), desc=f"bench {stream_name} batch {batch} {phase}", disable=not progress):
            prepare()
            for name, call, _ in calls:
                start = time.perf_counter()
                call()
                timed[name].append(time.perf_counter() - start)
        plain_per_image = statistics.median(timed["plain_pass"]) / window
        for name, call, images in calls:
            row = {"stream": stream_name, "phase": phase, "window": window,
                   **_timing_row(batch, name, timed[name], images, plain_per_image)}
            if name == "mass_onnx":
                counts = sets_per_batch[counts_from:]
                row["task_sets_per_batch"] = round(sum(counts) / len(counts), 2)
                row.update(counters)
                row["second_pass_model"] = runtime.stats()["second_pass"]["model_seconds"]
            rows.append(row)
    return rows


def run_bench(build_dir, batch_sizes=BENCH_BATCH_SIZES, warmup: int = BENCH_WARMUP, iterations: int = BENCH_ITERATIONS,
              providers=("cpu",),
              threads: int | None = None, with_torch: bool = True, peak_tflops: float | None = None,
              progress: bool = True, streams=STREAMS, seed: int = BENCH_SEED, cache_bytes: int | None = None,
              window: int | None = None) -> dict:
    """Time the plain pass and the two-pass runtime on each stream, interleaved round by round; see
    benchmarks/README.md for what each stream and row means. window: images per round (routed, then grouped by
    task set across them as `run` does; rounded down to whole batches, at least one); default `run`'s window."""
    from mass_export.runtime import MassRuntime
    from mass_export.runtime.engine import DEFAULT_WINDOW_BATCHES
    from mass_export.runtime.backends import make_runner
    from mass_export.runtime.preprocess import Preprocessor

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    gpu = gpu_name() if any(p.startswith(("cuda", "tensorrt")) for p in providers) else None
    peak = peak_tflops or next((v for k, v in PEAK_FP32_TFLOPS.items() if gpu and k in gpu), None)
    macs_full = tower_macs(manifest)
    macs_prefix = tower_macs(manifest, manifest["method"]["routing_layer"], tap=True)
    preprocessor = Preprocessor.from_manifest(manifest["model"])
    rows, providers_active = [], None

    def load():
        nonlocal providers_active
        runtime = MassRuntime.load(build_dir, providers=providers, threads=threads, cache_bytes=cache_bytes)
        providers_active = runtime.providers
        return runtime

    with tempfile.TemporaryDirectory() as tmp:
        plain_runner = make_runner(plain_graph(build_dir, manifest, Path(tmp) / "plain.onnx"), "onnxruntime",
                                   providers, threads)
        for batch in batch_sizes:
            pixels = sample_pixels(preprocessor, batch)
            window_batches = DEFAULT_WINDOW_BATCHES if window is None else max(1, window // batch)
            for stream_name in streams:
                rows += bench_stream_with_extras(build_dir, stream_name, batch, window_batches, pixels, plain_runner,
                                                 warmup, iterations, load, threads, with_torch, seed, progress)
                gc.collect()  # one stream's runtime (a real-size tower and its cache) is gone before the next
    for row in rows:
        if row["variant"] in ("plain_pass", "mass_onnx"):
            macs = macs_full if row["variant"] == "plain_pass" else macs_prefix + macs_full
            row["tflops"] = round(2 * macs * row["window"] / (row["p50_ms"] / 1000) / 1e12, 4)
            if peak:
                row["mfu"] = round(row["tflops"] / peak, 4)
    return {
        "build": str(build_dir), "model": manifest["model"]["name"], "tasks": len(manifest["tasks"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "warmup": warmup, "iterations": iterations,
        "streams": list(streams), "seed": seed, "window": window,
        "mixed_distribution": {"own_task": "uniform", "set_size": dict(zip(MIXED_SET_SIZES, MIXED_SIZE_PROBABILITIES)),
                               "partners": "uniform"},
        "providers_requested": list(providers), "providers_active": providers_active,
        "threads": threads, "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                        "cpus": os.cpu_count(), "gpu": gpu, "peak_fp32_tflops": peak},
        "macs_per_image": {"plain_pass": macs_full, "first_pass": macs_prefix},
        "storage": manifest.get("storage"), "runtime_memory": runtime_memory(build_dir, max(batch_sizes), threads),
        "results": rows,
    }


def bench_stream_with_extras(build_dir, stream_name, batch, window_batches, pixels, plain_runner, warmup, iterations,
                             load, threads, with_torch, seed, progress) -> list[dict]:
    """One stream's rows; the homogeneous stream also times the stages, task-set preparation and torch."""
    extras = {}

    def loaded():
        runtime = load()
        if stream_name == "homogeneous":
            extras.update({f"mass_onnx.{name}": call for name, call in stage_calls(runtime, pixels).items()})
            extras.update(preparation_calls(runtime, seed))
            if with_torch:
                extras.update(torch_calls(build_dir, pixels, threads))
        return runtime

    plain = lambda: plain_runner.run({"images": pixels})  # noqa: E731
    return bench_stream(build_dir, stream_name, batch, window_batches, pixels, plain, warmup, iterations, loaded,
                        extras, seed, progress)


CSV_COLUMNS = ["stream", "phase", "batch", "window", "variant", "images_per_s", "p50_ms", "p90_ms", "p99_ms",
               "time_ratio_to_plain", "throughput_ratio_to_plain", "tflops", "mfu", "task_sets_per_batch", "hits",
               "misses", "waits", "preparations", "prepare_seconds", "evictions", "cache_bytes"]


def to_csv(report: dict) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(report["results"])
    return buffer.getvalue()


def to_table(report: dict) -> str:
    lines = [f"{report['model']}, {report['tasks']} tasks, providers {report['providers_active']['encoder']}, "
             f"threads {report['threads']}",
             f"{'stream':<12}{'phase':<8}{'batch':>5}  {'variant':<30}{'img/s':>9}{'p50 ms':>10}{'p99 ms':>10}"
             f"{'x plain thr.':>13}{'sets/batch':>11}{'miss':>6}"]
    for row in report["results"]:
        lines.append(f"{row['stream'][-11:]:<12}{row['phase']:<8}{row['batch']:>5}  {row['variant']:<30}"
                     f"{row['images_per_s']:>9.2f}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}"
                     f"{row['throughput_ratio_to_plain']:>13.3f}{row.get('task_sets_per_batch', ''):>11}"
                     f"{row.get('misses', ''):>6}")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    from mass_export.core.jsonout import strict_dumps

    path.write_text(strict_dumps(report, str(path), indent=2) + "\n")
