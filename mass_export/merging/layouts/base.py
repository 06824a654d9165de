"""What every checkpoint layout provides (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class Converted:
    tensors: dict[str, torch.Tensor]  # open_clip keys (any prefix for the fallback layout)
    layout: str  # what the file is, e.g. "a transformers CLIPVisionModel state dict"
    from_pretrained: frozenset[str] = field(default_factory=frozenset)  # canonical visual keys the file lacks by
    # design and that are taken from the pretrained tower (a transformers CLIPVisionModel has no projection)
    quick_gelu: bool | None = None  # what the layout's own config says, when it says
    evidence: str = ""  # where quick_gelu was read


class Layout(Protocol):
    name: str
    files: tuple[str, ...]

    def recognise(self, keys: list[str]) -> bool: ...

    def convert(self, tensors: dict[str, torch.Tensor], folder: Path | None) -> Converted: ...

    def describe(self, keys: list[str]) -> str | None: ...
