"""Which truncation form: the authors' fp32 SVD against float64 Gram-matrix eigen-decompositions, on ViT-B-16 and
ViT-L-14 shapes, 1 and 2 threads, interleaved in the same rounds (a shared machine: the ratios are the result).

    python benchmarks/truncation_forms.py --rounds 2 -o benchmarks/results/truncation_forms.json
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from mass_export.merging import merge

# (model, shape, T): a q/k/v/out block, c_fc (tall) and c_proj (wide) of each tower.
SHAPES = [("ViT-B-16", (768, 768), 8), ("ViT-B-16", (3072, 768), 8), ("ViT-B-16", (768, 3072), 8),
          ("ViT-L-14", (1024, 1024), 20), ("ViT-L-14", (4096, 1024), 20), ("ViT-L-14", (1024, 4096), 20)]


def gram_full_eigh(matrices, k):
    """Float64 Gram + torch's full eigh, batched over same-shape matrices (the form the issue suggested)."""
    A = torch.stack(matrices).double()
    wide = A.shape[1] < A.shape[2]
    A = A.mT if wide else A
    values, W = torch.linalg.eigh(A.mT @ A)
    W, s = W[..., -k:].flip(-1), values[..., -k:].flip(-1).sqrt()
    return (A @ W) / s[:, None, :], s, W


FORMS = {
    "fp32 SVD (authors')": lambda ms, k: [merge.truncated_svd(m, k) for m in ms],
    "float64 Gram, full eigh, batched": gram_full_eigh,
    "float64 Gram, full eigh, one by one": lambda ms, k: [gram_full_eigh([m], k) for m in ms],
    "float64 Gram, top-k dsyevr (shipped)": lambda ms, k: [merge.top_singular_triplets(m, k) for m in ms],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--matrices", type=int, default=2, help="same-shape matrices per batch")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for model, shape, tasks in SHAPES:
        k = merge.truncation_rank(shape, tasks)
        matrices = [torch.randn(*shape, generator=g) * 1e-3 for _ in range(args.matrices)]
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            times = {name: [] for name in FORMS}
            for _ in range(args.rounds):  # interleaved: every form once per round
                for name, form in FORMS.items():
                    start = time.perf_counter()
                    form(matrices, k)
                    times[name].append((time.perf_counter() - start) / len(matrices))
            base = statistics.median(times["fp32 SVD (authors')"])
            for name, values in times.items():
                rows.append({"model": model, "shape": list(shape), "tasks": tasks, "k": k, "threads": threads,
                             "form": name, "seconds_per_matrix": round(statistics.median(values), 4),
                             "speedup_vs_fp32_svd": round(base / statistics.median(values), 2)})
                print(f"{model} {shape} T={tasks} threads={threads} {name:<38} "
                      f"{rows[-1]['seconds_per_matrix']:.3f} s  x{rows[-1]['speedup_vs_fp32_svd']}", flush=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "torch": torch.__version__,
              "rounds": args.rounds, "rows": rows}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
