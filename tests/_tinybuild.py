"""A small real build directory (random tiny open_clip CLIP, 4 tasks) made by `mass-export build` from real files."""

from __future__ import annotations

import json
from pathlib import Path

CLASSES = {"Alpha": 3, "Beta": 5, "Gamma": 4, "Delta": 2}
CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def make_tiny_build(output: Path, num_tasks: int = 4) -> Path:
    """Checkpoint files of a random tiny CLIP and ``num_tasks`` fine-tunes, built by the real `build` pipeline
    (once: an existing build at ``output`` is reused)."""
    output = Path(output)
    if (output / "manifest.json").is_file():
        return output
    import torch

    from layouts import tiny_model, write_head, write_safetensors
    from mass_export.pipeline.build import BuildConfig, build

    tree = output.with_name(output.name + "-checkpoints")
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "tiny.json").write_text(json.dumps(CONFIG))
    model = tiny_model(seed=0, config=CONFIG)
    write_safetensors(tree / "zeroshot.safetensors", model.state_dict())
    pre = {k: v.detach() for k, v in model.visual.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    for task, count in list(CLASSES.items())[:num_tasks]:
        # Task updates large enough that the router is confident on some images and splits on others.
        state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in pre.items()}
        write_safetensors(tree / task / "finetuned.safetensors", state, prefix="visual.")
        head = torch.nn.functional.normalize(torch.randn(count, CONFIG["embed_dim"], generator=generator), dim=-1)
        write_head(tree / f"head_{task}.safetensors", head * 100)
    build(BuildConfig(model=str(tree / "tiny.json"), checkpoints=tree, tasks=list(CLASSES)[:num_tasks],
                      routing_layer=2, output=output, progress=False))
    return output


def sample_images(folder: Path) -> list[Path]:
    """Real photos from scikit-image saved as files (colour, greyscale, non-square), plus two odd sizes."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    from mass_export.runtime.images import SAMPLE_PHOTOS

    for name in SAMPLE_PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    rng = np.random.default_rng(0)
    for name, shape in (("tiny.png", (32, 32, 3)), ("thin.png", (3, 500, 3))):
        if not (folder / name).exists():
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths
