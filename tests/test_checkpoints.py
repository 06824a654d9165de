"""Checkpoint loading: every layout round-trips exactly, bad files are refused by name, pickles never run code.

All files are real, written by tests/layouts.py into tmp_path; nothing of torch or open_clip is mocked.
"""

import builtins
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

sys.path.insert(0, str(Path(__file__).parent))  # layouts.py sits beside this file, whatever pytest's import mode
import layouts  # noqa: E402

from mass_export.merging import checkpoints as ck  # noqa: E402
from mass_export.core.errors import CheckpointError, ConfigError, MissingCheckpoints  # noqa: E402

C_FC = "transformer.resblocks.1.mlp.c_fc.weight"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return layouts.tiny_model(seed=1)


@pytest.fixture(scope="module")
def ref(tiny):
    return {k: v.detach().clone() for k, v in ck.visual_state(tiny).items()}


@pytest.fixture(scope="module")
def ft(ref):
    return layouts.synthetic_finetune(ref, seed=7)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "my-tiny-clip.json"
    path.write_text(json.dumps(layouts.tiny_config()))
    return path


def max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def training_checkpoint(path, state):
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": t for k, t in state.items()}, "optimizer": {}}, path)
    return path


def whole(model, visual):
    return {**model.state_dict(), **{f"visual.{k}": v for k, v in visual.items()}}


LAYOUTS = {
    "task_vectors finetuned.pt": lambda d, m, v: layouts.write_task_vectors(d / "Cars", m, "finetuned", visual=v),
    "task_vectors nonlinear_finetuned.pt":
        lambda d, m, v: layouts.write_task_vectors(d / "CarsVal", m, "nonlinear_finetuned", visual=v),
    "hf pytorch_model.bin": lambda d, m, v: layouts.write_hf_bin(d / "pytorch_model.bin", m, visual=v),
    **{f"state dict {p or 'no prefix'}": (lambda d, m, v, p=p: layouts.write_state_dict(d / "ft.pth", v, p))
       for p in ("model.visual.", "visual.", "module.", "")},
    **{f"safetensors {p or 'no prefix'}": (lambda d, m, v, p=p: layouts.write_safetensors(d / "ft.safetensors", v, p))
       for p in ("model.visual.", "visual.", "module.", "")},
    "whole CLIP state dict": lambda d, m, v: layouts.write_state_dict(d / "clip.bin", whole(m, v)),
    "whole CLIP safetensors under module.":
        lambda d, m, v: layouts.write_safetensors(d / "clip.safetensors", whole(m, v), "module."),
    "open_clip training checkpoint": lambda d, m, v: training_checkpoint(d / "epoch_3.pt", whole(m, v)),
    "safetensors named .bin": lambda d, m, v: layouts.write_safetensors(d / "weights.bin", v, "visual."),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_round_trips_exactly(tmp_path, tiny, ref, ft, layout):
    path = LAYOUTS[layout](tmp_path, tiny, ft)
    got = ck.load_visual(path, ref)
    assert max_diff(got, ft) == 0
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in got.values())


def test_half_precision_comes_back_fp32(tmp_path, ref, ft):
    path = layouts.write_safetensors(tmp_path / "half.safetensors", {k: v.half() for k, v in ft.items()}, "visual.")
    got = ck.load_visual(path, ref)
    assert max_diff(got, {k: v.half().float() for k, v in ft.items()}) == 0


def test_integer_tensors_kept_as_they_are(tmp_path, ref, ft):
    counter = torch.tensor([3, 1, 4], dtype=torch.int64)
    path = layouts.write_state_dict(tmp_path / "ft.pt", {**ft, "counter": counter}, "visual.")
    got = ck.load_visual(path, {**ref, "counter": torch.zeros(3, dtype=torch.int64)})
    assert got["counter"].dtype == torch.int64 and torch.equal(got["counter"], counter)


def test_pickle_loader_never_imports_the_authors_classes(tmp_path, tiny, ref, ft, monkeypatch):
    path = layouts.write_task_vectors(tmp_path / "Cars", tiny, visual=ft)
    marker = tmp_path / "imported"
    trap = type(sys)("src.modeling")

    class ImageEncoder:
        def __setstate__(self, state):
            marker.touch()

    trap.ImageEncoder = ImageEncoder
    monkeypatch.setitem(sys.modules, "src.modeling", trap)  # even when importable, the real class is not used
    assert max_diff(ck.load_visual(path, ref), ft) == 0
    assert not marker.exists()


@pytest.mark.parametrize("layout,has_text", [("task_vectors", False), ("hf_bin", False), ("visual_only", False),
                                             ("whole_clip", True)])
def test_load_pretrained_from_config_json(tmp_path, tiny, ref, config_file, layout, has_text):
    path = {"task_vectors": lambda: layouts.write_task_vectors(tmp_path / "zeroshot.pt", tiny, "zeroshot"),
            "hf_bin": lambda: layouts.write_hf_bin(tmp_path / "pytorch_model.bin", tiny),
            "visual_only": lambda: layouts.write_safetensors(tmp_path / "v.safetensors", ref),
            "whole_clip": lambda: layouts.write_safetensors(tmp_path / "zeroshot.safetensors", tiny.state_dict()),
            }[layout]()
    pm = ck.load_pretrained(str(config_file), str(path))
    assert (pm.name, pm.pretrained, pm.has_text, pm.quick_gelu) == ("my-tiny-clip", str(path), has_text, False)
    assert pm.config == {**layouts.tiny_config(), "quick_gelu": False}
    assert pm.preprocess == {"image_size": 32, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                             "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                             "resize_mode": "shortest"}
    assert max_diff(ck.visual_state(pm.model), ref) == 0
    assert not pm.model.training and "my-tiny-clip" not in open_clip.list_models()
    if has_text:
        assert max_diff(pm.model.state_dict(), tiny.state_dict()) == 0


def test_real_size_vit_b16(tmp_path):
    model = open_clip.create_model("ViT-B-16", force_quick_gelu=True)  # random weights, OpenAI's activation
    pre = {k: v.detach().clone() for k, v in ck.visual_state(model).items()}
    zeroshot = layouts.write_task_vectors(tmp_path / "ViT-B-16", model, "zeroshot")
    pm = ck.load_pretrained("ViT-B-16", str(zeroshot))
    assert pm.quick_gelu is True and pm.has_text is False and pm.preprocess["image_size"] == 224
    assert isinstance(pm.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert max_diff(ck.visual_state(pm.model), pre) == 0
    ft = layouts.synthetic_finetune(pre, seed=3)
    path = layouts.write_safetensors(tmp_path / "ViT-B-16" / "Cars" / "finetuned.safetensors", ft, "visual.")
    assert max_diff(ck.load_visual(path, pre), ft) == 0


# ---------------------------------------------------------------- QuickGELU


def test_quick_gelu_detected_from_pickle(tmp_path, config_file):
    source = layouts.tiny_model(seed=2, quick_gelu=True)
    path = layouts.write_task_vectors(tmp_path / "zeroshot.pt", source, "zeroshot")
    pm = ck.load_pretrained(str(config_file), str(path))
    assert pm.quick_gelu is True and pm.config["quick_gelu"] is True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pm.model.encode_image(x), source.encode_image(x))


def test_quick_gelu_mismatch_refused(tmp_path, config_file, ref):
    qg = layouts.write_task_vectors(tmp_path / "qg.pt", layouts.tiny_model(quick_gelu=True), "zeroshot")
    with pytest.raises(ConfigError, match="quick_gelu=False was given, but the checkpoint .*qg.pt uses QuickGELU"):
        ck.load_pretrained(str(config_file), str(qg), quick_gelu=False)
    plain = layouts.write_task_vectors(tmp_path / "plain.pt", layouts.tiny_model(), "zeroshot")
    with pytest.raises(ConfigError, match="quick_gelu=True was given, but the checkpoint .*plain.pt uses GELU"):
        ck.load_pretrained(str(config_file), str(plain), quick_gelu=True)
    with pytest.raises(ConfigError, match="qg.pt uses QuickGELU"):
        ck.load_visual(qg, ref, quick_gelu=False)
    # the config file says QuickGELU, the pickle says GELU
    config_file.write_text(json.dumps({**layouts.tiny_config(), "quick_gelu": True}))
    with pytest.raises(ConfigError, match="disagrees: the model config .* QuickGELU, the checkpoint .*plain.pt"):
        ck.load_pretrained(str(config_file), str(plain))


def test_quick_gelu_from_tag_and_name_checked_before_any_download():
    with pytest.raises(ConfigError, match="quick_gelu=False was given, but the pretrained tag 'openai' uses QuickGELU"):
        ck.load_pretrained("ViT-B-16", "openai", quick_gelu=False)
    with pytest.raises(ConfigError, match="model name 'ViT-B-16-quickgelu' uses QuickGELU"):
        ck.load_pretrained("ViT-B-16-quickgelu", "openai", quick_gelu=False)


def test_quick_gelu_argument_used_without_evidence(tmp_path, config_file, tiny):
    path = layouts.write_safetensors(tmp_path / "clip.safetensors", tiny.state_dict())
    pm = ck.load_pretrained(str(config_file), str(path), quick_gelu=True)
    assert pm.quick_gelu and isinstance(pm.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


# ---------------------------------------------------------------- validation


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, ref, ft):
    path = layouts.write_safetensors(tmp_path / "wide.safetensors", {**ft, C_FC: torch.zeros(256, 32)}, "visual.")
    with pytest.raises(CheckpointError) as err:
        ck.load_visual(path, ref)
    assert str(path) in str(err.value)
    assert f"{C_FC}: checkpoint has (256, 32), pretrained has (256, 64)" in str(err.value)


def test_other_architecture_refused(tmp_path, ref):
    config = layouts.tiny_config()
    config["vision_cfg"]["width"] = 96
    path = layouts.write_task_vectors(tmp_path / "other.pt", layouts.tiny_model(config=config))
    with pytest.raises(CheckpointError) as err:
        ck.load_visual(path, ref)
    assert str(path) in str(err.value)
    assert "conv1.weight: checkpoint has (96, 3, 8, 8), pretrained has (64, 3, 8, 8)" in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused_naming_the_key(tmp_path, ref, ft, bad):
    broken = {**ft, C_FC: ft[C_FC].clone()}
    broken[C_FC][3, 5] = bad
    path = layouts.write_state_dict(tmp_path / "nan.pt", broken, "model.visual.")
    with pytest.raises(CheckpointError, match=rf"nan.pt: .*\n  {C_FC}: 1 non-finite value"):
        ck.load_visual(path, ref)


def test_missing_and_unexpected_keys_listed(tmp_path, ref, ft):
    state = {k: v for k, v in ft.items() if k not in ("proj", "ln_post.bias")}
    state["extra.weight"] = torch.zeros(2)
    path = layouts.write_safetensors(tmp_path / "partial.safetensors", state, "visual.")
    with pytest.raises(CheckpointError) as err:
        ck.load_visual(path, ref)
    message = str(err.value)
    assert "missing 2 visual tower key(s): proj, ln_post.bias" in message
    assert "unexpected 1 visual tower key(s): extra.weight" in message


def test_no_visual_tower_refused(tmp_path, ref):
    path = layouts.write_state_dict(tmp_path / "optim.pt", {"exp_avg": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="optim.pt: no visual-tower tensors"):
        ck.load_visual(path, ref)


# ---------------------------------------------------------------- hostile and broken files


class Gadget:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _gadgets(marker: Path):
    touch = f"open({str(marker)!r}, 'w').close()"
    return {"os.system": Gadget(os.system, f"touch {marker}"),
            "builtins.eval": Gadget(builtins.eval, touch),
            "builtins.exec": Gadget(builtins.exec, touch),
            "subprocess.call": Gadget(subprocess.call, ["touch", str(marker)]),
            # protocol 2 pickles a method as builtins.getattr(Path, "touch"): the classic getattr gadget
            "getattr gadget": Gadget(Path.touch, marker)}


@pytest.mark.parametrize("gadget", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call", "getattr gadget"])
@pytest.mark.parametrize("writer", ["torch.save in a state dict", "torch.save in a module", "plain pickle"])
def test_malicious_pickle_refused_and_not_run(tmp_path, ref, tiny, gadget, writer):
    marker = tmp_path / "pwned"
    payload = _gadgets(marker)[gadget]
    path = tmp_path / "finetuned.pt"
    if writer == "torch.save in a state dict":
        torch.save({"visual.conv1.weight": ref["conv1.weight"], "x": payload}, path)
    elif writer == "torch.save in a module":
        head = layouts.ClassificationHead(True, torch.randn(3, 32))
        head.hook = payload
        with layouts.src_modeling():
            torch.save(head, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=r"finetuned.pt: refused, nothing in it was run: .*can run code"):
        ck.load_visual(path, ref)
    with pytest.raises(CheckpointError, match="refused"):
        ck.load_head(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # writing the TorchScript case
@pytest.mark.parametrize("case", ["zero-byte", "truncated pickle", "truncated safetensors", "text", "random bytes",
                                  "no tensors", "torchscript"])
def test_broken_files_refused_by_name(tmp_path, tiny, ref, ft, case):
    path = tmp_path / f"broken-{case.replace(' ', '_')}.pt"
    if case == "zero-byte":
        path.touch()
    elif case == "truncated pickle":
        data = layouts.write_task_vectors(tmp_path / "full.pt", tiny, visual=ft).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "truncated safetensors":
        path = path.with_suffix(".safetensors")
        data = layouts.write_safetensors(tmp_path / "full.safetensors", ft).read_bytes()
        path.write_bytes(data[: len(data) - 1000])
    elif case == "text":
        path.write_text("just some notes, not a checkpoint\n")
    elif case == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif case == "no tensors":
        torch.save({"epoch": 3, "note": "no weights here"}, path)
    else:
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError, match=str(path.name)):
        ck.load_visual(path, ref)
    with pytest.raises(CheckpointError, match=str(path.name)):
        ck.load_pretrained("ViT-B-16", str(path))


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_heads(tmp_path, suffix):
    weight = torch.randn(5, 32)
    assert torch.equal(ck.load_head(layouts.write_head(tmp_path / f"head_Cars{suffix}", weight)), weight)


def test_head_with_bias_or_without_normalize_refused(tmp_path):
    weight = torch.randn(5, 32)
    with pytest.raises(CheckpointError, match="head_A.pt: the head has a nonzero bias"):
        ck.load_head(layouts.write_head(tmp_path / "head_A.pt", weight, bias=torch.ones(5)))
    with pytest.raises(CheckpointError, match="head_B.pt: the head has normalize=False"):
        ck.load_head(layouts.write_head(tmp_path / "head_B.pt", weight, normalize=False))


# ---------------------------------------------------------------- finding files


def _tree(root: Path):
    files = ["ViT-B-16/CarsVal/nonlinear_finetuned.pt", "ViT-B-16/Cars/finetuned.pt",
             "ViT-B-16/DTD/finetuned.safetensors", "ViT-B-16/zeroshot.pt", "ViT-B-16/head_CarsVal.pt",
             "ViT-B-16/notes/README.txt", "SVHN/pytorch_model.bin", "head_DTD.safetensors", "MNIST/linear_finetuned.pt"]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()


@pytest.mark.parametrize("model_name", ["ViT-B-16", "ViT-B-16-quickgelu"])
def test_find_in_a_checkpoint_tree(tmp_path, model_name):
    _tree(tmp_path)
    b16 = tmp_path / "ViT-B-16"
    assert ck.discover_tasks(tmp_path, model_name) == ["Cars", "DTD", "SVHN"]
    assert ck.find_task_checkpoints(tmp_path, ["Cars", "DTD", "SVHN"], model_name) == {
        "Cars": b16 / "CarsVal" / "nonlinear_finetuned.pt", "DTD": b16 / "DTD" / "finetuned.safetensors",
        "SVHN": tmp_path / "SVHN" / "pytorch_model.bin"}
    assert ck.find_pretrained(tmp_path, model_name) == b16 / "zeroshot.pt"
    assert ck.find_heads(tmp_path, ["Cars", "DTD", "SVHN"], model_name) == {
        "Cars": b16 / "head_CarsVal.pt", "DTD": tmp_path / "head_DTD.safetensors"}


def test_missing_tasks_listed_together(tmp_path):
    _tree(tmp_path)
    with pytest.raises(MissingCheckpoints) as err:
        ck.find_task_checkpoints(tmp_path, ["Cars", "GTSRB", "MNIST", "EuroSAT"], "ViT-B-16")
    assert err.value.missing == ["GTSRB", "MNIST", "EuroSAT"]
    assert "GTSRB, MNIST, EuroSAT" in str(err.value)
    assert ck.find_pretrained(tmp_path / "ViT-B-16" / "Cars") is None


# ---------------------------------------------------------------- model sources


def test_local_dir(tmp_path, tiny, ref):
    folder = layouts.write_local_dir(tmp_path / "clip", tiny, layouts.tiny_config(),
                                     preprocess_cfg={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    pm = ck.load_pretrained(f"local-dir:{folder}", None)
    assert pm.has_text and pm.pretrained == str(folder / "open_clip_model.safetensors")
    assert pm.preprocess["mean"] == [0.5] * 3 and pm.preprocess["std"] == [0.25] * 3
    assert max_diff(pm.model.state_dict(), tiny.state_dict()) == 0
    visual_only = layouts.write_local_dir(tmp_path / "visual", tiny, layouts.tiny_config(), visual_only=True)
    pm = ck.load_pretrained(f"local-dir:{visual_only}", None)
    assert not pm.has_text and max_diff(ck.visual_state(pm.model), ref) == 0
    with pytest.raises(ConfigError, match="no open_clip_config.json"):
        ck.load_pretrained(f"local-dir:{tmp_path}", None)


def test_pretrained_argument_errors(tmp_path, config_file):
    with pytest.raises(ConfigError, match="give pretrained weights"):
        ck.load_pretrained("ViT-B-16", None)
    with pytest.raises(CheckpointError, match=r"a file nor an open_clip pretrained tag for ViT-B-16 \(tags: openai"):
        ck.load_pretrained("ViT-B-16", "no-such-tag")
    with pytest.raises(CheckpointError, match="missing.pt: no such file"):
        ck.load_pretrained("ViT-B-16", str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="neither an open_clip model name"):
        ck.load_pretrained("ViT-Q-99", "openai")
    with pytest.raises(CheckpointError, match="pretrained tags exist only for open_clip model names"):
        ck.load_pretrained(str(config_file), "openai")


def test_download_failure_is_a_clear_error():
    # open_clip's real download path, with the Hub's offline switch so it fails at once instead of retrying.
    code = textwrap.dedent("""
        from mass_export.merging import checkpoints as ck
        from mass_export.core.errors import CheckpointError
        try:
            ck.load_pretrained("ViT-B-16", "laion2b_s34b_b88k")
        except CheckpointError as exc:
            print("REFUSED", exc)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "REFUSED ViT-B-16: open_clip could not download or load the pretrained weights 'laion2b_s34b_b88k'" in out
