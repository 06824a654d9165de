"""`mass-export run` on the same images shuffled and sorted by task set, alternating, in one session.

    python benchmarks/run_order.py --per-task 2000 --repeats 3 > results/run_order_demo_zoo.json

The demo zoo's build and every held-out test image (up to --per-task per task), shuffled with a seeded draw;
"sorted" is the same list ordered by the task set a first `run` chose for each image (so consecutive images share
a set, the best case for any cache). Each repeat runs shuffled then sorted with the default --window; reported:
images/s per run (the run's own classify time, load excluded), cache and second-pass counters, and the ratio
shuffled / sorted of the median images/s. Rows are compared too (same task, class, task set per path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run(listing: Path, build: Path, out: Path, threads: int, batch_size: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "mass_export_cli", "run", f"@{listing}", "--build", str(build),
                           "--threads", str(threads), "--batch-size", str(batch_size), "-o", str(out), "--force",
                           "--json", "--no-progress"], capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    return {"images": summary["images"], "images_per_s": summary["images_per_s"], "seconds": summary["seconds"],
            "load_seconds": summary["load_seconds"], "cache": summary["cache"],
            "gram_blocks": summary.get("gram_blocks"), "second_pass": summary["second_pass"]}


def rows(path: Path) -> dict:
    return {r["path"]: (r["task"], r["class"], tuple(r["task_set"]))
            for r in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from mass_export.core.manifest import read_manifest
    from mass_export.zoo.demo import default_build, write_test_images

    build = default_build(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        written = write_test_images(read_manifest(build)["tasks"], tmp / "images", args.per_task, seed=args.seed)
        paths = [str(path) for path, _, _ in written]
        paths = [paths[i] for i in np.random.default_rng(args.seed).permutation(len(paths))]
        shuffled, ordered = tmp / "shuffled.txt", tmp / "sorted.txt"
        shuffled.write_text("\n".join(paths) + "\n")
        first = run(shuffled, build, tmp / "first.jsonl", args.threads, args.batch_size)
        chosen = rows(tmp / "first.jsonl")
        ordered.write_text("\n".join(sorted(paths, key=lambda p: (chosen[p][2], paths.index(p)))) + "\n")
        results = {"shuffled": [], "sorted": []}
        for _ in range(args.repeats):
            results["shuffled"].append(run(shuffled, build, tmp / "shuffled.jsonl", args.threads, args.batch_size))
            results["sorted"].append(run(ordered, build, tmp / "sorted.jsonl", args.threads, args.batch_size))
        same = rows(tmp / "shuffled.jsonl") == rows(tmp / "sorted.jsonl") == chosen

    def median(kind):
        return statistics.median(r["images_per_s"] for r in results[kind])

    print(json.dumps({
        "command": "python benchmarks/run_order.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                            "load_average": os.getloadavg()},
        "build": str(build), "images": len(paths), "task_sets": len({r[2] for r in chosen.values()}),
        "first_run": first, "runs": results, "rows_identical": same,
        "median_images_per_s": {"shuffled": median("shuffled"), "sorted": median("sorted")},
        "shuffled_over_sorted": round(median("shuffled") / median("sorted"), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
