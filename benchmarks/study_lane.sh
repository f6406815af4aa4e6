#!/usr/bin/env bash
# One queue ("lane") of equal-cost study pieces, one thread, in order:
#   benchmarks/study_lane.sh NAME SEED:METHODS [SEED:METHODS ...]
# e.g. nohup timeout 150m benchmarks/study_lane.sh A 1:devft-adaptive 1:layerdrop &
# Each piece is `equal_cost.py --seeds SEED --methods METHODS` into $OUT (FedIT of that seed
# runs first unless finished); finished runs are reused, interrupted ones resumed. After a
# piece, the MC accuracy of its finished runs' adapters (FedIT's too) at $MC items a task
# (default 300; MC=0 skips it), so no adapter has to outlive this checkout to be scored.
# Env: MODEL (default smollm2-135m-instruct), OUT (default results/equal-cost), MC.
# Logs: runs/logs/eq-NAME-sSEED-METHODS.log; progress: runs/lanes/NAME.progress.
# Before a session ends: benchmarks/study_keep.py stages cut runs' checkpoints for a commit.
set -uo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
model=${MODEL:-smollm2-135m-instruct}; out=${OUT:-results/equal-cost}; mc=${MC:-300}
mkdir -p runs/logs runs/lanes
for piece in "$@"; do
  seed=${piece%%:*}; methods=${piece#*:}; log="runs/logs/eq-$name-s$seed-${methods//,/_}"
  echo "$(date -u +%FT%TZ) start $piece" >> "runs/lanes/$name.progress"
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/equal_cost.py --models "$model" --out "$out" \
    --seeds "$seed" --methods "$methods" > "$log.log" 2>&1
  echo "$(date -u +%FT%TZ) end $piece rc=$?" >> "runs/lanes/$name.progress"
  if [ "$mc" != 0 ]; then
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/equal_cost.py --models "$model" \
      --out "$out" --seeds "$seed" --methods "$methods" --report-only --mc-limit "$mc" \
      --mc-methods "fedit,$methods" > "$log.mc.log" 2>&1
    echo "$(date -u +%FT%TZ) mc $piece rc=$?" >> "runs/lanes/$name.progress"
  fi
done
