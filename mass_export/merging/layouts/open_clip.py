"""open_clip's own keys under any prefix: task_vectors pickles (``model.visual.*``), the authors' HF
``pytorch_model.bin``, open_clip local-dir saves (``open_clip_model.safetensors``), training checkpoints
(``state_dict.module.*``) and plain state dicts or safetensors of the visual tower or the whole CLIP.

The prefix is not resolved here: the loader finds it by matching the pretrained tower's keys (checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mass_export.merging.layouts.base import Converted


def _has(keys, suffix: str) -> str | None:
    return next((k for k in keys if k == suffix or k.endswith("." + suffix)), None)


class OpenClipLayout:
    name = "open_clip"
    files = ("nonlinear_finetuned.pt", "finetuned.pt", "finetuned.safetensors", "pytorch_model.bin",
             "model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")

    def recognise(self, keys) -> bool:
        return True  # the fallback: the visual prefix is found against the pretrained tower later

    def convert(self, tensors, folder: Path | None) -> Converted:
        quick_gelu, evidence = None, ""
        config = folder / "open_clip_config.json" if folder else None
        if config is not None and config.is_file():
            try:
                model_cfg = json.loads(config.read_text()).get("model_cfg") or {}
            except (OSError, ValueError, AttributeError):
                model_cfg = {}
            if "quick_gelu" in model_cfg:
                quick_gelu, evidence = bool(model_cfg["quick_gelu"]), f"open_clip config {config}"
        return Converted(tensors, self.describe(list(tensors)) or "a state dict", quick_gelu=quick_gelu,
                         evidence=evidence)

    def describe(self, keys) -> str | None:
        conv = _has(keys, "conv1.weight")
        text = _has(keys, "token_embedding.weight")
        if conv and conv.startswith("model.visual."):
            return "a task_vectors ImageEncoder (open_clip tower under model.visual.)"
        if conv and text:
            return "an open_clip CLIP state dict (image and text towers)"
        if conv:
            return "an open_clip visual-tower state dict"
        if text:
            return "an open_clip text-tower state dict (no image tower)"
        if any(k.split(".")[-1] in ("exp_avg", "exp_avg_sq", "momentum_buffer") for k in keys):
            return "an optimizer state"
        return None
