"""Read the data in models/ (architectures, benchmark task lists, dataset class names and templates)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from mass_export.core.errors import ConfigError


def models_dir() -> Path:
    return Path(str(resources.files("mass_export_models")))


@lru_cache(maxsize=None)
def _json(name: str) -> dict:
    return json.loads((models_dir() / name).read_text())


def routing_layer(model_name: str, num_layers: int) -> int:
    """The architecture's routing layer from models/architectures.json, else 3/4 of the depth."""
    data = _json("architectures.json")
    known = data["architectures"].get(model_name)
    if known:
        return known["routing_layer"]
    return min(num_layers - 1, int(round(data["default_routing_fraction"] * num_layers)))


def architecture_names() -> list[str]:
    return list(_json("architectures.json")["architectures"])


def quick_gelu_tags() -> list[str]:
    return _json("architectures.json")["quick_gelu_tags"]


def benchmark_tasks(count: int) -> list[str]:
    lists = _json("benchmarks.json")
    if str(count) not in lists:
        choices = ", ".join(k for k in lists if not k.startswith("_"))
        raise ConfigError(f"--tasks {count}: no {count}-task benchmark in models/benchmarks.json (have {choices})")
    return list(lists[str(count)])


def dataset_info(task: str) -> dict | None:
    """{"classes": [...], "templates": [...]} for a task from models/datasets/, matched case-insensitively (a
    ``<Task>Val`` name is the task's; see datasets/README.md for the lists' sources)."""
    folder = models_dir() / "datasets"
    if not folder.is_dir():
        return None
    wanted = task.lower()
    wanted = wanted[:-3] if wanted.endswith("val") and len(wanted) > 3 else wanted
    for path in sorted(folder.glob("*.json")):
        if path.stem.lower() == wanted:
            return json.loads(path.read_text())
    return None
