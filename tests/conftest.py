"""Session fixtures shared across test files."""

import pytest

from _tinybuild import make_tiny_build, sample_images


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """A small real build (random tiny open_clip CLIP, 4 tasks) made by the real pipeline, shared by the runtime
    tests."""
    return make_tiny_build(tmp_path_factory.getbasetemp() / "runtime_tiny_build")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Real photos (scikit-image samples) as files, plus two odd sizes."""
    return sample_images(tmp_path_factory.getbasetemp() / "runtime_images")


@pytest.fixture(scope="session")
def zoo_build(tmp_path_factory):
    """The demo zoo's build directory (zoo and build cached under $MASS_EXPORT_CACHE or ~/.cache/mass-export)
    and real held-out test images written as PNG (<task>/<class>/<n>.png)."""
    from mass_export.core.manifest import read_manifest
    from mass_export.zoo.demo import default_build, write_test_images

    build = default_build(progress=False)
    tasks = read_manifest(build)["tasks"]
    images = tmp_path_factory.mktemp("zoo_images")
    written = write_test_images(tasks, images, per_task=6, seed=3)
    return {"build": build, "images": [path for path, _, _ in written], "truth": written}
