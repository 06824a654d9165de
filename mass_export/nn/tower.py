"""The open_clip visual tower run with weights given per call: full pass and the early-exit router prefix.

The same modules serve the torch reference (weights from a merged state dict) and the ONNX export (weights as
graph inputs), so the exported graphs compute exactly what the reference computes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token, positions and ln_pre, as open_clip's VisionTransformer (eval mode)."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(x)


def route_feature(visual: nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """CLS token of block ``layer``'s ln_2 output (the input of its mlp.c_fc); later blocks never run."""
    x = embed(visual, images)
    blocks = visual.transformer.resblocks
    for block in blocks[:layer]:
        x = block(x)
    tap = blocks[layer]
    x = x + tap.ls_1(tap.attention(q_x=tap.ln_1(x)))
    return tap.ln_2(x)[:, 0]


class RoutePrefix(nn.Module):
    def __init__(self, visual: nn.Module, layer: int):
        super().__init__()
        self.visual, self.layer = visual, layer

    def forward(self, images):
        return route_feature(self.visual, images, self.layer)


class FullTower(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, images):
        return self.visual(images)


def prefix_keys(visual: nn.Module, layer: int) -> list[str]:
    """Canonical keys the prefix reads: embeddings, ln_pre, blocks before ``layer`` and block ``layer`` up to ln_2."""
    keep = []
    for key in visual.state_dict():
        if key.startswith("transformer.resblocks."):
            index, rest = key.split(".")[2], key.split(".", 3)[3]
            if int(index) < layer or (int(index) == layer and rest.split(".")[0] in ("ln_1", "attn", "ln_2", "ls_1")):
                keep.append(key)
        elif key.startswith(("conv1", "class_embedding", "positional_embedding", "ln_pre")):
            keep.append(key)
    return keep


def run_with(module: nn.Module, weights: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Run a RoutePrefix / FullTower with the given canonical weights instead of the module's own."""
    return functional_call(module, {f"visual.{k}": v for k, v in weights.items()}, (images,), strict=False)
