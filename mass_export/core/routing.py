"""What the router reads from a build, defined once for the torch reference, the exporter, the validation and the
runtime: which stored factors are its basis, and which weights its first pass runs on.

Plain Python: the functions take and return numpy arrays and torch tensors alike (README, "The method as built";
the paper, arXiv 2504.05342).
"""

from __future__ import annotations

from typing import Callable, TypeVar

from mass_export.core import options
from mass_export.core.errors import ConfigError

Weights = TypeVar("Weights")


def router_basis_key(layer: int) -> str:
    """The factor key whose stored rows V_i are the router's basis at routing layer ``layer``: block ``layer``'s MLP
    input weight, since the router projects that weight's input (the CLS token after ln_2)."""
    return f"transformer.resblocks.{layer}.mlp.c_fc.weight"


def first_pass_weights(router_on: str | None, pretrained: Weights, merged: Callable[[], Weights]) -> Weights:
    """The weights of the first pass (up to the router's tap): theta_MT (``"merged"``, the paper), made by calling
    ``merged()``, or theta_pre (``"pretrained"``, the authors' ablation) as given, so no theta_MT is made.
    ``None``: a manifest written before the option existed (the option's default)."""
    router_on = options.default("router_on") if router_on is None else router_on
    choices = options.OPTIONS["router_on"].choices
    if router_on not in choices:
        raise ConfigError(f"router_on {router_on!r}: choose one of {', '.join(choices)}")
    return pretrained if router_on == "pretrained" else merged()
