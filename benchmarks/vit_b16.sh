#!/usr/bin/env bash
# ViT-B-16, 8 tasks, random weights (speed and size do not depend on values): write the checkpoints, time
# `mass-export build` (wall time, peak RSS), then `mass-export bench`. Results land in benchmarks/results/.
#   bash benchmarks/vit_b16.sh [WORKDIR]     (needs ~6 GB of disk, ~30 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/mass-vit-b16}
OUT=benchmarks/results
mkdir -p "$WORK" "$OUT"
PY=${PYTHON:-.venv/bin/python}
[ -f "$WORK/ckpt/zeroshot.safetensors" ] || $PY benchmarks/make_checkpoints.py --model ViT-B-16 --tasks 8 --out "$WORK/ckpt"
for dtype in fp32 fp16; do
  /usr/bin/time -v -o "$WORK/time-$dtype.txt" .venv/bin/mass-export build --model ViT-B-16 --checkpoints "$WORK/ckpt" \
      --tasks 8 --storage-dtype $dtype --threads 1 -o "$WORK/build-$dtype" --force --json > "$WORK/manifest-$dtype.json"
  $PY - "$WORK" $dtype > "$OUT/build_vit_b16_8tasks_$dtype.json" <<'PYEOF'
import json, re, sys, platform, os, time
work, dtype = sys.argv[1], sys.argv[2]
t = open(f"{work}/time-{dtype}.txt").read()
m = json.load(open(f"{work}/manifest-{dtype}.json"))
wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", t).group(1)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
print(json.dumps({"command": f"mass-export build --model ViT-B-16 --tasks 8 --storage-dtype {dtype}",
                  "date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                  "wall_clock": wall, "build_seconds": m.get("build_seconds"), "peak_rss_mib": round(rss / 1024),
                  "storage": m["storage"], "validation": m.get("validation")}, indent=2))
PYEOF
done
.venv/bin/mass-export bench --build "$WORK/build-fp32" --threads 2 --batch-sizes 1,16 --iterations 5 --warmup 1 \
    -o "$OUT/bench_vit_b16_8tasks_cpu.json" --csv "$OUT/bench_vit_b16_8tasks_cpu.csv"
