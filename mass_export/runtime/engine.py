"""MASS inference from a build directory: route each image on theta_MT, then classify it with theta(S).

numpy + onnxruntime only. Per batch: prefix graph (theta_MT, early exit) -> router graph -> task sets ->
images grouped by task set -> second pass per group -> heads graph -> the selected head with the largest logit.

The second pass of a group runs one of two exact forms of theta(S) (``SecondPassPlanner``): the encoder graph
fed with S's dense weights (cached, or prepared now), or the low-rank graph fed with theta_pre and S's update
factors (no preparation of dense weights; the activations pay R(m + n) per token). Stages are public
(``first_pass``, ``router``, ``second_pass``, ``heads``) so benchmarks time them without private state.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from safetensors.numpy import load_file
from threadpoolctl import ThreadpoolController

from mass_export.core import options
from mass_export.core.errors import BuildIntegrityError, ConfigError
from mass_export.core.lowrank import LOW_RANK_GRAPH_SPREAD, group_by_task_set, pick_heads, select_task_sets
from mass_export.core.manifest import head_slices, read_manifest
from mass_export.core.routing import first_pass_weights, router_basis_key
from mass_export.core.taskweights import (DENSE_OUTPUT, TASKS_INPUT, GramBlocks, StoredTasks, dense_from_low_rank,
                                         factor_input_names, low_rank_inputs, low_rank_stacks, task_set_cores,
                                         task_set_weights)
from mass_export.runtime.backends import Runner, check_providers, make_runner
from mass_export.runtime.images import DEFAULT_MAX_PIXELS, as_image
from mass_export.runtime.planner import SecondPassPlanner
from mass_export.runtime.preprocess import Preprocessor
from mass_export.runtime.sources import batched
from mass_export.runtime.taskcache import TaskSetCache, default_cache_bytes

GRAPHS = ("prefix", "router", "encoder", "heads")
# Builds made before them have none: without lowrank the second pass is dense only; without densify (or lowrank) a
# task set's dense weights are made by numpy on the host.
OPTIONAL_GRAPHS = ("lowrank", "densify")
DEFAULT_WINDOW_BATCHES = 8  # classify_batches routes this many batches before the second passes
RECENT_GROUPS = 64  # second-pass groups whose distinct sets are compared with the dense sets the cache holds
GRAM_SHARE = 0.25  # at most this share of cache_bytes holds the Gram blocks of task pairs (GramBlocks)
CORES_SHARE = 0.25  # this share holds task sets' TSV-M cores (the small M per key), once the low-rank graph exists


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
    """A loaded build. ``classify`` / ``classify_batches`` for images, ``predict`` for pixels; the stages
    ``first_pass``, ``router``, ``second_pass``, ``heads`` and ``route`` / ``encode`` / ``logits`` for
    validation and benchmarks; ``warm``, ``calibrate`` and ``stats`` for the task-set cache and the planner."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # a larger image file is refused before it is decoded (set to raise it)

    def __init__(self, root: Path, manifest: dict, stored: StoredTasks, heads: np.ndarray,
                 classes: dict[str, list[str]], runners: dict[str, Runner], cache_size: int | None = None,
                 loader_threads: int | None = None, cache_bytes: int | None = None, second_pass: str = "auto",
                 calibrate: bool = True, prepare_threads: int | None = 1):
        self.root, self.manifest, self.stored, self.runners = root, manifest, stored, runners
        self.tasks: list[str] = list(manifest["tasks"])
        self.classes = classes
        self.num_tasks = len(self.tasks)
        method = manifest["method"]
        self.eta, self.max_tasks, self.routing_layer = method["eta"], method["top_k"], method["routing_layer"]
        self.preprocessor = Preprocessor.from_manifest(manifest["model"])
        self.loader_threads = loader_threads or min(4, os.cpu_count() or 1)
        self._slices = head_slices(manifest)

        _check(stored.num_tasks == self.num_tasks, root, f"factors hold {stored.num_tasks} tasks, "
               f"manifest lists {self.num_tasks}")
        _check(all(len(classes.get(t, ())) == s.stop - s.start for t, s in zip(self.tasks, self._slices)),
               root, "classes.json does not match manifest['heads']")
        prefix_record = manifest["graphs"]["prefix"]
        prefix_keys = list(prefix_record.get("constants") or
                           [k for k in runners["prefix"].input_names if k != "pixel_values"])
        self._encoder_keys = [k for k in runners["encoder"].input_names if k != "pixel_values"]
        unknown = sorted(set(prefix_keys + self._encoder_keys) - set(stored.pretrained))
        _check(not unknown, root, f"graph inputs with no stored weights: {', '.join(unknown[:5])}")
        lowrank_record = manifest["graphs"].get("lowrank") or {}
        if "lowrank" in runners and "factor_keys" not in lowrank_record:
            # Builds made before 2026-12-06 fed per-set products U_cat M to their low-rank graph: run them dense.
            warnings.warn(f"{root}: its low-rank graph is of an older form; the second pass runs dense (rebuild "
                          "for the low-rank form)", RuntimeWarning, stacklevel=3)
            del runners["lowrank"]
        if "lowrank" not in runners:  # densify takes the low-rank graph's cores
            runners.pop("densify", None)
        self._linear_keys = list(lowrank_record.get("linear_keys", ())) if "lowrank" in runners else []
        self._factor_keys = list(lowrank_record.get("factor_keys", ())) if "lowrank" in runners else []
        if "lowrank" in runners:
            expected = {TASKS_INPUT, *(name for key in self._factor_keys for name in factor_input_names(key))}
            _check(expected <= set(runners["lowrank"].input_names), root, "graphs/lowrank.onnx lacks factor inputs")

        # numpy's BLAS threads while a task set is prepared. One by default: a multi-threaded BLAS spinning beside
        # ONNX Runtime's own threads on the same cores ran preparation 5-8x slower on a busy 2-core machine.
        self.prepare_threads = prepare_threads
        self._blas = ThreadpoolController() if prepare_threads else None
        # Memory for prepared state, three tiers by cost to remake: the Gram blocks of task pairs (reused by every
        # set holding the pair) take what they need up to GRAM_SHARE; task sets' cores (M per key, |S|k x |S|k:
        # remaking them is the eigen-decompositions, ~10x smaller than the factors) CORES_SHARE; prepared task
        # sets (factors or dense weights, remade from a core by products alone) the rest.
        cache_bytes = default_cache_bytes() if cache_bytes is None else int(cache_bytes)
        self.gram_blocks = GramBlocks(stored, min(GramBlocks.full_bytes(stored), max(0, int(GRAM_SHARE * cache_bytes))))
        cores_bytes = int(CORES_SHARE * cache_bytes) if self._linear_keys and "lowrank" in runners else 0
        self.cores = TaskSetCache(self._prepare_cores, cores_bytes)
        # theta_MT is prepared (and on a GPU uploaded) once; task sets' weights go through the cache.
        def merged():
            with self.preparation_threads():
                return task_set_weights(stored, range(self.num_tasks), keys=prefix_keys, base=True,
                                        blocks=self.gram_blocks)

        theta_mt = first_pass_weights(method.get("router_on"), {k: stored.pretrained[k] for k in prefix_keys}, merged)
        if self.gram_blocks.capacity_bytes == GramBlocks.full_bytes(stored):
            with self.preparation_threads():  # the keys theta_MT did not need (ViT-B-16: 3 s of its ~35 s)
                self.gram_blocks.fill(range(self.num_tasks))
        if isinstance(runners["prefix"], functools.partial):  # its weights are constants: made now, once
            runners["prefix"] = runners["prefix"](constants=theta_mt)
            self._prefix_inputs = {}
        else:  # builds before 2026-12-07 take them as inputs, fed on every call
            self._prefix_inputs = runners["prefix"].upload(theta_mt)
        basis = stored.factors[router_basis_key(self.routing_layer)]["V"]
        basis = basis.astype(np.float32)  # fp16 builds store it half
        self._router_inputs = runners["router"].upload({"router_basis": basis})
        self._heads_inputs = runners["heads"].upload({"heads": heads})
        if "lowrank" in runners:  # theta_pre for the linear weights and every task's factors, uploaded once
            self._lowrank_base = runners["lowrank"].upload({**{k: stored.pretrained[k] for k in self._linear_keys},
                                                            **low_rank_stacks(stored, self._factor_keys)})
        # One cache for both kinds of prepared state, keyed ("dense", S) / ("factors", S).
        self.cache = TaskSetCache(self._prepare_entry, cache_bytes - self.gram_blocks.capacity_bytes - cores_bytes,
                                  cache_size)
        self.planner = SecondPassPlanner(second_pass, lowrank_available="lowrank" in runners)
        self._dense_bytes = sum(int(stored.pretrained[k].nbytes) for k in self._encoder_keys)  # one dense set
        self._recent_sets: collections.deque = collections.deque(maxlen=RECENT_GROUPS)
        if calibrate and self.planner.form == "auto":
            self.calibrate()

    @classmethod
    def load(cls, build_dir, providers=("cpu",), strict_providers: bool = False, cache_size: int | None = None,
             threads: int | None = None, backend: str = "onnxruntime", loader_threads: int | None = None,
             cache_bytes: int | None = None, second_pass: str = "auto", calibrate: bool = True,
             prepare_threads: int | None = 1) -> "MassRuntime":
        """Open a build directory (every file's sha256 is checked against the manifest first).

        providers: ``cpu``, ``cuda``, ``cuda:1``, ``tensorrt`` (ONNX Runtime execution providers, in order of
        preference); a provider that cannot run warns, or raises ProviderError with ``strict_providers``.
        cache_bytes: memory for prepared task sets and the Gram blocks they are made from (default: a share of
        available memory, see ``runtime.taskcache``); cache_size: also at most this many task-set entries.
        threads: intra-op threads per graph.
        second_pass: ``auto`` (the planner chooses per group, see ``runtime.planner``), ``dense`` or ``lowrank``.
        calibrate: measure the planner's costs now (``auto`` only) rather than densifying until measured.
        prepare_threads: numpy BLAS threads while preparing a task set (None: the library's default).
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
        names = [*GRAPHS, *(name for name in OPTIONAL_GRAPHS if name in graphs and second_pass != "dense")]
        runners = {}
        for name in names:
            runner = functools.partial(make_runner, root / graphs[name]["file"], backend, providers, threads,
                                       check=False)
            # A graph with constants supplied at load is made once they are (the prefix: theta_MT, in __init__).
            _check(name == "prefix" or not graphs[name].get("constants"), root,
                   f"graph {name!r} declares constants supplied at load; this version supplies only the prefix's")
            runners[name] = runner if graphs[name].get("constants") else runner()
        # One check for all graphs: a provider counts as active only if every graph runs on it (those made later
        # ask for the same providers).
        made = [r for r in runners.values() if not isinstance(r, functools.partial)]
        active = [p for p in runners["encoder"].providers if all(p in r.providers for r in made)]
        check_providers(runners["encoder"].requested, active, strict_providers, str(root))
        return cls(root, manifest, stored, heads, classes, runners, cache_size, loader_threads, cache_bytes,
                   second_pass, calibrate, prepare_threads)

    @property
    def providers(self) -> dict[str, list[str]]:
        """The providers actually running each graph."""
        return {name: list(runner.providers) for name, runner in self.runners.items()}

    @property
    def encoder_keys(self) -> list[str]:
        """The dense encoder graph's weight inputs."""
        return list(self._encoder_keys)

    @property
    def has_lowrank(self) -> bool:
        return "lowrank" in self.runners

    @property
    def feature_width(self) -> int:
        """Width of the router tap's feature (the first pass's output)."""
        return int(self.stored.factors[router_basis_key(self.routing_layer)]["V"].shape[-1])

    @property
    def embed_dim(self) -> int:
        """Width of the image features (the second pass's output)."""
        return int(self.manifest["model"]["config"]["embed_dim"])

    def task_indices(self, task_set) -> tuple[int, ...]:
        """A task set (names or indices) as ascending task indices."""
        indices = sorted({self.tasks.index(t) if isinstance(t, str) else int(t) for t in task_set})
        if not indices or not all(0 <= i < self.num_tasks for i in indices):
            raise ValueError(f"task set {task_set!r}: give task indices in 0..{self.num_tasks - 1} or names")
        return tuple(indices)

    # --- task-set preparation ---------------------------------------------------------------------------------

    def prepare_factors(self, task_set: tuple[int, ...], reuse_cores: bool = True) -> dict | None:
        """The low-rank graph's per-set inputs (host arrays): the task indices, the set's TSV-M cores (kept in
        ``cores`` when ``reuse_cores``) and dense theta(S) for the other keys; None when the set must run dense
        (an ill-conditioned key, see ``taskweights.low_rank_inputs``). A public hook: subclass to observe or pace
        preparation."""
        cores = self.cores.get(task_set) if reuse_cores and self.cores.capacity_bytes else None
        return low_rank_inputs(self.stored, task_set, self._encoder_keys, self._linear_keys, self.gram_blocks, cores)

    def _prepare_cores(self, task_set: tuple[int, ...]) -> dict:
        with self.preparation_threads():
            return task_set_cores(self.stored, task_set, self._linear_keys, blocks=self.gram_blocks,
                                  well_conditioned=LOW_RANK_GRAPH_SPREAD)

    def prepare_task_set(self, task_set: tuple[int, ...], reuse_factors: bool = True) -> dict:
        """Dense theta(S) for the encoder graph, from S's cached low-rank inputs or cores when there are some
        (``reuse_factors``): numpy arrays, but for the linear weights the densify graph made on a GPU (OrtValues on
        the device). A public hook: subclass to observe or pace it."""
        ready = self.cache.lookup(("factors", task_set)) if reuse_factors and self._linear_keys else None
        inputs = ready["host"] if ready else None
        if inputs is None and self._linear_keys:
            inputs = self.prepare_factors(task_set, reuse_cores=reuse_factors)
        if inputs is None:  # no low-rank graph, or a set it cannot run
            return task_set_weights(self.stored, task_set, keys=self._encoder_keys, blocks=self.gram_blocks)
        started = time.perf_counter()
        if "densify" in self.runners:
            weights = self._densify(inputs)
        else:
            weights = dense_from_low_rank(self.stored, inputs, self._linear_keys)
        self.planner.observe_product(len(task_set), time.perf_counter() - started)
        return weights

    def _densify(self, inputs: dict) -> dict:
        """theta(S) from the low-rank inputs by the densify graph: the linear weights are made where the encoder
        runs (left on the device on a GPU, as OrtValues), the other keys are the inputs' host arrays."""
        runner = self.runners["densify"]
        names = [DENSE_OUTPUT.format(key) for key in self._linear_keys]
        made = runner.run({**self._lowrank_base, **inputs}, keep=names if runner.device != "cpu" else ())
        weights = {key: value for key, value in inputs.items() if key in self._encoder_keys}
        weights.update({key: made[name] for key, name in zip(self._linear_keys, names)})
        return weights

    def _prepare_entry(self, key) -> dict:
        """Cache entries hold host arrays and what the runner uploaded from them (the same arrays on CPU)."""
        with self.preparation_threads():
            return self._prepare_entry_now(key)

    def preparation_threads(self):
        """Context in which numpy's BLAS uses ``prepare_threads`` threads (as every preparation here does)."""
        if self._blas is None:
            return contextlib.nullcontext()
        return self._blas.limit(limits=self.prepare_threads, user_api="blas")

    def _prepare_entry_now(self, key) -> dict:
        kind, task_set = key
        if kind == "factors":  # host None: the set runs dense (second_pass falls back)
            host = self.prepare_factors(task_set)
            return {"host": host, "device": None if host is None else self.runners["lowrank"].upload(host)}
        host = self.prepare_task_set(task_set)
        self.cache.discard(("factors", task_set))  # superseded by the dense weights
        on_device = {k: v for k, v in host.items() if not isinstance(v, np.ndarray)}  # made there by densify
        device = self.runners["encoder"].upload({k: v for k, v in host.items() if k not in on_device})
        return {"host": host, "device": {**device, **on_device}}

    def warm(self, task_sets, form: str = "dense") -> None:
        """Prepare these task sets now (dense weights, or ``form="lowrank"``: their factors)."""
        if form not in ("dense", "lowrank") or (form == "lowrank" and not self.has_lowrank):
            raise ValueError(f"warm form {form!r}: choose dense" + (" or lowrank" if self.has_lowrank else ""))
        for task_set in task_sets:
            self.cache.get(("dense" if form == "dense" else "factors", self.task_indices(task_set)))

    def calibrate(self, images: int = 2) -> dict:
        """Measure the planner's costs once, on ``images`` blank images and task set (0,): a low-rank pass, the
        densifying product, a dense pass (each pass run twice, the second timed: first runs allocate). Nothing
        stays cached; the preparations show in the cache counters."""
        if "lowrank" not in self.runners:
            return self.planner.info()
        height, width = self.preprocessor.image_size
        x = np.zeros((images, 3, height, width), np.float32)
        task_set = (0,)
        seconds = {}
        for form in ("lowrank", "dense"):  # dense second: its preparation reuses the factors and times the product
            entry = self.cache.get(("factors" if form == "lowrank" else "dense", task_set))
            self._run_second_pass(x, task_set, form, entry=entry)
            started = time.perf_counter()
            self._run_second_pass(x, task_set, form, entry=entry)
            seconds[form] = time.perf_counter() - started
        self.cache.discard(("dense", task_set))
        self.planner.observe_dense(images, seconds["dense"])
        self.planner.observe_lowrank(1, images, seconds["lowrank"])
        return self.planner.info()

    def stats(self) -> dict:
        """Cache counters (hits, misses, waits, preparations, seconds preparing, bytes) and the planner's
        choices and cost model."""
        cache = self.cache.info()
        keys = cache.pop("keys")
        cache["dense_sets"] = sum(kind == "dense" for kind, _ in keys)
        cache["factor_sets"] = sum(kind == "factors" for kind, _ in keys)
        cores = self.cores.info()
        cores.pop("keys")
        return {"cache": cache, "gram_blocks": self.gram_blocks.info(), "cores": cores,
                "second_pass": self.planner.info()}

    # --- the stages -------------------------------------------------------------------------------------------

    def first_pass(self, pixel_values: np.ndarray, keep=()) -> np.ndarray:
        """The router tap's feature (B, d) from the prefix graph on theta_MT."""
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return self.runners["prefix"].run({"pixel_values": x, **self._prefix_inputs}, keep=keep)["route_feature"]

    def router(self, route_feature) -> np.ndarray:
        """Router probabilities (B, T) from first-pass features."""
        return self.runners["router"].run({"route_feature": route_feature, **self._router_inputs})["probs"]

    def route(self, pixel_values: np.ndarray) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """Router probabilities (B, T) and each image's task set (ascending task indices)."""
        if self.num_tasks == 1:
            return np.ones((len(pixel_values), 1), np.float32), [(0,)] * len(pixel_values)
        probs = self.router(self.first_pass(pixel_values, keep=("route_feature",)))
        return probs, select_task_sets(probs, self.eta, self.max_tasks)

    def _run_second_pass(self, x: np.ndarray, task_set: tuple[int, ...], form: str, keep=(), entry=None):
        if form == "dense":
            entry = entry or self.cache.get(("dense", task_set))
            return self.runners["encoder"].run({"pixel_values": x, **entry["device"]}, keep=keep)["image_features"]
        entry = entry or self.cache.get(("factors", task_set))
        return self.runners["lowrank"].run({"pixel_values": x, **self._lowrank_base, **entry["device"]},
                                           keep=keep)["image_features"]

    def second_pass(self, pixel_values: np.ndarray, task_set, form: str | None = None, keep=()):
        """Image features (B, D) of theta(task_set) (open_clip's encode_image, not normalised).

        form: ``dense`` or ``lowrank`` (both exact), or None to let the planner choose."""
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        task_set = self.task_indices(task_set)
        if form is None:
            self._recent_sets.append(task_set)
            form = self.planner.choose(task_set, len(x), ("dense", task_set) in self.cache,
                                       self.cache.in_flight(("dense", task_set)), self._dense_would_stay())
        elif form not in ("dense", "lowrank") or (form == "lowrank" and "lowrank" not in self.runners):
            raise ValueError(f"second pass form {form!r}: choose dense" + (" or lowrank" if "lowrank" in
                                                                          self.runners else " (no lowrank graph)"))
        entry = self.cache.get(("factors" if form == "lowrank" else "dense", task_set))  # not in the timing below
        if entry["device"] is None:  # a set the low-rank graph cannot run exactly
            form, entry = "dense", self.cache.get(("dense", task_set))
        started = time.perf_counter()
        features = self._run_second_pass(x, task_set, form, keep, entry)
        seconds = time.perf_counter() - started
        if form == "dense":
            self.planner.observe_dense(len(x), seconds)
        else:
            self.planner.observe_lowrank(len(task_set), len(x), seconds)
        return features

    def _dense_would_stay(self) -> bool:
        """Whether the cache holds as many dense sets as the distinct sets of the recent groups (else LRU evicts
        a densified set before its next use)."""
        slots = self.cache.capacity_bytes // max(1, self._dense_bytes)
        if self.cache.max_entries is not None:
            slots = min(slots, self.cache.max_entries)
        return len(set(self._recent_sets.copy())) <= slots  # copy: atomic while other threads append

    def heads(self, image_features) -> np.ndarray:
        """Every head's logits (B, sum of classes) on L2-normalised features."""
        return self.runners["heads"].run({"image_features": image_features, **self._heads_inputs})["logits"]

    def encode(self, pixel_values: np.ndarray, task_set, form: str | None = None) -> np.ndarray:
        """Image features (B, D) of theta(task_set), as open_clip's encode_image (not normalised)."""
        return self.second_pass(pixel_values, task_set, form)

    def logits(self, pixel_values: np.ndarray, task_set, form: str | None = None) -> np.ndarray:
        """Every head's logits (B, sum of classes) on theta(task_set)'s features."""
        return self.heads(self.second_pass(pixel_values, task_set, form, keep=("image_features",)))

    # --- predictions ------------------------------------------------------------------------------------------

    def predict(self, pixel_values: np.ndarray, top_k: int = options.TOP_CLASSES, task_sets=None, probs=None,
                batch_size: int | None = None, form: str | None = None) -> list[Prediction]:
        """Both passes on preprocessed pixels (B, 3, H, W); images sharing a task set run together.

        task_sets: one task set per image (names or indices) to skip the router, e.g. when the task is known;
        then ``probs`` is empty unless given. batch_size: run each group's second pass in chunks of this size.
        """
        if len(pixel_values) == 0:
            return []
        if task_sets is None:
            probs, task_sets = self.route(pixel_values)
        else:
            if len(task_sets) != len(pixel_values):
                raise ValueError(f"{len(task_sets)} task sets for {len(pixel_values)} images")
            task_sets = [self.task_indices(t) for t in task_sets]
        out: list[Prediction | None] = [None] * len(task_sets)
        for task_set, indices in group_by_task_set(task_sets).items():
            step = batch_size or len(indices)
            for start in range(0, len(indices), step):
                chunk = indices[start:start + step]
                logits = self.logits(pixel_values[chunk], task_set, form)
                for row, index in zip(logits, chunk):
                    out[index] = self._prediction(row, task_set, None if probs is None else probs[index], top_k)
        return out

    def _prediction(self, row: np.ndarray, task_set: tuple[int, ...], probs, top_k: int) -> Prediction:
        position, cls, score = pick_heads([row[self._slices[t]] for t in task_set])
        task = task_set[position]
        head = row[self._slices[task]]
        names = self.classes[self.tasks[task]]
        best = np.argsort(-head, kind="stable")[:top_k]
        return Prediction(task=self.tasks[task], task_index=task, class_index=cls, class_name=names[cls], score=score,
                          confidence=class_confidence(head, cls), top_k=[(names[i], float(head[i])) for i in best],
                          task_set=tuple(self.tasks[t] for t in task_set),
                          probs={} if probs is None else {name: float(p) for name, p in zip(self.tasks, probs)})

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

    def classify_batches(self, items: Iterable, batch_size: int = options.BATCH_SIZE,
                         top_k: int = options.TOP_CLASSES, window: int | None = None) -> Iterator[list[Prediction]]:
        """Predictions in input order, ``batch_size`` at a time.

        window: images routed before any second pass (default ``DEFAULT_WINDOW_BATCHES * batch_size``): the
        window's images are grouped by task set across it, so each set's second pass runs in full batches; at
        most ``window`` images are held at once (decoded, in flight or awaiting output). ``window=batch_size``
        is the plain batch-by-batch loop; there, the next batch is decoded while this one runs.
        """
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1 (got {batch_size})")
        window = DEFAULT_WINDOW_BATCHES * batch_size if window is None else window
        if window < 1:
            raise ConfigError(f"window must be >= 1 (got {window})")
        with ThreadPoolExecutor(self.loader_threads) as pool:
            if window <= batch_size:
                yield from self._batch_by_batch(items, batch_size, top_k, pool)
                return
            for chunk in batched(items, window):
                predictions = self._classify_prepared(list(pool.map(self._prepare, chunk)), top_k, batch_size)
                del chunk
                yield from batched(predictions, batch_size)

    def _batch_by_batch(self, items, batch_size: int, top_k: int, pool) -> Iterator[list[Prediction]]:
        pending = []
        for chunk in batched(items, batch_size):
            submitted = [pool.submit(self._prepare, item) for item in chunk]
            if pending:
                yield self._classify_prepared([future.result() for future in pending], top_k, batch_size)
            pending = submitted
        if pending:
            yield self._classify_prepared([future.result() for future in pending], top_k, batch_size)

    def _classify_prepared(self, prepared, top_k: int, batch_size: int) -> list[Prediction]:
        good = [i for i, (pixels, *_rest) in enumerate(prepared) if pixels is not None]
        results = []
        if good:
            pixels = np.stack([prepared[i][0] for i in good])
            probs, task_sets = self._route_in_batches(pixels, batch_size)
            results = self.predict(pixels, top_k, task_sets=task_sets, probs=probs, batch_size=batch_size)
        out = [Prediction(path=path, error=error, warning=warning) for _, path, error, warning in prepared]
        for i, prediction in zip(good, results):
            prediction.path, prediction.warning = prepared[i][1], prepared[i][3]
            out[i] = prediction
        return out

    def _route_in_batches(self, pixels: np.ndarray, batch_size: int):
        routed = [self.route(pixels[start:start + batch_size]) for start in range(0, len(pixels), batch_size)]
        return np.concatenate([p for p, _ in routed]), [s for _, sets in routed for s in sets]

    def classify(self, items: Iterable, batch_size: int = options.BATCH_SIZE, top_k: int = options.TOP_CLASSES,
                 window: int | None = None, ids: Iterable | None = None) -> list[Prediction]:
        """One Prediction per item (a path, encoded bytes, a PIL image or an HWC uint8 array), in order.

        A path that cannot be read gives a Prediction with ``error`` set; the other items are still classified.
        ids: the caller's name for each item (in-memory items have no path), set as ``Prediction.id``.
        """
        predictions = [p for batch in self.classify_batches(items, batch_size, top_k, window) for p in batch]
        if ids is not None:
            ids = [None if i is None else str(i) for i in ids]
            if len(ids) != len(predictions):
                raise ValueError(f"{len(ids)} ids for {len(predictions)} items")
            for prediction, name in zip(predictions, ids):
                prediction.id = name
        return predictions
