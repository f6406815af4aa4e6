#!/usr/bin/env bash
# One queue ("lane") of equal-cost study pieces on SmolLM2-135M, one thread, in order:
#   benchmarks/study_lane.sh NAME SEED:METHODS [SEED:METHODS ...]
# e.g. nohup timeout 150m benchmarks/study_lane.sh A 1:devft-adaptive 1:layerdrop &
# Each piece is `equal_cost.py --seeds SEED --methods METHODS` into results/equal-cost
# (FedIT of that seed runs first unless finished); finished runs are reused, interrupted ones
# resumed. Logs: runs/logs/eq-NAME-sSEED-METHODS.log; progress: runs/lanes/NAME.progress.
set -uo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
mkdir -p runs/logs runs/lanes
for piece in "$@"; do
  seed=${piece%%:*}; methods=${piece#*:}
  echo "$(date -u +%FT%TZ) start $piece" >> "runs/lanes/$name.progress"
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/equal_cost.py \
    --models "${MODEL:-smollm2-135m-instruct}" --out "${OUT:-results/equal-cost}" \
    --seeds "$seed" --methods "$methods" > "runs/logs/eq-$name-s$seed-${methods//,/_}.log" 2>&1
  echo "$(date -u +%FT%TZ) end $piece rc=$?" >> "runs/lanes/$name.progress"
done
