"""Fixture writers: real files in every checkpoint layout users have (docs/checkpoints.md), for any test to reuse.

The task_vectors pickles are made with look-alike ``src.modeling.ImageEncoder`` / ``ClassificationHead`` classes that
live in a ``src.modeling`` module present in ``sys.modules`` only while saving, so the pickles' globals carry the real
module paths and a loader never has those classes to import, as with the authors' files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch

KINDS = ("finetuned", "zeroshot", "nonlinear_finetuned")


def tiny_config() -> dict:
    """A small open_clip model config: vision 2 x 64 (patch 8, image 32), text 2 x 64 (context 16), embed 32."""
    return {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def tiny_model(seed: int = 0, quick_gelu: bool = False, config: dict | None = None):
    """A random-weight open_clip CLIP of ``config`` (default tiny_config()), eval mode; the global RNG is untouched."""
    from open_clip.model import CLIP

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIP(**{**(config or tiny_config()), "quick_gelu": quick_gelu}).eval()


# ---------------------------------------------------------------- the authors' classes, look-alike


class ImageEncoder(torch.nn.Module):
    """As task_vectors' src.modeling.ImageEncoder: the CLIP as ``model``, preprocess transforms, cache dir."""

    def __init__(self, model, train_preprocess, val_preprocess, cache_dir=None, keep_lang=False):
        super().__init__()
        self.model = model
        self.train_preprocess = train_preprocess
        self.val_preprocess = val_preprocess
        self.cache_dir = cache_dir
        if not keep_lang and hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    """As task_vectors' src.modeling.ClassificationHead: a Linear (zero bias) that L2-normalises its inputs."""

    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))

    def forward(self, inputs):
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)


_MODELING = types.ModuleType("src.modeling")
for _cls in (ImageEncoder, ClassificationHead):
    _cls.__module__ = "src.modeling"
    setattr(_MODELING, _cls.__name__, _cls)


@contextlib.contextmanager
def src_modeling():
    """``src.modeling`` importable for the duration (restoring whatever was there before)."""
    saved = {name: sys.modules.get(name) for name in ("src", "src.modeling")}
    package = types.ModuleType("src")
    package.__path__ = []
    package.modeling = _MODELING
    sys.modules.update({"src": package, "src.modeling": _MODELING})
    try:
        yield _MODELING
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _encoder(clip_model, visual: dict | None) -> ImageEncoder:
    from open_clip.transform import image_transform

    model = copy.deepcopy(clip_model).cpu()
    if visual is not None:
        model.visual.load_state_dict(visual)
    size = model.visual.image_size
    return ImageEncoder(model, image_transform(size, is_train=True), image_transform(size, is_train=False),
                        cache_dir="/tmp/open_clip_cache")


# ---------------------------------------------------------------- writers


def write_task_vectors(path, clip_model, kind: str = "finetuned", visual: dict | None = None) -> Path:
    """torch.save of a whole ImageEncoder (text transformer deleted), as finetuned.pt / zeroshot.pt /
    nonlinear_finetuned.pt. ``path``: the file, or a folder (then ``<path>/<kind>.pt``). ``visual``: a visual state
    dict to put in the copy of ``clip_model`` first (``clip_model`` itself is not changed). Returns the file."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    path = Path(path)
    file = path if path.suffix else path / f"{kind}.pt"
    file.parent.mkdir(parents=True, exist_ok=True)
    with src_modeling():
        torch.save(_encoder(clip_model, visual), file)
    return file


def write_head(path, weight: torch.Tensor, bias: torch.Tensor | None = None, normalize: bool = True) -> Path:
    """head_<Task>.pt (a pickled ClassificationHead) or, for a .safetensors path, {"weight": weight}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"weight": weight.detach().contiguous()}, str(path))
    else:
        with src_modeling():
            torch.save(ClassificationHead(normalize, weight.detach(), bias), path)
    return path


def write_hf_bin(path, clip_model, visual: dict | None = None) -> Path:
    """The authors' HF pytorch_model.bin: the ImageEncoder's state dict (model.visual.* plus text leftovers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(OrderedDict(_encoder(clip_model, visual).state_dict()), path)
    return path


def _prefixed(state: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v.detach() for k, v in state.items()}


def write_state_dict(path, state: dict, prefix: str = "") -> Path:
    """A plain torch state dict (weights_only-loadable), every key prefixed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(OrderedDict(_prefixed(state, prefix)), path)
    return path


def write_safetensors(path, state: dict, prefix: str = "") -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _prefixed(state, prefix).items()}, str(path))
    return path


def write_local_dir(folder, clip_model, config: dict, preprocess_cfg: dict | None = None, visual_only=False) -> Path:
    """An open_clip ``local-dir:`` folder: open_clip_config.json + open_clip_model.safetensors (whole CLIP, or
    ``visual.*`` only)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"model_cfg": config, **({"preprocess_cfg": preprocess_cfg} if preprocess_cfg else {})}
    (folder / "open_clip_config.json").write_text(json.dumps(data, indent=1))
    state = ({f"visual.{k}": v for k, v in clip_model.visual.state_dict().items()} if visual_only
             else clip_model.state_dict())
    write_safetensors(folder / "open_clip_model.safetensors", state)
    return folder


def synthetic_finetune(visual_state: dict, seed: int, scale: float = 0.02) -> dict:
    """Pretrained + a deterministic perturbation of every float tensor, sized relative to the tensor's RMS:
    a low-rank-plus-noise update on 2-D weights (what fine-tuning tends to produce), small noise elsewhere.
    Integer tensors are copied unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in visual_state.items():
        w = w.detach()
        if not w.is_floating_point():
            out[key] = w.clone()
            continue
        w = w.float()
        size = max(float(w.pow(2).mean().sqrt()), 1e-2)
        if w.ndim == 2:
            m, n = w.shape
            r = max(1, min(m, n) // 8)
            delta = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r ** 0.5
            delta += 0.1 * torch.randn(m, n, generator=g)
        else:
            delta = 0.1 * torch.randn(w.shape, generator=g)
        out[key] = w + scale * size * delta
    return out


# ---------------------------------------------------------------- transformers and open_clip saves, flat files


def hf_tiny_config(hidden_act: str = "quick_gelu"):
    """A small transformers CLIPConfig: vision 2 x 64 (patch 8, image 32), text 2 x 64 (context 16), projection 32."""
    from transformers import CLIPConfig

    common = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
              "hidden_act": hidden_act}
    return CLIPConfig(text_config={**common, "max_position_embeddings": 16, "vocab_size": 49408},
                      vision_config={**common, "image_size": 32, "patch_size": 8}, projection_dim=32)


def hf_tiny_model(seed: int = 0, hidden_act: str = "quick_gelu"):
    """A random-weight transformers CLIPModel (eval mode); the global RNG is untouched."""
    from transformers import CLIPModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPModel(hf_tiny_config(hidden_act)).eval()


def hf_finetune(model, seed: int, scale: float = 0.02, projection: bool = True):
    """A copy of a transformers CLIPModel whose vision tower (and projection, if ``projection``) got a seeded
    perturbation."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.startswith("vision_model.") or projection and name.startswith("visual_projection."):
                p.add_(scale * max(float(p.pow(2).mean().sqrt()), 1e-2) * torch.randn(p.shape, generator=g))
    return tuned


def write_hf_vision(folder, model, with_projection: bool = False, safe: bool = True) -> Path:
    """``save_pretrained`` of a transformers CLIPVisionModel (or ...WithProjection) holding ``model``'s vision tower."""
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    config = model.config.vision_config
    if with_projection:
        config.projection_dim = model.config.projection_dim
        vision = CLIPVisionModelWithProjection(config)
        vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    else:
        vision = CLIPVisionModel(config)
    # transformers 5's CLIPVisionModel is the tower itself (keys embeddings.*); 4's wrapped it as vision_model
    getattr(vision, "vision_model", vision).load_state_dict(model.vision_model.state_dict())
    vision.save_pretrained(folder)
    if not safe:
        # transformers 4's layout (most hub repos): the tower under vision_model., in pytorch_model.bin
        state = vision.state_dict()
        if not hasattr(vision, "vision_model"):
            state = {(k if k.startswith("visual_projection.") else f"vision_model.{k}"): v for k, v in state.items()}
        _as_bin(Path(folder), state)
    return Path(folder)


def _as_bin(folder: Path, state: dict) -> None:
    """Replace save_pretrained's model.safetensors with pytorch_model.bin (transformers 5 writes only safetensors;
    transformers 4 with safe_serialization=False wrote this torch.save of the state dict)."""
    (folder / "model.safetensors").unlink()
    torch.save(OrderedDict((k, v.detach().clone()) for k, v in state.items()), folder / "pytorch_model.bin")


def write_hf_clip(folder, model, safe: bool = True) -> Path:
    """``save_pretrained`` of a whole transformers CLIPModel (``safe=False``: as pytorch_model.bin)."""
    model.save_pretrained(folder)
    if not safe:
        _as_bin(Path(folder), model.state_dict())
    return Path(folder)


class _NoTokenizer:
    """open_clip's save_for_hf also saves a tokenizer; the tiny models here use the built-in BPE one."""

    def save_pretrained(self, folder):
        pass


def write_open_clip_save(folder, clip_model, config: dict, safe: bool | str = True) -> Path:
    """open_clip's own save (push_to_hf_hub.save_for_hf): open_clip_config.json + open_clip_model.safetensors
    (or open_clip_pytorch_model.bin)."""
    import dataclasses

    import open_clip
    from open_clip.push_to_hf_hub import save_for_hf
    from open_clip.transform import PreprocessCfg

    model = copy.deepcopy(clip_model)  # save_for_hf reads the preprocess cfg that create_model would have set
    open_clip.set_model_preprocess_cfg(model, dataclasses.asdict(PreprocessCfg(size=model.visual.image_size)))
    save_for_hf(model, _NoTokenizer(), config, folder, safe_serialization=safe)
    return Path(folder)
