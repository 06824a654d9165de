"""The demo path end to end on the real demo zoo: demo, eval, bench, and runtime == reference on real images."""

import json

import numpy as np

from _cli import cli


def invoke(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output[-3000:]
    return result


def test_runtime_predicts_what_the_reference_predicts_on_real_images(zoo_build):
    from mass_export.merging.stored import reference_from_build
    from mass_export.export.validate import pixel_batch
    from mass_export.core.manifest import read_manifest
    from mass_export.runtime import MassRuntime

    build, images = zoo_build["build"], zoo_build["images"]
    manifest = read_manifest(build)
    tasks = manifest["tasks"]
    runtime = MassRuntime.load(build).classify(images, batch_size=7)
    reference = reference_from_build(build).predict(pixel_batch(images, manifest["model"]))
    assert [(p.task, p.class_index, p.task_set) for p in runtime] == [
        (tasks[r.task_index], r.class_index, tuple(tasks[t] for t in r.task_set)) for r in reference]
    worst = max(abs(p.score - r.score) for p, r in zip(runtime, reference))
    print(f"zoo: runtime vs reference on {len(images)} real images: max |score diff| = {worst:.2e}")
    assert worst < 1e-4


def test_demo_reports_accuracy_on_real_test_images(zoo_build, tmp_path):
    report = json.loads(invoke("demo", "-o", tmp_path, "--images-per-task", 12, "--json").stdout)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 * len(report["per_task"]) and all(row["error"] is None for row in rows)
    assert len(list((tmp_path / "images").rglob("*.png"))) == len(rows)
    # far above chance (1/10 classes x 1/5 tasks = 2%): the zoo, the build and the runtime all work
    assert report["accuracy"] > 0.35, report


def test_eval_json_has_every_method_and_the_runtime_agrees(zoo_build):
    report = json.loads(invoke("eval", "--limit", 40, "--routing-layer-sweep", "1,2", "--json").stdout)
    assert report["schema"] == "mass-export/eval/1"
    expected = {"zero_shot", "finetuned", "task_arithmetic", "tsv_m", "tsv_m_no_redundancy", "tsv_c_task_known",
                "mass", "mass_authors_metric", "mass_onnx_runtime"}
    assert expected <= set(report["methods"])
    tasks = report["tasks"]
    for row in report["methods"].values():
        assert set(row["per_task"]) == set(tasks) and 0 <= row["mean"] <= 1 and "normalised" in row
    assert np.asarray(report["router"]["confusion"]).shape == (len(tasks), len(tasks))
    assert np.asarray(report["router"]["confusion"]).sum() == sum(report["images"].values())
    assert report["runtime"]["agreement_with_reference"] == 1.0
    assert report["methods"]["mass"]["per_task"] == report["methods"]["mass_onnx_runtime"]["per_task"]
    assert set(report["routing_layer_sweep"]) == {"1", "2"}
    # The authors' metric can only forgive a wrong head, never punish a right one.
    for task in tasks:
        assert report["methods"]["mass_authors_metric"]["per_task"][task] >= report["methods"]["mass"]["per_task"][task]


def test_bench_json_structure(zoo_build, tmp_path):
    report = json.loads(invoke("bench", "--build", zoo_build["build"], "--batch-sizes", "1,4", "--warmup", 1,
                               "--iterations", 2, "--threads", 1, "--csv", tmp_path / "b.csv",
                               "--stream", f"homogeneous,mixed,{zoo_build['images'][0].parents[2]}",
                               "--json").stdout)
    variants = {row["variant"] for row in report["results"]}
    assert {"plain_pass", "mass_onnx", "mass_onnx.first_pass", "mass_onnx.router", "mass_onnx.second_pass",
            "mass_onnx.heads", "torch_naive", "torch_early_exit_cached", "prepare_dense.size1"} <= variants
    for row in report["results"]:
        assert row["images_per_s"] > 0 and row["p50_ms"] <= row["p99_ms"] and row["time_ratio_to_plain"] > 0
    streams = {row["stream"] for row in report["results"]}
    assert len(streams) == 3 and {"homogeneous", "mixed"} <= streams
    mass = [row for row in report["results"] if row["variant"] == "mass_onnx"]
    assert {(row["stream"], row["phase"], row["batch"]) for row in mass} == {
        (stream, phase, batch) for stream in streams for phase in ("cold", "steady") for batch in (1, 4)}
    for row in mass:
        assert row["window"] == 8 * row["batch"]  # run's default window: 8 batches routed, then grouped
        assert row["throughput_ratio_to_plain"] > 0 and 1 <= row["task_sets_per_batch"] <= row["batch"]
        assert row["hits"] + row["misses"] >= 1 and row["preparations"] <= row["misses"]
        assert sum(row["second_pass_groups"].values()) >= 1
        assert set(row["cores"]) == {"hits", "misses", "evictions"} and row["gram_matrices_computed"] >= 0
    cold_mixed = next(r for r in mass if r["stream"] == "mixed" and r["phase"] == "cold" and r["batch"] == 4)
    assert cold_mixed["misses"] >= 1  # nothing was warmed before the stream began
    assert report["mixed_distribution"]["set_size"] == {"1": 0.28, "2": 0.63, "3": 0.09}
    assert report["providers_active"]["encoder"] == ["CPUExecutionProvider"]
    assert report["storage"]["factor_of_tower"]["total"] > 1
    assert report["runtime_memory"]["peak_rss_mib"] > 0 and report["runtime_memory"]["torch_imported"] is False
    assert (tmp_path / "b.csv").read_text().startswith("stream,phase,batch,window,variant,images_per_s")