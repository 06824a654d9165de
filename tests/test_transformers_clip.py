"""Hugging Face transformers CLIP checkpoints: converted to open_clip exactly, checked against transformers' own
forward pass on the same weights, and built into a MASS build whose features equal the fine-tuned model's.

Every checkpoint here is written by transformers' save_pretrained; nothing is mocked.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

import transformers  # noqa: E402,F401  (the [test] extra installs it; a missing one fails, never skips)

sys.path.insert(0, str(Path(__file__).parent))
import layouts  # noqa: E402

from mass_export.merging import checkpoints as ck  # noqa: E402
from mass_export.merging.zeroshot import tokenizer_for  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pixels(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hf_image_features(model, x):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=x)
    return getattr(out, "pooler_output", out)


def hf_text_features(model, ids):
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids)
    return getattr(out, "pooler_output", out)


@pytest.mark.parametrize("act,safe", [("quick_gelu", True), ("gelu", False)])
def test_pretrained_clipmodel_dir_converts_exactly(tmp_path, act, safe):
    model = layouts.hf_tiny_model(seed=1, hidden_act=act)
    folder = layouts.write_hf_clip(tmp_path / "clip", model, safe=safe)
    pm = ck.load_pretrained(str(folder), None)
    assert pm.has_text and pm.quick_gelu is (act == "quick_gelu")
    assert pm.config["vision_cfg"] == {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32,
                                       "mlp_ratio": 4.0}
    x = pixels()
    with torch.no_grad():
        ours = pm.model.encode_image(x)
    image_diff = float((ours - hf_image_features(model, x)).abs().max())
    tokens = tokenizer_for(pm.name, 16)(["a photo of a bolt.", "a nut", "gear wheel on a table"])
    with torch.no_grad():
        text = pm.model.encode_text(tokens)
    text_diff = float((text - hf_text_features(model, tokens)).abs().max())
    scale_diff = float((pm.model.logit_scale - model.logit_scale.detach()).abs())
    print(f"{act}: image max |diff| {image_diff:.2e}, text max |diff| {text_diff:.2e}")
    assert image_diff <= 1e-5 and text_diff <= 1e-5 and scale_diff == 0


def test_vision_model_without_projection_takes_the_pretrained_one(tmp_path):
    pre = layouts.hf_tiny_model(seed=2)
    tuned = layouts.hf_finetune(pre, seed=5)
    pm = ck.load_pretrained(str(layouts.write_hf_clip(tmp_path / "pre", pre)), None)
    reference = ck.visual_state(pm)
    folder = layouts.write_hf_vision(tmp_path / "Widgets", tuned)
    got = ck.load_visual(folder, reference, pm.quick_gelu)
    assert torch.equal(got["proj"], reference["proj"])  # a CLIPVisionModel has none: the pretrained's
    assert not torch.equal(got["conv1.weight"], reference["conv1.weight"])
    with_proj = ck.load_visual(layouts.write_hf_vision(tmp_path / "P", tuned, with_projection=True), reference)
    assert torch.equal(with_proj["proj"], tuned.visual_projection.weight.detach().t())
    # the whole fine-tuned CLIPModel saved as a .bin: the same tower
    whole = ck.load_visual(layouts.write_hf_clip(tmp_path / "W", tuned, safe=False) / "pytorch_model.bin", reference)
    assert all(torch.equal(whole[k], with_proj[k]) for k in reference)


def test_activation_mismatch_refused(tmp_path):
    pre = layouts.hf_tiny_model(seed=3, hidden_act="quick_gelu")
    gelu = layouts.hf_tiny_model(seed=3, hidden_act="gelu")
    pm = ck.load_pretrained(str(layouts.write_hf_clip(tmp_path / "pre", pre)), None)
    folder = layouts.write_hf_vision(tmp_path / "T", gelu)
    from mass_export.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"quick_gelu=True was given, but the transformers config .*T/config.json"):
        ck.load_visual(folder, ck.visual_state(pm), pm.quick_gelu)


def test_text_only_file_is_named_as_such(tmp_path):
    from transformers import CLIPTextModel

    model = layouts.hf_tiny_model(seed=4)
    text = CLIPTextModel(model.config.text_config)
    text.save_pretrained(tmp_path / "text")
    pm = ck.load_pretrained(str(layouts.write_hf_clip(tmp_path / "pre", model)), None)
    from mass_export.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="looks like a transformers CLIPTextModel state dict"):
        ck.load_visual(tmp_path / "text" / "model.safetensors", ck.visual_state(pm))


def test_one_task_build_equals_the_finetuned_model(tmp_path):
    """build --config from transformers dirs; T = 1 keeps full rank, so features equal the fine-tune's own."""
    from _cli import cli

    from mass_export.runtime import MassRuntime

    pre = layouts.hf_tiny_model(seed=0)
    tuned = layouts.hf_finetune(pre, seed=9, projection=False)  # saved as a CLIPVisionModel: no projection
    layouts.write_hf_clip(tmp_path / "openai-clip", pre)
    layouts.write_hf_vision(tmp_path / "ft" / "Widgets", tuned)
    (tmp_path / "tasks.yaml").write_text(
        "model: openai-clip\n"
        "tasks:\n"
        "  Widgets:\n"
        "    checkpoint: ft/Widgets\n"
        "    classes: [bolt, nut, gear]\n"
        "    templates: ['a photo of a {}.', 'a {} on a bench.']\n"
        "threads: 1\n")
    out = tmp_path / "build"
    result = cli("build", "--config", tmp_path / "tasks.yaml", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["tasks"] == ["Widgets"] and manifest["validation"]["passed"]
    assert manifest["build_config"]["task_sources"]["Widgets"]["classes"] == ["bolt", "nut", "gear"]
    assert json.loads((out / "classes.json").read_text()) == {"Widgets": ["bolt", "nut", "gear"]}
    x = pixels(4, seed=1)
    runtime = MassRuntime.load(out)
    ours = torch.from_numpy(runtime.encode(x.numpy(), (0,)))
    expected = hf_image_features(tuned, x)
    diff = float((ours - expected).abs().max())
    print(f"one-task MASS build vs transformers get_image_features of the fine-tune: max |diff| {diff:.2e}")
    assert diff <= 1e-4
    assert float((ours - hf_image_features(pre, x)).abs().max()) > 1e-3  # not just the pretrained's features


def test_a_transformers_dir_is_matched_to_its_open_clip_architecture(tmp_path):
    """transformers' default CLIPConfig is OpenAI's ViT-B/32 (QuickGELU): the catalog's routing layer applies.
    Only config.json is read (no weights are needed to know the architecture and depth)."""
    from transformers import CLIPConfig

    from transformers import CLIPImageProcessor

    CLIPConfig().save_pretrained(tmp_path)
    CLIPImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(tmp_path)
    kind, name, config, preprocess = ck._model_source(str(tmp_path))
    assert preprocess == {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic"}
    assert (kind, name, config["quick_gelu"]) == ("transformers", "ViT-B-32-quickgelu", True)
    assert config["vision_cfg"] == {"image_size": 224, "patch_size": 32, "layers": 12, "width": 768,
                                    "head_width": 64, "mlp_ratio": 4.0}
    assert ck.model_depth(str(tmp_path)) == 12


def test_tree_of_transformers_saves_builds_with_names_from_classes_txt(tmp_path):
    """--checkpoints over transformers folders (5's safetensors, 4's pytorch_model.bin, CLIPModel and
    CLIPVisionModel), the pretrained CLIPModel folder inside the same tree and not taken for a task."""
    from _cli import cli

    pre = layouts.hf_tiny_model(seed=0)
    root = tmp_path / "ckpt"
    layouts.write_hf_clip(root / "clip-base", pre)
    layouts.write_hf_vision(root / "Widgets", layouts.hf_finetune(pre, seed=1, projection=False))
    layouts.write_hf_vision(root / "Bolts", layouts.hf_finetune(pre, seed=2, projection=False), safe=False)
    layouts.write_hf_clip(root / "Gizmos", layouts.hf_finetune(pre, seed=3), safe=False)
    for task, names in (("Widgets", "cog\nspring\n"), ("Bolts", "hex\ncarriage\nflange\n"), ("Gizmos", "a\nb\n")):
        (root / task / "classes.txt").write_text(names)
    out = tmp_path / "build"
    result = cli("build", "--model", root / "clip-base", "--checkpoints", root, "--threads", 1, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["tasks"] == ["Bolts", "Gizmos", "Widgets"] and manifest["validation"]["passed"]
    assert manifest["model"]["quick_gelu"] is True and manifest["warnings"] == []
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"Bolts": ["hex", "carriage", "flange"], "Gizmos": ["a", "b"], "Widgets": ["cog", "spring"]}
    assert "vision_model.embeddings.patch_embedding.weight" in __import__("torch").load(
        root / "Bolts" / "pytorch_model.bin", weights_only=True)  # the transformers 4 key style was exercised


@pytest.mark.slow
def test_real_size_openai_vit_b32_layout(tmp_path):
    """transformers' default CLIPConfig (OpenAI ViT-B/32 shapes, QuickGELU), random weights, real size: read as
    --model DIR and as --pretrained DIR for the open_clip name; features equal transformers' own."""
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig()).eval()
    folder = layouts.write_hf_clip(tmp_path / "clip-vit-base-patch32", model)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = hf_image_features(model, x)
    for pm in (ck.load_pretrained(str(folder), None), ck.load_pretrained("ViT-B-32-quickgelu", str(folder))):
        assert pm.name == "ViT-B-32-quickgelu" and pm.quick_gelu and pm.has_text
        with torch.no_grad():
            diff = float((pm.model.encode_image(x) - expected).abs().max())
        print(f"ViT-B/32 real size, transformers vs converted open_clip: max |diff| {diff:.2e}")
        assert diff <= 1e-4
