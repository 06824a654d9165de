"""`mass-export run` locally against `run --ray local` on the same images, side by side in one session.

    python benchmarks/batch_run.py --build BUILD --images DIR [--workers 2] [--repeats 2] > result.json
    python benchmarks/batch_run.py --zoo --per-task 150                  # the demo zoo's build and test images

Each repeat runs local (1 thread per runtime, then as many threads as Ray has workers: the same cores) then Ray
(interleaved, so machine noise hits all three). Reported per run: wall time of the whole
command, the run's own load time (build load; for Ray, its cluster start-up too) and classify time, and images/s;
then the ratio Ray / local of classify time and of wall time. Rows are compared too (same task, class, task set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mass_export_cli", "run", *args, "--json"], capture_output=True,
                          text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    return {"wall_s": round(wall, 2), "load_s": summary["load_seconds"], "classify_s": summary["seconds"],
            "images": summary["images"], "images_per_s": summary["images_per_s"]}


def rows(path: Path) -> list[tuple]:
    return [(r["path"], r["task"], r["class"], tuple(r["task_set"]))
            for r in map(json.loads, path.read_text().splitlines())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--zoo", action="store_true", help="the demo zoo's build and held-out test images")
    parser.add_argument("--per-task", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per runtime")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.zoo:
            from mass_export.core.manifest import read_manifest
            from mass_export.zoo.demo import default_build, write_test_images

            args.build = default_build(progress=False)
            args.images = tmp / "images"
            write_test_images(read_manifest(args.build)["tasks"], args.images, args.per_task, seed=0)
        def common(threads):
            return [str(args.images), "--build", str(args.build), "--threads", str(threads), "--batch-size",
                    str(args.batch_size), "--force"]
        # The plain run on as many threads as Ray has workers too: the same cores, one process.
        same_cores = common(args.threads * args.workers)
        results = {"local": [], "local_same_cores": [], "ray": []}
        for _ in range(args.repeats):
            results["local"].append(run([*common(args.threads), "-o", str(tmp / "local.jsonl")]))
            results["local_same_cores"].append(run([*same_cores, "-o", str(tmp / "local_same_cores.jsonl")]))
            results["ray"].append(run([*common(args.threads), "-o", str(tmp / "ray.jsonl"), "--ray", "local", "--ray-workers",
                                       str(args.workers)]))
        same = rows(tmp / "local.jsonl") == rows(tmp / "ray.jsonl") == rows(tmp / "local_same_cores.jsonl")

    def best(kind, key):
        return min(r[key] for r in results[kind])

    print(json.dumps({
        "command": "python benchmarks/batch_run.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                            "load_average": os.getloadavg()},
        "build": str(args.build), "workers": args.workers, "threads_per_runtime": args.threads,
        "runs": results, "rows_identical": same,
        "ray_over_local": {"classify_time": round(best("ray", "classify_s") / best("local", "classify_s"), 3),
                           "wall_time": round(best("ray", "wall_s") / best("local", "wall_s"), 3),
                           "load_time": round(best("ray", "load_s") / best("local", "load_s"), 3)},
        "ray_over_local_same_cores": {
            "classify_time": round(best("ray", "classify_s") / best("local_same_cores", "classify_s"), 3),
            "wall_time": round(best("ray", "wall_s") / best("local_same_cores", "wall_s"), 3)},
    }, indent=2))


if __name__ == "__main__":
    main()
