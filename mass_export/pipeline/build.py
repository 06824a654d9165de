"""`mass-export build`: checkpoints in, a validated build directory out (docs/build-format.md)."""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mass_export import __version__

from mass_export.core import catalog, options
from mass_export.core.errors import CheckpointError, ConfigError
from mass_export.core.memory import return_freed_memory
from mass_export.core.manifest import head_table, staged_directory, update_manifest, write_manifest
from mass_export.core.outputs import locked, refuse_overlap
from mass_export.core.routing import router_basis_key
from mass_export.merging import checkpoints as ckpt
from mass_export.merging.zeroshot import tokenizer_for, zero_shot_head
from mass_export.merging.merge import TaskFactors, base_tasks, empty_factors, factors_to_flat, put_task, truncate_task
from mass_export.merging.reference import MassReference, Method
from mass_export.pipeline.config import BuildConfig  # noqa: F401  (part of this module's API)


# Dense task-set weight sets the validation's reference keeps (theta_MT aside): validation visits the task sets one
# after another, so one suffices and the build's memory stays a few towers plus the stored factors, whatever T.
REFERENCE_WEIGHT_SETS = 1


class BuildWarning(UserWarning):
    """Something the build did that the user may not expect (e.g. classes shown as indices); the CLI prints it."""


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
    notes: list[str] = field(default_factory=list)  # the warnings given, kept in the manifest

    def reference(self, cache_size: int = 4, progress: bool = False) -> MassReference:
        """The torch reference; ``cache_size`` dense task-set weight sets (a tower each) kept merged."""
        return MassReference(self.pretrained.model.visual, self.visual_pre, self.factors, self.bases, self.heads,
                             self.method, cache_size, progress)


def note(notes: list[str], message: str) -> None:
    notes.append(message)
    warnings.warn(message, BuildWarning, stacklevel=3)


def resolve_tasks(cfg: BuildConfig, checkpoints: Path | None, model_name: str | None) -> list[str]:
    """The task list: a benchmark count, names (--tasks or the config file's tasks), else those found on disk."""
    if isinstance(cfg.tasks, int) or (isinstance(cfg.tasks, str) and cfg.tasks.strip().isdigit()):
        return catalog.benchmark_tasks(int(cfg.tasks))
    names = cfg.task_names()
    if names:
        return names
    if checkpoints is None:
        raise ConfigError("give --tasks (a count or names), --checkpoints to discover them, or tasks: in --config")
    # a pretrained saved as a folder inside the tree looks like a task folder: it is not one
    pretrained_dirs = {Path(p).expanduser().resolve() for p in (cfg.model, cfg.pretrained)
                       if p and Path(p).expanduser().is_dir()}
    found = [t for t in ckpt.discover_tasks(checkpoints, model_name)
             if not any((base / t).resolve() in pretrained_dirs for base in (checkpoints, checkpoints / model_name))]
    if not found:
        raise CheckpointError(f"{checkpoints}: no task checkpoints found; {ckpt.searched(checkpoints, model_name)}. "
                              "Name each task's checkpoint in a build config (--config, docs/checkpoints.md)")
    return found


def task_checkpoints(cfg: BuildConfig, tasks: list[str], checkpoints: Path | None, model_name: str) -> dict[str, Path]:
    """Task -> checkpoint: the config file's ``checkpoint`` where given, else the search of --checkpoints."""
    given = {t: cfg.task_specs[t].checkpoint for t in tasks if t in cfg.task_specs and cfg.task_specs[t].checkpoint}
    rest = [t for t in tasks if t not in given]
    if rest and checkpoints is None:
        raise ConfigError(f"no checkpoint for task(s) {', '.join(rest)}: give --checkpoints (the directory holding "
                          "one fine-tuned checkpoint per task) or checkpoint: for each in --config")
    found = ckpt.find_task_checkpoints(checkpoints, rest, model_name) if rest else {}
    return {t: given.get(t) or found[t] for t in tasks}


def _task_folder(task: str, checkpoint: Path) -> Path | None:
    """The folder that is the task's own (a directory checkpoint, or <Task>/<Task>Val holding the file)."""
    if checkpoint.is_dir():
        return checkpoint
    return checkpoint.parent if checkpoint.parent.name in (task, f"{task}Val") else None


def class_names(task: str, spec, checkpoint: Path | None, info: dict | None) -> tuple[list[str] | None, str]:
    """(names, where from): the config file's classes, then <task folder>/classes.txt, then models/datasets/."""
    from mass_export.pipeline.config import read_names

    if spec is not None and spec.classes:
        return spec.classes, "the build config"
    folder = _task_folder(task, checkpoint) if checkpoint is not None else None
    if folder is not None and (folder / "classes.txt").is_file():
        return read_names(str(folder / "classes.txt"), folder, str(folder / "classes.txt")), str(folder / "classes.txt")
    if info:
        return list(info["classes"]), f"models/datasets/ ({task})"
    return None, ""


HOW_TO_NAME = ("give them as classes: in a build config (--config, tasks: {TASK: {classes: [...]}}) or in "
               "TASK/classes.txt beside the checkpoint, one per line")


def load_heads(pretrained: ckpt.PretrainedModel, tasks, checkpoints, cfg: BuildConfig | None = None,
               paths: dict | None = None, notes: list | None = None) -> tuple[list[torch.Tensor], dict]:
    """Heads from the config's head files or head_<Task> files in the tree, else zero-shot from the pretrained text
    tower with the task's class names and templates. Classes without names are shown as indices, with a warning."""
    specs = cfg.task_specs if cfg else {}
    paths = paths or {}
    notes = notes if notes is not None else []
    found = ckpt.find_heads(checkpoints, [t for t in tasks if not (t in specs and specs[t].head)],
                            pretrained.name) if checkpoints else {}
    heads, classes, problems = [], {}, []
    for task in tasks:
        spec, info = specs.get(task), catalog.dataset_info(task)
        names, source = class_names(task, spec, paths.get(task), info)
        head_file = spec.head if spec is not None and spec.head else found.get(task)
        if head_file is not None:
            head = ckpt.load_head(head_file).float()
        elif names and pretrained.has_text:
            templates = (spec.templates if spec is not None and spec.templates else None) or \
                (info["templates"] if info else DEFAULT_TEMPLATES)
            tokenizer = tokenizer_for(pretrained.name, pretrained.config["text_cfg"].get("context_length", 77))
            head = zero_shot_head(pretrained.model, tokenizer, names, templates)
        else:
            why = "no class names" if not names else "no text tower in the pretrained weights"
            problems.append(f"{task}: no head file (head_{task}.pt / .safetensors, or head: in --config) and {why}"
                            + (f" ({HOW_TO_NAME})" if not names else
                               " (give a pretrained with its text tower, e.g. a whole CLIP, or a head file)"))
            continue
        if names and len(names) != head.shape[0]:
            if spec is not None and spec.classes or source.endswith("classes.txt"):
                raise ConfigError(f"{task}: {len(names)} class names from {source}, but its head has "
                                  f"{head.shape[0]} classes")
            names = None
        if not names:
            note(notes, f"{task}: no class names for its {head.shape[0]} classes; run will print class indices. "
                 + HOW_TO_NAME[0].upper() + HOW_TO_NAME[1:])
            names = [str(i) for i in range(head.shape[0])]
        heads.append(head)
        classes[task] = names
    if problems:
        raise CheckpointError("cannot make classification heads:\n  " + "\n  ".join(problems))
    return heads, classes


DEFAULT_TEMPLATES = ["a photo of a {}."]


@torch.no_grad()
def load(cfg: BuildConfig) -> Loaded:
    """Read checkpoints, compute deltas and the per-task truncated factors, heads and the method."""
    cfg.check()  # every option's range, before anything is read
    depth = ckpt.model_depth(cfg.model)
    if depth is not None and cfg.routing_layer is not None and cfg.routing_layer >= depth:
        raise ConfigError(f"--routing-layer {cfg.routing_layer}: the tower has blocks 0..{depth - 1}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    notes: list[str] = []
    checkpoints = Path(cfg.checkpoints) if cfg.checkpoints else None
    model_stem = Path(cfg.model).stem if cfg.model.endswith(".json") else cfg.model
    source = cfg.pretrained
    if source is None and checkpoints is not None and not ckpt.carries_weights(cfg.model):
        found = ckpt.find_pretrained(checkpoints, model_stem)
        source = str(found) if found else None
    pretrained = ckpt.load_pretrained(cfg.model, source, cfg.quick_gelu)
    tasks = resolve_tasks(cfg, checkpoints, pretrained.name)
    paths = task_checkpoints(cfg, tasks, checkpoints, pretrained.name)
    layers = len(pretrained.model.visual.transformer.resblocks)
    layer = cfg.routing_layer if cfg.routing_layer is not None else catalog.routing_layer(pretrained.name, layers)
    method = Method(**{**{o.name: getattr(cfg, o.name) for o in options.METHOD_OPTIONS}, "routing_layer": layer})
    if not 0 <= layer < layers:
        raise ConfigError(f"--routing-layer {layer}: the tower has blocks 0..{layers - 1}")
    heads, classes = load_heads(pretrained, tasks, checkpoints, cfg, paths, notes)  # cheap, and fails early
    ckpt.drop_text_tower(pretrained)  # its one job, the zero-shot heads, is done: free it before the fine-tunes
    # The tower's own tensors, not copies (nothing writes to them; delta_in_place subtracts into the fine-tune).
    visual_pre = {k: v.detach().float() if v.is_floating_point() else v.detach()
                  for k, v in ckpt.visual_state(pretrained.model).items()}
    factors = None
    # One fine-tune in memory at a time, its delta made in place, its factors written straight into the
    # preallocated stacks: the peak is the towers plus the stored factors, whatever the number of tasks.
    for index, task in enumerate(tqdm(tasks, desc="truncating task updates", unit="task", disable=not cfg.progress)):
        delta = delta_in_place(ckpt.load_visual(paths[task], visual_pre, pretrained.quick_gelu), visual_pre)
        part = truncate_task(delta, len(tasks), cfg.rank, cfg.split_qkv, cfg.device)
        del delta
        factors = factors if factors is not None else empty_factors(part, len(tasks))
        put_task(factors, index, part)
        del part
    if cfg.storage_dtype == "fp16":
        # Round now, so the reference, the validation and the runtime all see exactly what is stored.
        factors = round_to_half(factors)
    bases = base_tasks(factors, cfg.base, cfg.redundancy_threshold)
    if router_basis_key(layer) not in factors.V:
        raise ConfigError(f"no stored factors for {router_basis_key(layer)}")
    return Loaded(pretrained, tasks, visual_pre, factors, bases, heads, classes, method, notes)


def delta_in_place(finetuned: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor]) -> dict:
    """theta_ft - theta_pre (merge.task_delta's result) computed in the fine-tune's own fp32 tensors."""
    out = {}
    for key, value in pretrained.items():
        if value.is_floating_point():
            tuned = finetuned.pop(key)
            if tuned.dtype != torch.float32 or tuned.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
                out[key] = tuned.float() - value  # a key the checkpoint lacks is the pretrained tensor itself
            else:
                out[key] = tuned.sub_(value)
    return out


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


def written_opset(stage: Path, graphs: dict, asked: int) -> int:
    """The opset the exported graphs really carry (the manifest states this one); asked for another: an error."""
    if not graphs:
        return asked
    import onnx

    found = set()
    for info in graphs.values():
        model = onnx.load(str(stage / info["file"]), load_external_data=False)
        found |= {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
    if found != {asked}:
        raise ConfigError(f"--opset {asked}: the exporter wrote opset {', '.join(map(str, sorted(found)))}")
    return asked


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
    graphs = {}
    ranks = {key: int(U.shape[-1]) for key, U in loaded.factors.U.items()}
    if cfg.export:
        from mass_export.export.graphs import GRAPH_NAMES, export_all

        with tqdm(total=len(GRAPH_NAMES), desc="exporting ONNX graphs", unit="graph", disable=not cfg.progress) as bar:
            graphs = export_all(pm.model.visual, loaded.visual_pre, loaded.factors.V[router_basis_key(method.routing_layer)],
                                torch.cat(loaded.heads), method, stage, cfg.opset, progress=lambda _: bar.update(),
                                ranks=ranks)
    manifest = {
        "model": {"name": pm.name, "pretrained": pm.pretrained, "quick_gelu": pm.quick_gelu, "config": pm.config,
                  **pm.preprocess, "layers": len(pm.model.visual.transformer.resblocks)},
        "tasks": loaded.tasks,
        "method": {**asdict(method), "ranks": sorted(set(ranks.values()))},
        "base_tasks": {key: tasks for key, tasks in loaded.bases.items()},
        "heads": head_table({task: head.shape[0] for task, head in zip(loaded.tasks, loaded.heads)}),
        "graphs": graphs,
        "opset": written_opset(stage, graphs, cfg.opset),
        "precision": "fp32",
        "storage_dtype": cfg.storage_dtype,
        "versions": versions(),
        "build_config": cfg.record(),
        "warnings": loaded.notes,
    }
    write_manifest(stage, manifest)
    return update_manifest(stage, storage=storage_report(stage, loaded.visual_pre))


def stored_views(loaded: Loaded, cfg: BuildConfig, stage: Path):
    """(StoredTasks, heads) as numpy views of the tensors just written, once each file is checked to hold exactly
    them, tensor by tensor: the validation then reads what the runtime will read without a second copy of the
    tower and the factors in memory."""
    from safetensors import safe_open

    from mass_export.core.taskweights import StoredTasks

    parts = {"pretrained.safetensors": loaded.visual_pre,
             "factors.safetensors": factors_to_flat(loaded.factors, loaded.bases),
             "deltas.safetensors": loaded.factors.whole,
             "heads.safetensors": {"heads": torch.cat(loaded.heads)}}
    for file, tensors in parts.items():
        with safe_open(str(stage / file), framework="pt") as stored:
            if set(stored.keys()) != set(tensors):
                raise ConfigError(f"{stage / file}: holds other tensors than the build wrote")
            dtype = cfg.storage_dtype if file in ("factors.safetensors", "deltas.safetensors") else "fp32"
            for key, value in tensors.items():
                if not torch.equal(stored.get_tensor(key), stored_dtype({key: value}, dtype)[key]):
                    raise ConfigError(f"{stage / file}: {key} reads back different from what was written")
    numpy = {file: {k: v.numpy() for k, v in tensors.items()} for file, tensors in parts.items()}
    stored = StoredTasks.from_flat(numpy["pretrained.safetensors"], numpy["factors.safetensors"],
                                   numpy["deltas.safetensors"], loaded.method.alpha)
    return stored, numpy["heads.safetensors"]["heads"]


def build_inputs(cfg: BuildConfig) -> list[Path]:
    """The files and folders a build reads: the output may not be, hold, or lie inside one of them."""
    per_task = [p for spec in (cfg.task_specs or {}).values() for p in (spec.checkpoint, spec.head, spec.classes)
                if isinstance(p, (str, Path))]
    named = [cfg.checkpoints, cfg.model, cfg.pretrained, cfg.config_file, *per_task, *cfg.validation_images]
    return [Path(p) for p in named if p is not None and (Path(p).exists() or Path(p).is_symlink())]


@torch.no_grad()
def build(cfg: BuildConfig) -> tuple[Path, dict]:
    """Run the whole build; the output directory appears only complete and validated."""
    started = time.perf_counter()
    seconds = {}  # per stage, into the manifest: where a slow build spends its time, without a profiler

    def lap(stage_name: str) -> None:
        seconds[stage_name] = round(time.perf_counter() - started - sum(seconds.values()), 2)
        return_freed_memory()  # each stage's temporaries, before the next stage's peak

    cfg.check()
    output = Path(cfg.output)
    refuse_overlap(output, build_inputs(cfg), "-o/--output")
    with locked(output, what="being built or read"), staged_directory(output, cfg.force) as stage:
        loaded = load(cfg)
        lap("load_and_truncate")
        manifest = write_build(loaded, cfg, stage)
        lap("write_and_export")
        if cfg.export and cfg.validate:
            from mass_export.export.validate import validate_build

            stored = stored_views(loaded, cfg, stage)
            lap("read_back")
            reference = loaded.reference(REFERENCE_WEIGHT_SETS, cfg.progress)
            report = validate_build(stage, reference, atol=cfg.atol, images=cfg.validation_images,
                                    progress=cfg.progress, stored=stored)
            lap("validation")
            manifest = update_manifest(stage, validation=report)
        manifest = update_manifest(stage, build_seconds=round(time.perf_counter() - started, 2),
                                   stage_seconds=seconds)
        open_permissions(stage)
    return output, manifest
