"""A small real build directory (random tiny open_clip tower, 4 tasks), written with the build room's own
merge, export and manifest code. Used by the runtime tests until (and beside) the lead's ``zoo_build``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8,
                                          "head_width": 32}}
CLASSES = {"Alpha": ["a0", "a1", "a2"], "Beta": ["b0", "b1", "b2", "b3", "b4"], "Gamma": ["g0", "g1", "g2", "g3"],
           "Delta": ["d0", "d1"]}
PREPROCESS = {"image_size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}


def make_tiny_build(output: Path, num_tasks: int = 4) -> Path:
    """Write the build (the first ``num_tasks`` tasks) at ``output`` unless it is there already."""
    output = Path(output)
    if (output / "manifest.json").is_file():
        return output
    import torch
    from open_clip.model import _build_vision_tower
    from safetensors.torch import save_file

    from mass_export.build import merge
    from mass_export.build.reference import Method
    from mass_export.export.graphs import export_all
    from mass_export.manifest import staged_directory, write_manifest

    classes = dict(list(CLASSES.items())[:num_tasks])
    torch.manual_seed(0)
    visual = _build_vision_tower(CONFIG["embed_dim"], CONFIG["vision_cfg"], quick_gelu=False).eval()
    pre = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    # Task updates large enough that the router is confident on some images and splits on others.
    finetuned = [{k: v + 0.05 * torch.randn_like(v) for k, v in pre.items()} for _ in classes]
    factors = merge.task_factors([merge.task_delta(pre, f) for f in finetuned])
    bases = merge.base_tasks(factors)
    heads = [torch.nn.functional.normalize(torch.randn(len(c), CONFIG["embed_dim"]), dim=-1) * 100
             for c in classes.values()]
    method = Method(routing_layer=2)
    with staged_directory(output, force=True) as stage:
        save_file({k: v.contiguous() for k, v in pre.items()}, str(stage / "pretrained.safetensors"))
        save_file(merge.factors_to_flat(factors, bases), str(stage / "factors.safetensors"))
        save_file({k: v.contiguous() for k, v in factors.whole.items()}, str(stage / "deltas.safetensors"))
        save_file({"heads": torch.cat(heads).contiguous()}, str(stage / "heads.safetensors"))
        (stage / "classes.json").write_text(json.dumps(classes))
        graphs = export_all(visual, pre, factors.V["transformer.resblocks.2.mlp.c_fc.weight"], torch.cat(heads),
                            method, stage)
        offsets, offset = {}, 0
        for task, names in classes.items():
            offsets[task], offset = {"offset": offset, "classes": len(names)}, offset + len(names)
        write_manifest(stage, {
            "model": {"name": "tiny", "pretrained": "random", "quick_gelu": False, "config": CONFIG, **PREPROCESS},
            "tasks": list(classes), "method": asdict(method), "heads": offsets, "graphs": graphs, "opset": 18,
            "precision": "fp32"})
    return output


def sample_images(folder: Path) -> list[Path]:
    """Real photos from scikit-image saved as files (colour, greyscale, non-square), plus two odd sizes."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "brick", "grass"):
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
