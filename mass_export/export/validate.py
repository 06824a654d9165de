"""Validation of exported graphs against the torch reference (optimum-style: atol, a max-diff table, typed error).

ONNX Runtime runs each graph fed with weights rebuilt by the numpy Gram form (``mass_export.core.taskweights``);
the reference runs torch with the SVD/polar form. So a pass checks the graphs, the Gram form and the rebuild
from stored factors at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from tqdm.auto import tqdm

from mass_export.core import options
from mass_export.core.compare import Comparison, finite_or_nan, max_abs_diff, worse, worst_per_graph
from mass_export.core.errors import ValidationError
from mass_export.core.lowrank import pick_heads, select_task_sets
from mass_export.core.manifest import head_slices, read_manifest
from mass_export.core.memory import return_freed_memory
from mass_export.core.routing import first_pass_weights, router_basis_key
from mass_export.core.taskweights import (TASKS_INPUT, StoredTasks, factor_input_names, low_rank_inputs,
                                         low_rank_stacks, task_set_weights)
from mass_export.runtime.backends import OrtRunner
from mass_export.runtime.images import sample_photos

# One batch per size, each of its own photos (1 + 3 = 4 images): every graph is compared at two batch sizes, and a
# real-size build validates in a small fraction of its build time (each image costs several tower passes).
BATCH_SIZES = (1, 3)
# Dense weight sets (a tower each) held at once by the validation; the reference holds one more (build.py). The
# second pass is compared task set by task set across every batch, so one each is enough and none is made twice.
WEIGHT_SETS_HELD = 1


def pixel_batch(images, preprocess: dict) -> torch.Tensor:
    """Preprocess with open_clip's own eval transform: the reference for the runtime's numpy version."""
    from open_clip.transform import image_transform
    from PIL import Image

    transform = image_transform(preprocess["image_size"], is_train=False, mean=tuple(preprocess["mean"]),
                                std=tuple(preprocess["std"]), interpolation=preprocess.get("interpolation", "bicubic"),
                                resize_mode=preprocess.get("resize_mode", "shortest"))
    loaded = [Image.open(p) if isinstance(p, (str, Path)) else p for p in images]
    return torch.stack([transform(image) for image in loaded])


def _session(root: Path, record: dict, constants: dict) -> OrtRunner:
    """The runtime's runner of one graph on CPU, its constants (if any) taken from ``constants``."""
    return OrtRunner(root / record["file"], ("cpu",), check=False,
                     constants={name: constants[name] for name in record.get("constants", ())})


def _run(runner: OrtRunner, feeds: dict) -> list[np.ndarray]:
    return list(runner.run({k: v for k, v in feeds.items() if k in runner.input_names}).values())


class _LowRankCheck:
    """The low-rank encoder graph fed as the runtime feeds it: theta_pre for the linear weights and the build's
    factor stacks (once), the set's task indices, cores and dense theta(S) for the other keys."""

    def __init__(self, manifest: dict, stored: StoredTasks, graphs: dict):
        self.session, self.stored = graphs["lowrank"], stored
        self.densify = graphs.get("densify")
        record = manifest["graphs"]["lowrank"]
        self.linear = record["linear_keys"]
        factor_inputs = {name for key in record["factor_keys"] for name in factor_input_names(key)}
        self.keys = [k for k in record["inputs"] if k not in ("pixel_values", TASKS_INPUT) and k not in factor_inputs]
        # theta_pre's linear weights and every task's factor stacks: fed to the lowrank and densify graphs alike
        self.shared = {**low_rank_stacks(stored, record["factor_keys"]),
                       **{k: stored.pretrained[k] for k in self.linear}}
        self.cache: dict = {}

    def densify_diff(self, task_set, dense: dict) -> float | None:
        """Worst |difference| between the densify graph's linear weights and ``dense`` (the numpy Gram form), or
        None when the build has no densify graph or the set runs dense (call ``features`` first)."""
        if self.densify is None or self.cache.get(task_set) is None:
            return None
        made = _run(self.densify, {**self.shared, **self.cache[task_set]})
        return max(max_abs_diff(weight, dense[key]) for key, weight in zip(self.linear, made))

    def features(self, pixels: np.ndarray, task_set) -> np.ndarray | None:
        """The graph's features, or None for a set the runtime runs dense (an ill-conditioned key)."""
        if task_set not in self.cache:
            self.cache.clear()  # sets come one after another (validate_build): one set's inputs held at a time
            self.cache[task_set] = low_rank_inputs(self.stored, task_set, self.keys, self.linear)
        if self.cache[task_set] is None:
            return None
        return _run(self.session, {"pixel_values": pixels, **self.shared, **self.cache[task_set]})[0]


GRAPHS_COMPARED = ("prefix", "router", "encoder", "heads", "end_to_end")


@dataclass
class BuildUnderTest:
    """What the validation feeds the graphs: the build's stored parts, rebuilt as the runtime rebuilds them."""

    manifest: dict
    stored: StoredTasks
    heads: np.ndarray
    graphs: dict  # name -> OrtRunner
    theta_mt: dict
    basis: np.ndarray
    slices: list[slice]
    lowrank: _LowRankCheck | None
    weights: dict = field(default_factory=dict)  # task set -> dense theta(S), at most WEIGHT_SETS_HELD

    def task_set_weights(self, task_set) -> dict:
        """Dense theta(S) by the numpy Gram form, as the encoder graph is fed at run time."""
        if task_set not in self.weights:
            if len(self.weights) >= WEIGHT_SETS_HELD:  # a real-size tower per entry: keep memory bounded
                self.weights.pop(next(iter(self.weights)))
            self.weights[task_set] = task_set_weights(self.stored, task_set)
        return self.weights[task_set]

    def heads_logits(self, features) -> np.ndarray:
        """Every head's logits from the heads graph."""
        return _run(self.graphs["heads"], {"image_features": features, "heads": self.heads})[0]

    def pick(self, logits_row, task_set) -> tuple[int, int]:
        """(task, class) the runtime predicts from a row of every head's logits (runtime's pick_heads)."""
        position, cls, _ = pick_heads([logits_row[self.slices[task]] for task in task_set])
        return task_set[position], cls


def load_stored(root: Path, manifest: dict) -> tuple[StoredTasks, np.ndarray]:
    """A build's stored parts as the runtime reads them (safetensors into numpy): (StoredTasks, heads)."""
    stored = StoredTasks.from_flat(load_file(str(root / "pretrained.safetensors")),
                                   load_file(str(root / "factors.safetensors")),
                                   load_file(str(root / "deltas.safetensors")), manifest["method"]["alpha"])
    return stored, load_file(str(root / "heads.safetensors"))["heads"]


def open_build(root: Path, progress: bool, stored: tuple[StoredTasks, np.ndarray] | None = None) -> BuildUnderTest:
    """The build's parts and an ONNX Runtime session per graph; theta_MT made once (unless routing on theta_pre).
    ``stored``: (StoredTasks, heads) already in memory and known equal to the build's files; read from them if None."""
    manifest = read_manifest(root)
    setup = tqdm(total=3, desc="validation: loading the build", unit="step", disable=not progress)
    stored, heads = stored if stored is not None else load_stored(root, manifest)
    setup.update()
    setup.set_description("validation: theta_MT (Gram form)")
    prefix = manifest["graphs"]["prefix"]
    theta_mt = first_pass_weights(manifest["method"]["router_on"], stored.pretrained, lambda: task_set_weights(
        stored, range(stored.num_tasks), keys=prefix.get("constants", prefix["inputs"]), base=True))
    setup.update()
    setup.set_description("validation: ONNX Runtime sessions")
    graphs = {name: _session(root, record, theta_mt if name == "prefix" else {})  # the prefix's constants
              for name, record in manifest["graphs"].items()}
    setup.update()
    setup.close()
    basis = stored.factors[router_basis_key(manifest["method"]["routing_layer"])]["V"].astype(np.float32)
    lowrank = _LowRankCheck(manifest, stored, graphs) if "lowrank" in graphs else None
    return BuildUnderTest(manifest, stored, heads, graphs, theta_mt, basis, head_slices(manifest), lowrank)


class _Diffs(dict):
    """graph -> worst difference so far in this batch (NaN-aware)."""

    def note(self, graph: str, value: float) -> None:
        self[graph] = worse(self.get(graph, 0.0), value)


def compare_routing(build: BuildUnderTest, reference, x: torch.Tensor, diffs: _Diffs) -> tuple[list, list, torch.Tensor]:
    """The prefix and router graphs against the reference; returns (the graphs' task sets, the reference's, the
    reference's router probabilities)."""
    feature = _run(build.graphs["prefix"], {"pixel_values": x.numpy(), **build.theta_mt})[0]
    ref_feature = reference.route_feature(x)
    diffs.note("prefix", max_abs_diff(feature, ref_feature.numpy()))
    ref_probs, _, ref_sets = reference.route(x)
    probs = _run(build.graphs["router"], {"route_feature": ref_feature.numpy(), "router_basis": build.basis})[0]
    diffs.note("router", max_abs_diff(probs, ref_probs.numpy()))
    own_probs = _run(build.graphs["router"], {"route_feature": feature, "router_basis": build.basis})[0]
    diffs.note("router", finite_or_nan(own_probs))  # the graphs' own probabilities decide the task sets
    manifest = build.manifest
    own_sets = (select_task_sets(own_probs, manifest["method"]["eta"], manifest["method"]["top_k"])
                if build.stored.num_tasks > 1 else [(0,)] * len(x))
    return own_sets, ref_sets, ref_probs


def compare_group(build: BuildUnderTest, reference, x: torch.Tensor, task_set, indices, ref_probs,
                  diffs: _Diffs) -> list[int]:
    """The second pass (dense and low-rank encoder graphs) and the heads graph on the images of one task set;
    returns the indices (within the batch) whose predicted task or class differs from the reference's."""
    mismatched = []
    features = _run(build.graphs["encoder"], {"pixel_values": x[indices].numpy(),
                                              **build.task_set_weights(task_set)})[0]
    ref_features = reference.encode(x[indices], task_set)
    diffs.note("encoder", max_abs_diff(features, ref_features.numpy()))
    ref_predictions = reference.classify(ref_features, task_set, ref_probs[indices])
    expected = [(prediction.task_index, prediction.class_index) for prediction in ref_predictions]
    low_features = build.lowrank.features(x[indices].numpy(), task_set) if build.lowrank else None
    if low_features is not None:
        diffs.note("lowrank", max_abs_diff(low_features, ref_features.numpy()))
        densify_diff = build.lowrank.densify_diff(task_set, build.task_set_weights(task_set))
        if densify_diff is not None:
            diffs.note("densify", densify_diff)
        low_logits = build.heads_logits(low_features)
        mismatched += [index for row, index in enumerate(indices)
                       if build.pick(low_logits[row], task_set) != expected[row]]
    logits = build.heads_logits(features)
    diffs.note("heads", finite_or_nan(logits))  # every head's logits, not only the winner's compared below
    ref_logits = build.heads_logits(ref_features.numpy())
    torch_logits = torch.nn.functional.normalize(ref_features, dim=-1) @ torch.from_numpy(build.heads).T
    diffs.note("heads", max_abs_diff(ref_logits, torch_logits.numpy()))
    for row, (index, prediction) in enumerate(zip(indices, ref_predictions)):
        winner = logits[row][build.slices[prediction.task_index]]
        diffs.note("end_to_end", max_abs_diff(winner, prediction.logits.numpy()))
        if build.pick(logits[row], task_set) != expected[row]:
            mismatched.append(index)
    return mismatched


@dataclass
class RoutedBatch:
    """One batch once routed: its images, the reference's routing, and what differed so far."""

    start: int
    x: torch.Tensor
    ref_probs: torch.Tensor
    ref_sets: list
    diffs: _Diffs
    mismatched_sets: list[int]
    mismatched_predictions: list[int] = field(default_factory=list)

    def comparisons(self, atol: float) -> list[Comparison]:
        return [Comparison(graph, len(self.x), value, atol) for graph, value in self.diffs.items()]


def route_batch(build: BuildUnderTest, reference, x: torch.Tensor, start: int) -> RoutedBatch:
    """The first pass of one batch compared (prefix and router graphs), its task sets kept for the second."""
    diffs = _Diffs()
    own_sets, ref_sets, ref_probs = compare_routing(build, reference, x, diffs)
    mismatched = [start + i for i, (a, b) in enumerate(zip(own_sets, ref_sets)) if a != b]
    return RoutedBatch(start, x, ref_probs, ref_sets, diffs, mismatched)


def compare_second_pass(build: BuildUnderTest, reference, routed: list[RoutedBatch], progress: bool) -> None:
    """Every task set the reference chose, set by set across all batches: each set's dense weights are made once
    on each side and at most one set is held on each (a tower each)."""
    task_sets = list(dict.fromkeys(s for batch in routed for s in batch.ref_sets))
    for task_set in tqdm(task_sets, desc="validating the second pass", unit="task set", disable=not progress):
        for batch in routed:
            indices = [i for i, s in enumerate(batch.ref_sets) if s == task_set]
            if indices:
                mismatched = compare_group(build, reference, batch.x, task_set, indices, batch.ref_probs, batch.diffs)
                batch.mismatched_predictions += [batch.start + i for i in mismatched]


def batches(pixels: torch.Tensor, batch_sizes) -> list[tuple[int, int]]:
    """(size, start) of each batch: consecutive images, or the first ones again when too few were given."""
    starts = [sum(batch_sizes[:i]) for i in range(len(batch_sizes))]
    return [(b, s if s + b <= len(pixels) else 0) for b, s in zip(batch_sizes, starts)]


def report_of(comparisons: list[Comparison], mismatched_sets, mismatched_predictions, atol: float, images: int,
              batch_sizes, graphs) -> dict:
    """The manifest's ``validation`` section (worst difference per graph, null when NaN) and every comparison."""
    worst = worst_per_graph(comparisons, graphs)
    return {"atol": atol, "images": images, "batch_sizes": list(batch_sizes),
            "max_abs_diff": {name: value if np.isfinite(value) else None for name, value in worst.items()},
            "task_sets_identical": not mismatched_sets, "predictions_identical": not mismatched_predictions,
            "passed": all(c.passed for c in comparisons) and not mismatched_sets and not mismatched_predictions,
            "comparisons": [c.record() for c in comparisons]}


def failure(root: Path, report: dict, mismatched_sets, mismatched_predictions) -> ValidationError:
    """The error naming every graph's worst difference and the images that disagree."""
    atol = report["atol"]
    table = [{"graph": name, "max_abs_diff": float("nan") if value is None else value, "atol": atol,
              "ok": value is not None and value <= atol} for name, value in report["max_abs_diff"].items()]
    lines = [f"  {row['graph']:<11} max|diff| {row['max_abs_diff']:.3e}  {'ok' if row['ok'] else 'FAIL'}"
             for row in table]
    if mismatched_sets:
        lines.append(f"  task sets differ for images {sorted(set(mismatched_sets))[:10]}")
    if mismatched_predictions:
        lines.append(f"  predicted classes differ for images {sorted(set(mismatched_predictions))[:10]}")
    return ValidationError(f"{root}: exported graphs disagree with the torch reference (atol {atol}):\n"
                           + "\n".join(lines), table)


def validate_build(root: Path, reference, atol: float = options.default("atol"), images=(), batch_sizes=BATCH_SIZES,
                   progress: bool = True, stored: tuple[StoredTasks, np.ndarray] | None = None) -> dict:
    """Compare every graph and the end-to-end predictions with the reference; raise ValidationError on failure.
    ``stored``: the build's parts already in memory (the build passes what it wrote, checked equal to the files)."""
    root = Path(root)
    build = open_build(root, progress, stored)
    pixels = pixel_batch((list(images) or sample_photos())[:sum(batch_sizes)], build.manifest["model"])
    graphs = (GRAPHS_COMPARED + (("lowrank",) if build.lowrank else ())
              + (("densify",) if build.lowrank and build.lowrank.densify else ()))
    routed = [route_batch(build, reference, pixels[start:start + size], start)
              for size, start in tqdm(batches(pixels, batch_sizes), desc="validating the router", unit="batch",
                                      disable=not progress)]
    # Every image is routed: free both sides' theta_MT before the second pass makes its towers (the prefix
    # graph's session holds it as constants).
    build.theta_mt = None
    del build.graphs["prefix"]
    reference.release_first_pass()
    return_freed_memory()
    compare_second_pass(build, reference, routed, progress)
    comparisons = [c for batch in routed for c in batch.comparisons(atol)]
    mismatched_sets = [i for batch in routed for i in batch.mismatched_sets]
    mismatched_predictions = [i for batch in routed for i in batch.mismatched_predictions]
    report = report_of(comparisons, mismatched_sets, mismatched_predictions, atol, len(pixels), batch_sizes, graphs)
    if not report["passed"]:
        raise failure(root, report, mismatched_sets, mismatched_predictions)
    return report
