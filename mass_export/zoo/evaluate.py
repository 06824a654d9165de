"""Measure a zoo with the build room's MASS functions: zero-shot, fine-tuned, static merges, TSV-C, MASS, router.

Uses ``mass_export.build.merge`` (deltas, per-task truncated SVD, TSV-M, no-redundancy) and the build room's
torch reference ``build.reference.MassReference`` (router, task-set selection, second pass, head choice), so the
numbers are those of the method as the build implements it, for every routing block. Only task arithmetic (a
static baseline that is not part of MASS) is written here. For a finished build directory and the exported
graphs use ``mass-export eval`` (``mass_export.evaluate``); this module measures checkpoints while choosing a
recipe.

All accuracies are on the held-out test splits. MASS counts a prediction correct only when both the task and the
class are right ("strict"); ``authors`` scores the winning head's argmax against the label, as the authors'
evaluation does (a wrong head can score by index coincidence).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..build import merge, reference, tower
from .train import create_model, task_data, to_tensor


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def load_zoo(root: Path):
    """(info, visual module, pretrained visual state, fine-tuned visual states, heads) of a built zoo."""
    root = Path(root)
    info = json.loads((root / "zoo.json").read_text())
    config = json.loads((root / "tiny-clip.json").read_text())
    model = create_model(config)
    model.load_state_dict(_load(root / "zeroshot.safetensors"))
    visual = model.visual.eval()
    pre = {k: v.clone() for k, v in visual.state_dict().items()}
    fts = [{k[len("visual."):]: v for k, v in _load(root / t / "finetuned.safetensors").items()} for t in info["tasks"]]
    heads = [_load(root / f"head_{t}.safetensors")["weight"] for t in info["tasks"]]
    return info, visual, pre, fts, heads


class _Runner:
    def __init__(self, visual):
        self.full = tower.FullTower(visual).eval()

    @torch.no_grad()
    def features(self, weights, images, batch=1024):
        out = [tower.run_with(self.full, weights, to_tensor(images[i : i + batch])) for i in range(0, len(images), batch)]
        return torch.cat(out)


def _acc(features, head, labels) -> float:
    pred = (F.normalize(features, dim=-1) @ head.T).argmax(1).numpy()
    return 100.0 * float((pred == labels).mean())


def task_arithmetic(pre, deltas, lam):
    return {k: (v + lam * sum(d[k] for d in deltas)) if k in deltas[0] else v for k, v in pre.items()}


def evaluate_zoo(root, layers=None, base: str = "no-redundancy", eta: float = 0.2, top_k: int = 3,
                 ta_grid=(0.2, 0.3, 0.4, 0.5, 0.7, 1.0), progress=False) -> dict:
    info, visual, pre, fts, heads = load_zoo(root)
    tasks = info["tasks"]
    T = len(tasks)
    recipe = info["recipe"]
    tests = [task_data(recipe, t, "test") for t in tasks]
    run = _Runner(visual)
    deltas = [merge.task_delta(pre, ft) for ft in fts]
    factors = merge.task_factors(deltas)
    n_layers = len(visual.transformer.resblocks)
    layers = list(range(n_layers)) if layers is None else list(layers)

    def per_task(weights):
        return [_acc(run.features(weights, x), heads[i], y) for i, (x, y) in enumerate(tests)]

    out = {"tasks": tasks, "per_task": {}, "summary": {}}
    rows = {}
    rows["zero_shot"] = per_task(pre)
    rows["finetuned"] = [_acc(run.features(fts[i], x), heads[i], y) for i, (x, y) in enumerate(tests)]
    ta = {lam: per_task(task_arithmetic(pre, deltas, lam)) for lam in ta_grid}
    best_lam = max(ta, key=lambda lam: np.mean(ta[lam]))
    rows["task_arithmetic"] = ta[best_lam]
    out["task_arithmetic_lambda"] = best_lam
    out["task_arithmetic_grid"] = {str(k): float(np.mean(v)) for k, v in ta.items()}
    bases = {name: merge.base_tasks(factors, name) for name in ("tsv", "no-redundancy")}
    theta_mt = {name: merge.merged_tower(pre, factors, range(T), per_key_tasks=b) for name, b in bases.items()}
    rows["tsv_m"] = per_task(theta_mt["tsv"])
    rows["tsv_m_no_redundancy"] = per_task(theta_mt["no-redundancy"])
    out["no_redundancy_dropped"] = {k: [i for i in range(T) if i not in v] for k, v in bases["no-redundancy"].items()
                                    if len(v) < T}
    set_weights = {}

    def weights_for(task_set):
        if task_set not in set_weights:
            set_weights[task_set] = merge.merged_tower(pre, factors, task_set)
        return set_weights[task_set]

    rows["tsv_c_task_known"] = [_acc(run.features(weights_for((i,)), x), heads[i], y) for i, (x, y) in enumerate(tests)]

    # MASS through the build room's torch reference (the oracle): route on theta_MT with early exit, second pass
    # on theta(S), best head among S. Every routing block is measured.
    images = to_tensor(np.concatenate([x for x, _ in tests]))
    labels = np.concatenate([y for _, y in tests])
    true_task = np.concatenate([np.full(len(y), i) for i, (_, y) in enumerate(tests)])
    mass = {}
    for layer in layers:
        method = reference.Method(routing_layer=layer, base=base, eta=eta, top_k=top_k)
        oracle = reference.MassReference(visual, pre, factors, bases[base], heads, method, cache_size=16)
        predictions = [p for i in range(0, len(images), 1024) for p in oracle.predict(images[i : i + 1024])]
        pred_task = np.asarray([p.task_index for p in predictions])
        pred_class = np.asarray([p.class_index for p in predictions])
        argmax_task = np.asarray([int(p.probs.argmax()) for p in predictions])
        sets = [p.task_set for p in predictions]
        strict = (pred_task == true_task) & (pred_class == labels)
        authors = pred_class == labels
        mass[layer] = {
            "per_task": [100.0 * float(strict[true_task == i].mean()) for i in range(T)],
            "per_task_authors": [100.0 * float(authors[true_task == i].mean()) for i in range(T)],
            "router_top1": [100.0 * float((argmax_task == true_task)[true_task == i].mean()) for i in range(T)],
            "router_in_set": [100.0 * float(np.mean([i in sets[j] for j in np.flatnonzero(true_task == i)]))
                              for i in range(T)],
            "mean_set_size": float(np.mean([len(s) for s in sets])),
            "confusion": np.bincount(true_task * T + argmax_task, minlength=T * T).reshape(T, T).tolist(),
        }
    out["mass_by_layer"] = {str(k): v for k, v in mass.items()}
    ft = np.asarray(rows["finetuned"])
    for name, values in rows.items():
        values = np.asarray(values)
        out["per_task"][name] = values.tolist()
        out["summary"][name] = {"mean": float(values.mean()), "normalised": float((values / ft).mean() * 100)}
    for layer, m in mass.items():
        values = np.asarray(m["per_task"])
        out["summary"][f"mass_l{layer}"] = {"mean": float(values.mean()), "normalised": float((values / ft).mean() * 100),
                                            "router_top1": float(np.mean(m["router_top1"])),
                                            "router_in_set": float(np.mean(m["router_in_set"])),
                                            "authors_mean": float(np.mean(m["per_task_authors"]))}
    return out


def format_table(result: dict) -> str:
    tasks = result["tasks"]
    ft = np.asarray(result["per_task"]["finetuned"])
    lines = ["| method | " + " | ".join(tasks) + " | mean | normalised |", "|---" * (len(tasks) + 3) + "|"]
    for name, values in result["per_task"].items():
        s = result["summary"][name]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {s['mean']:.1f} | {s['normalised']:.1f} |")
    for layer, m in result["mass_by_layer"].items():
        s = result["summary"][f"mass_l{layer}"]
        lines.append(f"| MASS (block {layer}) | " + " | ".join(f"{v:.1f}" for v in m["per_task"])
                     + f" | {s['mean']:.1f} | {s['normalised']:.1f} |")
        lines.append(f"| router top-1 (block {layer}) | " + " | ".join(f"{v:.1f}" for v in m["router_top1"])
                     + f" | {s['router_top1']:.1f} | in set {s['router_in_set']:.1f}, mean set {m['mean_set_size']:.2f} |")
    del ft
    return "\n".join(lines)


if __name__ == "__main__":  # python -m mass_export.zoo.evaluate ROOT
    import sys

    torch.set_num_threads(1)
    res = evaluate_zoo(sys.argv[1])
    print(format_table(res))
    print(json.dumps({k: v for k, v in res.items() if k not in ("per_task",)}, indent=None)[:4000])
