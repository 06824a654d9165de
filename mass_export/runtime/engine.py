"""MASS inference from a build directory: route each image on theta_MT, then classify it with theta(S).

numpy + onnxruntime only. Per batch: prefix graph (theta_MT, early exit) -> router graph -> task sets ->
images grouped by task set -> encoder graph with that set's weights (from a bounded LRU cache) -> heads graph
-> the selected head with the largest logit.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from safetensors.numpy import load_file

from mass_export.core.errors import BuildIntegrityError, ConfigError
from mass_export.core.lowrank import group_by_task_set, pick_heads, select_task_sets
from mass_export.core.manifest import read_manifest
from mass_export.core.taskweights import StoredTasks, task_set_weights
from mass_export.runtime.backends import Runner, check_providers, make_runner
from mass_export.runtime.images import DEFAULT_MAX_PIXELS, as_image
from mass_export.runtime.preprocess import Preprocessor

GRAPHS = ("prefix", "router", "encoder", "heads")


@dataclass
class Prediction:
    """One image's result. ``error`` is set (and the rest empty) when the image could not be read."""

    task: str | None = None
    task_index: int | None = None
    class_index: int | None = None
    class_name: str | None = None
    score: float | None = None  # the winning logit
    confidence: float | None = None  # softmax over the winning head's logits, at the predicted class
    top_k: list[tuple[str, float]] = field(default_factory=list)  # of the winning head, best first
    task_set: tuple[str, ...] = ()  # the tasks the router selected, in task order
    probs: dict[str, float] = field(default_factory=dict, repr=False)  # router probabilities
    path: str | None = None
    id: str | None = None  # the caller's name for an in-memory item (MassPredictor's "id" column)
    error: str | None = None
    warning: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(self) -> dict:
        """The output row of `mass-export run`."""
        return {"path": self.path, "task": self.task, "class": self.class_name, "score": self.score,
                "confidence": self.confidence, "top_k": [[name, score] for name, score in self.top_k],
                "task_set": list(self.task_set), "task_probs": self.task_probs, "error": self.error,
                "warning": self.warning}

    @property
    def task_probs(self) -> dict[str, float]:
        """The router's probability of each selected task: what a pipeline filters uncertain routing on."""
        return {task: self.probs[task] for task in self.task_set if task in self.probs}


def class_confidence(logits: np.ndarray, index: int) -> float:
    """softmax(logits)[index] in float64 (CLIP logits are ~100 x cosine: float32 exp would overflow)."""
    shifted = np.asarray(logits, np.float64) - float(np.max(logits))
    weights = np.exp(shifted)
    return float(weights[index] / weights.sum())


class LRUCache:
    """At most ``capacity`` values made by ``make(key)``, least recently used evicted first."""

    def __init__(self, capacity: int, make: Callable):
        if capacity < 0:
            raise ConfigError(f"cache size must be >= 0 (got {capacity})")
        self.capacity, self.make = capacity, make
        self.entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self.entries:
                self.hits += 1
                self.entries.move_to_end(key)
                return self.entries[key]
            self.misses += 1
            value = self.make(key)
            if self.capacity:
                self.entries[key] = value
                while len(self.entries) > self.capacity:
                    self.entries.popitem(last=False)
            return value

    def info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "size": len(self.entries), "capacity": self.capacity,
                "keys": list(self.entries)}


def _check(condition: bool, root: Path, problem: str) -> None:
    if not condition:
        raise BuildIntegrityError(f"{root}: {problem}")


def load_finite(root: Path, name: str) -> dict[str, np.ndarray]:
    """A safetensors file of the build, refusing NaN/Inf (a build never stores them; validation would not catch
    a weight that only some images reach)."""
    arrays = load_file(str(root / name))
    bad = [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    _check(not bad, root, f"{name}: NaN/Inf in {', '.join(bad[:5])}")
    return arrays


class MassRuntime:
    """A loaded build. ``classify`` for images; ``route`` and ``encode`` for validation and benchmarks."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # a larger image file is refused before it is decoded (set to raise it)

    def __init__(self, root: Path, manifest: dict, stored: StoredTasks, heads: np.ndarray,
                 classes: dict[str, list[str]], runners: dict[str, Runner], cache_size: int = 4,
                 loader_threads: int | None = None):
        self.root, self.manifest, self.stored, self.runners = root, manifest, stored, runners
        self.tasks: list[str] = list(manifest["tasks"])
        self.classes = classes
        self.num_tasks = len(self.tasks)
        method = manifest["method"]
        self.eta, self.max_tasks, self.routing_layer = method["eta"], method["top_k"], method["routing_layer"]
        self.preprocessor = Preprocessor.from_manifest(manifest["model"])
        self.loader_threads = loader_threads or min(4, os.cpu_count() or 1)
        self._slices = [slice(manifest["heads"][t]["offset"], manifest["heads"][t]["offset"]
                              + manifest["heads"][t]["classes"]) for t in self.tasks]

        _check(stored.num_tasks == self.num_tasks, root, f"factors hold {stored.num_tasks} tasks, "
               f"manifest lists {self.num_tasks}")
        _check(all(len(classes.get(t, ())) == s.stop - s.start for t, s in zip(self.tasks, self._slices)),
               root, "classes.json does not match manifest['heads']")
        prefix_keys = [k for k in runners["prefix"].input_names if k != "pixel_values"]
        self._encoder_keys = [k for k in runners["encoder"].input_names if k != "pixel_values"]
        unknown = sorted(set(prefix_keys + self._encoder_keys) - set(stored.pretrained))
        _check(not unknown, root, f"graph inputs with no stored weights: {', '.join(unknown[:5])}")

        # theta_MT is prepared (and on a GPU uploaded) once; task sets' weights go through the LRU cache.
        if method.get("router_on", "merged") == "pretrained":
            theta_mt = {k: stored.pretrained[k] for k in prefix_keys}
        else:
            theta_mt = task_set_weights(stored, range(self.num_tasks), keys=prefix_keys, base=True)
        self._prefix_inputs = runners["prefix"].upload(theta_mt)
        basis = stored.factors[f"transformer.resblocks.{self.routing_layer}.mlp.c_fc.weight"]["V"]
        basis = basis.astype(np.float32)  # fp16 builds store it half
        self._router_inputs = runners["router"].upload({"router_basis": basis})
        self._heads_inputs = runners["heads"].upload({"heads": heads})
        self.cache = LRUCache(cache_size, self._make_task_set_inputs)

    @classmethod
    def load(cls, build_dir, providers=("cpu",), strict_providers: bool = False, cache_size: int = 4,
             threads: int | None = None, backend: str = "onnxruntime",
             loader_threads: int | None = None) -> "MassRuntime":
        """Open a build directory (every file's sha256 is checked against the manifest first).

        providers: ``cpu``, ``cuda``, ``cuda:1``, ``tensorrt`` (ONNX Runtime execution providers, in order of
        preference); a provider that cannot run warns, or raises ProviderError with ``strict_providers``.
        cache_size: task sets whose dense weights stay prepared. threads: intra-op threads per graph.
        """
        root = Path(build_dir)
        manifest = read_manifest(root, verify=True)
        graphs = manifest.get("graphs") or {}
        missing = [name for name in GRAPHS if name not in graphs]
        _check(not missing, root, f"no {', '.join(missing)} graph(s) in the manifest (built with --no-export?)")
        stored = StoredTasks.from_flat(load_finite(root, "pretrained.safetensors"),
                                       load_finite(root, "factors.safetensors"),
                                       load_finite(root, "deltas.safetensors"), manifest["method"]["alpha"])
        heads = load_finite(root, "heads.safetensors")["heads"]
        classes = json.loads((root / "classes.json").read_text())
        runners = {name: make_runner(root / graphs[name]["file"], backend, providers, threads, check=False)
                   for name in GRAPHS}
        # One check for the four graphs: a provider counts as active only if every graph runs on it.
        active = [p for p in runners["encoder"].providers if all(p in r.providers for r in runners.values())]
        check_providers(runners["encoder"].requested, active, strict_providers, str(root))
        return cls(root, manifest, stored, heads, classes, runners, cache_size, loader_threads)

    @property
    def providers(self) -> dict[str, list[str]]:
        """The providers actually running each graph."""
        return {name: list(runner.providers) for name, runner in self.runners.items()}

    def _task_indices(self, task_set) -> tuple[int, ...]:
        indices = sorted({self.tasks.index(t) if isinstance(t, str) else int(t) for t in task_set})
        if not indices or not all(0 <= i < self.num_tasks for i in indices):
            raise ValueError(f"task set {task_set!r}: give task indices in 0..{self.num_tasks - 1} or names")
        return tuple(indices)

    def _make_task_set_inputs(self, task_set: tuple[int, ...]) -> dict:
        return self.runners["encoder"].upload(task_set_weights(self.stored, task_set, keys=self._encoder_keys))

    def route(self, pixel_values: np.ndarray) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """Router probabilities (B, T) and each image's task set (ascending task indices)."""
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if self.num_tasks == 1:
            return np.ones((len(x), 1), np.float32), [(0,)] * len(x)
        feature = self.runners["prefix"].run({"pixel_values": x, **self._prefix_inputs},
                                             keep=("route_feature",))["route_feature"]
        probs = self.runners["router"].run({"route_feature": feature, **self._router_inputs})["probs"]
        return probs, select_task_sets(probs, self.eta, self.max_tasks)

    def _features(self, x: np.ndarray, task_set, keep=()):
        inputs = self.cache.get(self._task_indices(task_set))
        return self.runners["encoder"].run({"pixel_values": x, **inputs}, keep=keep)["image_features"]

    def encode(self, pixel_values: np.ndarray, task_set) -> np.ndarray:
        """Image features (B, D) of theta(task_set), as open_clip's encode_image (not normalised)."""
        return self._features(np.ascontiguousarray(pixel_values, dtype=np.float32), task_set)

    def logits(self, pixel_values: np.ndarray, task_set) -> np.ndarray:
        """Every head's logits (B, sum of classes) on theta(task_set)'s features."""
        features = self._features(np.ascontiguousarray(pixel_values, dtype=np.float32), task_set,
                                  keep=("image_features",))
        return self.runners["heads"].run({"image_features": features, **self._heads_inputs})["logits"]

    def predict(self, pixel_values: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Both passes on preprocessed pixels (B, 3, H, W); images sharing a task set run together."""
        if len(pixel_values) == 0:
            return []
        probs, task_sets = self.route(pixel_values)
        out: list[Prediction | None] = [None] * len(task_sets)
        for task_set, indices in group_by_task_set(task_sets).items():
            logits = self.logits(pixel_values[indices], task_set)
            for row, index in zip(logits, indices):
                position, cls, score = pick_heads([row[self._slices[t]] for t in task_set])
                task = task_set[position]
                head = row[self._slices[task]]
                names = self.classes[self.tasks[task]]
                best = np.argsort(-head, kind="stable")[:top_k]
                out[index] = Prediction(
                    task=self.tasks[task], task_index=task, class_index=cls, class_name=names[cls], score=score,
                    confidence=class_confidence(head, cls),
                    top_k=[(names[i], float(head[i])) for i in best], task_set=tuple(self.tasks[t] for t in task_set),
                    probs={name: float(p) for name, p in zip(self.tasks, probs[index])})
        return out

    def _prepare(self, item):
        path = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
        loaded = as_image(item, self.max_pixels)
        if loaded.error:
            return None, path, loaded.error, None
        try:
            return self.preprocessor(loaded.image), path, None, loaded.warning
        except Exception as error:  # a decodable file that PIL still cannot resize: that file fails, not the run
            if path is None:
                raise
            return None, path, f"preprocessing failed ({type(error).__name__}: {error})", None

    def classify_batches(self, items: Iterable, batch_size: int = 16, top_k: int = 5) -> Iterator[list[Prediction]]:
        """Predictions batch by batch, in input order; the next batch is decoded while this one runs."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1 (got {batch_size})")
        items = iter(items)
        with ThreadPoolExecutor(self.loader_threads) as pool:
            pending = None
            while True:
                chunk = list(itertools.islice(items, batch_size))
                submitted = [pool.submit(self._prepare, item) for item in chunk]
                if pending:
                    yield self._classify_prepared([future.result() for future in pending], top_k)
                if not submitted:
                    return
                pending = submitted

    def _classify_prepared(self, prepared, top_k: int) -> list[Prediction]:
        good = [i for i, (pixels, *_rest) in enumerate(prepared) if pixels is not None]
        results = self.predict(np.stack([prepared[i][0] for i in good]), top_k) if good else []
        out = [Prediction(path=path, error=error, warning=warning) for _, path, error, warning in prepared]
        for i, prediction in zip(good, results):
            prediction.path, prediction.warning = prepared[i][1], prepared[i][3]
            out[i] = prediction
        return out

    def classify(self, items: Iterable, batch_size: int = 16, top_k: int = 5) -> list[Prediction]:
        """One Prediction per item (a path, a PIL image or an HWC uint8 array), in order.

        A path that cannot be read gives a Prediction with ``error`` set; the other items are still classified.
        """
        return [p for batch in self.classify_batches(items, batch_size, top_k) for p in batch]
