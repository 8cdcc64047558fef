#!/bin/bash
# The GPU benchmarks in one command, most wanted first, each part under its own time limit so
# that a short session on a lent GPU still brings back what finished:
#   1. prior_gpu_m and decoder_gpu_s training steps (bf16; MFU), with a Perfetto trace of each
#   2. the fast preset's sampling at 64 and 256 px (images/s per chip)
#   3. decoder_gpu_m, prior_gpu_l and upsampler_gpu_m training steps
# Results go to $BENCH_RESULTS_DIR (default bench/results/) after every config:
# train_step_gpu.json, sampling_gpu.json, train_step_gpu_more.json, trace_<config>.json.gz
# (summarise one with python bench/trace_summary.py FILE).
#
#   bash bench/gpu.sh                      # T1=240 T2=200 T3=300 seconds by default
#   T1=120 T2=0 T3=0 bash bench/gpu.sh     # a part with a limit of 0 is skipped
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export BENCH_RESULTS_DIR="${BENCH_RESULTS_DIR:-bench/results}"
export BENCH_TRACE="${BENCH_TRACE-decoder_gpu_s,prior_gpu_m}"
PY="${PYTHON:-python3}"
mkdir -p "$BENCH_RESULTS_DIR"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv 2>/dev/null
"$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())' || exit 1

part() {   # part SECONDS COMMAND...: run COMMAND under a time limit (0: skip)
  local limit=$1; shift
  [ "$limit" -gt 0 ] || return 0
  echo "== $* (limit ${limit} s)"
  local t0=$SECONDS
  timeout -s KILL "$limit" "$@"
  echo "== rc $? after $((SECONDS - t0)) s"
}

part "${T1:-240}" "$PY" bench/train_step.py --only "${TRAIN1:-prior_gpu_m,decoder_gpu_s}" \
  --steps 10 --warmup 3 --out train_step_gpu.json
part "${T2:-200}" "$PY" bench/sampling.py --repeats 2 ${SAMPLING_ONLY:+--only $SAMPLING_ONLY} --out sampling_gpu.json
part "${T3:-300}" "$PY" bench/train_step.py --only decoder_gpu_m,prior_gpu_l,upsampler_gpu_m \
  --steps 10 --warmup 3 --out train_step_gpu_more.json
ls -la "$BENCH_RESULTS_DIR"
