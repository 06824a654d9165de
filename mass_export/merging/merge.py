"""MASS's merge math as pure functions on state dicts (torch).

These are the reference forms, written the way the paper states them (SVD, polar factors). The runtime's
Gram form in ``mass_export.core.lowrank`` is checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mass_export.core import options
from mass_export.core.errors import CheckpointError, ConfigError
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
    """Top-``rank`` thin SVD in fp32 (the authors' form): U (m, k), s (k), V (k, n). The independent form the
    build's Gram truncation is checked against."""
    U, s, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return U[:, :rank].contiguous(), s[:rank].contiguous(), Vh[:rank].contiguous()


# Below this ratio s_k^2 / s_1^2 the Gram matrix's float64 eigenvalues stop resolving the k-th direction
# (eigenvalue error ~ 1e-16 * s_1^2), so such a matrix (e.g. an untouched key, delta 0) takes the full SVD.
GRAM_RESOLUTION = 1e-10


def _top_eigenpairs(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` largest eigenpairs of a symmetric float64 matrix, largest first. On the CPU LAPACK's
    dsyevr computes only those (the eigen step 3x faster than torch's full eigh on 1024 x 1024); on a GPU,
    torch's eigh."""
    if gram.device.type == "cpu":
        import scipy.linalg
        from threadpoolctl import threadpool_limits

        n = gram.shape[-1]
        # scipy's own OpenBLAS ignores torch.set_num_threads: hold it to --threads (2 threads on a busy 2-core
        # machine made this step 4x slower, benchmarks/README.md).
        with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
            values, vectors = scipy.linalg.eigh(gram.numpy(), subset_by_index=[n - rank, n - 1], driver="evr",
                                                check_finite=True)
        return torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())
    values, vectors = torch.linalg.eigh(gram)
    return values[..., -rank:].flip(-1), vectors[..., -rank:].flip(-1)


def top_singular_triplets(matrix: torch.Tensor, rank: int, device: str = options.default("device")
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` factors of ``matrix``'s SVD, fp32 (U (m, k), s (k), V (k, n)), from a float64
    eigen-decomposition of the smaller Gram matrix: G = A^T A = W diag(s^2) W^T, U = A W / s. Same
    factors as ``truncated_svd`` up to each pair's sign (which no product of MASS sees), reconstruction
    U diag(s) V within 1e-5 of it (tests/test_merge.py), and 2-7x faster on most ViT shapes (benchmarks/)."""
    A = matrix.to(device=device, dtype=torch.float64)
    wide = A.shape[0] < A.shape[1]
    if wide:
        A = A.T
    values, W = _top_eigenpairs((A.T @ A).to(A.device), rank)
    if not torch.isfinite(values).all():
        raise ValueError("non-finite values in a task update (a NaN or inf in the fine-tuned checkpoint?)")
    if values[-1] <= GRAM_RESOLUTION * values[0]:
        U, s, Vh = torch.linalg.svd(matrix.to(device=device, dtype=torch.float64), full_matrices=False)
        return U[:, :rank].float().cpu(), s[:rank].float().cpu(), Vh[:rank].float().cpu()
    W = W.to(A.device)
    s = values.to(A.device).sqrt()
    U = (A @ W) / s
    if wide:
        U, W = W, U
    return U.float().cpu().contiguous(), s.float().cpu().contiguous(), W.T.float().cpu().contiguous()


def truncate_task(delta: dict[str, torch.Tensor], num_tasks: int, rank: int | None = options.default("rank"),
                  split: bool = options.default("split_qkv"), device: str = options.default("device")
                  ) -> dict[str, tuple]:
    """One task's stored parts: (U, s, V) for each 2-D key, the whole delta for the others."""
    delta = split_qkv(delta) if split else delta
    parts = {}
    for key, value in delta.items():
        if value.ndim != 2:
            parts[key] = value
            continue
        try:
            parts[key] = top_singular_triplets(value, truncation_rank(value.shape, num_tasks, rank, key), device)
        except ValueError as error:  # scipy's check_finite: a NaN or inf in the update
            raise CheckpointError(f"{key}: the task update is not finite ({error})") from None
    return parts


def empty_factors(first: dict[str, tuple], num_tasks: int) -> TaskFactors:
    """Room for ``num_tasks`` tasks shaped like the first task's parts: filled in place by ``put_task``, so the
    build holds the stored factors once (never a list of parts and their stacked copy)."""
    U, s, V, whole = {}, {}, {}, {}
    for key, part in first.items():
        if isinstance(part, tuple):
            U[key], s[key], V[key] = (p.new_empty((num_tasks, *p.shape)) for p in part)
        else:
            whole[key] = part.new_empty((num_tasks, *part.shape))
    return TaskFactors(U, s, V, whole)


def put_task(factors: TaskFactors, index: int, part: dict[str, tuple]) -> None:
    for key, value in part.items():
        if isinstance(value, tuple):
            factors.U[key][index], factors.s[key][index], factors.V[key][index] = value
        else:
            factors.whole[key][index] = value


def stack_tasks(parts: list[dict[str, tuple]]) -> TaskFactors:
    """Stack per-task parts (from truncate_task, in task order) into TaskFactors."""
    factors = empty_factors(parts[0], len(parts))
    for index, part in enumerate(parts):
        put_task(factors, index, part)
    return factors


def task_factors(deltas: list[dict[str, torch.Tensor]], rank: int | None = options.default("rank"),
                 split: bool = options.default("split_qkv")) -> TaskFactors:
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


def non_redundant_tasks(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, threshold: float) -> list[int]:
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


def base_tasks(factors: TaskFactors, base: str = options.default("base"),
               threshold: float = options.default("redundancy_threshold")) -> dict[str, list[int]]:
    """Per 2-D key, the tasks that take part in theta_MT."""
    if base not in BASES:
        raise ConfigError(f"unknown --base {base!r}: choose {' or '.join(BASES)}")
    return BASES[base](factors, threshold)


def merged_tower(pretrained: dict[str, torch.Tensor], factors: TaskFactors, tasks,
                 alpha: float = options.default("alpha"), per_key_tasks: dict[str, list[int]] | None = None,
                 progress: str | None = None) -> dict[str, torch.Tensor]:
    """theta_pre + alpha * TSV-M(tasks) (2-D keys; ``per_key_tasks`` overrides the set per key) and
    theta_pre + alpha * mean of the tasks' deltas (other keys). Keys are the canonical (fused) ones.
    ``progress``: a progress bar's title (a real-size theta_MT takes minutes of float64 SVDs)."""
    tasks = list(tasks)

    def update(key: str) -> torch.Tensor | None:
        if key in factors.U:
            chosen = per_key_tasks[key] if per_key_tasks is not None else tasks
            return tsvm(factors.U[key][chosen], factors.s[key][chosen], factors.V[key][chosen]) if chosen else None
        if key in factors.whole:
            return factors.whole[key][tasks].double().mean(dim=0)
        return None

    # Key by key, so at most one float64 update is alive beside the fp32 tower being built.
    out = {}
    for key, value in tqdm(pretrained.items(), desc=progress, unit="key", disable=progress is None):
        delta = update(key)
        if delta is None and key.endswith("in_proj_weight") and f"{key}.{QKV_PARTS[0]}" in factors.U:
            blocks = [update(f"{key}.{part}") for part in QKV_PARTS]
            rows = value.shape[0] // 3
            delta = torch.cat([b if b is not None else value.new_zeros(rows, value.shape[1]).double()
                               for b in blocks])
        out[key] = value if delta is None else (value.double() + alpha * delta).float()
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
