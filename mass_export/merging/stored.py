"""Rebuild the torch reference from a build directory alone (for `mass-export validate` and evaluation)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mass_export.core.manifest import head_slices, read_manifest
from mass_export.merging.merge import TaskFactors
from mass_export.merging.reference import MassReference, Method


def vision_tower(manifest: dict) -> torch.nn.Module:
    from open_clip.model import _build_vision_tower

    config, quick_gelu = manifest["model"]["config"], manifest["model"]["quick_gelu"]
    return _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=quick_gelu).eval()


def factors_from_flat(flat: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]):
    U, s, V, bases = {}, {}, {}, {}
    for name, tensor in flat.items():
        key, field = name.rsplit(".", 1)
        if field == "base":
            bases[key] = [int(i) for i in torch.nonzero(tensor).flatten()]
        else:
            {"U": U, "s": s, "V": V}[field][key] = tensor.float()  # fp16 builds: compute in fp32
    return TaskFactors(U, s, V, {k: v.float() for k, v in whole.items()}), bases


def reference_from_build(root: Path, cache_size: int = 4) -> MassReference:
    root = Path(root)
    manifest = read_manifest(root)
    visual = vision_tower(manifest)
    pretrained = load_file(str(root / "pretrained.safetensors"))
    visual.load_state_dict(pretrained)
    factors, bases = factors_from_flat(load_file(str(root / "factors.safetensors")),
                                       load_file(str(root / "deltas.safetensors")))
    stacked = load_file(str(root / "heads.safetensors"))["heads"]
    heads = [stacked[rows] for rows in head_slices(manifest)]
    method = Method(**{k: v for k, v in manifest["method"].items() if k in Method.__dataclass_fields__})
    return MassReference(visual, pretrained, factors, bases, heads, method, cache_size)
