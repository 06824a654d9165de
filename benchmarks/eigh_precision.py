"""float32 against float64 eigen-decompositions of a task set's Gram matrices: time and exactness, one process.

    python benchmarks/eigh_precision.py BUILD --sets 3 > results/eigh_precision_vit_b16.json

For random task sets of 1, 2 and 3 tasks: the Gram matrices of every factor key (from the Gram-block store), the
batched eigh in float64 (shipped) and in float32, interleaved; then each key's TSV-M update U_cat M V_cat from both
(float64 products) and the largest |difference| of the merged weights, absolute and relative to the update's largest
entry. BLAS on 1 thread, as the runtime prepares."""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from threadpoolctl import threadpool_limits

from mass_export.core.lowrank import GRAM_RCOND
from mass_export.core.manifest import read_manifest
from mass_export.core.taskweights import GramBlocks, StoredTasks


def inverse_sqrt(gram: np.ndarray, dtype) -> tuple[np.ndarray, float]:
    """Batched (pseudo-)inverse square root with eigh in ``dtype``; returns it in float64 and eigh's seconds."""
    started = time.perf_counter()
    values, vectors = np.linalg.eigh(gram.astype(dtype))
    seconds = time.perf_counter() - started
    values, vectors = values.astype(np.float64), vectors.astype(np.float64)
    keep = values > GRAM_RCOND * np.maximum(values[..., -1:], 0)
    scale = np.where(keep, 1 / np.sqrt(np.where(keep, values, 1)), 0)
    return (vectors * scale[..., None, :]) @ np.swapaxes(vectors, -1, -2), seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", type=Path)
    parser.add_argument("--sets", type=int, default=3, help="random sets per size")
    args = parser.parse_args()
    manifest = read_manifest(args.build, verify=False)
    stored = StoredTasks.from_flat(*(load_file(str(args.build / f"{n}.safetensors"))
                                     for n in ("pretrained", "factors", "deltas")), manifest["method"]["alpha"])
    store, rng, rows = GramBlocks(stored), np.random.default_rng(0), []
    with threadpool_limits(1, user_api="blas"):
        store.fill(range(stored.num_tasks))
        for size in (1, 2, 3):
            for _ in range(args.sets):
                tasks = sorted(rng.choice(stored.num_tasks, size, replace=False).tolist())
                keys = list(stored.factors)
                grams = [store.grams(key, tasks) for key in keys]
                by_shape: dict[int, list[int]] = {}
                for position, (g_u, _) in enumerate(grams):
                    by_shape.setdefault(len(g_u), []).append(position)
                seconds, roots = {"float64": 0.0, "float32": 0.0}, {"float64": {}, "float32": {}}
                for positions in by_shape.values():  # batched per |S|k, as the runtime does
                    for name, dtype in (("float64", np.float64), ("float32", np.float32)):
                        root_u, t_u = inverse_sqrt(np.stack([grams[i][0] for i in positions]), dtype)
                        root_v, t_v = inverse_sqrt(np.stack([grams[i][1] for i in positions]), dtype)
                        seconds[name] += t_u + t_v
                        roots[name].update({i: (root_u[n], root_v[n]) for n, i in enumerate(positions)})
                worst, worst_relative = 0.0, 0.0
                for position, key in enumerate(keys):
                    parts = stored.factors[key]
                    U = np.concatenate([parts["U"][t] for t in tasks], axis=1).astype(np.float64)
                    V = np.concatenate([parts["V"][t] for t in tasks], axis=0).astype(np.float64)
                    s = np.concatenate([parts["s"][t] for t in tasks]).astype(np.float64)
                    delta = {name: U @ (by_key[position][0] @ (s[:, None] * by_key[position][1])) @ V
                             for name, by_key in roots.items()}
                    diff = float(np.abs(delta["float32"] - delta["float64"]).max())
                    worst = max(worst, diff)
                    worst_relative = max(worst_relative, diff / float(np.abs(delta["float64"]).max()))
                rows.append({"tasks": tasks, "eigh_seconds": {k: round(v, 4) for k, v in seconds.items()},
                             "float32_over_float64_time": round(seconds["float32"] / seconds["float64"], 3),
                             "max_abs_diff_merged_update": worst, "max_diff_relative_to_update": worst_relative})
    print(json.dumps({"build": str(args.build), "model": manifest["model"]["name"], "tasks": stored.num_tasks,
                      "keys": len(stored.factors), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "load_average": os.getloadavg(), "machine": {"platform": platform.platform(),
                                                                   "cpus": os.cpu_count()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
