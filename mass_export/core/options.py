"""Every build and method option, defined once: name, type, default, help text and valid range.

``Method`` (merging) and ``BuildConfig`` (pipeline) declare their fields with :func:`field`, so their defaults come
from here; the CLI's ``build`` command is generated from ``BuildConfig``'s fields (mergekit's way: the config class
is the CLI); a build config file (``--config tasks.yaml``) takes the same names. The range checks live with the
options and run on a whole config before anything is loaded (:func:`check`). Stdlib only: every room may read it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mass_export.core.errors import ConfigError

# Opsets the exporter writes as asked and ONNX Runtime loads (measured with torch 2.14.1, onnxruntime 1.32.0: 16
# came out as 18 silently, 17 goes through ONNX's version converter, which has no LayerNormalization before 17).
OPSETS = (18, 24)


def finite(value) -> str | None:
    return None if math.isfinite(value) else "must be a finite number"


def positive(value) -> str | None:
    return finite(value) or (None if value > 0 else "must be > 0")


def at_least(low: int) -> Callable:
    def check(value):
        return None if value >= low else f"must be >= {low}"
    return check


def within(low: float, high: float, high_open: bool = False) -> Callable:
    """low <= value <= high (or < high); NaN fails."""
    def check(value):
        ok = low <= value < high if high_open else low <= value <= high
        return None if ok else f"must be in [{low}, {high}{')' if high_open else ']'}"
    return check


@dataclass(frozen=True)
class Option:
    """One option. ``kind``: int, float, bool, str, "path" or "paths" (what the CLI and the config file parse).
    ``cli``: the public spelling when it differs from the field name (``max_tasks`` for the field ``top_k``);
    ``off``: a bool's negative flag; ``deprecated``: old spellings still accepted, with a warning."""

    name: str
    kind: Any
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    choices: tuple = ()
    cli: str | None = None
    off: str | None = None
    short: str | None = None
    deprecated: tuple[str, ...] = ()
    method: bool = False  # part of MASS's Method (recorded under manifest["method"])
    in_cli: bool = True

    @property
    def public(self) -> str:
        """The name users write: the config-file key (underscores) and, with dashes, the CLI flag."""
        return self.cli or self.name

    @property
    def flag(self) -> str:
        return "--" + self.public.replace("_", "-")

    def validate(self, value) -> None:
        """ConfigError naming the option and the value when it is out of range (None means 'the default rule')."""
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise ConfigError(f"{self.flag} {value!r}: choose one of {', '.join(map(str, self.choices))}")
        if self.kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or (self.kind is int and not float(value).is_integer())):
            raise ConfigError(f"{self.flag} {value!r}: must be {'an integer' if self.kind is int else 'a number'}")
        problem = self.check(value) if self.check else None
        if problem:
            raise ConfigError(f"{self.flag} {value!r}: {problem}")


OPTIONS: dict[str, Option] = {o.name: o for o in [
    Option("model", str, None, "open_clip model name (ViT-B-16), hf-hub:ORG/REPO, local-dir:PATH, a path to an "
           "open_clip model-config JSON, or a transformers CLIP directory (config.json + weights)."),
    Option("pretrained", str, None, "open_clip pretrained tag (openai), a checkpoint file, or a transformers CLIP "
           "directory. Default: zeroshot.pt / zeroshot.safetensors found under --checkpoints."),
    Option("checkpoints", "path", None, "Directory with one fine-tuned checkpoint per task (layouts: "
           "docs/checkpoints.md): TASK/finetuned.pt, TASKVal/nonlinear_finetuned.pt, TASK/pytorch_model.bin, "
           "TASK/model.safetensors (transformers), TASK/open_clip_model.safetensors, TASK.safetensors, TASK.pt..."),
    Option("tasks", str, None, "A count (8, 14, 20: the benchmark lists in models/benchmarks.json) or comma-separated "
           "task names. Default: every task found under --checkpoints (or listed in --config)."),
    Option("rank", int, None, "Components kept per task and matrix. Default: floor(min(m, n) / T).",
           at_least(1), method=True),
    Option("routing_layer", int, None, "Block whose c_fc input feeds the router. Default: from "
           "models/architectures.json (ViT-B-16: 9, ViT-B-32: 10, ViT-L-14: 20), else 3/4 of the depth.",
           at_least(0), method=True),
    Option("base", str, "no-redundancy", "First-pass model theta_MT: TSV-M skipping redundant tasks (cosine > "
           "--redundancy-threshold) or plain TSV-M of all tasks.", choices=("no-redundancy", "tsv"), method=True),
    Option("redundancy_threshold", float, 0.3, "Cosine similarity above which a task's update counts as redundant "
           "(--base no-redundancy).", within(0.0, 1.0), method=True),
    Option("split_qkv", bool, True, "Truncate attention q, k, v separately (the authors' later code) or the fused "
           "in_proj_weight.", off="fused-qkv", method=True),
    Option("alpha", float, 1.0, "Scale of the merged task update.", finite, method=True),
    Option("eta", float, 0.2, "Router probability threshold for selecting a task.", within(0.0, 1.0, high_open=True),
           method=True),
    Option("tau", float, 1.0, "Router softmax temperature.", positive, method=True),
    Option("top_k", int, 3, "At most this many tasks per image.", at_least(1), cli="max_tasks",
           deprecated=("top_k",), method=True),
    Option("router_on", str, "merged", "Route on theta_MT (the paper) or on theta_pre (the authors' ablation).",
           choices=("merged", "pretrained"), method=True),
    Option("quick_gelu", bool, None, "State the activation; a contradiction with what the weights say is refused. "
           "Default: detected (openai tags and transformers' quick_gelu use QuickGELU).", off="no-quick-gelu"),
    Option("output", "path", Path("build"), "Build directory.", short="-o"),
    Option("force", bool, False, "Overwrite an existing output directory."),
    Option("export", bool, True, "Export ONNX graphs (and validate them).", off="no-export"),
    Option("validate", bool, True, "Check the graphs against the torch reference.", off="no-validate"),
    Option("atol", float, 1e-4, "Validation tolerance on features and logits.", positive),
    Option("opset", int, 18, f"ONNX opset of the exported graphs ({OPSETS[0]}..{OPSETS[1]}).",
           within(*OPSETS)),
    Option("threads", int, None, "torch threads for the SVDs, export and validation (default: torch's). On a busy "
           "2-core machine 1 is several times faster than 2.", at_least(1)),
    Option("device", str, "cpu", "Where the truncation's float64 eigen-decompositions run: cuda when torch sees a "
           "GPU (the rest of the build stays on the CPU).", choices=("cpu", "cuda")),
    Option("storage_dtype", str, "fp32", "Precision of the stored per-task factors and deltas (theta_pre stays "
           "fp32). fp16 halves them; see the README for its measured accuracy effect.", choices=("fp32", "fp16")),
    Option("validation_images", "paths", (), "Images (or folders of them) for validation (default: "
           "scikit-image's sample photos)."),
    Option("progress", bool, True, "Progress bars.", in_cli=False),
]}

METHOD_OPTIONS = tuple(o for o in OPTIONS.values() if o.method)

# Classifying (`run`, MassRuntime.classify, MassPredictor, Ray): defaults shared by the CLI and the Python API.
BATCH_SIZE = 16  # images per batch
TOP_CLASSES = 5  # classes listed per image, of the winning head
RAY_WORKERS = 2  # predictor actors with `run --ray`


def default(name: str):
    return OPTIONS[name].default


def field(name: str, **kwargs):
    """A dataclass field whose default is the option's (lists become a default_factory)."""
    option = OPTIONS[name]
    value = option.default
    if isinstance(value, (list, tuple)):
        return dataclasses.field(default_factory=lambda: list(value), metadata={"option": option}, **kwargs)
    return dataclasses.field(default=value, metadata={"option": option}, **kwargs)


def options_of(obj_or_cls) -> list[Option]:
    return [f.metadata["option"] for f in dataclasses.fields(obj_or_cls) if "option" in f.metadata]


def check(obj) -> None:
    """Every option field of a dataclass instance (a Method, a BuildConfig) in range, else ConfigError."""
    for option in options_of(obj):
        option.validate(getattr(obj, option.name))


def by_public_name() -> dict[str, Option]:
    """Config-file keys (and deprecated ones) -> option; dashes and underscores both accepted by the reader."""
    names = {}
    for option in OPTIONS.values():
        names[option.public] = option
        for old in option.deprecated:
            names[old] = option
    return names
