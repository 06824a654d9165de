"""MASS's merge math as pure functions on state dicts (torch).

These are the reference forms, written the way the paper states them (SVD, polar factors). The runtime's
Gram form in ``mass_export.core.lowrank`` is checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mass_export.core.errors import ConfigError
from mass_export.core.taskweights import QKV_PARTS


@dataclass
class TaskFactors:
    """Per-task truncated SVDs of 2-D deltas (stacked over tasks) and whole non-2-D deltas."""

    U: dict[str, torch.Tensor]  # key -> (T, m, k)
    s: dict[str, torch.Tensor]  # key -> (T, k)
    V: dict[str, torch.Tensor]  # key -> (T, k, n), rows of V^T
    whole: dict[str, torch.Tensor]  # key -> (T, *shape)

    @property
    def num_tasks(self) -> int:
        return next(iter(self.U.values())).shape[0]


def task_delta(pretrained: dict, finetuned: dict) -> dict[str, torch.Tensor]:
    """theta_ft - theta_pre for every floating-point tensor (integer buffers carry no task information)."""
    return {key: finetuned[key].float() - value.float()
            for key, value in pretrained.items() if value.is_floating_point()}


def split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each fused attention ``in_proj_weight`` (3d x d) by its q, k, v blocks (d x d each)."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn.in_proj_weight") and value.ndim == 2:
            for part, block in zip(QKV_PARTS, value.chunk(3, dim=0)):
                out[f"{key}.{part}"] = block
        else:
            out[key] = value
    return out


def truncation_rank(shape, num_tasks: int, rank: int | None = None, key: str = "") -> int:
    """MASS's k = floor(min(m, n) / T), or the user's override (capped at min(m, n))."""
    full = min(shape)
    k = full // num_tasks if rank is None else min(rank, full)
    if k < 1:
        raise ConfigError(
            f"{key} {tuple(shape)}: rank floor({full}/{num_tasks}) = 0; at most {full} tasks fit this model"
            if rank is None else f"--rank must be >= 1 (got {rank})")
    return k


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` thin SVD in fp32: U (m, k), s (k), V (k, n)."""
    U, s, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return U[:, :rank].contiguous(), s[:rank].contiguous(), Vh[:rank].contiguous()


def truncate_task(delta: dict[str, torch.Tensor], num_tasks: int, rank: int | None = None,
                  split: bool = True) -> dict[str, tuple]:
    """One task's stored parts: (U, s, V) for each 2-D key, the whole delta for the others."""
    delta = split_qkv(delta) if split else delta
    return {key: truncated_svd(value, truncation_rank(value.shape, num_tasks, rank, key)) if value.ndim == 2
            else value for key, value in delta.items()}


def stack_tasks(parts: list[dict[str, tuple]]) -> TaskFactors:
    """Stack per-task parts (from truncate_task, in task order) into TaskFactors."""
    U, s, V, whole = {}, {}, {}, {}
    for key, first in parts[0].items():
        if isinstance(first, tuple):
            U[key], s[key], V[key] = (torch.stack(p) for p in zip(*(task[key] for task in parts)))
        else:
            whole[key] = torch.stack([task[key] for task in parts])
    return TaskFactors(U, s, V, whole)


def task_factors(deltas: list[dict[str, torch.Tensor]], rank: int | None = None, split: bool = True) -> TaskFactors:
    return stack_tasks([truncate_task(d, len(deltas), rank, split) for d in deltas])


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of matrix = P Sigma Q^T."""
    P, _, Qh = torch.linalg.svd(matrix, full_matrices=False)
    return P @ Qh


def tsvm(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """TSV-M of the stacked tasks (S, m, k), (S, k), (S, k, n) -> (m, n), via polar factors in float64."""
    U_cat = torch.cat(list(U.double()), dim=1)
    V_cat = torch.cat(list(V.double()), dim=0)
    return (polar_factor(U_cat) * s.double().reshape(-1)) @ polar_factor(V_cat)


def reconstruction(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Each task's truncated delta, (S, m, n)."""
    return (U * s[:, None, :]) @ V


def non_redundant_tasks(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, threshold: float = 0.3) -> list[int]:
    """Greedy in task order: skip a task whose truncated delta has cosine > threshold with an accepted one."""
    flat = torch.nn.functional.normalize(reconstruction(U.double(), s.double(), V.double()).flatten(1), dim=1)
    accepted: list[int] = []
    for task in range(flat.shape[0]):
        if all(float(flat[task] @ flat[other]) <= threshold for other in accepted):
            accepted.append(task)
    return accepted


# Merge bases: how theta_MT picks, per 2-D key, the tasks whose TSV-M it adds. A new base is one function
# registered here (its name is then a --base choice: add it to the option's choices in core/options.py; a test
# checks the two agree).
BASES: dict = {}


def merge_base(name: str):
    def register(function):
        BASES[name] = function
        return function
    return register


@merge_base("tsv")
def every_task(factors: TaskFactors, threshold: float) -> dict[str, list[int]]:
    """Plain TSV-M of all tasks (the authors' earlier code)."""
    return {key: list(range(factors.num_tasks)) for key in factors.U}


@merge_base("no-redundancy")
def non_redundant(factors: TaskFactors, threshold: float) -> dict[str, list[int]]:
    """Greedily skip a task whose update has cosine > threshold with an accepted one (the authors' latest)."""
    return {key: non_redundant_tasks(factors.U[key], factors.s[key], factors.V[key], threshold) for key in factors.U}


def base_tasks(factors: TaskFactors, base: str = "no-redundancy", threshold: float = 0.3) -> dict[str, list[int]]:
    """Per 2-D key, the tasks that take part in theta_MT."""
    if base not in BASES:
        raise ConfigError(f"unknown --base {base!r}: choose {' or '.join(BASES)}")
    return BASES[base](factors, threshold)


def merged_tower(pretrained: dict[str, torch.Tensor], factors: TaskFactors, tasks, alpha: float = 1.0,
                 per_key_tasks: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """theta_pre + alpha * TSV-M(tasks) (2-D keys; ``per_key_tasks`` overrides the set per key) and
    theta_pre + alpha * mean of the tasks' deltas (other keys). Keys are the canonical (fused) ones."""
    tasks = list(tasks)
    updates: dict[str, torch.Tensor] = {}
    for key in factors.U:
        chosen = per_key_tasks[key] if per_key_tasks is not None else tasks
        if chosen:
            updates[key] = tsvm(factors.U[key][chosen], factors.s[key][chosen], factors.V[key][chosen])
    for key, whole in factors.whole.items():
        updates[key] = whole[tasks].double().mean(dim=0)
    fused = {}
    for key, update in updates.items():
        base, _, part = key.rpartition(".")
        if part in QKV_PARTS and base.endswith("in_proj_weight"):
            fused.setdefault(base, [None] * 3)[QKV_PARTS.index(part)] = update
        else:
            fused[key] = update
    out = {}
    for key, value in pretrained.items():
        update = fused.get(key)
        if isinstance(update, list):
            rows = value.shape[0] // 3
            update = torch.cat([u if u is not None else value.new_zeros(rows, value.shape[1]).double()
                                for u in update])
        out[key] = value if update is None else (value.double() + alpha * update).float()
    return out


def factors_to_flat(factors: TaskFactors, bases: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The safetensors layout of docs/build-format.md: K.U, K.s, K.V, K.base."""
    flat = {}
    for key in factors.U:
        flat[f"{key}.U"], flat[f"{key}.s"], flat[f"{key}.V"] = factors.U[key], factors.s[key], factors.V[key]
        mask = torch.zeros(factors.num_tasks, dtype=torch.uint8)
        mask[bases[key]] = 1
        flat[f"{key}.base"] = mask
    return {k: v.contiguous() for k, v in flat.items()}
