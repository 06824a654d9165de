"""The torch reference MASS model: the oracle every exported graph and the runtime are checked against."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import torch

from mass_export.core import options
from mass_export.core.errors import ConfigError
from mass_export.core.routing import first_pass_weights, router_basis_key
from mass_export.nn.heads import head_logits
from mass_export.merging.merge import TaskFactors, merged_tower
from mass_export.nn.routing import projection_residuals, routing_probabilities, select_tasks
from mass_export.nn.tower import FullTower, RoutePrefix, prefix_keys, run_with


@dataclass(frozen=True)
class Method:
    """MASS's parameters; defaults and ranges are those of mass_export.core.options (the authors' code; README,
    "The method as built"). ``top_k`` is the CLI's ``--max-tasks`` (at most this many tasks per image), kept as
    ``top_k`` in the manifest of format mass-export/1."""

    routing_layer: int = options.field("routing_layer")
    alpha: float = options.field("alpha")
    eta: float = options.field("eta")
    tau: float = options.field("tau")
    top_k: int = options.field("top_k")
    base: str = options.field("base")
    redundancy_threshold: float = options.field("redundancy_threshold")
    split_qkv: bool = options.field("split_qkv")
    rank: int | None = options.field("rank")
    router_on: str = options.field("router_on")  # or "pretrained": route on theta_pre (no theta_MT needed)

    def __post_init__(self):
        if self.routing_layer is None:
            raise ConfigError("Method needs a routing_layer")
        options.check(self)


@dataclass
class Prediction:
    task_index: int
    class_index: int
    score: float
    task_set: tuple[int, ...]
    logits: torch.Tensor  # the winning head's logits
    probs: torch.Tensor = field(repr=False)  # router probabilities over all tasks


def choose_head(features: torch.Tensor, heads: list[torch.Tensor], task_set) -> tuple[int, torch.Tensor]:
    """The selected task whose head gives the largest logit (ties to the first); returns (task, its logits)."""
    best_task, best_logits = None, None
    for task in task_set:
        logits = head_logits(features[None], heads[task])[0]
        if best_logits is None or float(logits.max()) > float(best_logits.max()):
            best_task, best_logits = task, logits
    return best_task, best_logits


class MassReference:
    """Two passes: route on theta_MT with early exit, then classify with theta(S) for the selected set S."""

    def __init__(self, visual: torch.nn.Module, pretrained: dict[str, torch.Tensor], factors: TaskFactors,
                 bases: dict[str, list[int]], heads: list[torch.Tensor], method: Method, cache_size: int = 4,
                 progress: bool = False):
        self.pretrained, self.factors, self.heads, self.method = pretrained, factors, heads, method
        self.num_tasks = factors.num_tasks
        self.prefix = RoutePrefix(visual, method.routing_layer).eval()
        self.full = FullTower(visual).eval()
        self.bases, self.progress = bases, progress
        self._prefix_keys = prefix_keys(visual, method.routing_layer)
        self._theta_mt = self.first_pass_weights(self._prefix_keys)  # now: its cost shows in the build's progress
        self.basis = factors.V[router_basis_key(method.routing_layer)]
        self.cache: OrderedDict[tuple, dict] = OrderedDict()
        self.cache_size = cache_size

    def first_pass_weights(self, keys=None) -> dict[str, torch.Tensor]:
        """The first pass's weights (theta_MT, or theta_pre with ``router_on: pretrained``) for ``keys`` (all: None)."""
        pretrained = self.pretrained if keys is None else {k: self.pretrained[k] for k in keys}
        return first_pass_weights(self.method.router_on, pretrained, lambda: merged_tower(
            pretrained, self.factors, range(self.num_tasks), self.method.alpha, self.bases,
            progress="reference: merging theta_MT" if self.progress else None))

    @property
    def theta_mt(self) -> dict[str, torch.Tensor]:
        """The first pass's weights for the prefix's keys only: routing reads no other key, and merging the rest
        would cost a tower of memory and its SVDs. Made again if released."""
        if self._theta_mt is None:
            self._theta_mt = self.first_pass_weights(self._prefix_keys)
        return self._theta_mt

    @cached_property
    def theta_mt_full(self) -> dict[str, torch.Tensor]:
        """Every key of the first pass's weights: only the authors' whole first pass (``predict_naive``) needs it."""
        return self.first_pass_weights()

    def task_set_weights(self, task_set: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """theta(S), merged once per task set and kept in a bounded LRU cache."""
        if task_set in self.cache:
            self.cache.move_to_end(task_set)
            return self.cache[task_set]
        while self.cache and len(self.cache) >= self.cache_size:  # evict first: never cache_size + 1 towers at once
            self.cache.popitem(last=False)
        weights = merged_tower(self.pretrained, self.factors, task_set, self.method.alpha)
        if self.cache_size > 0:
            self.cache[task_set] = weights
        return weights

    def release_first_pass(self) -> None:
        """Drop theta_MT once every image is routed (validation does so before the second pass): a tower's worth.
        Routing again makes it again."""
        self._theta_mt = None
        self.__dict__.pop("theta_mt_full", None)

    @torch.no_grad()
    def route_feature(self, images: torch.Tensor) -> torch.Tensor:
        return run_with(self.prefix, self.theta_mt, images)

    @torch.no_grad()
    def route(self, images: torch.Tensor):
        """(probs (B, T), residuals (B, T), task sets)."""
        if self.num_tasks == 1:
            ones = torch.ones(images.shape[0], 1)
            return ones, torch.zeros_like(ones), [(0,)] * images.shape[0]
        residuals = projection_residuals(self.route_feature(images), self.basis)
        probs = routing_probabilities(residuals, self.method.tau)
        return probs, residuals, select_tasks(probs, self.method.eta, self.method.top_k)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, task_set: tuple[int, ...]) -> torch.Tensor:
        return run_with(self.full, self.task_set_weights(task_set), images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[Prediction]:
        probs, _, task_sets = self.route(images)
        out: list[Prediction | None] = [None] * len(task_sets)
        groups: dict[tuple, list[int]] = {}
        for index, task_set in enumerate(task_sets):
            groups.setdefault(task_set, []).append(index)
        for task_set, indices in groups.items():
            features = self.encode(images[indices], task_set)
            for index, prediction in zip(indices, self.classify(features, task_set, probs[indices])):
                out[index] = prediction
        return out

    def classify(self, features: torch.Tensor, task_set: tuple[int, ...], probs: torch.Tensor) -> list[Prediction]:
        """Each row's prediction among the heads of ``task_set`` (``probs``: the rows' router probabilities)."""
        out = []
        for row in range(features.shape[0]):
            task, logits = choose_head(features[row], self.heads, task_set)
            cls = int(logits.argmax())
            out.append(Prediction(task, cls, float(logits[cls]), task_set, logits, probs[row]))
        return out

    @torch.no_grad()
    def predict_naive(self, images: torch.Tensor) -> list[Prediction]:
        """The authors' way: the whole first pass runs (its output past the tap discarded) and each task set's
        weights are merged again for every batch (SVD form, no cache)."""
        captured = {}
        c_fc = self.full.visual.transformer.resblocks[self.method.routing_layer].mlp.c_fc
        hook = c_fc.register_forward_hook(lambda module, args, output: captured.update(z=args[0][:, 0]))
        try:
            run_with(self.full, self.theta_mt_full, images)
        finally:
            hook.remove()
        if self.num_tasks == 1:
            probs, task_sets = torch.ones(images.shape[0], 1), [(0,)] * images.shape[0]
        else:
            probs = routing_probabilities(projection_residuals(captured["z"], self.basis), self.method.tau)
            task_sets = select_tasks(probs, self.method.eta, self.method.top_k)
        out: list[Prediction | None] = [None] * len(task_sets)
        for task_set in dict.fromkeys(task_sets):
            indices = [i for i, s in enumerate(task_sets) if s == task_set]
            weights = merged_tower(self.pretrained, self.factors, task_set, self.method.alpha)
            features = run_with(self.full, weights, images[indices])
            for index, prediction in zip(indices, self.classify(features, task_set, probs[indices])):
                out[index] = prediction
        return out
