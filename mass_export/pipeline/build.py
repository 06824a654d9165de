"""`mass-export build`: checkpoints in, a validated build directory out (docs/build-format.md)."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mass_export import __version__

from mass_export.core import catalog
from mass_export.core.errors import CheckpointError, ConfigError
from mass_export.core.manifest import staged_directory, update_manifest, write_manifest
from mass_export.core.outputs import locked, refuse_overlap
from mass_export.merging import checkpoints as ckpt
from mass_export.merging.zeroshot import tokenizer_for, zero_shot_head
from mass_export.merging.merge import TaskFactors, base_tasks, factors_to_flat, stack_tasks, task_delta, truncate_task
from mass_export.merging.reference import MassReference, Method, router_basis_key


@dataclass
class BuildConfig:
    model: str
    output: Path
    pretrained: str | None = None
    checkpoints: Path | None = None
    tasks: list[str] | int | None = None
    rank: int | None = None
    routing_layer: int | None = None
    base: str = "no-redundancy"
    redundancy_threshold: float = 0.3
    split_qkv: bool = True
    alpha: float = 1.0
    eta: float = 0.2
    tau: float = 1.0
    top_k: int = 3
    router_on: str = "merged"
    quick_gelu: bool | None = None
    force: bool = False
    export: bool = True
    validate: bool = True
    atol: float = 1e-4
    opset: int = 18
    threads: int | None = None  # torch threads; 1 avoids oversubscription on small shared machines
    storage_dtype: str = "fp32"  # of the per-task factors and deltas; theta_pre stays fp32
    validation_images: list[Path] = field(default_factory=list)
    progress: bool = True


@dataclass
class Loaded:
    """Everything the build (and the evaluation) needs in memory."""

    pretrained: ckpt.PretrainedModel
    tasks: list[str]
    visual_pre: dict[str, torch.Tensor]
    factors: TaskFactors
    bases: dict[str, list[int]]
    heads: list[torch.Tensor]
    classes: dict[str, list[str]]
    method: Method

    def reference(self, cache_size: int = 4) -> MassReference:
        return MassReference(self.pretrained.model.visual, self.visual_pre, self.factors, self.bases, self.heads,
                             self.method, cache_size)


def refuse_duplicate_tasks(tasks: list[str]) -> list[str]:
    """Each task once (compared case-insensitively, as checkpoint folders on some file systems are)."""
    seen, duplicates = {}, []
    for task in tasks:
        if task.casefold() in seen:
            duplicates.append(task if task == seen[task.casefold()] else f"{seen[task.casefold()]}/{task}")
        seen.setdefault(task.casefold(), task)
    if duplicates:
        raise ConfigError(f"--tasks: {', '.join(dict.fromkeys(duplicates))} given more than once; name each task once")
    return tasks


def resolve_tasks(spec, checkpoints: Path | None, model_name: str | None) -> list[str]:
    return refuse_duplicate_tasks(_resolve_tasks(spec, checkpoints, model_name))


def named_tasks(spec) -> list[str]:
    """--tasks as a list of names ("A,B" or a list)."""
    if isinstance(spec, str):
        return [t.strip() for t in spec.split(",") if t.strip()]
    return list(spec or [])


def _resolve_tasks(spec, checkpoints: Path | None, model_name: str | None) -> list[str]:
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        return catalog.benchmark_tasks(int(spec))
    spec = named_tasks(spec)
    if spec:
        return list(spec)
    if checkpoints is None:
        raise ConfigError("give --tasks (a count or names) or --checkpoints to discover them")
    found = ckpt.discover_tasks(checkpoints, model_name)
    if not found:
        raise CheckpointError(f"{checkpoints}: no task checkpoints found")
    return found


def load_heads(pretrained: ckpt.PretrainedModel, tasks, checkpoints) -> tuple[list[torch.Tensor], dict]:
    """Heads from head_<Task> files where the tree has them, else zero-shot from the pretrained text tower."""
    files = ckpt.find_heads(checkpoints, tasks, pretrained.name) if checkpoints else {}
    heads, classes, problems = [], {}, []
    for task in tasks:
        info = catalog.dataset_info(task)
        if task in files:
            head = ckpt.load_head(files[task]).float()
        elif info and pretrained.has_text:
            tokenizer = tokenizer_for(pretrained.name, pretrained.config["text_cfg"].get("context_length", 77))
            head = zero_shot_head(pretrained.model, tokenizer, info["classes"], info["templates"])
        else:
            problems.append(f"{task}: no head_{task} file and "
                            + ("no class names in models/datasets/" if not info else "no text tower in the pretrained weights"))
            continue
        names = info["classes"] if info and len(info["classes"]) == head.shape[0] else [str(i) for i in range(head.shape[0])]
        heads.append(head)
        classes[task] = names
    if problems:
        raise CheckpointError("cannot make classification heads:\n  " + "\n  ".join(problems))
    return heads, classes


@torch.no_grad()
def load(cfg: BuildConfig) -> Loaded:
    """Read checkpoints, compute deltas and the per-task truncated factors, heads and the method."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.storage_dtype not in ("fp32", "fp16"):
        raise ConfigError(f"--storage-dtype {cfg.storage_dtype!r}: choose fp32 or fp16")
    checkpoints = Path(cfg.checkpoints) if cfg.checkpoints else None
    model_stem = Path(cfg.model).stem if cfg.model.endswith(".json") else cfg.model
    source = cfg.pretrained
    if source is None and checkpoints is not None:
        found = ckpt.find_pretrained(checkpoints, model_stem)
        source = str(found) if found else None
    pretrained = ckpt.load_pretrained(cfg.model, source, cfg.quick_gelu)
    tasks = resolve_tasks(cfg.tasks, checkpoints, pretrained.name)
    if checkpoints is None:
        raise ConfigError("--checkpoints is required: the directory holding one fine-tuned checkpoint per task")
    paths = ckpt.find_task_checkpoints(checkpoints, tasks, pretrained.name)
    visual_pre = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                  for k, v in ckpt.visual_state(pretrained.model).items()}
    parts = []
    for task in tqdm(tasks, desc="truncating task updates", unit="task", disable=not cfg.progress):
        finetuned = ckpt.load_visual(paths[task], visual_pre, pretrained.quick_gelu)
        parts.append(truncate_task(task_delta(visual_pre, finetuned), len(tasks), cfg.rank, cfg.split_qkv))
        del finetuned
    factors = stack_tasks(parts)
    if cfg.storage_dtype == "fp16":
        # Round now, so the reference, the validation and the runtime all see exactly what is stored.
        factors = round_to_half(factors)
    bases = base_tasks(factors, cfg.base, cfg.redundancy_threshold)
    layers = len(pretrained.model.visual.transformer.resblocks)
    layer = cfg.routing_layer if cfg.routing_layer is not None else catalog.routing_layer(pretrained.name, layers)
    if not 0 <= layer < layers:
        raise ConfigError(f"--routing-layer {layer}: the tower has blocks 0..{layers - 1}")
    if cfg.router_on not in ("merged", "pretrained"):
        raise ConfigError(f"--router-on {cfg.router_on!r}: choose merged or pretrained")
    method = Method(routing_layer=layer, alpha=cfg.alpha, eta=cfg.eta, tau=cfg.tau, top_k=cfg.top_k,
                    base=cfg.base, redundancy_threshold=cfg.redundancy_threshold, split_qkv=cfg.split_qkv,
                    rank=cfg.rank, router_on=cfg.router_on)
    heads, classes = load_heads(pretrained, tasks, checkpoints)
    if router_basis_key(layer) not in factors.V:
        raise ConfigError(f"no stored factors for {router_basis_key(layer)}")
    return Loaded(pretrained, tasks, visual_pre, factors, bases, heads, classes, method)


def round_to_half(factors: TaskFactors) -> TaskFactors:
    def half(tensors):
        return {k: v.half().float() for k, v in tensors.items()}

    return TaskFactors(half(factors.U), factors.s, half(factors.V), half(factors.whole))


def stored_dtype(tensors: dict, dtype: str) -> dict:
    if dtype == "fp16":
        return {k: v.half().contiguous() if v.dtype == torch.float32 and not k.endswith(".s") else v.contiguous()
                for k, v in tensors.items()}
    return {k: v.contiguous() for k, v in tensors.items()}


def open_permissions(root: Path) -> None:
    """Staging dirs come from mkdtemp (0700): give the build the user's usual modes so services can read it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import open_clip
    import safetensors

    return {"mass_export": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__}


def storage_report(root: Path, visual_pre: dict) -> dict:
    tower = sum(v.numel() * 4 for v in visual_pre.values() if v.is_floating_point())
    parts = {"pretrained": ["pretrained.safetensors"], "task_factors": ["factors.safetensors"],
             "non_2d_deltas": ["deltas.safetensors"], "heads": ["heads.safetensors", "classes.json"],
             "graphs": sorted(p.relative_to(root).as_posix() for p in (root / "graphs").glob("*"))
             if (root / "graphs").is_dir() else []}
    sizes = {name: sum((root / f).stat().st_size for f in files if (root / f).exists()) for name, files in parts.items()}
    total = sum(sizes.values())
    return {"fp32_visual_tower_bytes": tower, "bytes": sizes, "total_bytes": total,
            "factor_of_tower": {name: round(size / tower, 4) for name, size in {**sizes, "total": total}.items()}}


def require_finite(tensors: dict, file: str) -> dict:
    """Refuse NaN/Inf before it is stored: a build never holds a non-finite weight."""
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ConfigError(f"{file}: NaN/Inf in {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "")
                          + " (from the checkpoints or the method parameters); nothing was written")
    return tensors


def write_build(loaded: Loaded, cfg: BuildConfig, stage: Path) -> dict:
    pm, method = loaded.pretrained, loaded.method
    require_finite(loaded.visual_pre, "pretrained.safetensors")
    require_finite(factors_to_flat(loaded.factors, loaded.bases), "factors.safetensors")
    require_finite(loaded.factors.whole, "deltas.safetensors")
    require_finite({f"heads[{task}]": head for task, head in zip(loaded.tasks, loaded.heads)}, "heads.safetensors")
    save_file({k: v.contiguous() for k, v in loaded.visual_pre.items()}, str(stage / "pretrained.safetensors"))
    save_file(stored_dtype(factors_to_flat(loaded.factors, loaded.bases), cfg.storage_dtype),
              str(stage / "factors.safetensors"))
    save_file(stored_dtype(loaded.factors.whole, cfg.storage_dtype), str(stage / "deltas.safetensors"))
    save_file({"heads": torch.cat(loaded.heads).contiguous()}, str(stage / "heads.safetensors"))
    (stage / "classes.json").write_text(json.dumps(loaded.classes, indent=1) + "\n")
    offsets, offset = {}, 0
    for task, head in zip(loaded.tasks, loaded.heads):
        offsets[task] = {"offset": offset, "classes": int(head.shape[0])}
        offset += int(head.shape[0])
    graphs = {}
    if cfg.export:
        from mass_export.export.graphs import export_all

        with tqdm(total=4, desc="exporting ONNX graphs", unit="graph", disable=not cfg.progress) as bar:
            graphs = export_all(pm.model.visual, loaded.visual_pre, loaded.factors.V[router_basis_key(method.routing_layer)],
                                torch.cat(loaded.heads), method, stage, cfg.opset, progress=lambda _: bar.update())
    ranks = {key: int(U.shape[-1]) for key, U in loaded.factors.U.items()}
    manifest = {
        "model": {"name": pm.name, "pretrained": pm.pretrained, "quick_gelu": pm.quick_gelu, "config": pm.config,
                  **pm.preprocess, "layers": len(pm.model.visual.transformer.resblocks)},
        "tasks": loaded.tasks,
        "method": {**asdict(method), "ranks": sorted(set(ranks.values()))},
        "base_tasks": {key: tasks for key, tasks in loaded.bases.items()},
        "heads": offsets,
        "graphs": graphs,
        "opset": cfg.opset,
        "precision": "fp32",
        "storage_dtype": cfg.storage_dtype,
        "versions": versions(),
    }
    write_manifest(stage, manifest)
    return update_manifest(stage, storage=storage_report(stage, loaded.visual_pre))


def build_inputs(cfg: BuildConfig) -> list[Path]:
    """The files and folders a build reads: the output may not be, hold, or lie inside one of them."""
    named = [cfg.checkpoints, cfg.model, cfg.pretrained, *cfg.validation_images]
    return [Path(p) for p in named if p is not None and (Path(p).exists() or Path(p).is_symlink())]


@torch.no_grad()
def build(cfg: BuildConfig) -> tuple[Path, dict]:
    """Run the whole build; the output directory appears only complete and validated."""
    started = time.perf_counter()
    output = Path(cfg.output)
    if isinstance(cfg.tasks, (str, list, tuple)) and not str(cfg.tasks).isdigit():
        refuse_duplicate_tasks(named_tasks(cfg.tasks))  # before the pretrained model loads, not after
    refuse_overlap(output, build_inputs(cfg), "-o/--output")
    with locked(output, what="being built or read"), staged_directory(output, cfg.force) as stage:
        loaded = load(cfg)
        manifest = write_build(loaded, cfg, stage)
        if cfg.export and cfg.validate:
            from mass_export.export.validate import validate_build

            report = validate_build(stage, loaded.reference(), atol=cfg.atol, images=cfg.validation_images,
                                    progress=cfg.progress)
            manifest = update_manifest(stage, validation=report)
        manifest = update_manifest(stage, build_seconds=round(time.perf_counter() - started, 2))
        open_permissions(stage)
    return output, manifest
