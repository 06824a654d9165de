"""Checkpoint layouts: how a file's tensors are recognised and turned into open_clip's keys.

A layout is one module here with one class: ``name``; ``files``, the weight-file names it is saved as inside a task
folder (preferred first); ``recognise(keys)``; ``convert(tensors, folder)`` -> a :class:`Converted` (open_clip keys:
``visual.*`` for the image tower, the text tower's keys at the top level, as ``open_clip.CLIP.state_dict()``); and
``describe(keys)`` -> what the file looks like, for messages. Adding one is that module plus one line in
``REGISTRY`` below. Specific layouts are tried first; the open_clip layout (any key prefix, found later by
matching against the pretrained tower) is the fallback and comes last.
"""

from __future__ import annotations

from mass_export.merging.layouts.base import Converted, Layout
from mass_export.merging.layouts.open_clip import OpenClipLayout
from mass_export.merging.layouts.transformers_clip import TransformersClipLayout

REGISTRY: list[Layout] = [TransformersClipLayout(), OpenClipLayout()]


def recognise(keys) -> Layout:
    """The first registered layout that claims these keys (the open_clip fallback claims anything)."""
    keys = list(keys)
    return next(layout for layout in REGISTRY if layout.recognise(keys))


def describe(keys) -> str:
    """What a file with these keys looks like, e.g. 'a transformers CLIPVisionModel state dict'."""
    keys = list(keys)
    for layout in REGISTRY:
        what = layout.describe(keys)
        if what:
            return what
    return "no CLIP layout this tool knows"


def task_files() -> tuple[str, ...]:
    """Weight-file names looked for inside a task folder, in preference order (open_clip / task_vectors first:
    the order this tool has always used; then the other layouts' names)."""
    names: list[str] = []
    for layout in reversed(REGISTRY):
        names += [name for name in layout.files if name not in names]
    return tuple(names)


__all__ = ["Converted", "Layout", "REGISTRY", "describe", "recognise", "task_files"]
