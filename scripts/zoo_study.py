"""Screen demo-zoo recipes quickly: build a zoo (cached, base shared between recipes that differ only in their
fine-tunes) and score it in-process, without exporting ONNX graphs.

    OMP_NUM_THREADS=1 python scripts/zoo_study.py '{"tasks": [...], "finetune": {"lr": 1e-3}}' --seeds 0 1 2

The argument is a recipe override (JSON) merged onto models/zoo/default.json. Scores, on the first ``--limit``
images of each task's test split (all with ``--limit 0``): zero-shot, fine-tuned, task arithmetic (lambda 0.3),
TSV-M, TSV-M no-redundancy, TSV-C task known and MASS (strict: task and class right) at every routing block,
with the router's top-1 task identification. Same building blocks as `mass-export eval` (merging.merge,
merging.reference.MassReference); `mass-export eval` on a real build is the number of record
(docs/zoo-recipes.md). Prints one JSON line per seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from mass_export.merging import merge
from mass_export.merging.reference import MassReference, Method
from mass_export.nn.heads import head_logits
from mass_export.nn.tower import FullTower, run_with
from mass_export.zoo.datasets import load_split
from mass_export.zoo.recipe import _merge, load_recipe
from mass_export.zoo.train import build_zoo, create_model, to_tensor


def visual_state(path: Path) -> dict[str, torch.Tensor]:
    return {k[len("visual."):]: v for k, v in load_file(str(path)).items() if k.startswith("visual.")}


@torch.no_grad()
def accuracy(full, weights, pixels, labels, head, batch=500) -> float:
    predictions = torch.cat([head_logits(run_with(full, weights, pixels[i:i + batch]), head).argmax(1)
                             for i in range(0, len(pixels), batch)])
    return float((predictions.numpy() == labels).mean())


def mass_strict(reference, tests, tasks):
    strict, top1 = {}, {}
    for index, (task, (pixels, labels)) in enumerate(zip(tasks, tests)):
        hits, routed = [], []
        for start in range(0, len(pixels), 500):
            for p, y in zip(reference.predict(pixels[start:start + 500]), labels[start:start + 500]):
                hits.append(p.task_index == index and p.class_index == y)
                routed.append(int(p.probs.argmax()) == index)
        strict[task], top1[task] = float(np.mean(hits)), float(np.mean(routed))
    return strict, top1


def score(zoo, limit: int) -> dict:
    tasks = zoo.tasks
    config = json.loads(zoo.model_config.read_text())
    visual = create_model(config).visual.eval()
    pre = visual_state(zoo.pretrained)
    visual.load_state_dict(pre)
    full = FullTower(visual).eval()
    heads = [load_file(str(zoo.head(t)))["weight"] for t in tasks]
    tests = []
    for task in tasks:
        images, labels = load_split(task, "test", config["vision_cfg"]["image_size"])
        if limit:
            keep = np.random.default_rng(7).permutation(len(labels))[:limit]
            images, labels = images[keep], labels[keep]
        tests.append((to_tensor(images), labels))
    finetuned = [visual_state(zoo.finetuned(t)) for t in tasks]
    deltas = [merge.task_delta(pre, state) for state in finetuned]
    factors = merge.task_factors(deltas)
    every = list(range(len(tasks)))

    def static(weights):
        return {t: accuracy(full, weights, x, y, h) for t, (x, y), h in zip(tasks, tests, heads)}

    methods = {"zero_shot": static(pre)}
    methods["finetuned"] = {t: accuracy(full, w, x, y, h) for t, w, (x, y), h in zip(tasks, finetuned, tests, heads)}
    methods["task_arithmetic"] = static({k: v + 0.3 * sum(d[k] for d in deltas) if k in deltas[0] else v
                                         for k, v in pre.items()})
    methods["tsv_m"] = static(merge.merged_tower(pre, factors, every))
    bases = merge.base_tasks(factors, "no-redundancy")
    methods["tsv_m_no_redundancy"] = static(merge.merged_tower(pre, factors, every, 1.0, bases))
    methods["tsv_c_task_known"] = {t: accuracy(full, merge.merged_tower(pre, factors, [i]), x, y, h)
                                   for i, (t, (x, y), h) in enumerate(zip(tasks, tests, heads))}
    router = {}
    for layer in range(len(visual.transformer.resblocks)):
        reference = MassReference(visual, pre, factors, bases, heads, Method(routing_layer=layer), 2 ** len(tasks))
        methods[f"mass_block{layer}"], top1 = mass_strict(reference, tests, tasks)
        router[layer] = float(np.mean(list(top1.values())))
    ft = methods["finetuned"]
    rows = {name: {"mean": 100 * float(np.mean(list(v.values()))),
                   "normalised": 100 * float(np.mean([v[t] / ft[t] for t in tasks])),
                   "per_task": {t: round(100 * v[t], 1) for t in tasks}} for name, v in methods.items()}
    return {"rows": rows, "router_top1": router}


def summary(result: dict, routing_layer: int) -> str:
    rows = result["rows"]
    mass = rows[f"mass_block{routing_layer}"]
    static = max(rows[k]["mean"] for k in ("task_arithmetic", "tsv_m", "tsv_m_no_redundancy"))
    return (f"zs {rows['zero_shot']['mean']:.1f} ft {rows['finetuned']['mean']:.1f} "
            f"ta {rows['task_arithmetic']['mean']:.1f} tsvm {rows['tsv_m']['mean']:.1f} "
            f"nored {rows['tsv_m_no_redundancy']['mean']:.1f} known {rows['tsv_c_task_known']['normalised']:.1f}% "
            f"MASS(b{routing_layer}) {mass['mean']:.1f} ({mass['normalised']:.1f}%) "
            f"margin zs {mass['mean'] - rows['zero_shot']['mean']:+.1f} static {mass['mean'] - static:+.1f} | "
            + " ".join(f"b{k}:{rows[f'mass_block{k}']['mean']:.1f}/{100 * v:.0f}"
                       for k, v in result["router_top1"].items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("override", nargs="?", default="{}", help="recipe override, JSON")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--limit", type=int, default=500, help="test images per task (0 = all)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/zoo-study"))
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for seed in args.seeds:
        recipe = _merge(load_recipe(None), json.loads(args.override))
        recipe["seed"] = seed
        recipe["name"] = "study"
        started = time.perf_counter()
        zoo = build_zoo(copy.deepcopy(recipe), cache_dir=args.cache, progress=False, share_base=True)
        built = time.perf_counter() - started
        result = score(zoo, args.limit)
        result.update(override=json.loads(args.override), seed=seed, zoo=str(zoo.root),
                      wall_time_s=zoo.info["wall_time_s"], pretrain_time_s=zoo.info["pretrain_time_s"],
                      this_call_s=round(built, 1))
        print(f"seed {seed} build {zoo.info['wall_time_s']:.0f}s (pretrain {zoo.info['pretrain_time_s']:.0f}s): "
              + summary(result, recipe.get("routing_layer", 0)), flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
