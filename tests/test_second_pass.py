"""The second pass at speed: the low-rank graph equals the dense path and the torch reference; window scheduling
keeps input order and holds at most a window of images; a task-set miss never blocks a concurrent hit; the
planner's rent-or-buy rule. Real ONNX Runtime sessions on a small real build. Max differences print with -s."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from mass_export.core.manifest import read_manifest
from mass_export.core.taskweights import GramBlocks, StoredTasks, low_rank_inputs, task_set_weights
from mass_export.runtime import MassRuntime, load_image
from mass_export.runtime.planner import SecondPassPlanner

WAIT = 120  # seconds: only a guard against a hang, never a timing assertion


@pytest.fixture(scope="module")
def pixels(tiny_build, images):
    runtime = MassRuntime.load(tiny_build, threads=1, second_pass="dense")
    return np.stack([runtime.preprocessor(load_image(p).image) for p in images])


def test_lowrank_graph_equals_dense_path_and_torch_reference(tiny_build, images, pixels):
    import torch

    from mass_export.merging.stored import reference_from_build

    dense = MassRuntime.load(tiny_build, threads=1, second_pass="dense")
    lowrank = MassRuntime.load(tiny_build, threads=1, second_pass="lowrank")
    assert "lowrank" in lowrank.runners and "lowrank" not in dense.runners
    expected = reference_from_build(tiny_build).predict(torch.from_numpy(pixels))
    sets = {p.task_set for p in expected}
    assert len(sets) >= 3, "the fixture should exercise several task sets"
    for batch_size in (1, 4, len(images)):
        by_form = {name: rt.classify(images, batch_size=batch_size) for name, rt in
                   (("dense", dense), ("lowrank", lowrank))}
        for name, got in by_form.items():
            assert [(p.task_index, p.class_index) for p in got] == [(p.task_index, p.class_index) for p in expected]
            assert [p.task_set for p in got] == [tuple(dense.tasks[t] for t in p.task_set) for p in expected]
            worst = max(abs(g.score - e.score) for g, e in zip(got, expected))
            print(f"{name} vs torch reference, batch {batch_size}: max |winning logit diff| {worst:.2e}")
            assert worst < 1e-4
    reference = reference_from_build(tiny_build)
    heads = torch.from_numpy(load_file(str(tiny_build / "heads.safetensors"))["heads"])
    worst = {"lowrank-dense": 0.0, "lowrank-reference": 0.0}
    for task_set in sets | {(0, 1, 2), (0, 1, 2, 3)}:
        low = lowrank.logits(pixels, task_set)
        worst["lowrank-dense"] = max(worst["lowrank-dense"], float(np.abs(low - dense.logits(pixels, task_set)).max()))
        features = reference.encode(torch.from_numpy(pixels), task_set)
        ref = torch.nn.functional.normalize(features, dim=-1) @ heads.T
        worst["lowrank-reference"] = max(worst["lowrank-reference"], float(np.abs(low - ref.numpy()).max()))
    print(f"all logits, every routed set plus (0,1,2), (0,1,2,3): max |diff| {worst}")
    assert max(worst.values()) < 1e-4
    assert lowrank.stats()["second_pass"]["choices"]["lowrank"] > 0
    # (0, 1, 2, 3) is every task of this 4-task build: |S|k reaches the width and its Gram matrices are near
    # singular (spread ~6e-8, below LOW_RANK_GRAPH_SPREAD), so the low-rank runtime ran that one set dense,
    # exactly (above); every other set ran the low-rank graph.
    assert lowrank.task_indices((0, 1, 2, 3)) in {task_set for kind, task_set in lowrank.cache.info()["keys"]
                                                  if kind == "dense"}
    assert lowrank.stats()["cache"]["dense_sets"] == 1


def test_densify_graph_makes_the_numpy_dense_weights(tiny_build, pixels):
    """A set's dense weights made by the densify graph (what a GPU runs on the device) equal the numpy form's,
    and the encoder fed with them gives the same logits."""
    auto = MassRuntime.load(tiny_build, threads=1)
    host = MassRuntime.load(tiny_build, threads=1, second_pass="dense")
    assert "densify" in auto.runners and "densify" not in host.runners
    worst = {"weights": 0.0, "logits": 0.0}
    for task_set in ((0,), (1, 2), (0, 2, 3)):
        made = auto.prepare_task_set(task_set)
        expected = task_set_weights(auto.stored, task_set, keys=auto.encoder_keys)
        assert sorted(made) == sorted(expected)
        assert all(np.isfinite(made[key]).all() for key in made)
        worst["weights"] = max(worst["weights"], max(float(np.abs(made[k] - expected[k]).max()) for k in made))
        logits = auto.logits(pixels, task_set, form="dense")
        worst["logits"] = max(worst["logits"], float(np.abs(logits - host.logits(pixels, task_set)).max()))
    print(f"densify graph vs numpy dense weights, 3 task sets: max |diff| {worst}")
    assert worst["weights"] < 1e-5 and worst["logits"] < 1e-4  # the tolerance of every logits check here


def test_gram_blocks_give_the_same_task_set_weights(tiny_build):
    manifest = read_manifest(tiny_build)
    stored = StoredTasks.from_flat(*(load_file(str(tiny_build / f"{name}.safetensors"))
                                     for name in ("pretrained", "factors", "deltas")), manifest["method"]["alpha"])
    linear = manifest["graphs"]["lowrank"]["linear_keys"]
    keys = list(stored.pretrained)
    blocks, unkept = GramBlocks(stored), GramBlocks(stored, capacity_bytes=0)
    worst = 0.0
    for step, task_set in enumerate([(0, 1, 2), (0, 1), (1, 2), (2,), (0, 1, 2, 3), (1, 3)]):
        computed = blocks.computed
        plain = task_set_weights(stored, task_set)
        for store in (blocks, unkept):
            got = task_set_weights(stored, task_set, blocks=store)
            worst = max(worst, max(float(np.abs(got[k].astype(np.float64) - plain[k]).max()) for k in plain
                                   if plain[k].dtype.kind == "f"))
        if step in (1, 2, 3):  # every pair of these sets was seen in (0, 1, 2): assembled, nothing computed
            assert blocks.computed == computed
        low = low_rank_inputs(stored, task_set, keys, linear, blocks)
        expected = low_rank_inputs(stored, task_set, keys, linear)
        if task_set == (0, 1, 2, 3):  # near-singular Gram matrices: no low-rank inputs, with or without blocks
            assert low is None and expected is None
            continue
        worst = max(worst, max(float(np.abs(low[k] - expected[k]).max()) for k in expected if low[k].dtype.kind == "f"))
    print(f"task-set weights and low-rank inputs with vs without Gram blocks: max |diff| {worst:.1e}")
    assert worst <= 1e-6
    assert unkept.info()["blocks"] == 0 and unkept.info()["computed"] > 0
    info = blocks.info()
    assert 0 < info["bytes"] <= info["capacity_bytes"] == GramBlocks.full_bytes(stored)
    every_pair = sum(2 * len(p["s"]) * (len(p["s"]) + 1) // 2 for p in stored.factors.values())
    assert info["blocks"] == every_pair  # (0, 1, 2, 3) saw every pair
    # A runtime fills the store at load (theta_MT needs most pairs anyway), within --cache-bytes.
    runtime = MassRuntime.load(tiny_build, threads=1, cache_bytes=64 << 20, calibrate=False)
    stats = runtime.stats()
    assert stats["gram_blocks"]["blocks"] == every_pair and stats["gram_blocks"]["bytes"] == info["bytes"]
    assert sum(stats[part]["capacity_bytes"] for part in ("cache", "gram_blocks", "cores")) == 64 << 20


def test_cores_remake_an_evicted_set_without_eigen_decompositions(tiny_build):
    runtime = MassRuntime.load(tiny_build, threads=1, calibrate=False)
    stored, task_set = runtime.stored, (1, 2)
    first = runtime.prepare_factors(task_set)  # computes the set's cores and keeps them
    computed = runtime.stats()["gram_blocks"]["computed"]
    again = runtime.prepare_factors(task_set)  # e.g. after its factors were evicted: products U_cat M only
    fresh = runtime.prepare_factors(task_set, reuse_cores=False)
    independent = low_rank_inputs(stored, task_set, runtime.encoder_keys, runtime._linear_keys)  # no store, no cores
    cores = runtime.stats()["cores"]
    assert cores["misses"] == 1 and cores["hits"] == 1 and cores["entries"] == 1 and 0 < cores["bytes"]
    assert runtime.stats()["gram_blocks"]["computed"] == computed  # nothing recomputed for the second call
    for other in (again, fresh, independent):
        assert other.keys() == first.keys()
        for key, value in first.items():
            np.testing.assert_array_equal(other[key], value)  # the same numbers, bit for bit
    dense = runtime.prepare_task_set(task_set)
    expected = task_set_weights(stored, task_set, keys=runtime.encoder_keys)
    worst = max(float(np.abs(dense[k] - expected[k]).max()) for k in expected if expected[k].dtype.kind == "f")
    print(f"dense weights from cached cores vs task_set_weights: max |diff| {worst:.1e}")
    assert worst <= 1e-6


def test_planner_rents_then_buys():
    planner = SecondPassPlanner("auto")
    planner.observe_dense(images=4, seconds=0.5)  # 0.125 s per image (binary-exact numbers)
    planner.observe_lowrank(task_set_size=1, images=4, seconds=0.75)  # +0.0625 s per image and task
    planner.observe_product(task_set_size=1, seconds=0.375)  # densifying: 0.375 s per task
    assert planner.choose((0, 1), 2, dense_cached=False, dense_in_flight=False) == "lowrank"  # paid 0.25 of 0.75
    assert planner.choose((0, 1), 2, dense_cached=False, dense_in_flight=False) == "lowrank"  # paid 0.5 of 0.75
    assert planner.choose((0, 1), 2, dense_cached=False, dense_in_flight=False) == "dense"  # 0.75: buy
    assert planner.choose((2,), 16, dense_cached=False, dense_in_flight=False) == "dense"  # 1.0 >= 0.375 at once
    assert planner.choose((3,), 16, dense_cached=False, dense_in_flight=True) == "lowrank"  # never wait
    assert planner.choose((3,), 1, dense_cached=True, dense_in_flight=False) == "dense"
    # 16 images would repay densifying at once, but the cache could not keep the set: low-rank, nothing owed.
    assert planner.choose((4,), 16, dense_cached=False, dense_in_flight=False, dense_fits=False) == "lowrank"
    assert planner.info()["choices"] == {"dense_cached": 1, "dense_prepared": 2, "lowrank": 4}
    assert SecondPassPlanner("auto", lowrank_available=False).form == "dense"


def test_window_keeps_input_order_and_holds_at_most_a_window(tiny_build, images):
    runtime = MassRuntime.load(tiny_build, threads=1)
    items = list(images) * 3  # 30 images, several task sets
    expected = runtime.classify(items, batch_size=4, window=4)  # batch by batch
    drawn, emitted, held = [0], [0], []

    def stream():
        for item in items:
            drawn[0] += 1
            yield item

    calls = []
    for name in ("encoder", "lowrank"):
        runner = runtime.runners[name]
        runner.run = (lambda original: lambda feeds, keep=(): calls.append(len(feeds["pixel_values"]))
                      or original(feeds, keep))(runner.run)
    try:
        got = []
        for batch in runtime.classify_batches(stream(), batch_size=4, window=11):
            held.append(drawn[0] - emitted[0])
            emitted[0] += len(batch)
            got += batch
    finally:
        for name in ("encoder", "lowrank"):
            del runtime.runners[name].run
    assert [p.path for p in got] == [str(p) for p in items]
    assert [(p.task, p.class_name, p.task_set) for p in got] == [(p.task, p.class_name, p.task_set) for p in expected]
    print(f"window 11, batch 4: images held when each batch was emitted {held}")
    assert max(held) <= 11 and max(held) > 4
    # Grouped across the window: one second pass per task set per window (groups of <= 4 run whole) ...
    windows = [items[i:i + 11] for i in range(0, len(items), 11)]
    sets = {p.path: p.task_set for p in got}
    groups = [sum(-(-sum(sets[str(i)] == s for i in w) // 4) for s in {sets[str(i)] for i in w}) for w in windows]
    assert len(calls) == sum(groups) and sum(calls) == len(items)
    assert all(size <= 4 for size in calls)


class PacedRuntime(MassRuntime):
    """Preparation of one chosen task set waits for a signal: a real preparation, held open by the test."""

    slow_set: tuple = (1, 2)

    def __init__(self, *args, **kwargs):
        self.events: list[str] = []
        self.started, self.release = threading.Event(), threading.Event()
        super().__init__(*args, **kwargs)

    def prepare_task_set(self, task_set):
        if task_set == self.slow_set:
            self.events.append("slow preparation started")
            self.started.set()
            assert self.release.wait(WAIT)
        weights = super().prepare_task_set(task_set)
        if task_set == self.slow_set:
            self.events.append("slow preparation done")
        return weights


def test_a_miss_does_not_block_a_concurrent_hit(tiny_build, pixels):
    runtime = PacedRuntime.load(tiny_build, threads=1, second_pass="dense")
    runtime.warm([(0,)])
    x = pixels[:2]
    results = {}

    def slow(name):
        results[name] = runtime.encode(x, runtime.slow_set)
        runtime.events.append(f"{name} done")

    miss = threading.Thread(target=slow, args=("miss",))
    miss.start()
    assert runtime.started.wait(WAIT)
    same = threading.Thread(target=slow, args=("same set",))  # wants the set being prepared: waits for it
    same.start()
    while runtime.cache.info()["waits"] == 0 and same.is_alive():
        same.join(0.01)
    runtime.encode(x, (0,))  # a cached set while the other is being prepared
    runtime.events.append("hit done")
    runtime.release.set()
    miss.join(WAIT)
    same.join(WAIT)
    assert runtime.events[:2] == ["slow preparation started", "hit done"]
    assert runtime.events[2] == "slow preparation done" and set(runtime.events[3:]) == {"miss done", "same set done"}
    info = runtime.cache.info()
    assert info["waits"] == 1 and info["preparations"] == 2 and info["hits"] >= 1  # (0,) and the slow set, once
    np.testing.assert_array_equal(results["miss"], results["same set"])


def test_an_older_low_rank_graph_runs_dense_with_a_warning(tiny_build, pixels, tmp_path):
    """A build whose low-rank graph predates the gathered form (no ``factor_keys``) loads, says so and runs the
    dense encoder: the same predictions, nothing refused."""
    import json
    import shutil

    from mass_export.core.manifest import DIGEST, manifest_digest

    old = tmp_path / "old_build"
    shutil.copytree(tiny_build, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["graphs"]["lowrank"]["factor_keys"]
    manifest[DIGEST] = manifest_digest(manifest)
    (old / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.warns(RuntimeWarning, match="older form"):
        runtime = MassRuntime.load(old, threads=1)
    assert not runtime.has_lowrank
    expected = MassRuntime.load(tiny_build, threads=1, second_pass="dense").predict(pixels)
    got = runtime.predict(pixels)
    assert [(p.task_index, p.class_index) for p in got] == [(p.task_index, p.class_index) for p in expected]
    assert runtime.stats()["second_pass"]["choices"]["lowrank"] == 0
