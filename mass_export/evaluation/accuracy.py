"""`mass-export eval`: what MASS buys over the alternatives, on a build directory and labelled test images.

Every method is scored on the same preprocessed images. MASS runs through the torch reference (the oracle) and
through the exported runtime; a MASS prediction counts only when both task and class are right ("strict"), and
the authors' metric (the winning head's logits padded or trimmed to the true task's class count, so a wrong
head can score by index coincidence) is reported beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mass_export.core.manifest import read_manifest
from mass_export.evaluation import EVAL_BATCH_SIZE, EVAL_TA_LAMBDA

SCHEMA = "mass-export/eval/1"


@dataclasses.dataclass
class TestSet:
    task: str
    pixels: torch.Tensor  # (N, 3, H, W), preprocessed as the runtime does
    labels: np.ndarray


def folder_test_sets(data: Path, tasks, classes: dict, preprocessor) -> list[TestSet]:
    """Images under DATA/<task>/<class name>/* (the layout `mass-export demo` writes)."""
    from mass_export.runtime.images import PathProblem, as_image, expand_paths

    sets = []
    for task in tasks:
        pixels, labels = [], []
        for index, name in enumerate(classes[task]):
            found = expand_paths([data / task / name.replace("/", "-")])
            for path in [p for p in found if not isinstance(p, PathProblem)]:
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


def per_test_set(rows: list, tests: list[TestSet]):
    """(test set, its rows) for rows made test set after test set, in order."""
    offset = 0
    for test in tests:
        yield test, rows[offset:offset + len(test.labels)]
        offset += len(test.labels)


def strict_accuracy(rows: list[dict], test: TestSet, task_index: int) -> float:
    """MASS's accuracy on one test set: a prediction counts only when both its task and its class are right."""
    return float(np.mean([p["task_index"] == task_index and p["class_index"] == label
                          for p, label in zip(rows, test.labels)]))


def mass_scores(predictions, tests: list[TestSet], tasks: list[str], classes: dict) -> dict:
    """Strict and authors' accuracy per task, router task identification, mean set size and confusion."""
    num_tasks = len(tasks)
    out = {"strict": {}, "authors": {}, "router_top1": {}, "router_in_set": {}}
    confusion = np.zeros((num_tasks, num_tasks), dtype=np.int64)
    set_sizes = []
    for test, chunk in per_test_set(predictions, tests):
        index = tasks.index(test.task)
        authors, top1, in_set = [], [], []
        for p, label in zip(chunk, test.labels):
            logits = np.asarray(p["logits"])[:len(classes[test.task])]  # the authors' trim (pad never wins)
            authors.append(int(np.argmax(logits)) == label)
            top1.append(int(np.argmax(p["probs"])) == index)
            in_set.append(index in p["task_set"])
            confusion[index, int(np.argmax(p["probs"]))] += 1
            set_sizes.append(len(p["task_set"]))
        out["strict"][test.task] = strict_accuracy(chunk, test, index)
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


class Evaluation:
    """What the methods read: the torch reference rebuilt from the build, the test sets and the options. The costly
    shared parts (fine-tuned checkpoints, MASS's predictions) are made once, when a method first asks."""

    def __init__(self, build_dir: Path, manifest: dict, classes: dict, tests: list[TestSet],
                 checkpoints: Path | None, with_runtime: bool, ta_lambda: float, batch_size: int):
        from mass_export.merging.stored import reference_from_build

        self.build_dir, self.manifest, self.classes, self.tests = build_dir, manifest, classes, tests
        self.checkpoints, self.with_runtime, self.ta_lambda, self.batch_size = (checkpoints, with_runtime, ta_lambda,
                                                                                 batch_size)
        self.tasks = manifest["tasks"]
        self.reference = reference_from_build(build_dir, cache_size=cache_budget(build_dir, len(self.tasks)))
        self.pre, self.factors = self.reference.pretrained, self.reference.factors
        self.alpha = self.manifest["method"]["alpha"]

    def head(self, task: str) -> torch.Tensor:
        return self.reference.heads[self.tasks.index(task)]

    def accuracy(self, weights_for) -> dict[str, float]:
        """The scorer of a method with fixed weights: each test set's accuracy on its own task's head, the tower
        running ``weights_for(task)``."""
        return {t.task: head_accuracy(self.reference, weights_for(t.task), t, self.head(t.task), self.batch_size)
                for t in self.tests}

    @functools.cached_property
    def fine_tunes(self) -> tuple[dict[str, float], list[dict]]:
        """Each tested task's fine-tuned accuracy and every task's update (each checkpoint loaded once)."""
        from mass_export.merging import checkpoints as ckpt
        from mass_export.merging import merge

        paths = ckpt.find_task_checkpoints(self.checkpoints, self.tasks, self.manifest["model"]["name"])
        by_task = {test.task: test for test in self.tests}
        accuracy, deltas = {}, []
        for task in self.tasks:
            state = ckpt.load_visual(paths[task], self.pre, self.manifest["model"]["quick_gelu"])
            if task in by_task:
                accuracy[task] = head_accuracy(self.reference, state, by_task[task], self.head(task), self.batch_size)
            deltas.append(merge.task_delta(self.pre, state))
        return accuracy, deltas

    @functools.cached_property
    def no_redundancy(self) -> dict[str, list[int]]:
        from mass_export.merging import merge

        return merge.base_tasks(self.factors, "no-redundancy", self.manifest["method"]["redundancy_threshold"])

    @functools.cached_property
    def theta_mt_bases(self) -> dict[str, list[int]]:
        """The build's own merge base (its registered function), for references made here with other options."""
        from mass_export.merging import merge

        method = self.reference.method
        return merge.base_tasks(self.factors, method.base, method.redundancy_threshold)

    @functools.cached_property
    def mass(self) -> tuple[list[dict], dict]:
        """The torch reference's MASS predictions on every test image, and their scores."""
        rows = reference_predictions(self.reference, self.tests, self.batch_size)
        return rows, mass_scores(rows, self.tests, self.tasks, self.classes)

    @functools.cached_property
    def runtime_rows(self) -> list[dict]:
        """The exported runtime's MASS predictions on every test image."""
        return runtime_predictions(self.build_dir, self.tests, self.batch_size, self.tasks,
                                   self.reference.cache_size)


# ---- the methods: name -> per-task accuracy (None: not available for this evaluation) ------------------------

def zero_shot(ev: Evaluation):
    return ev.accuracy(lambda task: ev.pre)


def finetuned(ev: Evaluation):
    return ev.fine_tunes[0] if ev.checkpoints else None


def task_arithmetic(ev: Evaluation):
    if not ev.checkpoints:
        return None
    deltas = ev.fine_tunes[1]
    weights = {k: (v + ev.ta_lambda * sum(d[k] for d in deltas)) if k in deltas[0] else v for k, v in ev.pre.items()}
    return ev.accuracy(lambda task: weights)


def tsv_m(ev: Evaluation):
    from mass_export.merging.merge import merged_tower

    weights = merged_tower(ev.pre, ev.factors, range(len(ev.tasks)), ev.alpha)
    return ev.accuracy(lambda task: weights)


def tsv_m_no_redundancy(ev: Evaluation):
    from mass_export.merging.merge import merged_tower

    weights = merged_tower(ev.pre, ev.factors, range(len(ev.tasks)), ev.alpha, ev.no_redundancy)
    return ev.accuracy(lambda task: weights)


def tsv_c_task_known(ev: Evaluation):
    return ev.accuracy(lambda task: ev.reference.task_set_weights((ev.tasks.index(task),)))


def mass(ev: Evaluation):
    return ev.mass[1]["strict"]


def mass_authors_metric(ev: Evaluation):
    return ev.mass[1]["authors"]


def mass_onnx_runtime(ev: Evaluation):
    if not ev.with_runtime:
        return None
    return {test.task: strict_accuracy(rows, test, ev.tasks.index(test.task))
            for test, rows in per_test_set(ev.runtime_rows, ev.tests)}


METHODS = {f.__name__: f for f in (zero_shot, finetuned, task_arithmetic, tsv_m, tsv_m_no_redundancy,
                                   tsv_c_task_known, mass, mass_authors_metric, mass_onnx_runtime)}


def runtime_agreement(ev: Evaluation) -> dict:
    """How often the exported runtime's (task, class, task set) equals the torch reference's."""
    agree = float(np.mean([(a["task_index"], a["class_index"], tuple(a["task_set"])) ==
                           (b["task_index"], b["class_index"], tuple(b["task_set"]))
                           for a, b in zip(ev.mass[0], ev.runtime_rows)]))
    return {"agreement_with_reference": agree}


def routing_layer_scores(ev: Evaluation, layer: int, finetuned: dict | None) -> dict:
    """MASS and its router with the router tapped at another layer (same build, same factors)."""
    from mass_export.merging.reference import MassReference

    reference = ev.reference
    method = dataclasses.replace(reference.method, routing_layer=layer)
    swept = MassReference(reference.full.visual, ev.pre, ev.factors, ev.theta_mt_bases, reference.heads, method,
                          reference.cache_size)
    scores = mass_scores(reference_predictions(swept, ev.tests, ev.batch_size), ev.tests, ev.tasks, ev.classes)
    return {"mass": summarise(scores["strict"], finetuned),
            "router_top1": float(np.mean(list(scores["router_top1"].values()))),
            "router_in_set": float(np.mean(list(scores["router_in_set"].values())))}


def evaluate(build_dir: Path, checkpoints: Path | None = None, data: Path | None = None,
             routing_layers=None, with_runtime: bool = True, ta_lambda: float = EVAL_TA_LAMBDA,
             limit: int | None = None, batch_size: int = EVAL_BATCH_SIZE, progress: bool = True) -> dict:
    from mass_export.runtime.preprocess import Preprocessor

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    tasks, classes = manifest["tasks"], json.loads((build_dir / "classes.json").read_text())
    preprocessor = Preprocessor.from_manifest(manifest["model"])
    tests = (folder_test_sets(Path(data), tasks, classes, preprocessor) if data
             else zoo_test_sets(tasks, preprocessor, limit))
    ev = Evaluation(build_dir, manifest, classes, tests, checkpoints, with_runtime, ta_lambda, batch_size)
    bar = tqdm(total=len(METHODS) + len(routing_layers or []), desc="evaluating", disable=not progress)
    methods: dict[str, dict] = {}
    for name, method in METHODS.items():
        scores = method(ev)
        if scores is not None:
            methods[name] = scores
        bar.update()
    finetuned_scores = methods.get("finetuned")
    sweep = {}
    for layer in routing_layers or []:
        sweep[str(layer)] = routing_layer_scores(ev, layer, finetuned_scores)
        bar.update()
    bar.close()
    mass_report = ev.mass[1]
    return {
        "schema": SCHEMA, "build": str(build_dir), "tasks": [t.task for t in tests],
        "images": {t.task: int(len(t.labels)) for t in tests}, "routing_layer": ev.reference.method.routing_layer,
        "task_arithmetic_lambda": ta_lambda if checkpoints else None,
        "methods": {name: summarise(values, finetuned_scores) for name, values in methods.items()},
        "router": {"top1": summarise(mass_report["router_top1"], None),
                   "in_set": summarise(mass_report["router_in_set"], None),
                   "mean_task_set_size": mass_report["mean_task_set_size"], "confusion": mass_report["confusion"],
                   "confusion_axes": "rows: true task, columns: router argmax, in manifest task order"},
        "runtime": runtime_agreement(ev) if with_runtime else None, "routing_layer_sweep": sweep,
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
