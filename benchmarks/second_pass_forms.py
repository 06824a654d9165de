"""Which second-pass graph form is fastest on ONNX Runtime? (the measurement behind docs/build-format.md)

Forms, all for a ViT tower with random weights (speed does not depend on values), 3 selected tasks of 8:
  plain      the tower with its weights as constants (the floor: one ordinary encoder pass)
  inputs     the tower whose weights are graph inputs, fed a task set's dense weights prepared once by the
             runtime (what mass-export ships)
  in_graph   the tower fed theta_pre plus per-matrix factors A (m, R), B (R, n); W + A @ B computed in the graph
  prefix     the first pass: early exit at the router tap (for the two-pass total)
Variants run interleaved and are reported as ratios to `plain` measured in the same rounds.

    python benchmarks/second_pass_forms.py --model ViT-B-16 --threads 2 --batch-sizes 1,16 --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import open_clip
import torch

from mass_export.nn.tower import FullTower, run_with
from mass_export.export.graphs import _export, _rename_inputs, export_tower


class MergedInGraph(torch.nn.Module):
    def __init__(self, visual, low_rank_keys):
        super().__init__()
        self.tower, self.low_rank_keys = FullTower(visual), list(low_rank_keys)

    def forward(self, pixel_values, weights: dict, factors_a: dict, factors_b: dict):
        merged = dict(weights)
        for key in self.low_rank_keys:
            merged[key] = weights[key] + factors_a[key] @ factors_b[key]
        return run_with(self.tower, merged, pixel_values)


def export_plain(visual, path):
    batch = torch.export.Dim("batch", min=1, max=4096)
    _export(FullTower(visual).eval(), (torch.zeros(2, 3, 224, 224),), None, path, ["image_features"],
            {"images": {0: batch}}, 18)


def export_in_graph(visual, weights, rank, path):
    keys2d = [k for k, v in weights.items() if v.ndim == 2]
    a = {k: torch.zeros(weights[k].shape[0], rank) for k in keys2d}
    b = {k: torch.zeros(rank, weights[k].shape[1]) for k in keys2d}
    batch = torch.export.Dim("batch", min=1, max=4096)
    _export(MergedInGraph(visual, keys2d).eval(), (torch.zeros(2, 3, 224, 224),),
            {"weights": weights, "factors_a": a, "factors_b": b}, path, ["image_features"],
            {"pixel_values": {0: batch}, "weights": {k: None for k in weights},
             "factors_a": {k: None for k in keys2d}, "factors_b": {k: None for k in keys2d}}, 18)
    renames = {"weights_" + k.replace(".", "_"): k for k in weights}
    renames.update({"factors_a_" + k.replace(".", "_"): k + ".A" for k in keys2d})
    renames.update({"factors_b_" + k.replace(".", "_"): k + ".B" for k in keys2d})
    _rename_inputs(path, renames)
    return {**{k + ".A": v.numpy() + 0.01 for k, v in a.items()}, **{k + ".B": v.numpy() for k, v in b.items()}}


def session(path, threads, constants=None):
    """constants: the graph's weights supplied at load (the prefix's), as the runtime supplies them."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in (constants or {}).values()]
    if values:
        options.add_external_initializers(list(constants), values)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])  # it copied the values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--selected", type=int, default=3)
    parser.add_argument("--routing-layer", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    visual = open_clip.create_model(args.model).visual.eval()
    weights = {k: v.detach() for k, v in visual.state_dict().items()}
    rank = args.selected * (visual.transformer.width // args.tasks)
    feeds_w = {k: v.numpy() for k, v in weights.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_plain(visual, tmp / "plain.onnx")
        export_tower(visual, weights, tmp / "inputs.onnx", layer=None)
        prefix_constants = export_tower(visual, weights, tmp / "prefix.onnx", layer=args.routing_layer)["constants"]
        factor_feeds = export_in_graph(visual, weights, rank, tmp / "in_graph.onnx")
        sessions = {name: session(tmp / f"{name}.onnx", args.threads) for name in ("plain", "inputs", "in_graph")}
        sessions["prefix"] = session(tmp / "prefix.onnx", args.threads, {k: feeds_w[k] for k in prefix_constants})
        results = []
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            feeds = {"plain": {"images": x}, "inputs": {"pixel_values": x, **feeds_w},
                     "in_graph": {"pixel_values": x, **feeds_w, **factor_feeds}, "prefix": {"pixel_values": x, **feeds_w}}
            for name, s in sessions.items():  # warm-up
                wanted = {i.name for i in s.get_inputs()}
                feeds[name] = {k: v for k, v in feeds[name].items() if k in wanted}
                s.run(None, feeds[name])
            times = {name: [] for name in sessions}
            for _ in range(args.rounds):
                for name, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, feeds[name])
                    times[name].append(time.perf_counter() - start)
            plain = statistics.median(times["plain"])
            for name, values in times.items():
                median = statistics.median(values)
                results.append({"batch": batch, "form": name, "median_s": round(median, 4),
                                "images_per_s": round(batch / median, 2), "ratio_to_plain": round(median / plain, 3)})
                print(json.dumps(results[-1]))
    record = {"model": args.model, "threads": args.threads, "tasks": args.tasks, "selected": args.selected,
              "rank_in_graph": rank, "machine": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count(),
              "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"second_pass_forms_{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
