"""Zoo recipes: JSON files in ``models/zoo/`` (or anywhere), resolved to one dict and hashed for the cache.

A recipe names the tasks, the tiny open_clip model config, the seed and the training schedules::

    {"name": "default", "seed": 0, "model_config": "tiny-clip.json", "image_size": 32,
     "tasks": ["Digits", "MNIST", "FashionMNIST", "Textures"], "threads": 1, "routing_layer": 5,
     "pretrain": {"steps": 800, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1, "warmup": 40,
                  "freeze_token_embedding": true, "domain_caption_prob": 0.0, "augment": false},
     "finetune": {"steps": 250, "batch_size": 64, "lr": 3e-4, "weight_decay": 0.0, "warmup": 20,
                  "augment": true, "optimizer": "adamw"},
     "limit": {"pretrain": null, "finetune": null, "test": null}}

``model_config`` is a file name next to the recipe (or in ``models/zoo/``) or an inline dict; it is inlined when
the recipe is resolved, so the cache key covers the architecture too. ``limit`` caps the samples per task and
split (a fixed class-mixed subset; for fast test recipes). ``finetune`` may hold per-task overrides under
``"per_task": {"Task": {...}}``. ``routing_layer`` is not used for training: it records the routing block the
recipe study (docs/zoo-recipes.md) found best, and is copied into zoo.json for the build.
``pretrain.domain_caption_prob``: the share of pretraining captions that name only the task's domain
(``"domain"`` in models/datasets/<task>.json) instead of the class. ``finetune.optimizer``: "adamw" or "sgd".
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from mass_export.core.errors import ConfigError
from mass_export.core.catalog import models_dir

# The code that turns a recipe into weights: its source is part of the cache key, so a cache never serves a zoo
# made by older code (any edit, even a comment, costs one rebuild: cheaper than a stale zoo).
ZOO_CODE = ("zoo/train.py", "zoo/datasets.py", "zoo/recipe.py", "merging/zeroshot.py")

DEFAULTS = {
    "name": "custom",
    "seed": 0,
    "image_size": 32,
    "threads": 1,
    "pretrain": {"steps": 800, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1, "warmup": 40},
    "finetune": {"steps": 250, "batch_size": 64, "lr": 3e-4, "weight_decay": 0.0, "warmup": 20, "augment": True},
    "limit": {"pretrain": None, "finetune": None, "test": None},
}


def zoo_dir() -> Path:
    return models_dir() / "zoo"


def default_recipe_path() -> Path:
    return zoo_dir() / "default.json"


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(recipe=None) -> dict:
    """Resolve a recipe (None = the default, a path, a name in models/zoo/, or a dict) to a full dict."""
    where = zoo_dir()
    if recipe is None:
        recipe = default_recipe_path()
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if not path.is_file() and (zoo_dir() / f"{recipe}.json").is_file():
            path = zoo_dir() / f"{recipe}.json"
        if not path.is_file():
            raise ConfigError(f"zoo recipe {recipe!s} not found (a JSON path or a name in {zoo_dir()})")
        where = path.parent
        recipe = json.loads(path.read_text())
    if not isinstance(recipe, dict) or not recipe.get("tasks"):
        raise ConfigError("a zoo recipe needs a non-empty 'tasks' list")
    resolved = _merge(DEFAULTS, recipe)
    config = resolved.get("model_config", "tiny-clip.json")
    if isinstance(config, str):
        candidates = [where / config, zoo_dir() / config]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"model config {config!r} not found next to the recipe or in {zoo_dir()}")
        config = json.loads(found.read_text())
    resolved["model_config"] = config
    if config["vision_cfg"]["image_size"] != resolved["image_size"]:
        raise ConfigError("recipe image_size differs from the model config's vision_cfg.image_size")
    return resolved


def code_fingerprint(tasks=()) -> str:
    """sha256 of the zoo's training and data-loading code and of the tasks' dataset files (classes, templates,
    tint: models/datasets/<task>.json)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    files = [package / name for name in ZOO_CODE] + [models_dir() / "datasets" / f"{t}.json" for t in sorted(tasks)]
    for path in files:
        digest.update(path.name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    return digest.hexdigest()


def recipe_hash(recipe: dict) -> str:
    """sha256 of the resolved recipe (canonical JSON) and of the code that trains it (:func:`code_fingerprint`)."""
    payload = json.dumps({"recipe": recipe, "code": code_fingerprint(recipe.get("tasks", ()))}, sort_keys=True,
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
