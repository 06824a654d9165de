"""`mass-export eval`: what MASS buys over the alternatives, on a build directory and labelled test images.

Every method is scored on the same preprocessed images. MASS runs through the torch reference (the oracle) and
through the exported runtime; a MASS prediction counts only when both task and class are right ("strict"), and
the authors' metric (the winning head's logits padded or trimmed to the true task's class count, so a wrong
head can score by index coincidence) is reported beside it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mass_export.core.manifest import read_manifest

SCHEMA = "mass-export/eval/1"


@dataclasses.dataclass
class TestSet:
    task: str
    pixels: torch.Tensor  # (N, 3, H, W), preprocessed as the runtime does
    labels: np.ndarray


def folder_test_sets(data: Path, tasks, classes: dict, preprocessor) -> list[TestSet]:
    """Images under DATA/<task>/<class name>/* (the layout `mass-export demo` writes)."""
    from mass_export.runtime.images import as_image

    sets = []
    for task in tasks:
        pixels, labels = [], []
        for index, name in enumerate(classes[task]):
            for path in sorted((data / task / name.replace("/", "-")).glob("*")):
                loaded = as_image(path)
                if not loaded.error:
                    pixels.append(preprocessor(loaded.image))
                    labels.append(index)
        if pixels:
            sets.append(TestSet(task, torch.from_numpy(np.stack(pixels)), np.asarray(labels)))
    return sets


def zoo_test_sets(tasks, preprocessor, limit: int | None = None) -> list[TestSet]:
    """The held-out test splits of the demo zoo's datasets."""
    from PIL import Image

    from mass_export.zoo.datasets import load_split

    sets = []
    for task in tasks:
        images, labels = load_split(task, "test")
        if limit:
            images, labels = images[:limit], labels[:limit]
        pixels = np.stack([preprocessor(Image.fromarray(image)) for image in images])
        sets.append(TestSet(task, torch.from_numpy(pixels), np.asarray(labels)))
    return sets


def _batches(pixels: torch.Tensor, size: int):
    for start in range(0, len(pixels), size):
        yield pixels[start:start + size]


@torch.no_grad()
def head_accuracy(reference, weights: dict, test: TestSet, head: torch.Tensor, batch_size: int) -> float:
    from mass_export.nn.heads import head_logits
    from mass_export.nn.tower import run_with

    predictions = torch.cat([head_logits(run_with(reference.full, weights, x), head).argmax(1)
                             for x in _batches(test.pixels, batch_size)])
    return float((predictions.numpy() == test.labels).mean())


def mass_scores(predictions, tests: list[TestSet], tasks: list[str], classes: dict) -> dict:
    """Strict and authors' accuracy per task, router task identification, mean set size and confusion."""
    num_tasks = len(tasks)
    out = {"strict": {}, "authors": {}, "router_top1": {}, "router_in_set": {}}
    confusion = np.zeros((num_tasks, num_tasks), dtype=np.int64)
    offset, set_sizes = 0, []
    for true_task, test in enumerate(tests):
        index = tasks.index(test.task)
        chunk = predictions[offset:offset + len(test.labels)]
        offset += len(test.labels)
        strict, authors, top1, in_set = [], [], [], []
        for p, label in zip(chunk, test.labels):
            task_index = p["task_index"]
            logits = np.asarray(p["logits"])[:len(classes[test.task])]  # the authors' trim (pad never wins)
            strict.append(task_index == index and p["class_index"] == label)
            authors.append(int(np.argmax(logits)) == label)
            top1.append(int(np.argmax(p["probs"])) == index)
            in_set.append(index in p["task_set"])
            confusion[index, int(np.argmax(p["probs"]))] += 1
            set_sizes.append(len(p["task_set"]))
        out["strict"][test.task] = float(np.mean(strict))
        out["authors"][test.task] = float(np.mean(authors))
        out["router_top1"][test.task] = float(np.mean(top1))
        out["router_in_set"][test.task] = float(np.mean(in_set))
    out["mean_task_set_size"] = float(np.mean(set_sizes))
    out["confusion"] = confusion.tolist()
    return out


def reference_predictions(reference, tests: list[TestSet], batch_size: int) -> list[dict]:
    rows = []
    for test in tests:
        for x in _batches(test.pixels, batch_size):
            for p in reference.predict(x):
                rows.append({"task_index": p.task_index, "class_index": p.class_index, "task_set": p.task_set,
                             "logits": p.logits.numpy(), "probs": p.probs.numpy()})
    return rows


def runtime_predictions(build_dir: Path, tests: list[TestSet], batch_size: int, tasks: list[str],
                        cache_size: int = 4) -> list[dict]:
    from mass_export.runtime import MassRuntime

    runtime = MassRuntime.load(build_dir, cache_size=cache_size)
    rows = []
    for test in tests:
        for x in _batches(test.pixels, batch_size):
            for p in runtime.predict(x.numpy()):
                rows.append({"task_index": p.task_index, "class_index": p.class_index,
                             "task_set": tuple(tasks.index(t) for t in p.task_set),
                             "probs": np.array([p.probs[t] for t in tasks])})
    return rows


def cache_budget(build_dir: Path, num_tasks: int, budget_bytes: int = 4 << 30) -> int:
    """Task sets to keep merged while scoring thousands of images: every possible set for small towers, as many
    as fit in ~4 GiB for big ones (re-merging a set per batch would dominate the evaluation's time)."""
    tower = (Path(build_dir) / "pretrained.safetensors").stat().st_size
    return max(4, min(2 ** num_tasks - 1, budget_bytes // max(tower, 1)))


def summarise(per_task: dict, finetuned: dict | None) -> dict:
    values = list(per_task.values())
    row = {"per_task": per_task, "mean": float(np.mean(values))}
    if finetuned:
        row["normalised"] = float(np.mean([per_task[t] / finetuned[t] for t in per_task]))
    return row


def evaluate(build_dir: Path, checkpoints: Path | None = None, data: Path | None = None,
             routing_layers=None, with_runtime: bool = True, ta_lambda: float = 0.3, limit: int | None = None,
             batch_size: int = 256, progress: bool = True) -> dict:
    from mass_export.merging import checkpoints as ckpt
    from mass_export.merging import merge
    from mass_export.merging.reference import MassReference
    from mass_export.merging.stored import reference_from_build
    from mass_export.runtime.preprocess import Preprocessor

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    tasks, classes = manifest["tasks"], json.loads((build_dir / "classes.json").read_text())
    reference = reference_from_build(build_dir, cache_size=cache_budget(build_dir, len(tasks)))
    preprocessor = Preprocessor.from_manifest(manifest["model"])
    tests = (folder_test_sets(Path(data), tasks, classes, preprocessor) if data
             else zoo_test_sets(tasks, preprocessor, limit))
    pre, factors, heads = reference.pretrained, reference.factors, reference.heads
    head_of = {test.task: heads[tasks.index(test.task)] for test in tests}
    bar = tqdm(total=6 + len(routing_layers or []), desc="evaluating", disable=not progress)

    def static(weights) -> dict:
        return {t.task: head_accuracy(reference, weights, t, head_of[t.task], batch_size) for t in tests}

    methods: dict[str, dict] = {}
    finetuned = None
    methods["zero_shot"] = static(pre)
    bar.update()
    if checkpoints:
        paths = ckpt.find_task_checkpoints(checkpoints, tasks, manifest["model"]["name"])
        by_task = {test.task: test for test in tests}
        deltas, finetuned = [], {}
        for task in tasks:
            state = ckpt.load_visual(paths[task], pre, manifest["model"]["quick_gelu"])
            if task in by_task:
                finetuned[task] = head_accuracy(reference, state, by_task[task], head_of[task], batch_size)
            deltas.append(merge.task_delta(pre, state))
        methods["finetuned"] = finetuned
        arithmetic = {k: (v + ta_lambda * sum(d[k] for d in deltas)) if k in deltas[0] else v
                      for k, v in pre.items()}
        methods["task_arithmetic"] = static(arithmetic)
    bar.update()
    every = range(len(tasks))
    methods["tsv_m"] = static(merge.merged_tower(pre, factors, every, manifest["method"]["alpha"]))
    bar.update()
    no_redundancy = merge.base_tasks(factors, "no-redundancy", manifest["method"]["redundancy_threshold"])
    methods["tsv_m_no_redundancy"] = static(merge.merged_tower(pre, factors, every, manifest["method"]["alpha"],
                                                               no_redundancy))
    bar.update()
    methods["tsv_c_task_known"] = {t.task: head_accuracy(reference, reference.task_set_weights((tasks.index(t.task),)),
                                                         t, head_of[t.task], batch_size) for t in tests}
    bar.update()
    ref_rows = reference_predictions(reference, tests, batch_size)
    mass = mass_scores(ref_rows, tests, tasks, classes)
    methods["mass"] = mass["strict"]
    methods["mass_authors_metric"] = mass["authors"]
    bar.update()
    runtime_report = None
    if with_runtime:
        onnx_rows = runtime_predictions(build_dir, tests, batch_size, tasks, reference.cache_size)
        agree = float(np.mean([(a["task_index"], a["class_index"], tuple(a["task_set"])) ==
                               (b["task_index"], b["class_index"], tuple(b["task_set"]))
                               for a, b in zip(ref_rows, onnx_rows)]))
        strict = {}
        offset = 0
        for test in tests:
            chunk = onnx_rows[offset:offset + len(test.labels)]
            offset += len(test.labels)
            strict[test.task] = float(np.mean([p["task_index"] == tasks.index(test.task) and p["class_index"] == y
                                               for p, y in zip(chunk, test.labels)]))
        methods["mass_onnx_runtime"] = strict
        runtime_report = {"agreement_with_reference": agree}
    sweep = {}
    for layer in routing_layers or []:
        method = dataclasses.replace(reference.method, routing_layer=layer)
        swept = MassReference(reference.full.visual, pre, factors, no_redundancy if method.base == "no-redundancy"
                              else {k: list(every) for k in factors.U}, heads, method, reference.cache_size)
        scores = mass_scores(reference_predictions(swept, tests, batch_size), tests, tasks, classes)
        sweep[str(layer)] = {"mass": summarise(scores["strict"], finetuned),
                             "router_top1": float(np.mean(list(scores["router_top1"].values()))),
                             "router_in_set": float(np.mean(list(scores["router_in_set"].values())))}
        bar.update()
    bar.close()
    return {
        "schema": SCHEMA, "build": str(build_dir), "tasks": [t.task for t in tests],
        "images": {t.task: int(len(t.labels)) for t in tests}, "routing_layer": reference.method.routing_layer,
        "task_arithmetic_lambda": ta_lambda if checkpoints else None,
        "methods": {name: summarise(values, finetuned) for name, values in methods.items()},
        "router": {"top1": summarise(mass["router_top1"], None), "in_set": summarise(mass["router_in_set"], None),
                   "mean_task_set_size": mass["mean_task_set_size"], "confusion": mass["confusion"],
                   "confusion_axes": "rows: true task, columns: router argmax, in manifest task order"},
        "runtime": runtime_report, "routing_layer_sweep": sweep,
    }


def format_table(report: dict) -> str:
    tasks = report["tasks"]
    width = max(12, *(len(t) + 2 for t in tasks))
    lines = [f"{'method':<24}" + "".join(f"{t:>{width}}" for t in tasks) + f"{'mean':>9}{'normalised':>12}"]
    for name, row in report["methods"].items():
        norm = f"{100 * row['normalised']:>11.1f}%" if "normalised" in row else f"{'':>12}"
        lines.append(f"{name:<24}" + "".join(f"{100 * row['per_task'][t]:>{width}.1f}" for t in tasks)
                     + f"{100 * row['mean']:>9.1f}" + norm)
    router = report["router"]
    lines.append(f"{'router task id (top-1)':<24}" + "".join(f"{100 * router['top1']['per_task'][t]:>{width}.1f}"
                                                             for t in tasks) + f"{100 * router['top1']['mean']:>9.1f}")
    lines.append(f"{'true task in set':<24}" + "".join(f"{100 * router['in_set']['per_task'][t]:>{width}.1f}"
                                                       for t in tasks) + f"{100 * router['in_set']['mean']:>9.1f}")
    lines.append(f"mean task-set size {router['mean_task_set_size']:.2f}; routing layer {report['routing_layer']}")
    if report.get("runtime"):
        lines.append(f"ONNX runtime agrees with the torch reference on "
                     f"{100 * report['runtime']['agreement_with_reference']:.2f}% of images (task, class, task set)")
    for layer, row in report["routing_layer_sweep"].items():
        norm = f", normalised {100 * row['mass']['normalised']:.1f}%" if "normalised" in row["mass"] else ""
        lines.append(f"routing layer {layer}: MASS {100 * row['mass']['mean']:.1f}%{norm}, router top-1 "
                     f"{100 * row['router_top1']:.1f}%, true task in set {100 * row['router_in_set']:.1f}%")
    return "\n".join(lines)
