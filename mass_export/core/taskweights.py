"""Dense tower weights for a task set, rebuilt from a build's stored parts: numpy only.

theta(S) = theta_pre + alpha * TSV-M(S) on 2-D keys and theta_pre + alpha * mean_{i in S} delta_i elsewhere.
theta_MT is the same with S = all tasks, except that each 2-D key merges only its ``base`` tasks (the
no-redundancy pass may drop some per key).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from mass_export.core.lowrank import (LOW_RANK_GRAPH_SPREAD, WELL_CONDITIONED, concatenated, factors_from_core,
                                     tsvm_cores_many)

QKV_PARTS = ("q", "k", "v")
# Factor keys whose eigen-decompositions run in one batch when dense weights are made: batching amortises the
# LAPACK calls, while a whole tower's float64 Gram matrices, cores and factors at once cost ~3 GB more than the
# tower on ViT-B-16 theta_MT (measured; benchmarks/README.md, build memory).
KEYS_PER_BATCH = 16


@dataclass
class StoredTasks:
    """A build's per-task parts as numpy arrays (see docs/build-format.md)."""

    pretrained: dict[str, np.ndarray]
    factors: dict[str, dict[str, np.ndarray]]  # factor key -> {"U", "s", "V", "base"}
    deltas: dict[str, np.ndarray]  # non-2-D key -> (T, *shape)
    alpha: float = 1.0

    @classmethod
    def from_flat(cls, pretrained, factor_tensors, deltas, alpha=1.0):
        factors: dict[str, dict[str, np.ndarray]] = {}
        for name, array in factor_tensors.items():
            key, field = name.rsplit(".", 1)
            factors.setdefault(key, {})[field] = array
        return cls(dict(pretrained), factors, dict(deltas), alpha)

    @property
    def num_tasks(self) -> int:
        return next(iter(self.factors.values()))["U"].shape[0]


def weight_key(factor_key: str) -> tuple[str, int | None]:
    """Canonical weight a factor key belongs to, and its q/k/v row block (None when stored fused)."""
    head, _, last = factor_key.rpartition(".")
    if last in QKV_PARTS and head.endswith("in_proj_weight"):
        return head, QKV_PARTS.index(last)
    return factor_key, None


class GramBlocks:
    """Per factor key, the float64 Gram blocks U_i^T U_j and V_i V_j^T of task pairs (i <= j), kept once computed.

    A task set's Gram matrices G_U = U_cat^T U_cat and G_V = V_cat V_cat^T are made of these k x k blocks, so a
    set whose pairs have all been seen assembles them at no cost instead of m x |S|k x |S|k products (about a
    third of preparing a 2- or 3-task set's factors on ViT-B-16). A set with an unseen pair computes its Gram
    matrices in one product, as without the store, and keeps their blocks; loading theta_MT does so for every
    pair of its tasks. The blocks are the numbers a full product gives, so exactness does not change.
    Bounded: a block that would take the store past ``capacity_bytes`` is not kept (all pairs of all keys take
    ``full_bytes``: 2 * T(T+1)/2 * k^2 * 8 per key, 385 MB for ViT-B-16 with T = 8). ``computed`` counts Gram
    matrices computed rather than assembled.
    """

    def __init__(self, stored: StoredTasks, capacity_bytes: int | None = None):
        self.stored = stored
        self.capacity_bytes = self.full_bytes(stored) if capacity_bytes is None else int(capacity_bytes)
        self._blocks: dict[tuple[str, str, int, int], np.ndarray] = {}
        self._lock = threading.Lock()
        self.bytes = self.computed = 0

    @staticmethod
    def full_bytes(stored: StoredTasks) -> int:
        total = 0
        for parts in stored.factors.values():
            tasks, k = parts["s"].shape
            total += 2 * tasks * (tasks + 1) // 2 * k * k * 8
        return total

    def _full(self, factor_key: str, side: str, tasks: list[int]) -> np.ndarray:
        """The Gram matrix of these tasks in one float64 product (the form without the store)."""
        parts = self.stored.factors[factor_key]
        if side == "U":
            cat = np.concatenate([parts["U"][t] for t in tasks], axis=1).astype(np.float64)
            return cat.T @ cat
        cat = np.concatenate([parts["V"][t] for t in tasks], axis=0).astype(np.float64)
        return cat @ cat.T

    def grams(self, factor_key: str, tasks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(G_U, G_V), each (|S|k, |S|k) float64, of these tasks (in this order) for one factor key.

        When a block is missing, the whole Gram matrix is computed in one product (what it cost without the
        store) and its blocks are kept; else it is assembled from the blocks."""
        k = self.stored.factors[factor_key]["s"].shape[1]
        pairs = [(a, b) for a in range(len(tasks)) for b in range(a, len(tasks))]
        out = []
        for side in ("U", "V"):
            found = [self._blocks.get((factor_key, side, tasks[a], tasks[b])) for a, b in pairs]
            if any(block is None for block in found):
                full = self._full(factor_key, side, tasks)
                self._keep(factor_key, side, tasks, pairs, full, k)
            else:
                full = np.empty((len(tasks) * k, len(tasks) * k))
                for (a, b), block in zip(pairs, found):
                    full[a * k:(a + 1) * k, b * k:(b + 1) * k] = block
                    if b != a:
                        full[b * k:(b + 1) * k, a * k:(a + 1) * k] = block.T
            out.append(full)
        return out[0], out[1]

    def _keep(self, factor_key: str, side: str, tasks, pairs, full: np.ndarray, k: int) -> None:
        with self._lock:
            self.computed += 1
            for a, b in pairs:
                name = (factor_key, side, tasks[a], tasks[b])
                if name not in self._blocks and self.bytes + k * k * 8 <= self.capacity_bytes:
                    self._blocks[name] = full[a * k:(a + 1) * k, b * k:(b + 1) * k].copy()
                    self.bytes += k * k * 8

    def fill(self, tasks) -> None:
        """Compute and keep every pair of ``tasks`` for every key (one product per key and side)."""
        for factor_key in self.stored.factors:
            self.grams(factor_key, list(tasks))

    def info(self) -> dict:
        with self._lock:
            return {"blocks": len(self._blocks), "bytes": self.bytes, "capacity_bytes": self.capacity_bytes,
                    "computed": self.computed}


def _chosen_tasks(parts: dict[str, np.ndarray], tasks: tuple[int, ...], base: bool) -> list[int]:
    return [t for t in tasks if parts["base"][t]] if base else list(tasks)


def _factor_keys(stored: StoredTasks, keys) -> list[str]:
    """The factor keys of the wanted weights (all when ``keys`` is None), in stored order."""
    wanted = None if keys is None else set(keys)
    return [k for k in stored.factors if wanted is None or weight_key(k)[0] in wanted]


def _selected_parts(stored: StoredTasks, tasks, factor_keys, base: bool) -> dict[str, tuple[list[int], tuple]]:
    """Per factor key: its chosen tasks and their (U, s, V); keys whose task list is empty (theta_MT's
    no-redundancy pass) are left out."""
    selected = {}
    for factor_key in factor_keys:
        parts = stored.factors[factor_key]
        chosen = _chosen_tasks(parts, tuple(tasks), base)
        if chosen:
            index = np.asarray(chosen, dtype=np.int64)
            selected[factor_key] = (chosen, (parts["U"][index], parts["s"][index], parts["V"][index]))
    return selected


def task_set_cores(stored: StoredTasks, tasks, keys=None, base: bool = False, dtype=np.float32,
                   blocks: GramBlocks | None = None, well_conditioned: float = WELL_CONDITIONED) -> dict[str, tuple]:
    """Per factor key of the wanted weights: the small core of its TSV-M (``lowrank.tsvm_cores_many``: the
    |S|k x |S|k middle M in ``dtype``, or the balanced factors of a key whose Gram spread is below
    ``well_conditioned``). The eigen-decompositions run batched across keys; the Gram matrices come from
    ``blocks`` when given."""
    return _cores(_selected_parts(stored, tasks, _factor_keys(stored, keys), base), dtype, blocks, well_conditioned)


def _cores(selected: dict[str, tuple[list[int], tuple]], dtype, blocks: GramBlocks | None,
           well_conditioned: float = WELL_CONDITIONED) -> dict[str, tuple]:
    grams = [blocks.grams(key, chosen) for key, (chosen, _) in selected.items()] if blocks is not None else None
    return dict(zip(selected, tsvm_cores_many([parts for _, parts in selected.values()], dtype, grams,
                                              well_conditioned)))


def mean_deltas(stored: StoredTasks, tasks, keys=None) -> dict[str, np.ndarray]:
    """theta_pre + alpha * mean over ``tasks`` of the non-2-D deltas, float32."""
    index = list(tasks)
    return {key: np.asarray(stored.pretrained[key] + stored.alpha * delta[index].astype(np.float64).mean(axis=0),
                            dtype=np.float32)
            for key, delta in stored.deltas.items() if keys is None or key in keys}


def task_set_weights(stored: StoredTasks, tasks, keys=None, base: bool = False,
                     blocks: GramBlocks | None = None) -> dict[str, np.ndarray]:
    """fp32 weights for the graph inputs: theta(tasks), or theta_MT when ``base`` (then ``tasks`` = all).

    Each 2-D weight is theta_pre + alpha * A @ B computed in float32 straight into its output array (no float64
    copy of the tower): the rounding of the product is relative to the update, ~1e-7 of it. theta_MT (``base``)
    merges all T tasks, where |S|k reaches min(m, n) and the Gram matrices can be ill-conditioned; it is made
    once per load, so it is computed in float64 throughout.
    """
    tasks = tuple(tasks)
    wanted = None if keys is None else set(keys)
    dtype = np.float64 if base else np.float32
    factor_keys = _factor_keys(stored, keys)
    parts_left = Counter(weight_key(k)[0] for k in factor_keys)  # q/k/v blocks of one weight may span batches
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(factor_keys), KEYS_PER_BATCH):
        selected = _selected_parts(stored, tasks, factor_keys[start:start + KEYS_PER_BATCH], base)
        cores = _cores(selected, dtype, blocks)
        for factor_key, (_, parts) in selected.items():
            A, B = factors_from_core(*parts, cores.pop(factor_key), dtype)
            key, block = weight_key(factor_key)
            if key not in out:
                out[key] = np.array(stored.pretrained[key], dtype=dtype, copy=True)
            rows = A.shape[0]
            target = out[key] if block is None else out[key][block * rows:(block + 1) * rows]
            update = np.matmul(A, B)
            if stored.alpha != 1:
                update *= stored.alpha
            target += update
        for factor_key in factor_keys[start:start + KEYS_PER_BATCH]:
            key = weight_key(factor_key)[0]
            parts_left[key] -= 1
            if not parts_left[key] and key in out:  # done: float32 now, so one float64 weight is held, not a tower
                out[key] = np.ascontiguousarray(out[key], dtype=np.float32)
    out.update(mean_deltas(stored, tasks, wanted))
    for key, value in stored.pretrained.items():
        if (wanted is None or key in wanted) and key not in out:
            out[key] = value  # integer buffers, 2-D keys without a selected task, anything without a delta
    return {key: np.ascontiguousarray(value, dtype=np.float32) if value.dtype.kind == "f" else value
            for key, value in out.items()}


TASKS_INPUT = "tasks"  # the low-rank graph's selected task indices (|S|,), int64, shared by every linear weight
DENSE_OUTPUT = "{}.dense"  # the densify graph's output for a linear weight (its input of that name is theta_pre)
FACTOR_FIELDS = ("U", "V", "M")


def factor_input_names(factor_key: str) -> tuple[str, str, str]:
    """The low-rank graph's inputs for one factor key: the build's stacks U (T, m, k) and V (T, k, n) (fed once)
    and the task set's core M (|S|, k, |S|, k) (fed per set)."""
    return tuple(f"{factor_key}.{field}" for field in FACTOR_FIELDS)


def low_rank_stacks(stored: StoredTasks, factor_keys) -> dict[str, np.ndarray]:
    """The low-rank graph's per-build inputs: every task's U and V of each factor key, float32 (the stored arrays
    themselves when they are float32 already: nothing is copied)."""
    out = {}
    for factor_key in factor_keys:
        name_u, name_v, _ = factor_input_names(factor_key)
        parts = stored.factors[factor_key]
        out[name_u] = np.ascontiguousarray(parts["U"], dtype=np.float32)
        out[name_v] = np.ascontiguousarray(parts["V"], dtype=np.float32)
    return out


def low_rank_inputs(stored: StoredTasks, tasks, keys, linear_keys, blocks: GramBlocks | None = None,
                    cores: dict[str, tuple] | None = None) -> dict[str, np.ndarray] | None:
    """The low-rank graph's per-task-set inputs: ``tasks`` (|S|,), the core ``K.M`` (|S|, k, |S|, k, alpha folded
    in) of every factor key of the ``linear_keys`` and dense theta(S) for the other ``keys``; None when a key's
    Gram spread is below ``lowrank.LOW_RANK_GRAPH_SPREAD`` (its float32 core would lose precision in the graph,
    so the set runs dense). cores: ``task_set_cores(stored, tasks, linear_keys,
    well_conditioned=LOW_RANK_GRAPH_SPREAD)`` when the caller kept them."""
    tasks = tuple(tasks)
    factor_keys = _factor_keys(stored, linear_keys)
    if cores is None:
        cores = _cores(_selected_parts(stored, tasks, factor_keys, False), np.float32, blocks, LOW_RANK_GRAPH_SPREAD)
    if any(cores[key][0] != "middle" for key in factor_keys):
        return None
    linear = {weight_key(key)[0] for key in factor_keys}
    out = task_set_weights(stored, tasks, keys=[k for k in keys if k not in linear], blocks=blocks)
    out[TASKS_INPUT] = np.asarray(tasks, dtype=np.int64)
    for key in factor_keys:
        middle = cores[key][1]
        k = stored.factors[key]["s"].shape[1]
        middle = middle * np.float32(stored.alpha) if stored.alpha != 1 else middle
        out[factor_input_names(key)[2]] = np.ascontiguousarray(middle.reshape(len(tasks), k, len(tasks), k))
    return out


def dense_from_low_rank(stored: StoredTasks, inputs: dict[str, np.ndarray], linear_keys) -> dict[str, np.ndarray]:
    """theta(S) from the low-rank inputs: W = theta_pre + U_cat M V_cat per (row block of a) linear weight
    (float32, straight into W); the other keys are the same arrays."""
    tasks = list(inputs[TASKS_INPUT])
    factor_keys = _factor_keys(stored, linear_keys)
    names = {TASKS_INPUT} | {factor_input_names(key)[2] for key in factor_keys}
    out = {key: value for key, value in inputs.items() if key not in names}
    for factor_key in factor_keys:
        parts = stored.factors[factor_key]
        U_cat, _, V_cat = concatenated(parts["U"][tasks], parts["s"][tasks], parts["V"][tasks])
        middle = inputs[factor_input_names(factor_key)[2]]
        rank = middle.shape[0] * middle.shape[1]
        key, block = weight_key(factor_key)
        if key not in out:
            out[key] = np.array(stored.pretrained[key], dtype=np.float32, copy=True)
        rows = U_cat.shape[0]
        target = out[key] if block is None else out[key][block * rows:(block + 1) * rows]
        target += (U_cat @ middle.reshape(rank, rank)) @ V_cat
    return out
