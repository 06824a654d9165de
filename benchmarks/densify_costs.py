"""Making a task set's dense weights from its cores: the densify graph (ONNX Runtime) against the numpy products,
side by side in one process, as ratios to one batch-16 pass of the encoder graph (fed theta_pre).

    python benchmarks/densify_costs.py BUILD [--threads 2] [--rounds 3] [--json OUT]

Each round draws a fresh task set of 1, 2 and 3 tasks (seeded), prepares its low-rank inputs (cores; not timed
here) and times both forms on it, then one encoder pass on a batch of 16. Both forms' weights are compared
(max |diff|). Preparation runs on one BLAS thread for numpy, as in the runtime; the graph on ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _report import report  # benchmarks/, on the path when run as a script

from mass_export.core.taskweights import dense_from_low_rank
from mass_export.runtime import MassRuntime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    runtime = MassRuntime.load(args.build, threads=args.threads, calibrate=False)
    if "densify" not in runtime.runners:
        raise SystemExit(f"{args.build}: no densify graph (built before 2026-12-07?)")
    rng = np.random.default_rng(0)
    height, width = runtime.preprocessor.image_size
    pixels = rng.standard_normal((16, 3, height, width)).astype(np.float32)
    plain = runtime.stored.pretrained
    feeds = {"pixel_values": pixels, **{k: plain[k] for k in runtime.encoder_keys}}
    runtime.runners["encoder"].run(feeds)  # first runs allocate
    times = {f"{form}.size{n}": [] for n in (1, 2, 3) for form in ("numpy", "graph")}
    times["encoder_batch16"] = []
    worst = 0.0
    for _ in range(args.rounds):
        for size in (1, 2, 3):
            task_set = tuple(sorted(rng.choice(runtime.num_tasks, size, replace=False).tolist()))
            inputs = runtime.prepare_factors(task_set, reuse_cores=False)
            with runtime.preparation_threads():
                started = time.perf_counter()
                by_numpy = dense_from_low_rank(runtime.stored, inputs, runtime._linear_keys)
                times[f"numpy.size{size}"].append(time.perf_counter() - started)
            started = time.perf_counter()
            by_graph = runtime._densify(inputs)
            times[f"graph.size{size}"].append(time.perf_counter() - started)
            worst = max(worst, max(float(np.abs(by_graph[k] - by_numpy[k]).max()) for k in by_numpy))
        started = time.perf_counter()
        runtime.runners["encoder"].run(feeds)
        times["encoder_batch16"].append(time.perf_counter() - started)
    plain_s = statistics.median(times["encoder_batch16"])
    result = {"build": args.build, "threads": args.threads, "rounds": args.rounds,
              "median_seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
              "ratio_to_encoder_batch16": {k: round(statistics.median(v) / plain_s, 3) for k, v in times.items()},
              "max_abs_diff_graph_vs_numpy": worst}
    report(result, args.json)


if __name__ == "__main__":
    main()
