"""Validation of exported graphs against the torch reference (optimum-style: atol, a max-diff table, typed error).

ONNX Runtime runs each graph fed with weights rebuilt by the numpy Gram form (``mass_export.core.taskweights``);
the reference runs torch with the SVD/polar form. So a pass checks the graphs, the Gram form and the rebuild
from stored factors at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.numpy import load_file
from tqdm.auto import tqdm

from mass_export.core import options
from mass_export.core.errors import ValidationError
from mass_export.core.lowrank import group_by_task_set, pick_heads, select_task_sets
from mass_export.core.manifest import read_manifest
from mass_export.runtime.images import sample_photos
from mass_export.core.taskweights import StoredTasks, low_rank_inputs, task_set_weights

# One batch per size, each of its own photos (1 + 3 = 4 images): every graph is compared at two batch sizes, and a
# real-size build validates in a small fraction of its build time (each image costs several tower passes).
BATCH_SIZES = (1, 3)
# Dense weight sets (a tower each) held at once by the validation; the reference holds one more (build.py).
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


def head_slice(manifest: dict, task_index: int) -> slice:
    record = manifest["heads"][manifest["tasks"][task_index]]
    return slice(record["offset"], record["offset"] + record["classes"])


def _session(root: Path, record: dict) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(root / record["file"]), options, providers=["CPUExecutionProvider"])


def _run(session, feeds: dict) -> list[np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})


def max_abs_diff(a, b) -> float:
    """max |a - b|, NaN when either side holds NaN/Inf anywhere (np.abs(...).max() alone would let an Inf pair
    through as NaN only by luck, and Python's max() drops NaN: ``max(0.0, nan) == 0.0``)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.abs(a - b).max()) if a.size else 0.0


def worse(current: float, new: float) -> float:
    """The larger of two differences, NaN as soon as either is NaN (NaN must never pass a check)."""
    return float("nan") if np.isnan(current) or np.isnan(new) else max(current, new)


class _LowRankCheck:
    """The low-rank encoder graph fed as the runtime feeds it: theta_pre for the linear weights, the set's
    factors (Gram form) and dense theta(S) for the other keys."""

    def __init__(self, manifest: dict, stored: StoredTasks, graphs: dict):
        self.session, self.stored = graphs["lowrank"], stored
        record = manifest["graphs"]["lowrank"]
        self.linear = record["linear_keys"]
        self.keys = [k for k in record["inputs"] if k != "pixel_values" and not k.endswith((".A", ".B"))]
        self.cache: dict = {}

    def features(self, pixels: np.ndarray, task_set) -> np.ndarray:
        if task_set not in self.cache:
            if len(self.cache) >= 2:
                self.cache.pop(next(iter(self.cache)))
            inputs = low_rank_inputs(self.stored, task_set, self.keys, self.linear)
            inputs.update({k: self.stored.pretrained[k] for k in self.linear})
            self.cache[task_set] = inputs
        return _run(self.session, {"pixel_values": pixels, **self.cache[task_set]})[0]


def validate_build(root: Path, reference, atol: float = options.default("atol"), images=(), batch_sizes=BATCH_SIZES,
                   progress: bool = True) -> dict:
    """Compare every graph and the end-to-end predictions with the reference; raise ValidationError on failure."""
    root = Path(root)
    manifest = read_manifest(root)
    pixels = pixel_batch((list(images) or sample_photos())[:sum(batch_sizes)], manifest["model"])
    setup = tqdm(total=3, desc="validation: loading the build", unit="step", disable=not progress)
    stored = StoredTasks.from_flat(load_file(str(root / "pretrained.safetensors")),
                                   load_file(str(root / "factors.safetensors")),
                                   load_file(str(root / "deltas.safetensors")), manifest["method"]["alpha"])
    heads = load_file(str(root / "heads.safetensors"))["heads"]
    setup.update()
    setup.set_description("validation: ONNX Runtime sessions")
    graphs = {name: _session(root, record) for name, record in manifest["graphs"].items()}
    setup.update()
    setup.set_description("validation: theta_MT (Gram form)")
    every = range(stored.num_tasks)
    theta_mt = (stored.pretrained if manifest["method"]["router_on"] == "pretrained"
                else task_set_weights(stored, every, keys=manifest["graphs"]["prefix"]["inputs"], base=True))
    setup.update()
    setup.close()
    layer = manifest["method"]["routing_layer"]
    basis = stored.factors[f"transformer.resblocks.{layer}.mlp.c_fc.weight"]["V"].astype(np.float32)
    diffs = {name: 0.0 for name in ("prefix", "router", "encoder", "heads", "end_to_end")}
    lowrank = _LowRankCheck(manifest, stored, graphs) if "lowrank" in graphs else None
    if lowrank:
        diffs["lowrank"] = 0.0
    mismatched_sets, mismatched_predictions, weight_cache = [], [], {}
    eta, top_k = manifest["method"]["eta"], manifest["method"]["top_k"]
    starts = [sum(batch_sizes[:i]) for i in range(len(batch_sizes))]
    steps = [(b, s if s + b <= len(pixels) else 0) for b, s in zip(batch_sizes, starts)]  # few images given: reuse
    for batch_size, start in tqdm(steps, desc="validating graphs", unit="batch", disable=not progress):
        x = pixels[start:start + batch_size]
        feeds = {"pixel_values": x.numpy()}
        feature = _run(graphs["prefix"], {**feeds, **theta_mt})[0]
        ref_feature = reference.route_feature(x)
        diffs["prefix"] = worse(diffs["prefix"], max_abs_diff(feature, ref_feature.numpy()))
        ref_probs, _, ref_sets = reference.route(x)
        probs = _run(graphs["router"], {"route_feature": ref_feature.numpy(), "router_basis": basis})[0]
        diffs["router"] = worse(diffs["router"], max_abs_diff(probs, ref_probs.numpy()))
        own_probs = _run(graphs["router"], {"route_feature": feature, "router_basis": basis})[0]
        if not np.isfinite(own_probs).all():  # the graphs' own probabilities decide the task sets
            diffs["router"] = float("nan")
        own_sets = select_task_sets(own_probs, eta, top_k) if stored.num_tasks > 1 else [(0,)] * len(x)
        mismatched_sets += [start + i for i, (a, b) in enumerate(zip(own_sets, ref_sets)) if a != b]
        ref_predictions = reference.predict(x)
        for task_set, indices in group_by_task_set(ref_sets).items():
            if task_set not in weight_cache:
                if len(weight_cache) >= WEIGHT_SETS_HELD:  # a real-size tower per entry: keep memory bounded
                    weight_cache.pop(next(iter(weight_cache)))
                weight_cache[task_set] = task_set_weights(stored, task_set)
            features = _run(graphs["encoder"], {"pixel_values": x[indices].numpy(), **weight_cache[task_set]})[0]
            ref_features = reference.encode(x[indices], task_set)
            diffs["encoder"] = worse(diffs["encoder"], max_abs_diff(features, ref_features.numpy()))
            if lowrank:
                low_features = lowrank.features(x[indices].numpy(), task_set)
                diffs["lowrank"] = worse(diffs["lowrank"], max_abs_diff(low_features, ref_features.numpy()))
                low_logits = _run(graphs["heads"], {"image_features": low_features, "heads": heads})[0]
                for row, index in enumerate(indices):
                    slices = [head_slice(manifest, task) for task in task_set]
                    position, cls, _ = pick_heads([low_logits[row][s] for s in slices])
                    if (task_set[position], cls) != (ref_predictions[index].task_index,
                                                      ref_predictions[index].class_index):
                        mismatched_predictions.append(start + index)
            logits = _run(graphs["heads"], {"image_features": features, "heads": heads})[0]
            if not np.isfinite(logits).all():  # every head's logits, not only the winner's compared below
                diffs["heads"] = float("nan")
            ref_logits = _run(graphs["heads"], {"image_features": ref_features.numpy(), "heads": heads})[0]
            torch_logits = torch.nn.functional.normalize(ref_features, dim=-1) @ torch.from_numpy(heads).T
            diffs["heads"] = worse(diffs["heads"], max_abs_diff(ref_logits, torch_logits.numpy()))
            for row, index in enumerate(indices):
                slices = [head_slice(manifest, task) for task in task_set]
                position, cls, _ = pick_heads([logits[row][s] for s in slices])
                prediction = ref_predictions[index]
                winner = logits[row][head_slice(manifest, prediction.task_index)]
                diffs["end_to_end"] = worse(diffs["end_to_end"], max_abs_diff(winner, prediction.logits.numpy()))
                if (task_set[position], cls) != (prediction.task_index, prediction.class_index):
                    mismatched_predictions.append(start + index)
    table = [{"graph": name, "max_abs_diff": value, "atol": atol, "ok": bool(np.isfinite(value) and value <= atol)} for name, value in diffs.items()]
    report = {"atol": atol, "images": len(pixels), "batch_sizes": list(batch_sizes),
              "max_abs_diff": {name: value if np.isfinite(value) else None for name, value in diffs.items()},
              "task_sets_identical": not mismatched_sets, "predictions_identical": not mismatched_predictions,
              "passed": all(row["ok"] for row in table) and not mismatched_sets and not mismatched_predictions}
    if not report["passed"]:
        lines = [f"  {row['graph']:<11} max|diff| {row['max_abs_diff']:.3e}  {'ok' if row['ok'] else 'FAIL'}"
                 for row in table]
        if mismatched_sets:
            lines.append(f"  task sets differ for images {sorted(set(mismatched_sets))[:10]}")
        if mismatched_predictions:
            lines.append(f"  predicted classes differ for images {sorted(set(mismatched_predictions))[:10]}")
        raise ValidationError(f"{root}: exported graphs disagree with the torch reference (atol {atol}):\n"
                              + "\n".join(lines), table)
    return report
