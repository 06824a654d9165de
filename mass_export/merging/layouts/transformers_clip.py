"""Hugging Face transformers CLIP: ``CLIPModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` (a
directory with config.json + model.safetensors or pytorch_model.bin, or the state dict alone).

Converted to open_clip's keys exactly (the weights are the same numbers, arranged as open_clip's modules hold them):
q/k/v projections concatenated into ``in_proj_weight`` / ``in_proj_bias`` (q, k, v order, as torch's
MultiheadAttention), the patch conv, class and position embeddings, ``pre_layrnorm`` -> ``ln_pre``,
``post_layernorm`` -> ``ln_post``, ``layer_norm1/2`` -> ``ln_1/2``, ``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj``,
``visual_projection.weight.T`` -> ``proj``; the text tower likewise (``final_layer_norm`` -> ``ln_final``,
``text_projection.weight.T`` -> ``text_projection``). A ``CLIPVisionModel`` has no projection: a fine-tune saved that
way takes ``proj`` from the pretrained (its update there is zero). The activation comes from the config's
``hidden_act`` (``quick_gelu`` -> QuickGELU, ``gelu`` -> GELU); :func:`open_clip_config` builds open_clip's model
config from transformers' config. transformers itself is not needed to read these files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mass_export.core.errors import ConfigError
from mass_export.merging.layouts.base import Converted

# Markers of each tower, under any prefix: ``vision_model.`` in a CLIPModel (and in transformers 4's
# CLIPVisionModel), none in transformers 5's CLIPVisionModel / CLIPTextModel, more in front when wrapped.
PATCH, CLASS = "embeddings.patch_embedding.weight", "embeddings.class_embedding"
TOKENS = "embeddings.token_embedding.weight"

# transformers' CLIPVisionConfig / CLIPTextConfig defaults, for configs saved without every field (older hub files)
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                   "projection_dim": 512}
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "projection_dim": 512}
ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # open_clip has exactly these two
BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
         "self_attn.out_proj": "attn.out_proj"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _prefix(keys, marker: str) -> str | None:
    """The prefix in front of ``marker`` (``vision_model.``, none, or more when wrapped), or None."""
    return next((k[: -len(marker)] for k in keys if k == marker or k.endswith("." + marker)), None)


def _vision_prefix(keys) -> str | None:
    """A CLIP image tower has a class embedding beside the patch conv (SigLIP's, for one, has not)."""
    prefix = _prefix(keys, PATCH)
    return prefix if prefix is not None and prefix + CLASS in keys else None


def _projection(keys, name: str) -> str | None:
    return next((k for k in keys if k == f"{name}.weight" or k.endswith(f".{name}.weight")), None)


def _blocks(tensors: dict, source: str, target: str) -> dict:
    """Encoder layers ``{source}encoder.layers.i.*`` -> open_clip ``{target}transformer.resblocks.i.*``."""
    out, layers = {}, set()
    pattern = re.compile(re.escape(source) + r"encoder\.layers\.(\d+)\.")
    for key in tensors:
        match = pattern.match(key)
        if match:
            layers.add(int(match.group(1)))
    for i in sorted(layers):
        hf, oc = f"{source}encoder.layers.{i}.", f"{target}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            parts = [tensors.get(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv"]
            if all(p is not None for p in parts):
                out[f"{oc}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            for old, new in BLOCK.items():
                if f"{hf}{old}.{kind}" in tensors:
                    out[f"{oc}{new}.{kind}"] = tensors[f"{hf}{old}.{kind}"]
    return out


def _copy(tensors: dict, pairs: dict) -> dict:
    return {new: tensors[old] for old, new in pairs.items() if old in tensors}


def vision_to_open_clip(tensors: dict, v: str) -> dict:
    """``{v}embeddings.*``, ``{v}encoder.*``, ... (+ ``visual_projection.weight``) -> open_clip ``visual.*`` keys."""
    out = _copy(tensors, {f"{v}embeddings.patch_embedding.weight": "visual.conv1.weight",
                          f"{v}embeddings.class_embedding": "visual.class_embedding",
                          f"{v}embeddings.position_embedding.weight": "visual.positional_embedding",
                          f"{v}pre_layrnorm.weight": "visual.ln_pre.weight", f"{v}pre_layrnorm.bias": "visual.ln_pre.bias",
                          f"{v}post_layernorm.weight": "visual.ln_post.weight",
                          f"{v}post_layernorm.bias": "visual.ln_post.bias"})
    out.update(_blocks(tensors, v, "visual."))
    projection = _projection(tensors, "visual_projection")
    if projection is not None:
        out["visual.proj"] = tensors[projection].t().contiguous()
    return out


def text_to_open_clip(tensors: dict, t: str) -> dict:
    """``{t}embeddings.*``, ``{t}encoder.*``, ``{t}final_layer_norm.*`` + ``text_projection.weight`` +
    ``logit_scale`` -> open_clip CLIP's text keys."""
    out = _copy(tensors, {f"{t}embeddings.token_embedding.weight": "token_embedding.weight",
                          f"{t}embeddings.position_embedding.weight": "positional_embedding",
                          f"{t}final_layer_norm.weight": "ln_final.weight", f"{t}final_layer_norm.bias": "ln_final.bias"})
    out.update(_blocks(tensors, t, ""))
    projection = _projection(tensors, "text_projection")
    if projection is not None:
        out["text_projection"] = tensors[projection].t().contiguous()
    scale = next((k for k in tensors if k == "logit_scale" or k.endswith(".logit_scale")), None)
    if scale is not None:
        out["logit_scale"] = tensors[scale]
    return out


def read_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})") from None
    return data if isinstance(data, dict) else None


def is_transformers_dir(folder: Path) -> bool:
    config = read_config(folder) if folder.is_dir() else None
    return bool(config) and config.get("model_type") in ("clip", "clip_vision_model")


def sub_configs(config: dict) -> tuple[dict, dict | None, int]:
    """(vision config, text config or None, projection dim), transformers' defaults filled in."""
    if config.get("model_type") == "clip_vision_model":
        vision = {**VISION_DEFAULTS, **config}
        return vision, None, int(vision["projection_dim"])
    vision = {**VISION_DEFAULTS, **(config.get("vision_config") or {})}
    text = {**TEXT_DEFAULTS, **(config.get("text_config") or {})}
    return vision, text, int(config.get("projection_dim", vision["projection_dim"]))


def activation(config: dict, where) -> bool:
    """QuickGELU? from hidden_act (both towers must agree: open_clip has one switch)."""
    vision, text, _ = sub_configs(config)
    acts = {vision["hidden_act"]} | ({text["hidden_act"]} if text else set())
    unknown = acts - ACTIVATIONS.keys()
    if unknown or len(acts) > 1:
        raise ConfigError(f"{where}: hidden_act {' / '.join(sorted(acts))}: open_clip towers use quick_gelu or gelu, "
                          "one for both towers")
    return ACTIVATIONS[acts.pop()]


def open_clip_config(config: dict, where) -> dict:
    """open_clip's model config (embed_dim, vision_cfg, text_cfg, quick_gelu) for a transformers CLIP config."""
    vision, text, embed_dim = sub_configs(config)
    for name, cfg in (("vision", vision), ("text", text)):
        if cfg and float(cfg["layer_norm_eps"]) != 1e-5:
            raise ConfigError(f"{where}: {name} layer_norm_eps {cfg['layer_norm_eps']}; open_clip's LayerNorm uses "
                              "1e-5, so the converted tower would not compute the same features")

    def tower(cfg):
        width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return {"width": width, "layers": int(cfg["num_hidden_layers"]), "mlp_ratio": cfg["intermediate_size"] / width,
                "heads": heads, "head_width": width // heads}

    v = tower(vision)
    vision_cfg = {"image_size": int(vision["image_size"]), "patch_size": int(vision["patch_size"]),
                  "layers": v["layers"], "width": v["width"], "head_width": v["head_width"], "mlp_ratio": v["mlp_ratio"]}
    if text is None:  # a vision-only model: a minimal text tower, never loaded (has_text is False)
        text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}
    else:
        t = tower(text)
        text_cfg = {"context_length": int(text["max_position_embeddings"]), "vocab_size": int(text["vocab_size"]),
                    "width": t["width"], "heads": t["heads"], "layers": t["layers"], "mlp_ratio": t["mlp_ratio"]}
    return {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg,
            "quick_gelu": activation(config, where)}


def preprocess(folder: Path) -> dict:
    """open_clip preprocess overrides from preprocessor_config.json (mean, std, interpolation), when present."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    if "image_mean" in data and "image_std" in data:
        out.update(mean=tuple(data["image_mean"]), std=tuple(data["image_std"]))
    if data.get("resample") in (2, 3):  # PIL's BILINEAR / BICUBIC
        out["interpolation"] = "bilinear" if data["resample"] == 2 else "bicubic"
    return out


class TransformersClipLayout:
    name = "transformers CLIP"
    files = WEIGHT_FILES

    def recognise(self, keys) -> bool:
        keys = set(keys)
        return _vision_prefix(keys) is not None or _prefix(keys, TOKENS) is not None

    def describe(self, keys) -> str | None:
        keys = set(keys)
        vision, text = _vision_prefix(keys), _prefix(keys, TOKENS)
        if vision is not None and text is not None:
            return "a transformers CLIPModel state dict"
        if vision is not None:
            has_proj = any(k.endswith("visual_projection.weight") for k in keys)
            return f"a transformers CLIPVisionModel{'WithProjection' if has_proj else ''} state dict"
        if text is not None:
            return "a transformers CLIPTextModel state dict (no image tower)"
        return None

    def convert(self, tensors, folder: Path | None) -> Converted:
        keys = set(tensors)
        out = {}
        vision, text = _vision_prefix(keys), _prefix(keys, TOKENS)
        if vision is not None:
            out.update(vision_to_open_clip(tensors, vision))
        if text is not None:
            out.update(text_to_open_clip(tensors, text))
        missing_proj = vision is not None and "visual.proj" not in out
        quick_gelu, evidence = None, ""
        config = read_config(folder) if folder is not None else None
        if config and config.get("model_type") in ("clip", "clip_vision_model"):
            quick_gelu, evidence = activation(config, folder / "config.json"), f"transformers config {folder / 'config.json'}"
        return Converted(out, self.describe(keys), frozenset({"proj"}) if missing_proj else frozenset(),
                         quick_gelu, evidence)
