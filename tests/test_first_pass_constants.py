"""The first pass's weights are constants the runtime supplies when it opens the graph (ONNX Runtime folds and
pre-packs constants, not inputs): the graph holds no weights and opens only with them; a build whose prefix
graph still takes them as inputs (made before 2026-12-07) runs and routes the same. Real sessions, a real build.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from mass_export.core.manifest import DIGEST, read_manifest, write_manifest
from mass_export.core.onnxfiles import SUPPLIED_AT_LOAD, external_data_locations
from mass_export.runtime import MassRuntime, load_image
from mass_export.runtime.backends import OrtRunner


def test_prefix_weights_are_supplied_at_load(tiny_build):
    manifest = read_manifest(tiny_build)
    record = manifest["graphs"]["prefix"]
    path = tiny_build / record["file"]
    assert record["inputs"] == ["pixel_values"] and len(record["constants"]) > 5
    assert set(external_data_locations(path)) == {SUPPLIED_AT_LOAD}
    # Without its constants the graph does not open (nothing is read from a file of that name).
    with pytest.raises(Exception, match="supplied-at-load"):
        OrtRunner(path, ("cpu",), threads=1, check=False)
    runtime = MassRuntime.load(tiny_build, threads=1, second_pass="dense")
    assert runtime.runners["prefix"].input_names == ["pixel_values"]


def _as_older_build(build, out):
    """The build with its prefix graph in the form before 2026-12-07: the constants are graph inputs again."""
    shutil.copytree(build, out)
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["graphs"]["prefix"]
    model = onnx.load(str(out / record["file"]), load_external_data=False)
    constants = [t for t in model.graph.initializer if t.name in set(record["constants"])]
    for tensor in constants:
        model.graph.initializer.remove(tensor)
        model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    onnx.save(model, str(out / record["file"]))
    record["inputs"] = ["pixel_values", *record.pop("constants")]
    manifest.pop("files")
    manifest.pop(DIGEST, None)
    write_manifest(out, {k: v for k, v in manifest.items() if k != "format"})
    return out


def test_an_older_prefix_graph_with_weight_inputs_routes_the_same(tiny_build, images, tmp_path):
    new = MassRuntime.load(tiny_build, threads=1, second_pass="dense")
    old = MassRuntime.load(_as_older_build(tiny_build, tmp_path / "older"), threads=1, second_pass="dense")
    assert len(old.runners["prefix"].input_names) > 5  # its weights are fed on every call
    pixels = np.stack([new.preprocessor(load_image(p).image) for p in images])
    features_new, features_old = new.first_pass(pixels), old.first_pass(pixels)
    diff = float(np.abs(features_new - features_old).max())
    print(f"first pass, constants vs inputs: max |diff| {diff:.2e} over {len(pixels)} images")
    assert np.isfinite(features_new).all() and diff <= 1e-5  # the same weights; fusions may round differently
    assert new.route(pixels)[1] == old.route(pixels)[1]
