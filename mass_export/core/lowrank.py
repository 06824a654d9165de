"""TSV-M of any task subset from stored factors, and MASS's task selection: numpy only.

Shared by the build room (to rebuild theta_MT) and the runtime (to prepare a task set's weights), so it must
never import torch. The torch SVD/polar forms in ``mass_export.merging.merge`` are its independent check.

Why the Gram form: polar(U_cat) = U_cat (U_cat^T U_cat)^(-1/2), so
    TSV-M(S) = U_cat  G_U^(-1/2) diag(s_cat) G_V^(-1/2)  V_cat
with G_U = U_cat^T U_cat and G_V = V_cat V_cat^T only |S|k x |S|k: no m x n SVD at run time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mass_export.core import options

# Eigenvalues of a Gram matrix below this fraction of the largest are treated as zero (pseudo-inverse square
# root), which makes the Gram form equal the polar factor P Q^T even when U_cat is rank-deficient. float64 eigh
# resolves eigenvalues down to ~n * eps * max (1.7e-13 for n = 768); a larger cutoff drops real directions:
# 1e-10 dropped one of a ViT-B-16 q block (sigma_min^2 = 3.1e-10) and moved its weights by 1.6e-4.
GRAM_RCOND = 1e-13


# A Gram matrix whose smallest kept eigenvalue is below this fraction of its largest is "ill-conditioned": float32
# products through its inverse square root would lose up to sqrt(1 / ratio) of float32's precision (10x here).
WELL_CONDITIONED = 1e-2
# The low-rank graph applies M in float32 to activations, (x V_cat^T) M^T U_cat^T: its rounding grows as
# 1/sqrt(spread) like the products'. It takes keys down to this spread (100x float32's precision, ~1e-5 of the
# update: every triple of the 4-task test build, whose spreads are ~6e-3); below it a task set runs dense.
LOW_RANK_GRAPH_SPREAD = 1e-4


def inverse_sqrt_psd(gram: np.ndarray, rcond: float = GRAM_RCOND, with_spread: bool = False):
    """(pseudo-)inverse square root of symmetric positive semi-definite matrices (..., n, n), batched.

    with_spread: also return, per matrix, smallest kept eigenvalue / largest (1 = orthonormal columns)."""
    eigenvalues, eigenvectors = np.linalg.eigh(gram)  # one LAPACK loop over the stack
    largest = np.maximum(eigenvalues[..., -1:], 0.0)
    keep = eigenvalues > rcond * largest
    scale = np.where(keep, 1.0 / np.sqrt(np.where(keep, eigenvalues, 1.0)), 0.0)
    result = (eigenvectors * scale[..., None, :]) @ np.swapaxes(eigenvectors, -1, -2)
    if not with_spread:
        return result
    smallest = np.where(keep, eigenvalues, np.inf).min(axis=-1)
    return result, np.where(largest[..., 0] > 0, smallest / np.where(largest[..., 0] > 0, largest[..., 0], 1), 1.0)


def _inverse_sqrt_both_sides(grams_u: np.ndarray, grams_v: np.ndarray):
    """``inverse_sqrt_psd`` (with spreads) of the U and the V Gram stacks, side by side in two threads: LAPACK
    releases the GIL, and the eigen-decompositions are most of preparing a task set. On ViT-B-16 x 8 (idle 2-core
    machine, one BLAS thread per side) a 3-task set's cores took 0.70-1.01 s instead of 1.32-1.72 s, a 2-task
    set's 0.32-0.44 s instead of 0.48-0.49 s. Each side runs on the BLAS threads the caller allows."""
    with ThreadPoolExecutor(1) as pool:
        side_u = pool.submit(inverse_sqrt_psd, grams_u, with_spread=True)
        side_v = inverse_sqrt_psd(grams_v, with_spread=True)
        return side_u.result(), side_v


def concatenated(U: np.ndarray, s: np.ndarray, V: np.ndarray, dtype=np.float32):
    """U_cat (m, Sk), s_cat (Sk,), V_cat (Sk, n) from per-task U (S, m, k), s (S, k), V (S, k, n)."""
    num_tasks, m, k = U.shape
    U_cat = np.ascontiguousarray(np.transpose(U, (1, 0, 2)).reshape(m, num_tasks * k), dtype=dtype)
    V_cat = np.ascontiguousarray(V.reshape(num_tasks * k, -1), dtype=dtype)
    return U_cat, s.reshape(-1).astype(np.float64), V_cat


def gram(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ right in float64: only |S|k x |S|k, but the inverse square roots amplify its rounding in nearly
    dependent subspaces (and fp16-stored factors are orthonormal only to ~1e-3), so it earns float64."""
    return left.astype(np.float64) @ right.astype(np.float64)


def tsvm_cores_many(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], dtype=np.float32,
                    grams: list[tuple[np.ndarray, np.ndarray]] | None = None,
                    well_conditioned: float = WELL_CONDITIONED) -> list[tuple]:
    """Per (U, s, V) of ``parts``, the small core its TSV-M factors are made from (``factors_from_core``).

    Usually ("middle", M): A = U_cat M (m, Sk), B = V_cat (Sk, n) with M = G_U^(-1/2) diag(s_cat) G_V^(-1/2)
    (|S|k x |S|k, in ``dtype``). M comes from float64 Gram matrices whose eigen-decompositions run batched over
    every key of the same |S|k; the big product U_cat M is in ``dtype`` (float32: its rounding is ~1e-7 of the
    update). When a Gram matrix is ill-conditioned (``WELL_CONDITIONED``; e.g. all T tasks, |S|k = min(m, n))
    the float32 form would cancel, so that key's core is ("balanced", A, B) with A = U_perp diag(s_cat),
    B = V_perp (both polar factors, orthonormal, computed in float64): the same product, no large entries.
    ``dtype=np.float64`` is the all-float64 form. grams: each part's (G_U, G_V) in float64 when the caller has
    them (``taskweights.GramBlocks`` assembles them from cached per-pair blocks), else they are computed here.
    well_conditioned: the spread below which a key's core is balanced (``LOW_RANK_GRAPH_SPREAD`` for the cores
    the low-rank graph takes).
    """
    cats: dict[int, tuple] = {}

    def cat(i):  # U_cat, s_cat, V_cat, made only where needed
        if i not in cats:
            cats[i] = concatenated(*parts[i], dtype)
        return cats[i]

    out: list[tuple | None] = [None] * len(parts)
    by_rank: dict[int, list[int]] = {}
    for index, (_, s, _) in enumerate(parts):
        by_rank.setdefault(s.size, []).append(index)
    for indices in by_rank.values():
        if grams is None:
            grams_u = np.stack([gram(cat(i)[0].T, cat(i)[0]) for i in indices])
            grams_v = np.stack([gram(cat(i)[2], cat(i)[2].T) for i in indices])
        else:
            grams_u = np.stack([grams[i][0] for i in indices])
            grams_v = np.stack([grams[i][1] for i in indices])
        # No shortcut for a single task: the polar step the reference applies must be applied here too.
        (roots_u, spread_u), (roots_v, spread_v) = _inverse_sqrt_both_sides(grams_u, grams_v)
        for position, i in enumerate(indices):
            s_cat = parts[i][1].reshape(-1).astype(np.float64)
            if dtype == np.float64 or min(spread_u[position], spread_v[position]) >= well_conditioned:
                middle = roots_u[position] @ (s_cat[:, None] * roots_v[position])
                out[i] = ("middle", middle.astype(dtype))
            else:
                U_cat, _, V_cat = cat(i)
                U_perp = U_cat.astype(np.float64) @ roots_u[position]
                V_perp = roots_v[position] @ V_cat.astype(np.float64)
                out[i] = ("balanced", (U_perp * s_cat).astype(dtype), V_perp.astype(dtype))
    return out


def factors_from_core(U: np.ndarray, s: np.ndarray, V: np.ndarray, core: tuple,
                      dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A @ B = TSV-M of the tasks of U (S, m, k), s (S, k), V (S, k, n), from their core."""
    if core[0] == "balanced":
        return core[1], core[2]
    U_cat, _, V_cat = concatenated(U, s, V, dtype)
    return U_cat @ core[1], V_cat


def tsvm_factors_many(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], dtype=np.float32,
                      grams: list[tuple[np.ndarray, np.ndarray]] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A, B) with A @ B = TSV-M for each (U, s, V) of ``parts`` (rank |S|k each), in ``dtype``: see
    ``tsvm_cores_many``."""
    cores = tsvm_cores_many(parts, dtype, grams)
    return [factors_from_core(*part, core, dtype) for part, core in zip(parts, cores)]


def tsvm_factors(U: np.ndarray, s: np.ndarray, V: np.ndarray, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Factors (A, B) with A @ B = TSV-M of the given tasks (float64 by default: the exact form).

    U: (S, m, k), s: (S, k), V: (S, k, n) for the S selected tasks. Returns A (m, Sk), B (Sk, n).
    """
    return tsvm_factors_many([(U, s, V)], dtype)[0]


def tsvm_delta(U: np.ndarray, s: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Dense TSV-M update (m, n) in float32."""
    A, B = tsvm_factors(U, s, V)
    return (A @ B).astype(np.float32)


def zscore_softmax(residuals: np.ndarray, tau: float = options.default("tau")) -> np.ndarray:
    """Router probabilities from residuals (B, T): softmax of the z-scored negative residuals over tasks."""
    scores = -residuals.astype(np.float64)
    if scores.shape[1] > 1:
        std = scores.std(axis=1, ddof=1, keepdims=True)  # unbiased, as torch.std
        scores = (scores - scores.mean(axis=1, keepdims=True)) / (std + 1e-6)
    scores = scores / tau
    scores = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(scores)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def select_task_sets(probs: np.ndarray, eta: float, top_k: int) -> list[tuple[int, ...]]:
    """Per sample: tasks with p > eta, at most top_k of the largest, else the argmax; ascending task order."""
    selected = []
    for row in np.asarray(probs):
        order = np.argsort(-row, kind="stable")
        chosen = [int(t) for t in order[:top_k] if row[t] > eta]
        selected.append(tuple(sorted(chosen)) if chosen else (int(order[0]),))
    return selected


def pick_heads(logits_per_task: list[np.ndarray]) -> tuple[int, int, float]:
    """Among candidate heads' logits (one 1-D array each), the (position, class, score) of the largest logit.

    A tie goes to the first candidate, as in the reference.
    """
    best = max(range(len(logits_per_task)), key=lambda i: (float(logits_per_task[i].max()), -i))
    winner = logits_per_task[best]
    cls = int(np.argmax(winner))
    return best, cls, float(winner[cls])


def group_by_task_set(task_sets: list[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Sample indices per task set, in first-seen order, so each set's second pass runs once."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, task_set in enumerate(task_sets):
        groups.setdefault(task_set, []).append(index)
    return groups
