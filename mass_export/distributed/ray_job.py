"""`mass-export run --ray ADDRESS`: Ray Data reads the images, one MassPredictor actor per worker classifies them.

Routing and grouping by task set happen inside each actor, on the batches Ray hands it (the runtime's own batch
loop, through ``MassPredictor``). Rows come back as the same dicts a local run writes, in input order (they are
matched to the inputs by path, so Ray's block order does not matter). Paths that cannot be read (missing, a folder,
empty, unreadable) never reach Ray: they become the same error rows here as in a local run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from mass_export.core import options
from mass_export.core.errors import ConfigError
from mass_export.runtime.engine import Prediction
from mass_export.runtime.images import unreadable
from mass_export.runtime.predictor import MassPredictor, row_from_columns


def connect(address: str, workers: int) -> None:
    """``local`` starts a local Ray cluster sized for ``workers`` actors; anything else joins that cluster."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray Data: pip install 'mass-export[ray]'") from None
    if ray.is_initialized():
        return
    settings = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address == "local":
        # Each predictor actor holds a CPU for its lifetime; reading needs one more, or the job waits forever.
        ray.init(num_cpus=max(workers + 1, os.cpu_count() or 1), **settings)
    else:
        ray.init(address=address, **settings)


def _key(path) -> str:
    return os.path.realpath(os.fspath(path))


def classify_on_ray(items: list, build: Path, address: str = "local", workers: int = options.RAY_WORKERS,
                    batch_size: int = options.BATCH_SIZE, providers=("cpu",), threads: int | None = None,
                    top_classes: int = options.TOP_CLASSES, max_pixels: int | None = None) -> Iterator[dict]:
    """One `run` row per item, in input order."""
    import ray

    connect(address, workers)
    rows: dict[int, dict] = {}
    readable: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        if problem := unreadable(item):  # the local run's own check, so both write the same error rows
            rows[index] = Prediction(path=os.fspath(item), error=problem).to_row()
        else:
            readable.append((index, os.fspath(item)))
    if readable:
        gpus = 1 if any(str(p).startswith(("cuda", "tensorrt")) for p in providers) else 0
        dataset = ray.data.read_binary_files([path for _, path in readable], include_paths=True)
        predicted = dataset.map_batches(
            MassPredictor, fn_constructor_kwargs={"build": str(Path(build).resolve()), "providers": tuple(providers),
                                                  "threads": threads, "batch_size": batch_size,
                                                  "top_classes": top_classes, "max_pixels": max_pixels},
            compute=ray.data.ActorPoolStrategy(size=workers), batch_size=batch_size * 4, num_gpus=gpus,
            batch_format="numpy")
        given = dict(readable)
        by_path: dict[str, list[int]] = {}
        for index, path in readable:
            by_path.setdefault(_key(path), []).append(index)
        for batch in predicted.iter_batches(batch_size=None, batch_format="numpy"):
            for position in range(len(batch["path"])):
                row = row_from_columns(batch, position)
                indices = by_path.get(_key("/" + str(row["path"]).lstrip("/"))) or by_path.get(_key(row["path"]))
                if not indices:
                    raise RuntimeError(f"Ray returned a row for {row['path']!r}, which was not asked for")
                index = indices.pop(0)
                rows[index] = {**row, "path": given[index]}  # as the user wrote it, like a local run
    for index in range(len(items)):
        yield rows[index]
