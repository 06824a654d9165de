"""Export the graphs of docs/build-format.md with torch.onnx (dynamo exporter), weights as inputs.

Why the dynamo exporter: its graphs are ~3.5x smaller than the legacy exporter's and it needs no
attention fast-path switch; passing the weights as a dict keyword keeps them real graph inputs.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch

from mass_export.core import options
from mass_export.nn.heads import Heads
from mass_export.nn.lowrank import LowRankEncoder, factor_names, linear_keys
from mass_export.nn.routing import Router
from mass_export.nn.tower import FullTower, RoutePrefix, prefix_keys, run_with

OPSET = options.default("opset")


class _WithWeights(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, pixel_values, weights: dict):
        return run_with(self.module, weights, pixel_values)


def _rename_inputs(path: Path, renames: dict[str, str]) -> None:
    model = onnx.load(str(path))
    present = {value.name for value in model.graph.input}
    missing = [old for old in renames if old not in present]
    if missing:
        raise RuntimeError(f"exporter named inputs unexpectedly; not found: {missing[:3]}")
    for value in model.graph.input:
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _name_inputs_in_order(path: Path, names: list[str]) -> None:
    """Name the graph inputs positionally (the exporter flattens args in order); refuse a count mismatch."""
    model = onnx.load(str(path))
    old = [value.name for value in model.graph.input]
    if len(old) != len(names):
        raise RuntimeError(f"{path.name}: exporter made {len(old)} inputs, expected {len(names)}")
    _rename_inputs(path, {a: b for a, b in zip(old, names) if a != b})


def _export(module, args, kwargs, path: Path, output_names, dynamic_shapes, opset: int) -> None:
    # The exporter prints progress on stdout, which belongs to the CLI's --json output.
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, None, kwargs=kwargs, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                    verbose=False, optimize=True)
    program.save(str(path), external_data=False)


def export_tower(visual: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path, *, layer: int | None,
                 opset: int = OPSET) -> dict:
    """The encoder (layer None) or the router prefix (early exit at ``layer``). Returns its graph record."""
    module = FullTower(visual) if layer is None else RoutePrefix(visual, layer)
    keys = list(weights) if layer is None else prefix_keys(visual, layer)
    feeds = {key: weights[key] for key in keys}
    size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    images = torch.zeros(2, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    output = "image_features" if layer is None else "route_feature"
    _export(_WithWeights(module).eval(), (images,), {"weights": feeds}, path, [output],
            {"pixel_values": {0: batch}, "weights": {key: None for key in keys}}, opset)
    _rename_inputs(path, {"weights_" + key.replace(".", "_"): key for key in keys})
    return {"inputs": ["pixel_values", *keys], "outputs": [output]}


def export_lowrank(visual: torch.nn.Module, weights: dict[str, torch.Tensor], split_qkv: bool, path: Path,
                   opset: int = OPSET) -> dict:
    """The low-rank encoder: theta_pre plus a task set's update factors per linear key, rank a dynamic dimension."""
    linear = linear_keys(visual)
    example_rank = 3  # any size > 1: the exporter specialises 0 and 1
    factors = {}
    for key in linear:
        parts = 3 if split_qkv and key.endswith("in_proj_weight") else 1
        m, n = weights[key].shape
        factors[key] = (torch.zeros(parts, m // parts, example_rank), torch.zeros(parts, example_rank, n))
    size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    batch = torch.export.Dim("batch", min=1, max=65536)
    rank = torch.export.Dim("rank", min=1, max=65536)
    keys = list(weights)
    _export(LowRankEncoder(visual).eval(), (torch.zeros(2, 3, *size),), {"weights": dict(weights), "factors": factors},
            path, ["image_features"], {"pixel_values": {0: batch}, "weights": {key: None for key in keys},
                                       "factors": {key: ({2: rank}, {1: rank}) for key in linear}}, opset)
    names = ["pixel_values", *keys, *[name for key in linear for name in factor_names(key)]]
    _name_inputs_in_order(path, names)
    return {"inputs": names, "outputs": ["image_features"], "linear_keys": linear}


def export_router(basis: torch.Tensor, tau: float, path: Path, opset: int = OPSET) -> dict:
    batch = torch.export.Dim("batch", min=1, max=65536)
    features = torch.randn(2, basis.shape[-1])
    _export(Router(tau).eval(), (features, basis), None, path, ["probs", "residuals"],
            {"route_feature": {0: batch}, "router_basis": None}, opset)
    return {"inputs": ["route_feature", "router_basis"], "outputs": ["probs", "residuals"]}


def export_heads(heads: torch.Tensor, path: Path, opset: int = OPSET) -> dict:
    batch = torch.export.Dim("batch", min=1, max=65536)
    features = torch.randn(2, heads.shape[-1])
    _export(Heads().eval(), (features, heads), None, path, ["logits"],
            {"image_features": {0: batch}, "heads": None}, opset)
    return {"inputs": ["image_features", "heads"], "outputs": ["logits"]}


GRAPH_NAMES = ("prefix", "router", "encoder", "heads", "lowrank")


def export_all(visual, pretrained: dict, basis: torch.Tensor, heads: torch.Tensor, method, out_dir: Path,
               opset: int = OPSET, progress=None) -> dict:
    """Write graphs/{prefix,router,encoder,heads,lowrank}.onnx under out_dir; returns manifest["graphs"]."""
    graphs_dir = Path(out_dir) / "graphs"
    graphs_dir.mkdir(parents=True, exist_ok=True)
    jobs = {
        "prefix": lambda p: export_tower(visual, pretrained, p, layer=method.routing_layer, opset=opset),
        "router": lambda p: export_router(basis, method.tau, p, opset),
        "encoder": lambda p: export_tower(visual, pretrained, p, layer=None, opset=opset),
        "heads": lambda p: export_heads(heads, p, opset),
        "lowrank": lambda p: export_lowrank(visual, pretrained, method.split_qkv, p, opset),
    }
    assert tuple(jobs) == GRAPH_NAMES
    records = {}
    for name, job in jobs.items():
        path = graphs_dir / f"{name}.onnx"
        records[name] = {"file": f"graphs/{name}.onnx", **job(path)}
        if progress:
            progress(name)
    return records
