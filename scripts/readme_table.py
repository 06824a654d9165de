"""Rewrite the README's demo-zoo table from `mass-export eval --json` reports.

    mass-export eval --json > /tmp/eval-seed0.json                     # the default zoo (its recipe's seed)
    python scripts/readme_table.py --eval /tmp/eval-seed0.json --seed-evals seeds/*.json
    python scripts/readme_table.py --run-seeds 0 1 2 --save-dir benchmarks/results/zoo-seeds   # evaluates them

The block between ``<!-- zoo-table:begin -->`` and ``<!-- zoo-table:end -->`` in README.md is replaced by: the
per-task table of the first report (the default zoo), its fingerprint (recipe hash and weights hash, from the zoo's
zoo.json), the spread over every report given (one per seed: a stand-in for machine-to-machine variation), and
the line that another machine trains slightly different weights. ``--run-seeds`` builds and evaluates the
default recipe with each seed through the same `evaluate()` that `mass-export eval --json` prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"
ROWS = (  # (method key, label)
    ("zero_shot", "zero-shot"),
    ("finetuned", "fine-tuned"),
    ("task_arithmetic", "task arithmetic (lambda {lam})"),
    ("tsv_m", "TSV-M"),
    ("tsv_m_no_redundancy", "TSV-M, no-redundancy base"),
    ("tsv_c_task_known", "TSV-C, task known"),
    ("mass", "**MASS** (task and class both right)"),
    ("mass_authors_metric", "MASS, authors' padded-logits metric"),
    ("mass_onnx_runtime", "MASS through the exported ONNX runtime"),
)
STATIC = ("task_arithmetic", "tsv_m", "tsv_m_no_redundancy")


def margins(report: dict) -> dict:
    """MASS's mean and normalised accuracy and its margins (points) over zero-shot and the best static merge."""
    methods = report["methods"]
    mass = methods["mass"]["mean"]
    best_static = max(STATIC, key=lambda k: methods[k]["mean"])
    return {"mass": 100 * mass, "mass_normalised": 100 * methods["mass"]["normalised"],
            "zero_shot": 100 * methods["zero_shot"]["mean"], "finetuned": 100 * methods["finetuned"]["mean"],
            "best_static": 100 * methods[best_static]["mean"], "best_static_name": best_static,
            "over_zero_shot": 100 * (mass - methods["zero_shot"]["mean"]),
            "over_best_static": 100 * (mass - methods[best_static]["mean"]),
            "router_top1": 100 * report["router"]["top1"]["mean"],
            "agreement": 100 * report["runtime"]["agreement_with_reference"] if report.get("runtime") else None}


def zoo_info(report: dict) -> dict:
    from mass_export.zoo.demo import zoo_root

    path = zoo_root(Path(report["build"])) / "zoo.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def per_task_table(report: dict) -> list[str]:
    tasks = report["tasks"]
    lines = ["| method | " + " | ".join(tasks) + " | mean | normalised |", "|---" * (len(tasks) + 3) + "|"]
    for key, label in ROWS:
        row = report["methods"].get(key)
        if row is None:
            continue
        label = label.format(lam=report.get("task_arithmetic_lambda"))
        cells = [f"{100 * row['per_task'][t]:.1f}" for t in tasks]
        mean, norm = f"{100 * row['mean']:.1f}", f"{100 * row['normalised']:.1f}%" if "normalised" in row else ""
        if key == "mass":
            mean, norm = f"**{mean}**", f"**{norm}**"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} | {norm} |")
    router = report["router"]
    lines.append("| router task identification (top-1) | "
                 + " | ".join(f"{100 * router['top1']['per_task'][t]:.1f}" for t in tasks)
                 + f" | {100 * router['top1']['mean']:.1f} | true task in set {100 * router['in_set']['mean']:.1f}% |")
    return lines


def spread_table(reports: list[dict], seeds: list) -> list[str]:
    rows = [margins(r) for r in reports]
    fields = (("zero_shot", "zero-shot mean"), ("finetuned", "fine-tuned mean"),
              ("best_static", "best static merge mean"), ("mass", "MASS mean"),
              ("mass_normalised", "MASS normalised (%)"), ("over_zero_shot", "MASS minus zero-shot (points)"),
              ("over_best_static", "MASS minus best static merge (points)"), ("router_top1", "router top-1"),
              ("agreement", "ONNX runtime agreement (%)"))
    lines = ["| | " + " | ".join(f"seed {s}" for s in seeds) + " | min | max |", "|---" * (len(seeds) + 3) + "|"]
    for key, label in fields:
        values = [row[key] for row in rows]
        if any(v is None for v in values):
            continue
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in values)
                     + f" | {min(values):.1f} | {max(values):.1f} |")
    return lines


def render(reports: list[dict]) -> str:
    first = reports[0]
    info = zoo_info(first)
    # A saved report keeps its seed (evaluate_seed); the zoo's own zoo.json tells it while that zoo is cached.
    seeds = [r.get("seed", zoo_info(r).get("seed", "?")) for r in reports]
    images = sum(first["images"].values())
    lines = [BEGIN, "<!-- generated by scripts/readme_table.py from `mass-export eval --json`; do not edit -->", "",
             f"`mass-export eval` on the held-out test splits ({images:,} images), default recipe, seed "
             f"{info.get('seed', '?')}, routing block {first['routing_layer']}:", ""]
    lines += per_task_table(first)
    lines += ["", f"Zoo fingerprint: recipe `{info.get('recipe_hash', '?')[:16]}`, weights "
              f"`{info.get('weights_hash', '?')[:16]}` (torch {info.get('versions', {}).get('torch', '?')}; built with "
              f"{info.get('threads', '?')} torch thread{'' if info.get('threads') == 1 else 's'} in "
              f"{info.get('cpu_time_s', float('nan')):.0f} CPU seconds, "
              f"{info.get('wall_time_s', float('nan')):.0f} s wall where it was built)."]
    if len(reports) > 1:
        lines += ["", f"The same recipe with {len(reports)} seeds (a stand-in for machine-to-machine variation):", ""]
        lines += spread_table(reports, seeds)
    lines += ["", "Another machine (other CPU, other float rounding) trains slightly different weights, so its "
              "numbers differ from these within about the seed spread above.", END]
    return "\n".join(lines)


def rewrite_readme(block: str, readme: Path = README) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block to rewrite")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + block + tail)


def evaluate_seed(seed: int, limit: int | None = None) -> dict:
    """The default recipe with ``seed``: zoo and MASS build (both cached), scored as `mass-export eval --json`."""
    from mass_export.evaluation.accuracy import evaluate
    from mass_export.zoo.demo import default_build, zoo_root
    from mass_export.zoo.recipe import load_recipe

    recipe = load_recipe(None)
    recipe["seed"] = seed
    build = default_build(recipe=recipe, progress=False)
    return {**evaluate(build, zoo_root(build), limit=limit, progress=False), "seed": seed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval", type=Path, help="`mass-export eval --json` output of the default zoo")
    parser.add_argument("--seed-evals", type=Path, nargs="*", default=[], help="reports of other seeds")
    parser.add_argument("--run-seeds", type=int, nargs="*", default=[], help="build and evaluate these seeds")
    parser.add_argument("--save-dir", type=Path, default=None, help="write the --run-seeds reports here")
    parser.add_argument("--print", dest="only_print", action="store_true", help="print, do not rewrite README.md")
    args = parser.parse_args(argv)
    reports = [json.loads(path.read_text()) for path in ([args.eval] if args.eval else []) + args.seed_evals]
    for seed in args.run_seeds:
        report = evaluate_seed(seed)
        if args.save_dir:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            (args.save_dir / f"eval-seed{seed}.json").write_text(json.dumps(report, indent=2) + "\n")
        reports.append(report)
    if not reports:
        parser.error("give --eval FILE and/or --run-seeds")
    block = render(reports)
    if args.only_print:
        print(block)
    else:
        rewrite_readme(block)
        print(f"rewrote the demo-zoo table in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
