"""Fixture writers: real files in every checkpoint layout users have (DESIGN.md §4), for any test to reuse.

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
