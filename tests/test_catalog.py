"""models/: every benchmark task has class names and templates, with the dataset's known class count."""

import pytest

from mass_export.core import catalog

# The datasets' class counts (their papers / torchvision): the lists in models/datasets/ were written from memory,
# so the count is what is checked for the long ones.
KNOWN_COUNTS = {"SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43, "MNIST": 10,
                "DTD": 47, "Flowers102": 102, "PCAM": 2, "FER2013": 7, "OxfordIIITPet": 37, "STL10": 10,
                "CIFAR100": 100, "CIFAR10": 10, "Food101": 101, "FashionMNIST": 10, "EMNIST": 10, "KMNIST": 10,
                "RenderedSST2": 2}


@pytest.mark.parametrize("count", [8, 14, 20])
def test_every_benchmark_task_has_names_and_templates(count):
    for task in catalog.benchmark_tasks(count):
        info = catalog.dataset_info(task)
        assert info is not None, task
        assert len(info["classes"]) == KNOWN_COUNTS[task] == len(set(info["classes"])), task
        assert info["templates"] and all("{}" in t for t in info["templates"]), task
        assert catalog.dataset_info(task + "Val") == info  # the authors' <Task>Val folders


def test_routing_layers_follow_the_authors_later_code():
    assert catalog.routing_layer("ViT-B-32", 12) == 10 and catalog.routing_layer("ViT-B-32-quickgelu", 12) == 10
    assert catalog.routing_layer("ViT-B-16", 12) == 9 and catalog.routing_layer("ViT-L-14", 24) == 20
    assert catalog.routing_layer("unknown", 4) == 3
