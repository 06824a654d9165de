"""Options and the build config file: one definition per option, range checks before any work, `build --config`,
command-line overrides, every checkpoint layout found in a tree, class names that reach `run`'s rows.

All checkpoints are real files written by open_clip, torch.save and safetensors (tests/layouts.py)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import layouts  # noqa: E402

from mass_export.core import options  # noqa: E402
from mass_export.core.errors import CheckpointError, MissingCheckpoints  # noqa: E402
from mass_export.merging import checkpoints as ck  # noqa: E402
from mass_export.merging.reference import Method  # noqa: E402
from mass_export.pipeline.config import BuildConfig  # noqa: E402
from _cli import cli  # noqa: E402
from mass_export_cli.main import main  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- one definition per option


def test_defaults_come_from_one_definition():
    for cls in (Method, BuildConfig):
        for f in dataclasses.fields(cls):
            option = f.metadata.get("option")
            if option is None:
                continue
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert value == option.default or list(value) == list(option.default), (cls.__name__, f.name)
    method_fields = {f.name for f in dataclasses.fields(Method)}
    assert {o.name for o in options.METHOD_OPTIONS} == method_fields
    build_fields = {f.name for f in dataclasses.fields(BuildConfig) if "option" in f.metadata}
    assert build_fields == set(options.OPTIONS)


def test_merge_bases_registered_are_the_options_choices():
    from mass_export.merging.merge import BASES

    assert set(BASES) == set(options.OPTIONS["base"].choices)


def test_cli_is_generated_from_the_options():
    command = main.commands["build"]
    flags = {opt for p in command.params for opt in p.opts}
    for option in options.OPTIONS.values():
        assert (option.flag in flags) == option.in_cli, option.name
    assert "--max-tasks" in flags and "--top-k" in flags  # the old spelling, hidden
    help_text = cli("build", "--help").output
    assert "--max-tasks" in help_text and "--top-k" not in help_text and "[default: 0.2]" in help_text
    assert "--top-classes" in cli("run", "--help").output


# ---------------------------------------------------------------- range checks, before any work


@pytest.fixture(scope="module")
def poisoned_tree(tmp_path_factory):
    """A config JSON (2 blocks) and a tree whose pretrained file is garbage: any error that is not about the
    option proves something was read first."""
    root = tmp_path_factory.mktemp("poisoned")
    (root / "tiny.json").write_text(json.dumps(layouts.tiny_config()))
    (root / "ckpt" / "A").mkdir(parents=True)
    (root / "ckpt" / "zeroshot.pt").write_text("not a checkpoint")
    (root / "ckpt" / "A" / "finetuned.pt").write_text("not a checkpoint")
    return root


@pytest.mark.parametrize("args,named", [
    (["--alpha", "nan"], "--alpha nan: must be a finite number"),
    (["--alpha", "inf"], "--alpha inf: must be a finite number"),
    (["--tau", "0"], "--tau 0.0: must be > 0"),
    (["--eta", "1"], "--eta 1.0: must be in [0.0, 1.0)"),
    (["--eta", "-0.1"], "--eta -0.1: must be in [0.0, 1.0)"),
    (["--max-tasks", "0"], "--max-tasks 0: must be >= 1"),
    (["--rank", "0"], "--rank 0: must be >= 1"),
    (["--redundancy-threshold", "1.5"], "--redundancy-threshold 1.5: must be in [0.0, 1.0]"),
    (["--routing-layer", "2"], "--routing-layer 2: the tower has blocks 0..1"),
    (["--routing-layer", "-1"], "--routing-layer -1: must be >= 0"),
    (["--tasks", "A,B,A"], "duplicate task name(s) A"),
    (["--opset", "16"], "--opset 16: must be in [18, 24]"),
    (["--atol", "nan"], "--atol nan: must be a finite number"),
    (["--threads", "0"], "--threads 0: must be >= 1"),
])
def test_out_of_range_refused_before_any_work(poisoned_tree, tmp_path, args, named):
    out = tmp_path / "out"
    result = cli("build", "--model", poisoned_tree / "tiny.json", "--checkpoints", poisoned_tree / "ckpt",
                 "-o", out, *args)
    assert result.exit_code == 2, result.output
    assert named in result.output, result.output
    assert "zeroshot.pt" not in result.output and not out.exists()


def test_deprecated_top_k_is_checked_and_warned(poisoned_tree, tmp_path):
    result = cli("build", "--model", poisoned_tree / "tiny.json", "--checkpoints", poisoned_tree / "ckpt",
                 "-o", tmp_path / "out", "--top-k", "0")
    assert result.exit_code == 2
    assert "--top-k is deprecated, use --max-tasks" in result.output and "--max-tasks 0: must be >= 1" in result.output


def test_method_checks_its_own_ranges():
    from mass_export.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--tau 0"):
        Method(routing_layer=1, tau=0)
    with pytest.raises(ConfigError, match="--alpha nan"):
        Method(routing_layer=1, alpha=float("nan"))


# ---------------------------------------------------------------- finding tasks


def test_two_checkpoints_for_one_task_refused_naming_both(tmp_path):
    model = layouts.tiny_model()
    layouts.write_open_clip_save(tmp_path / "Cars", model, layouts.tiny_config())
    layouts.write_safetensors(tmp_path / "Cars.safetensors", model.visual.state_dict(), "visual.")
    with pytest.raises(CheckpointError) as err:
        ck.find_task_checkpoints(tmp_path, ["Cars"])
    message = str(err.value)
    assert str(tmp_path / "Cars" / "open_clip_model.safetensors") in message
    assert str(tmp_path / "Cars.safetensors") in message and "--config" in message


def test_two_saves_in_one_task_folder_refused_but_one_save_in_two_formats_is_not(tmp_path):
    model = layouts.tiny_model()
    layouts.write_open_clip_save(tmp_path / "Cars", model, layouts.tiny_config(), safe="both")
    assert ck.find_task_checkpoints(tmp_path, ["Cars"])["Cars"].name == "open_clip_model.safetensors"
    layouts.write_task_vectors(tmp_path / "Cars", model, "finetuned")
    with pytest.raises(CheckpointError, match=r"task Cars: two checkpoints, .*Cars/finetuned.pt and "
                                              r".*Cars/open_clip_model.safetensors"):
        ck.find_task_checkpoints(tmp_path, ["Cars"])


def test_missing_task_message_says_what_was_searched_and_found(tmp_path):
    (tmp_path / "Cars").mkdir()
    (tmp_path / "Cars" / "finetuned.pt").touch()
    (tmp_path / "DTD.safetensors").touch()
    (tmp_path / "zeroshot.pt").touch()
    with pytest.raises(MissingCheckpoints) as err:
        ck.find_task_checkpoints(tmp_path, ["Cars", "SVHN"])
    message = str(err.value)
    assert "no checkpoint for task(s) SVHN" in message
    assert f"searched {tmp_path} for a folder <Task>Val or <Task>" in message and "open_clip_model.safetensors" in message
    assert "tasks found there: DTD" in message and "--config" in message
    assert ck.discover_tasks(tmp_path) == ["Cars", "DTD"]


# ---------------------------------------------------------------- builds from every open_clip / torch layout


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Pretrained (whole CLIP, so zero-shot heads work) + one task per layout, all written by the real libraries."""
    root = tmp_path_factory.mktemp("layouts")
    model = layouts.tiny_model(seed=0)
    config = layouts.tiny_config()
    (root / "tiny.json").write_text(json.dumps(config))
    ckpt = root / "ckpt"
    layouts.write_safetensors(ckpt / "zeroshot.safetensors", model.state_dict())
    pre = {k: v.detach().clone() for k, v in model.visual.state_dict().items()}
    states = {task: layouts.synthetic_finetune(pre, seed=i + 1) for i, task in enumerate(["Anvil", "Bolt", "Cog",
                                                                                          "Drill"])}
    tuned = layouts.tiny_model(seed=0)
    tuned.visual.load_state_dict(states["Anvil"])
    layouts.write_open_clip_save(ckpt / "Anvil", tuned, config)  # open_clip's own save, per task
    (ckpt / "Anvil" / "classes.txt").write_text("hammer\nanvil\ntongs\n")
    save_file({f"visual.{k}": v.contiguous() for k, v in states["Bolt"].items()}, str(ckpt / "Bolt.safetensors"))
    torch.save({f"visual.{k}": v for k, v in states["Cog"].items()}, ckpt / "Cog.pt")
    tuned.visual.load_state_dict(states["Drill"])
    torch.save(tuned.state_dict(), ckpt / "Drill.bin")
    g = torch.Generator().manual_seed(0)
    for task, count in (("Bolt", 4), ("Cog", 2), ("Drill", 3)):
        layouts.write_head(ckpt / f"head_{task}.safetensors",
                           100 * torch.nn.functional.normalize(torch.randn(count, 32, generator=g), dim=-1))
    return root, pre, states


def test_every_layout_loads_exactly(tree):
    root, pre, states = tree
    paths = ck.find_task_checkpoints(root / "ckpt", ["Anvil", "Bolt", "Cog", "Drill"])
    assert paths["Anvil"].name == "open_clip_model.safetensors" and paths["Drill"].name == "Drill.bin"
    for task, path in paths.items():
        got = ck.load_visual(path, pre)
        assert all(torch.equal(got[k], states[task][k]) for k in pre), task


def test_build_discovers_every_layout_and_warns_about_indices(tree):
    root, *_ = tree
    out = root / "build"
    result = cli("build", "--model", root / "tiny.json", "--checkpoints", root / "ckpt", "--routing-layer", 1,
                 "--top-k", 2, "--threads", 1, "-o", out)
    assert result.exit_code == 0, result.output
    assert "--top-k is deprecated, use --max-tasks" in result.output
    for task in ("Bolt", "Cog", "Drill"):
        assert f"warning: {task}: no class names for its" in result.output
    assert "classes: in a build config" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"] == ["Anvil", "Bolt", "Cog", "Drill"] and manifest["method"]["top_k"] == 2
    assert manifest["validation"]["passed"] and len(manifest["warnings"]) == 3 and manifest["opset"] == 18
    classes = json.loads((out / "classes.json").read_text())
    assert classes["Anvil"] == ["hammer", "anvil", "tongs"] and classes["Cog"] == ["0", "1"]


# ---------------------------------------------------------------- the config file


def test_config_file_build_and_run_rows_carry_the_names(tree, tmp_path):
    from PIL import Image
    from skimage import data

    root, *_ = tree
    (root / "gadget-classes.json").write_text(json.dumps(["spring", "lever"]))
    config = root / "tasks.yaml"
    config.write_text(
        "model: tiny.json\n"
        "pretrained: ckpt/zeroshot.safetensors\n"
        "tasks:\n"
        "  Widgets:\n"
        "    checkpoint: ckpt/Bolt.safetensors\n"
        "    classes: [bolt, nut, gear]\n"
        "    templates: ['a photo of a {}.']\n"
        "  Gadgets:\n"
        "    checkpoint: ckpt/Anvil\n"
        "    classes: gadget-classes.json\n"
        "routing_layer: 1\n"
        "alpha: 0.5\n"
        "max_tasks: 1\n"
        "threads: 1\n")
    out = tmp_path / "build"
    result = cli("build", "--config", config, "--alpha", "0.8", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["tasks"] == ["Widgets", "Gadgets"]
    assert manifest["method"]["alpha"] == 0.8 and manifest["method"]["top_k"] == 1  # the command line wins
    recorded = manifest["build_config"]
    assert recorded["config_file"] == str(config) and recorded["alpha"] == 0.8 and recorded["max_tasks"] == 1
    assert recorded["task_sources"]["Widgets"]["checkpoint"] == str(root / "ckpt" / "Bolt.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(data, name)()).save(images / f"{name}.png")
    result = cli("run", images, "--build", out, "--output", tmp_path / "rows.jsonl", "--top-classes", 2)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    names = {"Widgets": {"bolt", "nut", "gear"}, "Gadgets": {"spring", "lever"}}
    assert len(rows) == 4
    for row in rows:
        assert row["class"] in names[row["task"]] and len(row["top_k"]) == 2
    # run's old --top-k spelling still works, with a warning
    result = cli("run", images, "--build", out, "--output", tmp_path / "old.jsonl", "--top-k", 1)
    assert result.exit_code == 0 and "run --top-k is deprecated, use --top-classes" in result.output
    assert all(len(json.loads(line)["top_k"]) == 1 for line in (tmp_path / "old.jsonl").read_text().splitlines())


@pytest.mark.parametrize("text,named", [
    ("model: tiny.json\nalpah: 2\ntasks: [A]\n", "unknown key(s) alpah"),
    ("model: tiny.json\ntasks:\n  A:\n    checkpoint: ckpt/Cog.pt\n    clases: [a]\n", "tasks.A: unknown key(s) clases"),
    ("model: tiny.json\ntasks:\n  A:\n    checkpoint: nowhere.pt\n", "tasks.A.checkpoint: no such file or directory"),
    ("model: tiny.json\ntasks:\n  A:\n    checkpoint: ckpt/Cog.pt\n    templates: ['no slot']\n", "templates"),
    ("model: tiny.json\neta: 1.5\ntasks: [A]\n", "--eta 1.5: must be in [0.0, 1.0)"),
    ("- just\n- a list\n", "a build config is a mapping"),
    ("model: [unclosed\n", "not a readable build config"),
])
def test_bad_config_files_refused_naming_the_key(tree, text, named):
    root, *_ = tree
    config = root / "bad.yaml"
    config.write_text(text)
    result = cli("build", "--config", config, "-o", root / "never")
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert named.startswith("--eta") or str(config) in result.output  # a range names the option, the rest the file
    assert not (root / "never").exists()


def test_config_file_reader_resolves_paths_and_warns_on_old_keys(tmp_path):
    from mass_export.pipeline.config import read_config_file, resolve

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "names.txt").write_text("one\ntwo\n\n")
    (tmp_path / "sub" / "w.pt").write_bytes(b"x")
    config = tmp_path / "sub" / "c.yml"
    config.write_text("model: ViT-B-16\npretrained: openai\ntop_k: 2\nstorage-dtype: fp16\ncheckpoints: .\n"
                      "tasks:\n  A: w.pt\n  B:\n    checkpoint: w.pt\n    classes: names.txt\n")
    with pytest.warns(FutureWarning, match="'top_k' is deprecated, write 'max_tasks'"):
        values = read_config_file(config)
    assert values["top_k"] == 2 and values["storage_dtype"] == "fp16" and values["checkpoints"] == tmp_path / "sub"
    assert values["pretrained"] == "openai" and values["model"] == "ViT-B-16"  # names and tags stay as they are
    assert values["task_specs"]["A"].checkpoint == tmp_path / "sub" / "w.pt"
    assert values["task_specs"]["B"].classes == ["one", "two"]
    with pytest.warns(FutureWarning):
        cfg = resolve({"tasks": "B", "alpha": 0.5}, config)
    assert cfg.tasks == "B" and list(cfg.task_specs) == ["B"] and cfg.alpha == 0.5 and cfg.top_k == 2
