"""MASS's data-free router in torch: projection residuals, z-scored softmax, task-set selection.

This is the reference form; the exported router graph and ``mass_export.core.lowrank`` are checked against it.
"""

from __future__ import annotations

import torch

from mass_export.core import options


def projection_residuals(features: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """r_i = ||z - V_i^T V_i z|| for features z (B, d) and stacked task bases V (T, k, d) -> (B, T)."""
    coords = torch.einsum("tkd,bd->btk", basis, features)
    projected = torch.einsum("btk,tkd->btd", coords, basis)
    return torch.linalg.vector_norm(features[:, None, :] - projected, dim=-1)


def routing_probabilities(residuals: torch.Tensor, tau: float = options.default("tau")) -> torch.Tensor:
    """softmax over tasks of z-scored (-residuals) / tau; std is torch.std's unbiased estimator."""
    scores = -residuals
    if scores.shape[1] > 1:
        scores = (scores - scores.mean(dim=1, keepdim=True)) / (scores.std(dim=1, keepdim=True) + 1e-6)
    return torch.softmax(scores / tau, dim=1)


def select_tasks(probs: torch.Tensor, eta: float, top_k: int) -> list[tuple[int, ...]]:
    """Tasks with p > eta, the top_k most probable of them, else the argmax; sorted by task index."""
    chosen = []
    for row in probs:
        values, order = torch.sort(row, descending=True, stable=True)
        keep = [int(t) for v, t in zip(values[:top_k], order[:top_k]) if float(v) > eta]
        chosen.append(tuple(sorted(keep)) if keep else (int(order[0]),))
    return chosen


class Router(torch.nn.Module):
    """The router graph: (route_feature, router_basis) -> (probs, residuals)."""

    def __init__(self, tau: float = options.default("tau")):
        super().__init__()
        self.tau = tau

    def forward(self, route_feature, router_basis):
        residuals = projection_residuals(route_feature, router_basis)
        return routing_probabilities(residuals, self.tau), residuals
