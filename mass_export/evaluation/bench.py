"""`mass-export bench`: what MASS costs against one plain encoder pass, measured side by side on the same inputs.

Every variant runs interleaved (round-robin) so machine noise hits them alike; the result is each variant's
ratio to the plain pass of the same run. Torch variants import torch lazily and can be skipped.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mass_export.core import options
from mass_export.core.lowrank import group_by_task_set
from mass_export.core.manifest import read_manifest

# Dense fp32 peak (TFLOP/s) of GPUs we may meet; --peak-tflops overrides. Figures are the vendors' data sheets.
PEAK_FP32_TFLOPS = {"H100": 67.0, "H200": 67.0, "A100": 19.5, "L4": 30.3, "A10": 31.2, "T4": 8.1}


@dataclass
class Variant:
    name: str
    run: callable
    stages: dict | None = None  # stage name -> callable, timed once per round too


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


def sample_pixels(runtime, batch: int, images=()) -> np.ndarray:
    """Preprocessed real photos (scikit-image samples unless images are given), repeated to the batch size."""
    if not images:
        from mass_export.runtime.images import sample_photos

        images = sample_photos()
    pixels = np.stack([runtime.preprocessor(runtime_image(i)) for i in images])
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


def variants(runtime, build_dir: Path, manifest: dict, pixels: np.ndarray, tmp: Path, threads, providers,
             with_torch: bool) -> list[Variant]:
    from mass_export.runtime.backends import make_runner

    plain = make_runner(plain_graph(build_dir, manifest, tmp / "plain.onnx"), "onnxruntime", providers, threads)
    _, task_sets = runtime.route(pixels)
    groups = group_by_task_set(task_sets)
    for task_set in groups:  # cached task-set weights, as in steady-state serving
        runtime.encode(pixels[:1], task_set)
    feature = runtime.runners["prefix"].run({"pixel_values": pixels, **runtime._prefix_inputs})["route_feature"]
    features = runtime.encode(pixels, next(iter(groups)))

    def second_pass():
        for task_set, indices in groups.items():
            runtime.encode(pixels[indices], task_set)

    out = [
        Variant("plain_pass", lambda: plain.run({"images": pixels})),
        Variant("mass_onnx", lambda: runtime.predict(pixels), stages={
            "first_pass": lambda: runtime.runners["prefix"].run({"pixel_values": pixels, **runtime._prefix_inputs}),
            "router": lambda: runtime.runners["router"].run({"route_feature": feature, **runtime._router_inputs}),
            "second_pass": second_pass,
            "heads": lambda: runtime.runners["heads"].run({"image_features": features, **runtime._heads_inputs}),
        }),
    ]
    if with_torch:
        import torch

        from mass_export.merging.stored import reference_from_build

        if threads:
            torch.set_num_threads(threads)
        reference = reference_from_build(build_dir)
        x = torch.from_numpy(pixels)
        reference.predict(x)  # warm the task-set cache
        out += [Variant("torch_naive", lambda: reference.predict_naive(x)),
                Variant("torch_early_exit_cached", lambda: reference.predict(x))]
    return out


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


def run_bench(build_dir, batch_sizes=(1, 16), warmup: int = 2, iterations: int = 10, providers=("cpu",),
              threads: int | None = None, with_torch: bool = True, peak_tflops: float | None = None,
              progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from mass_export.runtime import MassRuntime

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    runtime = MassRuntime.load(build_dir, providers=providers, threads=threads)
    gpu = gpu_name() if any(p.startswith(("cuda", "tensorrt")) for p in providers) else None
    peak = peak_tflops or next((v for k, v in PEAK_FP32_TFLOPS.items() if gpu and k in gpu), None)
    macs_full = tower_macs(manifest)
    macs_prefix = tower_macs(manifest, manifest["method"]["routing_layer"], tap=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batch_sizes:
            pixels = sample_pixels(runtime, batch)
            chosen = variants(runtime, build_dir, manifest, pixels, Path(tmp), threads, providers, with_torch)
            timed = {v.name: [] for v in chosen}
            timed.update({f"{v.name}.{s}": [] for v in chosen for s in (v.stages or {})})
            calls = [(v.name, v.run) for v in chosen] + [(f"{v.name}.{s}", f) for v in chosen
                                                          for s, f in (v.stages or {}).items()]
            for _ in range(warmup):
                for _, call in calls:
                    call()
            for _ in tqdm(range(iterations), desc=f"bench batch {batch}", disable=not progress):
                for name, call in calls:
                    start = time.perf_counter()
                    call()
                    timed[name].append(time.perf_counter() - start)
            plain = statistics.median(timed["plain_pass"])
            _, task_sets = runtime.route(pixels)
            for name, values in timed.items():
                ordered = sorted(values)
                median = statistics.median(values)
                row = {"batch": batch, "variant": name, "images_per_s": round(batch / median, 3),
                       "p50_ms": round(1000 * median, 3),
                       "p90_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
                       "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
                       "time_ratio_to_plain": round(median / plain, 3),
                       "throughput_ratio_to_plain": round(plain / median, 3)}
                if name in ("plain_pass", "mass_onnx"):
                    macs = macs_full * batch if name == "plain_pass" else (macs_prefix + macs_full) * batch
                    row["tflops"] = round(2 * macs / median / 1e12, 4)
                    if peak:
                        row["mfu"] = round(row["tflops"] / peak, 4)
                if name == "mass_onnx":
                    row["task_sets"] = len(group_by_task_set(task_sets))
                rows.append(row)
    return {
        "build": str(build_dir), "model": manifest["model"]["name"], "tasks": len(manifest["tasks"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "warmup": warmup, "iterations": iterations,
        "providers_requested": list(providers), "providers_active": runtime.providers,
        "threads": threads, "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                        "cpus": os.cpu_count(), "gpu": gpu, "peak_fp32_tflops": peak},
        "macs_per_image": {"plain_pass": macs_full, "first_pass": macs_prefix},
        "storage": manifest.get("storage"), "runtime_memory": runtime_memory(build_dir, max(batch_sizes), threads),
        "results": rows,
    }


def to_csv(report: dict) -> str:
    import csv
    import io

    keys = ["batch", "variant", "images_per_s", "p50_ms", "p90_ms", "p99_ms", "time_ratio_to_plain",
            "throughput_ratio_to_plain", "tflops", "mfu", "task_sets"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(report["results"])
    return buffer.getvalue()


def to_table(report: dict) -> str:
    lines = [f"{report['model']}, {report['tasks']} tasks, providers {report['providers_active']['encoder']}, "
             f"threads {report['threads']}",
             f"{'batch':>5}  {'variant':<32}{'img/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'x plain time':>14}"]
    for row in report["results"]:
        lines.append(f"{row['batch']:>5}  {row['variant']:<32}{row['images_per_s']:>9.2f}{row['p50_ms']:>10.1f}"
                     f"{row['p99_ms']:>10.1f}{row['time_ratio_to_plain']:>14.3f}")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    from mass_export.core.jsonout import strict_dumps

    path.write_text(strict_dumps(report, str(path), indent=2) + "\n")
