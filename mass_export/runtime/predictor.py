"""A columnar predictor for batch pipelines: a dict of numpy arrays in, a dict of columns out.

It is what Ray Data's ``map_batches`` calls with a stateful class (one runtime per actor), and works the same
without Ray on a plain dict::

    from mass_export.runtime import MassPredictor
    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
    predictions = ds.map_batches(MassPredictor, fn_constructor_kwargs={"build": "build/"}, concurrency=2,
                                 batch_size=64)

    MassPredictor("build/")({"image": uint8_hwc_arrays, "id": ["a", "b"]})

Input columns: ``bytes`` (encoded image files, as ``read_binary_files`` gives) or ``image`` (HWC uint8 arrays, as
``read_images`` gives); ``path`` and ``id`` are passed through when present. A row that cannot be decoded gets
``error`` and empty prediction columns; the batch goes on. Output columns (:data:`COLUMNS`) hold the same values as
a ``mass-export run`` row; the nested ones (``top_k``, ``task_probs``) are JSON text so that every column is a
flat Arrow type.
"""

from __future__ import annotations

import json

import numpy as np

from mass_export.core import options
from mass_export.core.errors import ConfigError
from mass_export.runtime.engine import MassRuntime, Prediction

COLUMNS = ("path", "id", "task", "class", "score", "confidence", "top_k", "task_set", "task_probs", "error",
           "warning")
NESTED = ("top_k", "task_probs")


def prediction_columns(predictions: list[Prediction]) -> dict[str, np.ndarray]:
    """Predictions as columns (see the module docstring)."""
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for prediction in predictions:
        row = {**prediction.to_row(), "id": prediction.id}
        for name in COLUMNS:
            value = row.get(name)
            if name in NESTED:
                value = json.dumps(value)
            columns[name].append(value)
    return {name: np.asarray(values, dtype=object) for name, values in columns.items()}


def row_from_columns(columns: dict, index: int) -> dict:
    """One `mass-export run` row back from the columns (the nested fields parsed again)."""
    row = {name: _plain(columns[name][index]) for name in COLUMNS if name != "id"}
    for name in NESTED:
        row[name] = json.loads(row[name])
    row["task_set"] = list(row["task_set"])
    return row


def _plain(value):
    """numpy scalars as Python values; a missing number as None (Arrow stores a null float column entry as NaN)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


class MassPredictor:
    """One loaded runtime; ``__call__`` classifies a columnar batch."""

    def __init__(self, build, providers=("cpu",), threads: int | None = None, batch_size: int = options.BATCH_SIZE,
                 top_classes: int = options.TOP_CLASSES, cache_size: int | None = None, max_pixels: int | None = None):
        self.runtime = MassRuntime.load(build, providers=providers, threads=threads, cache_size=cache_size)
        if max_pixels is not None:  # `run --max-megapixels`, as a local run applies it
            self.runtime.max_pixels = max_pixels
        self.batch_size, self.top_classes = batch_size, top_classes

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        if "bytes" in batch:
            items = [bytes(item) for item in batch["bytes"]]
        elif "image" in batch:
            items = [np.asarray(item) for item in batch["image"]]
        else:
            raise ConfigError(f"MassPredictor needs a 'bytes' or an 'image' column; got {sorted(batch)}")
        predictions = self.runtime.classify(items, batch_size=self.batch_size, top_k=self.top_classes,
                                            ids=batch.get("id"))
        paths = batch.get("path")
        for index, prediction in enumerate(predictions):
            prediction.path = None if paths is None else str(paths[index])
        return prediction_columns(predictions)
