"""`mass-export build` end to end through the CLI, from real files in every checkpoint layout.

The method's invariants (the paper, arXiv 2504.05342; README "The method as built") are checked on the written
build: theta_MT rebuilt from stored factors equals the torch merge of the original checkpoints, single-task sets
equal their truncated update, exported graphs equal the reference (validation inside build), and the runtime on
real images predicts what the reference predicts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from _cli import cli
from layouts import (synthetic_finetune, tiny_config, tiny_model, write_hf_bin, write_head, write_safetensors,
                     write_state_dict, write_task_vectors)
from mass_export.merging import merge
from mass_export.merging.checkpoints import visual_state
from mass_export.core.taskweights import StoredTasks, task_set_weights

TASKS = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon"]


def write_tree(root: Path, model, config_path: Path, tasks=TASKS, scale=0.02, classes=(3, 4, 5, 2)):
    """A task_vectors-style tree whose tasks each use a different layout; returns the fine-tuned visual states."""
    pre = {k: v.detach().clone() for k, v in visual_state(model).items()}
    write_task_vectors(root / "zeroshot.pt", model, "zeroshot")
    states = []
    writers = [
        lambda task, state: write_task_vectors(root / task / "finetuned.pt", model, "finetuned", visual=state),
        lambda task, state: write_task_vectors(root / f"{task}Val" / "nonlinear_finetuned.pt", model,
                                               "nonlinear_finetuned", visual=state),
        lambda task, state: write_hf_bin(root / task / "pytorch_model.bin", model, visual=state),
        lambda task, state: write_safetensors(root / task / "finetuned.safetensors", state, prefix="visual."),
        lambda task, state: write_state_dict(root / task / "finetuned.pt", state, prefix="model.visual."),
    ]
    g = torch.Generator().manual_seed(7)
    embed = model.visual.proj.shape[1]
    for index, task in enumerate(tasks):
        state = synthetic_finetune(pre, seed=index + 1, scale=scale)
        writers[index % len(writers)](task, state)
        head = torch.nn.functional.normalize(torch.randn(classes[index % len(classes)], embed, generator=g), dim=-1)
        write_head(root / f"head_{task}.pt", head * 100)
        states.append(state)
    return pre, states


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    config_path = root / "tiny.json"
    config_path.write_text(json.dumps(tiny_config()))
    model = tiny_model(seed=0)
    pre, states = write_tree(root / "ckpt", model, config_path)
    return root, config_path, pre, states


@pytest.fixture(scope="module")
def tiny_build(tiny_tree):
    root, config_path, pre, states = tiny_tree
    out = root / "build"
    result = cli("build", "--model", config_path, "--checkpoints", root / "ckpt", "--routing-layer", 1,
                 "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout), pre, states


def test_build_writes_the_contract(tiny_build):
    out, manifest, pre, states = tiny_build
    assert sorted(manifest["tasks"]) == sorted(TASKS)
    for name in ("pretrained.safetensors", "factors.safetensors", "deltas.safetensors", "heads.safetensors",
                 "classes.json", "graphs/prefix.onnx", "graphs/router.onnx", "graphs/encoder.onnx",
                 "graphs/heads.onnx"):
        assert manifest["files"][name]["bytes"] == (out / name).stat().st_size
    assert manifest["method"]["routing_layer"] == 1 and manifest["method"]["base"] == "no-redundancy"
    assert manifest["validation"]["passed"] and manifest["validation"]["task_sets_identical"]
    print("validation max |diff|:", manifest["validation"]["max_abs_diff"])
    assert manifest["model"]["quick_gelu"] is False
    assert {"torch", "onnx", "onnxruntime", "open_clip"} <= set(manifest["versions"])
    stages = manifest["stage_seconds"]  # where a slow build's time went: every stage, adding up to the whole
    assert list(stages) == ["load_and_truncate", "write_and_export", "read_back", "validation"]
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) <= manifest["build_seconds"] + 0.05
    assert not list(out.parent.glob(".build.*")), "staging directory left behind"


def test_stored_factors_rebuild_the_independent_merge(tiny_build):
    """theta_MT and single-task sets, rebuilt from the files, against the torch merge of the raw checkpoints."""
    out, manifest, pre, states = tiny_build
    order = [TASKS.index(t) for t in manifest["tasks"]]
    deltas = [merge.task_delta(pre, states[i]) for i in order]
    factors = merge.task_factors(deltas, split=True)
    bases = merge.base_tasks(factors, "no-redundancy", 0.3)
    stored = StoredTasks.from_flat(load_file(str(out / "pretrained.safetensors")),
                                   load_file(str(out / "factors.safetensors")),
                                   load_file(str(out / "deltas.safetensors")))
    theta_mt = merge.merged_tower(pre, factors, range(len(order)), per_key_tasks=bases)
    rebuilt = task_set_weights(stored, range(len(order)), base=True)
    worst = max(float(np.abs(rebuilt[k] - theta_mt[k].numpy()).max()) for k in pre)
    print(f"theta_MT from stored factors vs torch merge of checkpoints: max |diff| = {worst:.2e}")
    assert worst < 1e-5
    for task in range(len(order)):
        single = task_set_weights(stored, (task,))
        truncated = {k: pre[k] + (factors.U[k][task] * factors.s[k][task]) @ factors.V[k][task]
                     for k in factors.U if "in_proj" not in k}
        worst = max(float(np.abs(single[k] - truncated[k].numpy()).max()) for k in truncated)
        assert worst < 1e-5
        assert np.allclose(single["conv1.weight"], (pre["conv1.weight"] + deltas[task]["conv1.weight"]).numpy())


def test_runtime_predicts_what_the_reference_predicts(tiny_build, tmp_path):
    from PIL import Image
    from skimage import data

    from mass_export.merging.stored import reference_from_build
    from mass_export.export.validate import pixel_batch

    out, manifest, *_ = tiny_build
    photos = [getattr(data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")]
    paths = []
    for i, photo in enumerate(photos):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(photo).save(paths[-1])
    result = cli("run", tmp_path, "--build", out, "--batch-size", 4, "--output", tmp_path / "p.jsonl")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    reference = reference_from_build(out).predict(pixel_batch(paths, manifest["model"]))
    tasks = manifest["tasks"]
    assert [(r["task"], r["task_set"]) for r in rows] == [
        (tasks[p.task_index], [tasks[t] for t in p.task_set]) for p in reference]
    assert [r["score"] for r in rows] == pytest.approx([p.score for p in reference], abs=1e-3)


def test_existing_output_is_refused_without_force(tiny_build, tiny_tree):
    out, *_ = tiny_build
    root, config_path, *_ = tiny_tree
    before = (out / "manifest.json").read_text()
    result = cli("build", "--model", config_path, "--checkpoints", root / "ckpt", "-o", out)
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "manifest.json").read_text() == before


def test_bad_inputs_are_named_and_leave_nothing(tiny_tree, tmp_path):
    root, config_path, pre, states = tiny_tree
    # a fine-tune of another width: the key and both shapes are named
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for item in (root / "ckpt").iterdir():
        os.symlink(item, bad / item.name)
    os.unlink(bad / "Alpha")
    wrong = dict(states[0])
    wrong["transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(128, 32)
    write_safetensors(bad / "Alpha" / "finetuned.safetensors", wrong, prefix="visual.")
    out = tmp_path / "out"
    result = cli("build", "--model", config_path, "--checkpoints", bad, "-o", out)
    assert result.exit_code == 2
    assert "transformer.resblocks.0.mlp.c_fc.weight" in result.output and "(128, 32)" in result.output
    assert "(256, 64)" in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    # NaN weights are refused, naming the key
    nan = dict(states[0])
    nan["ln_post.weight"] = torch.full_like(nan["ln_post.weight"], float("nan"))
    write_safetensors(bad / "Alpha" / "finetuned.safetensors", nan, prefix="visual.")
    result = cli("build", "--model", config_path, "--checkpoints", bad, "-o", out)
    assert result.exit_code == 2 and "ln_post.weight" in result.output and "NaN" in result.output
    # missing tasks are listed together
    result = cli("build", "--model", config_path, "--checkpoints", root / "ckpt", "--tasks", "Alpha,Nope,Gone",
                 "-o", out)
    assert result.exit_code == 2 and "Nope" in result.output and "Gone" in result.output
    # a rank that rounds to zero names the largest task count it allows
    result = cli("build", "--model", config_path, "--checkpoints", root / "ckpt", "--tasks", ",".join(TASKS),
                 "--rank", "0", "-o", out)
    assert result.exit_code == 2 and "rank" in result.output
    assert not out.exists()


def test_rank_that_rounds_to_zero_names_the_largest_task_count():
    from mass_export.core.errors import ConfigError

    with pytest.raises(ConfigError, match="at most 64 tasks"):
        merge.truncate_task({"w": torch.zeros(64, 256)}, 65)


def test_fused_qkv_and_tsv_base_and_fp16(tiny_tree, tmp_path):
    root, config_path, *_ = tiny_tree
    out = tmp_path / "fused"
    result = cli("build", "--model", config_path, "--checkpoints", root / "ckpt", "--fused-qkv", "--base", "tsv",
                 "--storage-dtype", "fp16", "--routing-layer", 0, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    factors = load_file(str(out / "factors.safetensors"))
    assert "transformer.resblocks.0.attn.in_proj_weight.U" in factors
    assert factors["transformer.resblocks.0.attn.in_proj_weight.U"].dtype == np.float16
    assert all(v.all() for k, v in factors.items() if k.endswith(".base"))
    assert manifest["validation"]["passed"]


@pytest.mark.slow
def test_real_size_vit_b16_in_every_layout(tmp_path):
    """Real-size random-weight ViT-B-16: pretrained pickle + 5 fine-tunes in 5 layouts, built, exported, validated."""
    import open_clip

    model = open_clip.create_model("ViT-B-16").eval()
    root = tmp_path / "ckpt"
    # five tasks: one per writer, so every layout is read at real size
    pre, _ = write_tree(root, model, None, tasks=["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST"], classes=(5, 4, 3))
    del model
    out = tmp_path / "build"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "mass_export_cli", "build", "--model", "ViT-B-16", "--checkpoints",
                           str(root), "-o", str(out), "--threads", "1", "--json"], capture_output=True, text=True, env=env,
                          timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    assert manifest["method"]["routing_layer"] == 9 and 153 in manifest["method"]["ranks"]
    assert manifest["validation"]["passed"]
    print("ViT-B-16 validation max |diff|:", manifest["validation"]["max_abs_diff"])
    print("ViT-B-16 storage:", manifest["storage"]["factor_of_tower"])


def test_validation_reads_what_was_written_and_refuses_a_changed_part(tiny_tree, tmp_path):
    """The build hands validation views of the tensors it wrote only after reading every file back: the views
    equal what the runtime loads (fp16 storage too), and a part changed on disk is named and refused."""
    from safetensors.torch import load_file as load_torch, save_file

    from mass_export.core.errors import ConfigError
    from mass_export.export.validate import load_stored
    from mass_export.pipeline.build import BuildConfig, load, stored_views, write_build

    root, config_path, *_ = tiny_tree
    cfg = BuildConfig(model=str(config_path), checkpoints=root / "ckpt", routing_layer=1, storage_dtype="fp16",
                      output=tmp_path / "unused", progress=False, export=False)
    loaded = load(cfg)
    assert not hasattr(loaded.pretrained.model, "transformer")  # the text tower is freed once the heads exist
    stage = tmp_path / "stage"
    stage.mkdir()
    manifest = write_build(loaded, cfg, stage)
    (stored, heads), (files, file_heads) = stored_views(loaded, cfg, stage), load_stored(stage, manifest)
    assert np.array_equal(heads, file_heads)
    assert stored.pretrained.keys() == files.pretrained.keys()
    assert all(np.array_equal(stored.pretrained[k], files.pretrained[k]) for k in files.pretrained)
    for key, parts in files.factors.items():
        for name, value in parts.items():
            assert np.array_equal(np.asarray(stored.factors[key][name], np.float32), np.asarray(value, np.float32))
    factors = load_torch(str(stage / "factors.safetensors"))
    changed = sorted(k for k in factors if k.endswith(".U"))[0]
    factors[changed] = factors[changed].clone()
    factors[changed].view(-1)[0] += 1
    save_file(factors, str(stage / "factors.safetensors"))
    with pytest.raises(ConfigError, match=f"factors.safetensors: {changed}"):
        stored_views(loaded, cfg, stage)
