"""Export the graphs of docs/build-format.md with torch.onnx (dynamo exporter), weights as inputs (the first
pass's then made constants the runtime supplies at load).

Why the dynamo exporter: its graphs are ~3.5x smaller than the legacy exporter's and it needs no
attention fast-path switch; passing the weights as a dict keyword keeps them real graph inputs.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from mass_export.core import options
from mass_export.nn.heads import Heads
from mass_export.core.onnxfiles import SUPPLIED_AT_LOAD
from mass_export.core.taskweights import DENSE_OUTPUT, TASKS_INPUT, factor_input_names, weight_key
from mass_export.nn.lowrank import Densify, LowRankEncoder, factor_keys_of, linear_keys
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


def _supply_at_load(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Turn these weight inputs into constants the runtime supplies when it opens the graph (external
    initializers at ``SUPPLIED_AT_LOAD``) of the given shapes: for weights fixed for a runtime's life (the first
    pass's theta_MT). A shape must agree with the input's declared one."""
    model = onnx.load(str(path))
    inputs = {value.name: value for value in model.graph.input}
    missing = [name for name in shapes if name not in inputs]
    if missing:
        raise RuntimeError(f"{path.name}: no inputs {missing[:3]} to turn into constants")
    for name, shape in shapes.items():
        tensor_type = inputs[name].type.tensor_type
        declared = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
        if len(declared) != len(shape) or any(d is not None and d != s for d, s in zip(declared, shape)):
            raise RuntimeError(f"{path.name}: input {name!r} is {declared}, not {list(shape)}")
        nbytes = int(np.prod(shape)) * onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
        entries = [onnx.StringStringEntryProto(key=key, value=str(value))
                   for key, value in (("location", SUPPLIED_AT_LOAD), ("offset", 0), ("length", nbytes))]
        tensor = onnx.TensorProto(name=name, data_type=tensor_type.elem_type, dims=list(shape),
                                  data_location=onnx.TensorProto.EXTERNAL, external_data=entries)
        model.graph.initializer.append(tensor)
    kept = [value for value in model.graph.input if value.name not in shapes]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save(model, str(path))


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
    if layer is None:  # the second pass: a task set's weights, fed per call
        return {"inputs": ["pixel_values", *keys], "outputs": [output]}
    # The first pass's weights (theta_MT, or theta_pre) are fixed for a runtime's life: constants.
    _supply_at_load(path, {key: tuple(weights[key].shape) for key in keys})
    return {"inputs": ["pixel_values"], "constants": keys, "outputs": [output]}


def _factor_inputs(visual: torch.nn.Module, weights: dict[str, torch.Tensor], ranks: dict[str, int], split_qkv: bool):
    """What the low-rank and densify graphs take per linear weight: (linear keys, factor keys, example keyword
    arguments ``tasks`` and ``factors`` = {factor key: (U stack, V stack, core M)}, their dynamic shapes: the
    number of tasks and of selected tasks). ranks: k per factor key (the build's truncation ranks)."""
    linear = linear_keys(visual)
    factor_keys = [fk for key in linear for fk in factor_keys_of(key, split_qkv)]
    stacks, selected = 3, 2  # example sizes > 1 (the exporter specialises 0 and 1)
    factors = {}
    for factor_key in factor_keys:
        key, block = weight_key(factor_key)
        m, n = weights[key].shape
        rows, k = (m // 3 if block is not None else m), ranks[factor_key]
        factors[factor_key] = (torch.zeros(stacks, rows, k), torch.zeros(stacks, k, n),
                               torch.zeros(selected, k, selected, k))
    num_tasks = torch.export.Dim("num_tasks", min=1, max=4096)
    set_size = torch.export.Dim("set_size", min=1, max=4096)
    dynamic = {"tasks": {0: set_size},
               "factors": {fk: ({0: num_tasks}, {0: num_tasks}, {0: set_size, 2: set_size}) for fk in factor_keys}}
    return linear, factor_keys, {"tasks": torch.tensor([0, stacks - 1]), "factors": factors}, dynamic


def _factor_names(factor_keys: list[str]) -> list[str]:
    return [name for fk in factor_keys for name in factor_input_names(fk)]


def export_lowrank(visual: torch.nn.Module, weights: dict[str, torch.Tensor], ranks: dict[str, int], split_qkv: bool,
                   path: Path, opset: int = OPSET) -> dict:
    """The low-rank encoder: theta_pre plus a task set's update, gathered from per-task factor stacks by the
    ``tasks`` input; the number of tasks (stacks) and of selected tasks are dynamic dimensions."""
    linear, factor_keys, examples, dynamic = _factor_inputs(visual, weights, ranks, split_qkv)
    size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    batch = torch.export.Dim("batch", min=1, max=65536)
    keys = list(weights)
    _export(LowRankEncoder(visual, split_qkv).eval(), (torch.zeros(2, 3, *size),),
            {"weights": dict(weights), **examples}, path, ["image_features"],
            {"pixel_values": {0: batch}, "weights": {key: None for key in keys}, **dynamic}, opset)
    names = ["pixel_values", *keys, TASKS_INPUT, *_factor_names(factor_keys)]
    _name_inputs_in_order(path, names)
    return {"inputs": names, "outputs": ["image_features"], "linear_keys": linear, "factor_keys": factor_keys}


def export_densify(visual: torch.nn.Module, weights: dict[str, torch.Tensor], ranks: dict[str, int], split_qkv: bool,
                   path: Path, opset: int = OPSET) -> dict:
    """A task set's dense linear weights from the low-rank graph's stacks and cores (``nn.lowrank.Densify``),
    fed as the low-rank graph is: theta_pre's linear weights and every task's factor stacks (the same arrays,
    once per load), ``tasks`` and the cores M per set. Inputs, not constants supplied at load: ONNX Runtime 1.32
    copies such constants (825 MB more for ViT-B-16 x 8, measured) and this graph gains nothing from folding.
    The non-linear keys (the means of small deltas) are made on the host."""
    linear, factor_keys, examples, dynamic = _factor_inputs(visual, weights, ranks, split_qkv)
    outputs = [DENSE_OUTPUT.format(key) for key in linear]
    _export(Densify(linear, split_qkv).eval(), (), {"weights": {key: weights[key] for key in linear}, **examples},
            path, outputs, {"weights": {key: None for key in linear}, **dynamic}, opset)
    names = [*linear, TASKS_INPUT, *_factor_names(factor_keys)]
    _name_inputs_in_order(path, names)
    return {"inputs": names, "outputs": outputs, "linear_keys": linear, "factor_keys": factor_keys}


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


GRAPH_NAMES = ("prefix", "router", "encoder", "heads", "lowrank", "densify")


def export_all(visual, pretrained: dict, basis: torch.Tensor, heads: torch.Tensor, method, out_dir: Path,
               opset: int = OPSET, progress=None, *, ranks: dict[str, int]) -> dict:
    """Write graphs/{prefix,router,encoder,heads,lowrank,densify}.onnx under out_dir; returns manifest["graphs"]."""
    graphs_dir = Path(out_dir) / "graphs"
    graphs_dir.mkdir(parents=True, exist_ok=True)
    jobs = {
        "prefix": lambda p: export_tower(visual, pretrained, p, layer=method.routing_layer, opset=opset),
        "router": lambda p: export_router(basis, method.tau, p, opset),
        "encoder": lambda p: export_tower(visual, pretrained, p, layer=None, opset=opset),
        "heads": lambda p: export_heads(heads, p, opset),
        "lowrank": lambda p: export_lowrank(visual, pretrained, ranks, method.split_qkv, p, opset),
        "densify": lambda p: export_densify(visual, pretrained, ranks, method.split_qkv, p, opset),
    }
    assert tuple(jobs) == GRAPH_NAMES
    records = {}
    for name, job in jobs.items():
        path = graphs_dir / f"{name}.onnx"
        records[name] = {"file": f"graphs/{name}.onnx", **job(path)}
        if progress:
            progress(name)
    return records
