"""ViT-B-16 second-pass costs in one process, interleaved round by round: a dense encoder pass (the plain pass's
cost: same graph, theta_pre fed), the low-rank encoder pass for a 1/2/3-task set, and preparing a new random set
of each size, with and without the Gram-block store, with 1 or 2 BLAS threads.

    python benchmarks/second_pass_costs.py BUILD --threads 2 --rounds 3 > results/second_pass_costs_vit_b16.json

Preparation rows (ratio to the plain pass of the same rounds):
  prepare_lowrank.sizeN.no_store   the factors as before the store (Gram matrices by m x Sk x Sk products)
  prepare_lowrank.sizeN.store      the factors with every pair's Gram blocks in the store (a runtime's steady state)
  prepare_lowrank.sizeN.store.blas2  the same with 2 BLAS threads instead of 1
  prepare_lowrank.sizeN.cores      the factors from the set's kept TSV-M cores (an evicted set coming back)
  prepare_product.sizeN            dense weights from ready factors (float32 products into theta_pre)
  prepare_dense.sizeN.*            factors + product, i.e. what a miss on dense weights costs
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
from mass_export.core.lowrank import LOW_RANK_GRAPH_SPREAD
from mass_export.core.taskweights import (GramBlocks, StoredTasks, dense_from_low_rank, low_rank_inputs,
                                         low_rank_stacks, task_set_cores)
from mass_export.runtime.backends import make_runner


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-lowrank-passes", action="store_true", help="time only the plain pass and preparation")
    args = parser.parse_args()
    root = args.build
    manifest = read_manifest(root, verify=False)
    stored = StoredTasks.from_flat(load_file(str(root / "pretrained.safetensors")),
                                   load_file(str(root / "factors.safetensors")),
                                   load_file(str(root / "deltas.safetensors")), manifest["method"]["alpha"])
    encoder = make_runner(root / manifest["graphs"]["encoder"]["file"], threads=args.threads)
    lowrank = None if args.no_lowrank_passes else make_runner(root / manifest["graphs"]["lowrank"]["file"],
                                                              threads=args.threads)
    linear = manifest["graphs"]["lowrank"]["linear_keys"]
    keys = [k for k in encoder.input_names if k != "pixel_values"]
    size = manifest["model"]["image_size"]
    x = np.random.default_rng(0).standard_normal((args.batch, 3, size, size), dtype=np.float32)
    rng = np.random.default_rng(0)
    store = GramBlocks(stored)
    started = time.perf_counter()
    with threadpool_limits(1, user_api="blas"):
        for factor_key in stored.factors:  # every pair's blocks, as a runtime holds them once the pairs were seen
            store.grams(factor_key, list(range(stored.num_tasks)))
    fill_seconds = time.perf_counter() - started
    fixed = {n: tuple(sorted(rng.choice(stored.num_tasks, n, replace=False).tolist())) for n in (1, 2, 3)}
    with threadpool_limits(1, user_api="blas"):
        factors = {n: low_rank_inputs(stored, s, keys, linear, store) for n, s in fixed.items()}
    base = {**{k: stored.pretrained[k] for k in linear},
            **low_rank_stacks(stored, manifest["graphs"]["lowrank"]["factor_keys"])}
    timed, drawn = {}, {n: [] for n in (1, 2, 3)}

    def clock(name, call, blas=1):
        with threadpool_limits(blas, user_api="blas"):
            start = time.perf_counter()
            call()
            timed.setdefault(name, []).append(time.perf_counter() - start)

    for _ in range(args.rounds):
        clock("plain_pass", lambda: encoder.run({"pixel_values": x, **{k: stored.pretrained[k] for k in keys}}))
        for n in (1, 2, 3):
            task_set = tuple(sorted(rng.choice(stored.num_tasks, n, replace=False).tolist()))  # new each round
            drawn[n].append(task_set)
            if lowrank is not None:
                clock(f"lowrank_pass.size{n}", lambda: lowrank.run({"pixel_values": x, **base, **factors[n]}))
            clock(f"prepare_lowrank.size{n}.no_store", lambda: low_rank_inputs(stored, task_set, keys, linear))
            clock(f"prepare_lowrank.size{n}.store", lambda: low_rank_inputs(stored, task_set, keys, linear, store))
            clock(f"prepare_lowrank.size{n}.store.blas2",
                  lambda: low_rank_inputs(stored, task_set, keys, linear, store), blas=2)
            with threadpool_limits(1, user_api="blas"):
                cores = task_set_cores(stored, task_set, linear, blocks=store, well_conditioned=LOW_RANK_GRAPH_SPREAD)
            clock(f"prepare_lowrank.size{n}.cores",
                  lambda: low_rank_inputs(stored, task_set, keys, linear, store, cores))
            clock(f"prepare_product.size{n}", lambda: dense_from_low_rank(stored, factors[n], linear))
    plain = statistics.median(timed["plain_pass"])
    rows = {name: {"median_s": round(statistics.median(v), 3), "time_ratio_to_plain": round(statistics.median(v) / plain, 3)}
            for name, v in timed.items()}
    for n in (1, 2, 3):
        product = statistics.median(timed[f"prepare_product.size{n}"])
        for form in ("no_store", "store", "cores"):
            total = statistics.median(timed[f"prepare_lowrank.size{n}.{form}"]) + product
            rows[f"prepare_dense.size{n}.{form}"] = {"median_s": round(total, 3),
                                                     "time_ratio_to_plain": round(total / plain, 3)}
    print(json.dumps({"build": str(root), "model": manifest["model"]["name"], "tasks": len(manifest["tasks"]),
                      "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "task_sets": drawn,
                      "gram_store": {**store.info(), "fill_seconds": round(fill_seconds, 2)},
                      "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg(),
                      "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
