"""The first pass with its weights as constants supplied at load (what builds since 2026-12-07 do) against the same
graph taking them as inputs fed every call (the form before), side by side in one process.

    python benchmarks/constants_vs_inputs.py BUILD [--threads 2] [--rounds 5] [--batch 16] [--json OUT]

The inputs form is made from the build's own prefix graph (its constants turned back into graph inputs, as
``tests/test_first_pass_constants.py`` does) and fed theta_MT made as the runtime makes it; both run interleaved on
the same random batch, and their outputs are compared (max |diff|).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _report import report  # benchmarks/, on the path when run as a script
import onnx

from mass_export.core.manifest import read_manifest
from mass_export.core.routing import first_pass_weights
from mass_export.core.taskweights import task_set_weights
from mass_export.runtime import MassRuntime
from mass_export.runtime.backends import OrtRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    record = read_manifest(args.build)["graphs"]["prefix"]
    if not record.get("constants"):
        raise SystemExit(f"{args.build}: its prefix graph takes its weights as inputs already (an older build)")
    runtime = MassRuntime.load(args.build, threads=args.threads, calibrate=False, second_pass="dense")
    method, stored = read_manifest(args.build)["method"], runtime.stored
    constants = first_pass_weights(method["router_on"], {k: stored.pretrained[k] for k in record["constants"]},
                                   lambda: task_set_weights(stored, range(stored.num_tasks), keys=record["constants"],
                                                            base=True))
    model = onnx.load(f"{args.build}/{record['file']}", load_external_data=False)
    for tensor in [t for t in model.graph.initializer if t.name in constants]:
        model.graph.initializer.remove(tensor)
        model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    as_inputs = OrtRunner(model.SerializeToString(), ("cpu",), threads=args.threads, check=False)
    height, width = runtime.preprocessor.image_size
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, height, width)).astype(np.float32)
    calls = {"constants": lambda: runtime.runners["prefix"].run({"pixel_values": pixels})["route_feature"],
             "inputs": lambda: as_inputs.run({"pixel_values": pixels, **constants})["route_feature"]}
    outputs = {name: call() for name, call in calls.items()}  # first runs allocate
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"build": args.build, "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
              "median_seconds": {k: round(v, 4) for k, v in medians.items()},
              "constants_time_ratio_to_inputs": round(medians["constants"] / medians["inputs"], 3),
              "max_abs_diff": float(np.abs(outputs["constants"] - outputs["inputs"]).max())}
    report(result, args.json)


if __name__ == "__main__":
    main()
