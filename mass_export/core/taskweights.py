"""Dense tower weights for a task set, rebuilt from a build's stored parts: numpy only.

theta(S) = theta_pre + alpha * TSV-M(S) on 2-D keys and theta_pre + alpha * mean_{i in S} delta_i elsewhere.
theta_MT is the same with S = all tasks, except that each 2-D key merges only its ``base`` tasks (the
no-redundancy pass may drop some per key).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mass_export.core.lowrank import tsvm_factors

QKV_PARTS = ("q", "k", "v")
FACTOR_FIELDS = ("U", "s", "V", "base")


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


def low_rank_update(parts: dict[str, np.ndarray], tasks) -> tuple[np.ndarray, np.ndarray]:
    index = np.asarray(tasks, dtype=np.int64)
    return tsvm_factors(parts["U"][index], parts["s"][index], parts["V"][index])


def task_set_weights(stored: StoredTasks, tasks, keys=None, base: bool = False) -> dict[str, np.ndarray]:
    """fp32 weights for the graph inputs: theta(tasks), or theta_MT when ``base`` (then ``tasks`` = all)."""
    tasks = tuple(tasks)
    out: dict[str, np.ndarray] = {}
    wanted = None if keys is None else set(keys)
    for factor_key, parts in stored.factors.items():
        key, block = weight_key(factor_key)
        if wanted is not None and key not in wanted:
            continue
        chosen = [t for t in tasks if parts["base"][t]] if base else list(tasks)
        if key not in out:
            out[key] = stored.pretrained[key].astype(np.float64)
        if not chosen:
            continue
        A, B = low_rank_update(parts, chosen)
        rows = A.shape[0]
        target = out[key] if block is None else out[key][block * rows:(block + 1) * rows]
        target += stored.alpha * (A @ B)
    for key, delta in stored.deltas.items():
        if wanted is not None and key not in wanted:
            continue
        mean = delta[list(tasks)].astype(np.float64).mean(axis=0)
        out[key] = stored.pretrained[key] + stored.alpha * mean
    for key, value in stored.pretrained.items():
        if (wanted is None or key in wanted) and key not in out:
            out[key] = value  # integer buffers and anything without a delta
    return {key: np.ascontiguousarray(value, dtype=np.float32) if value.dtype.kind == "f" else value
            for key, value in out.items()}
