"""The helpers that replaced copies: each is the one definition its callers share (the router's reads, head
slices, NaN-aware comparison records, the batch loop, the pre-read path check)."""

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mass_export.core.compare import Comparison, max_abs_diff, worst_per_graph
from mass_export.core.errors import ConfigError
from mass_export.core.manifest import head_slices, head_table, read_manifest
from mass_export.core.routing import first_pass_weights, router_basis_key
from mass_export.runtime.images import PathProblem, as_image, unreadable
from mass_export.runtime.sources import batched

PACKAGE = Path(__file__).resolve().parents[1] / "mass_export"


def test_head_table_and_slices_round_trip():
    manifest = {"tasks": ["b", "a"], "heads": head_table({"b": 3, "a": 2})}
    assert manifest["heads"] == {"b": {"offset": 0, "classes": 3}, "a": {"offset": 3, "classes": 2}}
    assert head_slices(manifest) == [slice(0, 3), slice(3, 5)]


def test_head_slices_of_a_build_cover_its_heads_in_task_order(tiny_build):
    manifest = read_manifest(tiny_build)
    rows = load_file(str(tiny_build / "heads.safetensors"))["heads"].shape[0]
    slices = head_slices(manifest)
    assert slices[0].start == 0 and slices[-1].stop == rows
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))


def test_router_basis_is_a_stored_factor_and_spelled_once(tiny_build):
    manifest = read_manifest(tiny_build)
    factors = load_file(str(tiny_build / "factors.safetensors"))
    assert f"{router_basis_key(manifest['method']['routing_layer'])}.V" in factors
    pattern = re.compile(r"resblocks\.\{[^}]*\}\.mlp\.c_fc\.weight")  # the key built from a layer number
    spelled = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert spelled == ["core/routing.py"]


def test_first_pass_weights_makes_theta_mt_only_when_routing_on_it():
    made = []

    def merged():
        made.append(True)
        return "theta_MT"

    assert first_pass_weights("pretrained", "theta_pre", merged) == "theta_pre" and not made
    assert first_pass_weights("merged", "theta_pre", merged) == "theta_MT" and made == [True]
    assert first_pass_weights(None, "theta_pre", merged) == "theta_MT"  # a manifest from before the option
    with pytest.raises(ConfigError, match="router_on 'both'"):
        first_pass_weights("both", "theta_pre", merged)


def test_a_comparison_with_nan_never_passes_and_is_written_as_null():
    nan = max_abs_diff(np.array([1.0, np.inf]), np.array([1.0, 2.0]))
    failed = Comparison("encoder", 3, nan, 1e-4)
    assert not failed.passed and failed.record()["max_abs_diff"] is None and failed.record()["passed"] is False
    ok = Comparison("encoder", 1, 2e-5, 1e-4)
    assert ok.passed and not Comparison("heads", 1, 2e-4, 1e-4).passed
    worst = worst_per_graph([ok, failed, Comparison("heads", 1, 3e-5, 1e-4)], graphs=("prefix",))
    assert worst["prefix"] == 0.0 and math.isnan(worst["encoder"]) and worst["heads"] == 3e-5


def test_batched_reads_lazily_and_keeps_the_tail():
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]] and list(batched([], 3)) == []
    assert next(batched(itertools.count(), 3)) == [0, 1, 2]  # an endless source: only what is asked for is read


def test_the_pre_read_check_gives_the_errors_a_local_run_gives(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cases = [tmp_path, tmp_path / "missing.png", empty, PathProblem(tmp_path / "x", "no file matches this pattern")]
    for item in cases:
        assert unreadable(item) is not None and unreadable(item) == as_image(item).error
    image = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(image)
    assert unreadable(image) is None and as_image(image).error is None
