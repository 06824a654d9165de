"""The embedded demo zoo: a tiny open_clip CLIP trained here on real offline datasets, fine-tuned per task.

``build_zoo()`` builds (or returns the cached) zoo; ``load_split()`` reads the datasets it is made from.
"""

from mass_export.zoo.datasets import DatasetUnavailable, available_tasks, class_names, load_split, task_names, templates
from mass_export.zoo.recipe import load_recipe, recipe_hash


def build_zoo(recipe=None, cache_dir=None, progress=True, **options):
    """See :func:`mass_export.zoo.train.build_zoo` (imported lazily: it needs torch and open_clip)."""
    from mass_export.zoo.train import build_zoo as _build

    return _build(recipe, cache_dir=cache_dir, progress=progress, **options)


def __getattr__(name):
    if name == "ZooResult":
        from mass_export.zoo.train import ZooResult

        return ZooResult
    raise AttributeError(name)


__all__ = ["DatasetUnavailable", "ZooResult", "available_tasks", "build_zoo", "class_names", "load_recipe",
           "load_split", "recipe_hash", "task_names", "templates"]
