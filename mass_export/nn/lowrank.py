"""The low-rank second pass: theta_pre's linear layers plus a task set's TSV-M update applied to the activations.

For every linear weight W (attention in/out projections, MLP c_fc/c_proj) of the open_clip tower the task set's
update is A @ B (Gram form, docs/build-format.md), so
    x (W + A B)^T = x W^T + (x B^T) A^T
costs R(m + n) per token instead of m n per call to densify. The fused attention ``in_proj_weight`` has one
update per q/k/v block (``split_qkv``): A is stacked (P, m/P, R) and B (P, R, n) with P = 3 (P = 1 elsewhere);
block p of the output gets (x B_p^T) A_p^T. The rank R is a dynamic dimension of the graph. Every other weight
(biases, LayerNorms, embeddings, ``proj``) is a dense input, theta(S) as in the dense encoder.

Shared by the torch reference's check and the ONNX export, as the other modules of this room.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

LINEAR_WEIGHTS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def low_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                    B: torch.Tensor) -> torch.Tensor:
    """x (W + blockrows(A_p B_p))^T + bias for x (..., n), W (m, n), A (P, m/P, R), B (P, R, n)."""
    out = nn.functional.linear(x, weight, bias)
    parts = A.shape[0]
    update = [(x @ B[p].T) @ A[p].T for p in range(parts)]
    return out + (update[0] if parts == 1 else torch.cat(update, dim=-1))


class LowRankLinear(nn.Module):
    """nn.Linear with a low-rank update; ``A``/``B`` are buffers so functional_call feeds them per call."""

    def __init__(self, linear: nn.Linear, parts: int = 1):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        m, n = linear.weight.shape
        self.register_buffer("A", torch.zeros(parts, m // parts, 1))
        self.register_buffer("B", torch.zeros(parts, 1, n))

    def forward(self, x):
        return low_rank_linear(x, self.weight, self.bias, self.A, self.B)


class LowRankAttention(nn.Module):
    """open_clip's batch-first self-attention (nn.MultiheadAttention, no mask) with low-rank q/k/v and output
    updates; parameter names as nn.MultiheadAttention's so the tower's keys stay canonical."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if not attention.batch_first or attention.in_proj_weight is None:
            raise ValueError("the low-rank tower needs open_clip's batch-first fused-projection attention")
        self.num_heads = attention.num_heads
        self.in_proj_weight = nn.Parameter(attention.in_proj_weight.detach().clone())
        self.in_proj_bias = nn.Parameter(attention.in_proj_bias.detach().clone())
        width = self.in_proj_weight.shape[1]
        self.register_buffer("in_proj_weight_A", torch.zeros(3, width, 1))
        self.register_buffer("in_proj_weight_B", torch.zeros(3, 1, width))
        self.out_proj = LowRankLinear(attention.out_proj)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("the low-rank tower supports unmasked (vision) attention only")
        batch, tokens, width = query.shape
        qkv = low_rank_linear(query, self.in_proj_weight, self.in_proj_bias, self.in_proj_weight_A,
                              self.in_proj_weight_B)
        heads = qkv.reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(heads[0], heads[1], heads[2])
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.out_proj(out), None


def low_rank_tower(visual: nn.Module) -> nn.Module:
    """A copy of the open_clip visual tower whose linear layers take low-rank updates."""
    tower = copy.deepcopy(visual)
    for block in tower.transformer.resblocks:
        block.attn = LowRankAttention(block.attn)
        block.mlp.c_fc = LowRankLinear(block.mlp.c_fc)
        block.mlp.c_proj = LowRankLinear(block.mlp.c_proj)
    return tower.eval()


def factor_names(key: str) -> tuple[str, str]:
    """Graph input names of a linear weight's update factors."""
    return f"{key}.A", f"{key}.B"


def _module_names(key: str) -> tuple[str, str]:
    """Where functional_call finds a weight's factors inside ``low_rank_tower``."""
    if key.endswith("attn.in_proj_weight"):
        return f"{key}_A", f"{key}_B"
    module = key.rsplit(".", 1)[0]
    return f"{module}.A", f"{module}.B"


def linear_keys(visual: nn.Module) -> list[str]:
    """Canonical keys of the tower's linear weights, in state-dict order."""
    return [k for k in visual.state_dict() if k.startswith("transformer.resblocks.") and k.endswith(LINEAR_WEIGHTS)]


class LowRankEncoder(nn.Module):
    """forward(pixel_values, weights, factors): weights = every canonical key (theta_pre for linear weights),
    factors = {key: (A, B)} for every linear key."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.tower = low_rank_tower(visual)

    def forward(self, pixel_values, weights: dict, factors: dict):
        feeds = dict(weights)
        for key, (A, B) in factors.items():
            name_a, name_b = _module_names(key)
            feeds[name_a], feeds[name_b] = A, B
        return functional_call(self.tower, feeds, (pixel_values,), strict=False)
