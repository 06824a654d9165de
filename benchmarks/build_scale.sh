#!/usr/bin/env bash
# Build at real size from random-weight checkpoints (speed and size do not depend on values) and record wall
# time, peak RSS, storage per part, validation and the load average in benchmarks/results/build_<model>_<T>tasks.json.
#   bash benchmarks/build_scale.sh MODEL TASKS [WORKDIR] [extra build options...]
#   e.g. bash benchmarks/build_scale.sh ViT-L-14 20 /work/scale-ckpt     (~25 GB of checkpoints, ~17 min, 9.2 GiB)
# The checkpoints stay in WORKDIR/<model>-<T> for reruns; delete them when done.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; TASKS=$2; WORK=${3:-/tmp/mass-scale}; shift $(( $# < 3 ? $# : 3 ))
PY=${PYTHON:-.venv/bin/python}
NAME=$(echo "$MODEL" | tr 'A-Z-' 'a-z_')_${TASKS}tasks
CKPT="$WORK/$MODEL-$TASKS"; OUT=benchmarks/results
mkdir -p "$WORK" "$OUT"
[ -f "$CKPT/zeroshot.safetensors" ] || $PY benchmarks/make_checkpoints.py --model "$MODEL" --tasks "$TASKS" --out "$CKPT"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
set +e
/usr/bin/time -v -o "$WORK/time-$NAME.txt" .venv/bin/mass-export build --model "$MODEL" --checkpoints "$CKPT" \
    --tasks "$TASKS" -o "$WORK/build-$NAME" --force --json "$@" > "$WORK/manifest-$NAME.json" 2> "$WORK/log-$NAME.txt"
RC=$?
set -e
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
$PY benchmarks/record_build.py --time "$WORK/time-$NAME.txt" --manifest "$WORK/manifest-$NAME.json" \
    --log "$WORK/log-$NAME.txt" --command "mass-export build --model $MODEL --tasks $TASKS $*" --exit-code $RC \
    --load-before "$LOAD_BEFORE" --load-after "$LOAD_AFTER" > "$OUT/build_$NAME.json"
cat "$OUT/build_$NAME.json"
exit $RC
