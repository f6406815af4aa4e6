#!/usr/bin/env bash
# One queue ("lane") of equal-cost study pieces, one thread, in order:
#   benchmarks/study_lane.sh NAME SEED:METHODS [SEED:METHODS ...]
# e.g. nohup timeout 150m benchmarks/study_lane.sh A 1:devft-adaptive 1:layerdrop &
# Each piece is `equal_cost.py --seeds SEED --methods METHODS` into $OUT (FedIT of that seed
# runs first unless finished); finished runs are reused, interrupted ones resumed. After a
# piece, the MC accuracy of its finished runs' adapters (FedIT's too) at $MC items a task
# (default 300; MC=0 skips it), so no adapter has to outlive this checkout to be scored.
# When the lane ends, finished or cut by a signal (timeout's TERM), it runs
# benchmarks/study_keep.py, which stages its own runs' (the pieces' and their seeds' FedIT)
# cut checkpoints and unscored adapters for the next commit (one lane at a time: flock;
# never another lane's live run); `git commit` is still yours.
# Env: MODEL (default smollm2-135m-instruct), OUT (default results/equal-cost), MC,
#      PY (default .venv/bin/python), RUNS (logs folder, default runs),
#      STUDY (default benchmarks/equal_cost.py; benchmarks/equal_budget.py for issue 31's
#      study and benchmarks/budget_study.py for issue 34's, each with MC=0 and
#      KEEP_ARGS=--keep-checkpoints), NICE (default 0),
#      EXTRA (more arguments for the study command, e.g. "--set model.quantization=nf4").
# Logs: $RUNS/logs/eq-NAME-sSEED-METHODS.log; progress: $RUNS/lanes/NAME.progress.
set -uo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
model=${MODEL:-smollm2-135m-instruct}; out=${OUT:-results/equal-cost}; mc=${MC:-300}
py=${PY:-.venv/bin/python}; runs=${RUNS:-runs}
study=${STUDY:-benchmarks/equal_cost.py}; keep_args=${KEEP_ARGS:-}; nice=${NICE:-0}
extra=${EXTRA:-}
progress="$runs/lanes/$name.progress"
mkdir -p "$runs/logs" "$runs/lanes"
note() { echo "$(date -u +%FT%TZ) $*" >> "$progress"; }
own=()
for piece in "$@"; do
  IFS=, read -ra methods <<< "fedit,${piece#*:}"
  for m in "${methods[@]}"; do own+=("$model/seed-${piece%%:*}/$m"); done
done
keep() {
  # shellcheck disable=SC2086
  flock "$runs/lanes/keep.lock" "$py" benchmarks/study_keep.py --out "$out" $keep_args \
    --only "${own[@]}" \
    >> "$runs/logs/keep-$name.log" 2>&1
  note "keep rc=$?"
}
on_signal() { trap - TERM INT; wait; note "cut by a signal"; keep; exit 143; }
trap on_signal TERM INT
for piece in "$@"; do
  seed=${piece%%:*}; methods=${piece#*:}; log="$runs/logs/eq-$name-s$seed-${methods//,/_}"
  note "start $piece"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 nice -n "$nice" "$py" "$study" --models "$model" --out "$out" \
    --seeds "$seed" --methods "$methods" $extra > "$log.log" 2>&1
  note "end $piece rc=$?"
  if [ "$mc" != 0 ]; then
    OMP_NUM_THREADS=1 "$py" benchmarks/equal_cost.py --models "$model" \
      --out "$out" --seeds "$seed" --methods "$methods" --report-only --mc-limit "$mc" \
      --mc-methods "fedit,$methods" > "$log.mc.log" 2>&1
    note "mc $piece rc=$?"
  fi
done
keep
