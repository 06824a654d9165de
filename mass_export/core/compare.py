"""Comparing arrays against a reference so that NaN never passes: the largest difference, and one record per
compared graph and batch size (as Polygraphy's comparator keeps one result per output and iteration). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def finite_or_nan(array) -> float:
    """0.0 when every value is finite, else NaN: an output with no reference to compare still must not be NaN."""
    return 0.0 if np.isfinite(np.asarray(array, dtype=np.float64)).all() else float("nan")


@dataclass(frozen=True)
class Comparison:
    """One graph's outputs against the reference on one batch: the largest difference and whether it passes."""

    graph: str
    batch_size: int
    max_abs_diff: float  # NaN when either side held NaN/Inf
    atol: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.atol)

    def record(self) -> dict:
        """As strict JSON: a NaN difference is written as null."""
        value = self.max_abs_diff if np.isfinite(self.max_abs_diff) else None
        return {"graph": self.graph, "batch_size": self.batch_size, "max_abs_diff": value, "atol": self.atol,
                "passed": self.passed}


def worst_per_graph(comparisons, graphs=()) -> dict[str, float]:
    """The worst difference of each graph over all its comparisons (``graphs`` listed first, 0.0 if never
    compared), NaN-aware."""
    out = {name: 0.0 for name in graphs}
    for comparison in comparisons:
        out[comparison.graph] = worse(out.get(comparison.graph, 0.0), comparison.max_abs_diff)
    return out
