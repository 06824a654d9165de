"""The one-command demo: zoo -> `mass-export build` -> real test images as PNG -> the runtime -> what to look at."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np


# The rooms whose code decides what a build holds: a cached build made by other code is never served.
BUILD_CODE = ("core", "nn", "merging", "export", "pipeline")


def build_code_fingerprint() -> str:
    """sha256 (16 hex) of the source files of the rooms that write a build."""
    import hashlib

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for room in BUILD_CODE:
        for path in sorted((package / room).rglob("*.py")):
            digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def default_build(cache_dir: Path | None = None, recipe=None, progress: bool = True, force: bool = False) -> Path:
    """The demo zoo's build directory, built once per zoo and per version of the build code (both cached)."""
    from mass_export.pipeline.build import BuildConfig, build
    from mass_export.core.errors import BuildIntegrityError
    from mass_export.core.manifest import read_manifest
    from mass_export.zoo import build_zoo

    zoo = build_zoo(recipe, cache_dir=cache_dir, progress=progress)
    output = zoo.root.parent / f"{zoo.root.name}-build-{build_code_fingerprint()}"
    if output.exists() and not force:
        try:
            read_manifest(output)
            return output
        except BuildIntegrityError:
            force = True  # a damaged cached build is rebuilt, never served
    images = validation_images(zoo.tasks, output.parent / f"{zoo.root.name}-validation", per_task=2)
    build(BuildConfig(model=str(zoo.model_config), pretrained=str(zoo.pretrained), checkpoints=zoo.root,
                      output=output, force=force, validation_images=images, progress=progress,
                      routing_layer=zoo.info.get("routing_layer")))  # the recipe's measured best block
    return output


def write_test_images(tasks, out: Path, per_task: int, seed: int = 0) -> list[tuple[Path, str, str]]:
    """PNGs of held-out test images, ``out/<task>/<class>/<n>.png``; returns (path, task, class)."""
    from PIL import Image

    from mass_export.zoo.datasets import class_names, load_split

    rng = np.random.default_rng(seed)
    written = []
    for task in tasks:
        images, labels = load_split(task, "test")
        names = class_names(task)
        for n, index in enumerate(rng.choice(len(images), size=min(per_task, len(images)), replace=False)):
            folder = out / task / names[labels[index]].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{n:04d}.png"
            Image.fromarray(images[index]).save(path)
            written.append((path, task, names[labels[index]]))
    return written


def validation_images(tasks, out: Path, per_task: int = 2) -> list[Path]:
    if not out.exists():
        write_test_images(tasks, out, per_task, seed=1)
    return sorted(out.rglob("*.png"))


def run_demo(out: Path = Path("demo"), per_task: int = 50, batch_size: int = 64, cache_dir: Path | None = None,
             progress: bool = True, echo=print) -> dict:
    from mass_export.runtime import MassRuntime

    started = time.perf_counter()
    build_dir = default_build(cache_dir, progress=progress)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    images_dir = Path(out) / "images"
    truth = write_test_images(manifest["tasks"], images_dir, per_task)
    runtime = MassRuntime.load(build_dir)
    predictions = runtime.classify([path for path, _, _ in truth], batch_size=batch_size)
    out_file = Path(out) / "predictions.jsonl"
    with open(out_file, "w") as handle:
        for prediction in predictions:
            handle.write(json.dumps(prediction.to_row()) + "\n")
    per_task_hits, per_task_routed, totals = Counter(), Counter(), Counter()
    for (path, task, cls), p in zip(truth, predictions):
        totals[task] += 1
        per_task_routed[task] += p.task == task
        per_task_hits[task] += (p.task, p.class_name) == (task, cls)
    report = {
        "build": str(build_dir), "images": str(images_dir), "predictions": str(out_file),
        "validation": manifest.get("validation", {}).get("max_abs_diff"),
        "storage_factor_of_tower": manifest["storage"]["factor_of_tower"]["total"],
        "per_task": {t: {"images": totals[t], "accuracy": per_task_hits[t] / totals[t],
                         "routed_to_own_task": per_task_routed[t] / totals[t]} for t in totals},
        "accuracy": sum(per_task_hits.values()) / max(1, sum(totals.values())),
        "seconds": round(time.perf_counter() - started, 1),
    }
    echo(f"\nbuild      {build_dir} ({report['storage_factor_of_tower']:.2f}x the fp32 tower on disk)")
    if report["validation"]:
        echo("validation ONNX vs torch max |diff|: " + ", ".join(f"{k} {v:.1e}" for k, v in report["validation"].items()))
    echo(f"images     {images_dir} ({sum(totals.values())} real held-out test images as PNG)")
    echo(f"output     {out_file}\n")
    echo(f"{'task':<14}{'images':>7}{'accuracy':>10}{'routed to own task':>20}")
    for task, row in report["per_task"].items():
        echo(f"{task:<14}{row['images']:>7}{100 * row['accuracy']:>9.1f}%{100 * row['routed_to_own_task']:>19.1f}%")
    echo(f"{'all':<14}{sum(totals.values()):>7}{100 * report['accuracy']:>9.1f}%\n")
    echo("a few predictions (image -> task / class, score, task set):")
    for (path, _, _), p in list(zip(truth, predictions))[::max(1, len(truth) // 6)][:6]:
        echo(f"  {path}  ->  {p.task} / {p.class_name}  {p.score:.1f}  {list(p.task_set)}")
    echo(f"\nnext: mass-export run {images_dir} --build {build_dir}  |  mass-export eval  |  mass-export bench")
    return report


def zoo_root(build_dir: Path) -> Path:
    """The zoo checkpoints a demo build was made from (they sit beside it)."""
    build_dir = Path(build_dir)
    return build_dir.with_name(build_dir.name.rsplit("-build", 1)[0])
