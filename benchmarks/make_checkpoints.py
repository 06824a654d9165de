"""Write a pretrained open_clip model (random weights, real size) and T synthetic fine-tunes as a checkpoint tree.

    python benchmarks/make_checkpoints.py --model ViT-B-16 --tasks 8 --out /tmp/ckpt
Speed and storage do not depend on weight values, so random weights measure what real ones would.
"""

import argparse
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from mass_export.core.catalog import benchmark_tasks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=0.01)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "zeroshot.safetensors"))
    visual = {k: v.detach() for k, v in model.visual.state_dict().items()}
    embed = model.visual.proj.shape[1]
    for index, task in enumerate(benchmark_tasks(args.tasks)):
        g = torch.Generator().manual_seed(index + 1)
        state = {f"visual.{k}": (v + args.scale * v.abs().mean() * torch.randn(v.shape, generator=g)).contiguous()
                 for k, v in visual.items()}
        (args.out / task).mkdir(exist_ok=True)
        save_file(state, str(args.out / task / "finetuned.safetensors"))
        head = torch.nn.functional.normalize(torch.randn(10 + index, embed, generator=g), dim=-1) * 100
        save_file({"weight": head.contiguous()}, str(args.out / f"head_{task}.safetensors"))
        print("wrote", task)


if __name__ == "__main__":
    main()
