"""ViT-B-16 second-pass costs in one process, interleaved: a dense encoder pass (the plain pass's cost: same graph,
theta_pre fed), the low-rank encoder pass for a 1/2/3-task set, and preparing a set (dense, low-rank factors).

    python benchmarks/second_pass_costs.py BUILD --threads 2 --rounds 2 > results/second_pass_costs_vit_b16.json
A cut-down stand-in for `mass-export bench` when there is no time or memory for the full run: it loads no
theta_MT and no plain graph of its own."""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from threadpoolctl import threadpool_limits

from mass_export.core.manifest import read_manifest
from mass_export.core.taskweights import StoredTasks, dense_from_low_rank, low_rank_inputs
from mass_export.runtime.backends import make_runner


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    root = args.build
    manifest = read_manifest(root, verify=False)
    stored = StoredTasks.from_flat(load_file(str(root / "pretrained.safetensors")),
                                   load_file(str(root / "factors.safetensors")),
                                   load_file(str(root / "deltas.safetensors")), manifest["method"]["alpha"])
    encoder = make_runner(root / manifest["graphs"]["encoder"]["file"], threads=args.threads)
    lowrank = make_runner(root / manifest["graphs"]["lowrank"]["file"], threads=args.threads)
    linear = manifest["graphs"]["lowrank"]["linear_keys"]
    keys = [k for k in encoder.input_names if k != "pixel_values"]
    size = manifest["model"]["image_size"]
    x = np.random.default_rng(0).standard_normal((args.batch, 3, size, size), dtype=np.float32)
    rng = np.random.default_rng(0)
    sets = {n: tuple(sorted(rng.choice(stored.num_tasks, n, replace=False).tolist())) for n in (1, 2, 3)}
    with threadpool_limits(1, user_api="blas"):
        factors = {n: low_rank_inputs(stored, s, keys, linear) for n, s in sets.items()}
    base = {k: stored.pretrained[k] for k in linear}
    timed = {}

    def clock(name, call):
        start = time.perf_counter()
        call()
        timed.setdefault(name, []).append(time.perf_counter() - start)

    for _ in range(args.rounds):
        clock("plain_pass", lambda: encoder.run({"pixel_values": x, **{k: stored.pretrained[k] for k in keys}}))
        for n, task_set in sets.items():
            clock(f"lowrank_pass.size{n}", lambda: lowrank.run({"pixel_values": x, **base, **factors[n]}))
            with threadpool_limits(1, user_api="blas"):
                clock(f"prepare_lowrank.size{n}", lambda: low_rank_inputs(stored, task_set, keys, linear))
                clock(f"prepare_product.size{n}", lambda: dense_from_low_rank(stored, factors[n], linear))
    plain = statistics.median(timed["plain_pass"])
    rows = {name: {"median_s": round(statistics.median(v), 3), "time_ratio_to_plain": round(statistics.median(v) / plain, 3)}
            for name, v in timed.items()}
    for n in (1, 2, 3):
        total = statistics.median(timed[f"prepare_lowrank.size{n}"]) + statistics.median(timed[f"prepare_product.size{n}"])
        rows[f"prepare_dense.size{n}"] = {"median_s": round(total, 3), "time_ratio_to_plain": round(total / plain, 3)}
    print(json.dumps({"build": str(root), "model": manifest["model"]["name"], "tasks": len(manifest["tasks"]),
                      "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "task_sets": sets,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg(),
                      "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
