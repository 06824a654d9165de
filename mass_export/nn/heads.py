"""The heads graph's torch module: logits of every head on L2-normalised image features."""

from __future__ import annotations

import torch


def head_logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features, dim=-1) @ head.T


class Heads(torch.nn.Module):
    """The heads graph: (image_features, heads) -> logits of every head, on L2-normalised features."""

    def forward(self, image_features, heads):
        return head_logits(image_features, heads)
