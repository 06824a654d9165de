"""The low-rank second pass: theta_pre's linear layers plus a task set's TSV-M update applied to the activations.

For every linear weight W (attention in/out projections, MLP c_fc/c_proj) of the open_clip tower the task set's
update is U_cat M V_cat (Gram form, docs/build-format.md), so
    x (W + U_cat M V_cat)^T = x W^T + ((x V_cat^T) M^T) U_cat^T
costs R(m + n) + R^2 per token (R = |S|k) instead of m n per call to densify. U_cat and V_cat are the stored
per-task factors of the selected tasks, gathered inside the graph from the build's stacks (T, m, k) and (T, k, n)
by the ``tasks`` input, so the only per-set inputs are the small cores M (|S|, k, |S|, k) and nothing of size m n
or R(m + n) is made per task set. The fused attention ``in_proj_weight`` has one update per q/k/v block
(``split_qkv``): block p of the output gets its own factors and core. The number of tasks is a dynamic dimension
of the graph. Every other weight (biases, LayerNorms, embeddings, ``proj``) is a dense input, theta(S) as in the
dense encoder.

Shared by the torch reference's check and the ONNX export, as the other modules of this room.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from mass_export.core.taskweights import FACTOR_FIELDS, QKV_PARTS, weight_key

LINEAR_WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gathered_factors(tasks: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U_cat (m, |S|k) and V_cat (|S|k, n) of the selected tasks from the stacks U (T, m, k), V (T, k, n)."""
    U_sel, V_sel = U[tasks], V[tasks]  # (S, m, k), (S, k, n)
    rank = V_sel.shape[0] * V_sel.shape[1]
    return U_sel.permute(1, 0, 2).reshape(U_sel.shape[1], rank), V_sel.reshape(rank, V_sel.shape[2])


def gathered_update(x: torch.Tensor, tasks: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                    M: torch.Tensor) -> torch.Tensor:
    """((x V_cat^T) M^T) U_cat^T for x (..., n), stacks U (T, m, k), V (T, k, n), core M (S, k, S, k)."""
    U_cat, V_cat = gathered_factors(tasks, U, V)
    rank = V_cat.shape[0]
    return ((x @ V_cat.T) @ M.reshape(rank, rank).T) @ U_cat.T


class Densify(nn.Module):
    """forward(weights, tasks, factors) -> theta(S)'s linear weights in ``keys`` order: theta_pre (``weights``)
    plus U_cat M V_cat per weight (per q/k/v row block of a split projection), from the same stacks and cores
    the low-rank encoder takes. A task set's dense weights made by a graph, so on a GPU they are made where the
    encoder reads them."""

    def __init__(self, keys: list[str], split_qkv: bool = True):
        super().__init__()
        self.keys, self.split_qkv = list(keys), split_qkv

    def forward(self, weights: dict, tasks, factors: dict):
        out = []
        for key in self.keys:
            deltas = []
            for factor_key in factor_keys_of(key, self.split_qkv):
                U_cat, V_cat = gathered_factors(tasks, *factors[factor_key][:2])
                rank = V_cat.shape[0]
                deltas.append((U_cat @ factors[factor_key][2].reshape(rank, rank)) @ V_cat)
            out.append(weights[key] + (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=0)))
        return tuple(out)


class LowRankLinear(nn.Module):
    """nn.Linear plus a task set's update in ``parts`` row blocks (3 for a split q/k/v projection); the factor
    stacks, cores and task indices are buffers so functional_call feeds them per call."""

    def __init__(self, linear_weight: torch.Tensor, bias: torch.Tensor | None, parts: int = 1):
        super().__init__()
        self.weight = nn.Parameter(linear_weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.parts = parts
        m, n = self.weight.shape
        self.register_buffer("tasks", torch.zeros(1, dtype=torch.int64))
        for p in range(parts):
            self.register_buffer(f"U{p}", torch.zeros(1, m // parts, 1))
            self.register_buffer(f"V{p}", torch.zeros(1, 1, n))
            self.register_buffer(f"M{p}", torch.zeros(1, 1, 1, 1))

    def forward(self, x):
        out = nn.functional.linear(x, self.weight, self.bias)
        update = [gathered_update(x, self.tasks, *(getattr(self, f"{field}{p}") for field in FACTOR_FIELDS))
                  for p in range(self.parts)]
        return out + (update[0] if self.parts == 1 else torch.cat(update, dim=-1))


class LowRankAttention(nn.Module):
    """open_clip's batch-first self-attention (nn.MultiheadAttention, no mask) with low-rank q/k/v and output
    updates."""

    def __init__(self, attention: nn.MultiheadAttention, qkv_parts: int):
        super().__init__()
        if not attention.batch_first or attention.in_proj_weight is None:
            raise ValueError("the low-rank tower needs open_clip's batch-first fused-projection attention")
        self.num_heads = attention.num_heads
        self.in_proj = LowRankLinear(attention.in_proj_weight, attention.in_proj_bias, qkv_parts)
        self.out_proj = LowRankLinear(attention.out_proj.weight, attention.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("the low-rank tower supports unmasked (vision) attention only")
        batch, tokens, width = query.shape
        qkv = self.in_proj(query)
        heads = qkv.reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(heads[0], heads[1], heads[2])
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.out_proj(out), None


def low_rank_tower(visual: nn.Module, split_qkv: bool = True) -> nn.Module:
    """A copy of the open_clip visual tower whose linear layers take low-rank updates."""
    tower = copy.deepcopy(visual)
    for block in tower.transformer.resblocks:
        block.attn = LowRankAttention(block.attn, 3 if split_qkv else 1)
        block.mlp.c_fc = LowRankLinear(block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        block.mlp.c_proj = LowRankLinear(block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    return tower.eval()


def factor_keys_of(key: str, split_qkv: bool) -> list[str]:
    """The factor keys (stored per q/k/v block when split) of one linear weight, in part order."""
    if split_qkv and key.endswith("attn.in_proj_weight"):
        return [f"{key}.{part}" for part in QKV_PARTS]
    return [key]


def _module_name(key: str) -> str:
    """Where ``low_rank_tower`` keeps a canonical linear weight's LowRankLinear."""
    if key.endswith("attn.in_proj_weight"):
        return key[:-len("in_proj_weight")] + "in_proj"
    return key.rsplit(".", 1)[0]


def canonical_name(module_key: str) -> str:
    """The canonical state-dict key of a ``low_rank_tower`` parameter (the fused projection moved into a module)."""
    for field in ("weight", "bias"):
        if module_key.endswith(f"attn.in_proj.{field}"):
            return module_key[:-len(f"in_proj.{field}")] + f"in_proj_{field}"
    return module_key


def linear_keys(visual: nn.Module) -> list[str]:
    """Canonical keys of the tower's linear weights, in state-dict order."""
    return [k for k in visual.state_dict() if k.startswith("transformer.resblocks.") and k.endswith(LINEAR_WEIGHTS)]


class LowRankEncoder(nn.Module):
    """forward(pixel_values, weights, tasks, factors): weights = every canonical key (theta_pre for linear
    weights), tasks = the selected task indices (S,), factors = {factor key: (U stack, V stack, core M)}."""

    def __init__(self, visual: nn.Module, split_qkv: bool = True):
        super().__init__()
        self.tower = low_rank_tower(visual, split_qkv)
        self._renamed = {canonical_name(k): k for k in self.tower.state_dict() if canonical_name(k) != k}

    def forward(self, pixel_values, weights: dict, tasks, factors: dict):
        feeds = {self._renamed.get(key, key): value for key, value in weights.items()}
        for factor_key, values in factors.items():
            key, block = weight_key(factor_key)  # block: the q/k/v part of a split projection, else None
            module = _module_name(key)
            feeds[f"{module}.tasks"] = tasks
            for field, value in zip(FACTOR_FIELDS, values):
                feeds[f"{module}.{field}{block or 0}"] = value
        return functional_call(self.tower, feeds, (pixel_values,), strict=False)
