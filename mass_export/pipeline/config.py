"""The build configuration: options (defaults from mass_export.core.options), per-task sources, and the build
config file (``mass-export build --config tasks.yaml``, mergekit's way).

File schema (YAML or JSON; docs/checkpoints.md has an example)::

    model: ViT-B-16 | local-dir:PATH | hf-hub:ORG/REPO | PATH     # open_clip config JSON or a transformers CLIP dir
    pretrained: openai | PATH                                      # optional
    checkpoints: PATH                                              # optional: a tree searched for tasks not given
    tasks:                                                         # a mapping, a list of names, or a count
      Widgets:
        checkpoint: PATH        # a file or a directory, any supported layout
        head: PATH              # optional
        classes: [bolt, nut]    # or a .txt (one per line) / .json (a list) path
        templates: ["a photo of a {}."]
    alpha: 1.0                  # any other build option, by its command-line name (max_tasks, routing_layer, ...)

Relative paths resolve against the file's folder; unknown keys are refused naming them; options given on the command
line override the file.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

from mass_export.core import options
from mass_export.core.errors import ConfigError

TASK_KEYS = ("checkpoint", "head", "classes", "templates")


@dataclass
class TaskSpec:
    """Where one task's parts come from when not found by the search (all optional)."""

    checkpoint: Path | None = None
    head: Path | None = None
    classes: list[str] | None = None
    templates: list[str] | None = None

    def record(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items() if v is not None}


@dataclass
class BuildConfig:
    model: str | None = options.field("model")
    output: Path = options.field("output")
    pretrained: str | None = options.field("pretrained")
    checkpoints: Path | None = options.field("checkpoints")
    tasks: list[str] | int | str | None = options.field("tasks")
    rank: int | None = options.field("rank")
    routing_layer: int | None = options.field("routing_layer")
    base: str = options.field("base")
    redundancy_threshold: float = options.field("redundancy_threshold")
    split_qkv: bool = options.field("split_qkv")
    alpha: float = options.field("alpha")
    eta: float = options.field("eta")
    tau: float = options.field("tau")
    top_k: int = options.field("top_k")  # --max-tasks
    router_on: str = options.field("router_on")
    quick_gelu: bool | None = options.field("quick_gelu")
    force: bool = options.field("force")
    export: bool = options.field("export")
    validate: bool = options.field("validate")
    atol: float = options.field("atol")
    opset: int = options.field("opset")
    threads: int | None = options.field("threads")
    device: str = options.field("device")
    storage_dtype: str = options.field("storage_dtype")
    validation_images: list[Path] = options.field("validation_images")
    progress: bool = options.field("progress")
    task_specs: dict[str, TaskSpec] = None  # from a config file's tasks mapping
    config_file: Path | None = None

    def __post_init__(self):
        self.task_specs = dict(self.task_specs or {})

    def task_names(self) -> list[str] | None:
        """The tasks as given (a list), a benchmark count resolved later, or None (discover)."""
        if isinstance(self.tasks, str):
            if self.tasks.strip().isdigit():
                return None
            return [t.strip() for t in self.tasks.split(",") if t.strip()]
        if isinstance(self.tasks, (list, tuple)):
            return [str(t) for t in self.tasks]
        return None

    def check(self) -> None:
        """Every option in range and the task list sane: ConfigError naming the option and the value, before
        anything is loaded. (The routing layer's upper bound is checked once the model's depth is known.)"""
        options.check(self)
        if self.model is None:
            raise ConfigError("--model is required (on the command line or as model: in --config)")
        names = self.task_names()
        if names is not None:
            if not names:
                raise ConfigError("--tasks: no task names given")
            # Compared case-insensitively, as checkpoint folders on some file systems are.
            seen: dict[str, str] = {}
            dupes = []
            for name in names:
                if name.casefold() in seen:
                    first = seen[name.casefold()]
                    dupes.append(name if name == first else f"{first}/{name}")
                seen.setdefault(name.casefold(), name)
            if dupes:
                raise ConfigError(f"--tasks {','.join(names)}: duplicate task name(s) {', '.join(dict.fromkeys(dupes))}"
                                  " given more than once; name each task once")
        elif isinstance(self.tasks, int) and not isinstance(self.tasks, bool) and self.tasks < 1:
            raise ConfigError(f"--tasks {self.tasks}: give a benchmark count (8, 14, 20) or task names")

    def record(self) -> dict:
        """The resolved configuration, as the manifest records it (paths as strings)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("progress", "force", "task_specs", "config_file", "output", "validation_images"):
                continue
            option = f.metadata.get("option")
            out[option.public if option else f.name] = str(value) if isinstance(value, Path) else value
        out["validation_images"] = len(self.validation_images)
        if self.task_specs:
            out["task_sources"] = {name: spec.record() for name, spec in self.task_specs.items()}
        if self.config_file:
            out["config_file"] = str(self.config_file)
        return out


# ---------------------------------------------------------------- the config file


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: no such build config file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: not a readable build config ({type(exc).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a build config is a mapping (model:, tasks:, ...), got {type(data).__name__}")
    return data


def _path(value, base: Path, where: str) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _maybe_path(value: str, base: Path) -> str:
    """A model/pretrained value: a path relative to the config's folder when it names something there; else as is
    (an open_clip name or tag, hf-hub:)."""
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}")
    if value.startswith("local-dir:"):
        return "local-dir:" + str(_path(value[len("local-dir:"):], base, value))
    if value.startswith("hf-hub:") or Path(value).expanduser().is_absolute():
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() or "/" in value or value.endswith(".json") else value


def read_names(value, base: Path, where: str) -> list[str]:
    """Class names: a list, or a .txt (one per line) / .json (a list) file."""
    if isinstance(value, list):
        names = value
    else:
        path = _path(value, base, where)
        if not path.is_file():
            raise ConfigError(f"{where}: no such file {path}")
        if path.suffix == ".json":
            try:
                names = json.loads(path.read_text())
            except ValueError as exc:
                raise ConfigError(f"{path}: not a readable JSON list ({exc})") from None
        else:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise ConfigError(f"{where}: expected a non-empty list of names")
    return [str(n) for n in names]


def _templates(value, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and "{}" in t for t in value):
        raise ConfigError(f"{where}: expected a list of templates, each with {{}} where the class name goes")
    return value


def _task_spec(name: str, value, base: Path, path: Path) -> TaskSpec:
    where = f"{path}: tasks.{name}"
    if value is None:
        return TaskSpec()
    if isinstance(value, str):  # shorthand: the checkpoint
        return TaskSpec(checkpoint=_path(value, base, where))
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(TASK_KEYS)}")
    unknown = [k for k in value if k not in TASK_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(TASK_KEYS)})")
    spec = TaskSpec()
    if value.get("checkpoint") is not None:
        spec.checkpoint = _path(value["checkpoint"], base, f"{where}.checkpoint")
        if not spec.checkpoint.exists():
            raise ConfigError(f"{where}.checkpoint: no such file or directory {spec.checkpoint}")
    if value.get("head") is not None:
        spec.head = _path(value["head"], base, f"{where}.head")
        if not spec.head.is_file():
            raise ConfigError(f"{where}.head: no such file {spec.head}")
    if value.get("classes") is not None:
        spec.classes = read_names(value["classes"], base, f"{where}.classes")
    if value.get("templates") is not None:
        spec.templates = _templates(value["templates"], f"{where}.templates")
    return spec


def _option_value(option: options.Option, value, base: Path, where: str):
    if option.kind == "path":
        return _path(value, base, where)
    if option.kind == "paths":
        values = value if isinstance(value, list) else [value]
        return [_path(v, base, where) for v in values]
    if option.name in ("model", "pretrained"):
        return _maybe_path(value, base)
    if option.kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if option.kind is float and isinstance(value, str):  # YAML reads "nan"/"1e-4" as strings
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    return value


def read_config_file(path) -> dict:
    """{field name: value} from a build config file; paths resolved against its folder. ConfigError naming the
    file and the key for anything unknown or malformed."""
    path = Path(path).expanduser().resolve()
    data = _load_file(path)
    base = path.parent
    known = options.by_public_name()
    out: dict = {"config_file": path}
    unknown = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "tasks":
            if isinstance(value, dict):
                out["task_specs"] = {str(task): _task_spec(str(task), spec, base, path) for task, spec in value.items()}
                out["tasks"] = list(out["task_specs"])
            elif isinstance(value, (list, int, str)) and not isinstance(value, bool):
                out["tasks"] = [str(t) for t in value] if isinstance(value, list) else value
            else:
                raise ConfigError(f"{path}: tasks: expected a mapping of tasks, a list of names or a count")
            continue
        option = known.get(name)
        if option is None or not option.in_cli:
            unknown.append(str(key))
            continue
        if name in option.deprecated:
            warnings.warn(f"{path}: '{key}' is deprecated, write '{option.public}'", FutureWarning, stacklevel=2)
        out[option.name] = _option_value(option, value, base, f"{path}: {key}")
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (known: tasks, "
                          f"{', '.join(sorted(o.public for o in options.OPTIONS.values() if o.in_cli))})")
    return out


def resolve(given: dict, config_file=None) -> BuildConfig:
    """Defaults < the config file < options given on the command line (``given`` holds only those, by field name)."""
    values = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in given.items() if v is not None})
    if "tasks" in given and given["tasks"] is not None and values.get("task_specs"):
        # --tasks on the command line picks among the file's tasks (and may add tree-searched ones)
        names = BuildConfig(tasks=given["tasks"]).task_names()
        if names is not None:
            values["task_specs"] = {n: s for n, s in values["task_specs"].items() if n in names}
    return BuildConfig(**values)


__all__ = ["BuildConfig", "TaskSpec", "read_config_file", "read_names", "resolve"]
