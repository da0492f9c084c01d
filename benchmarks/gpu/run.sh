#!/usr/bin/env bash
# The one-command device run: on a lent GPU (either kind the device tool lends: one NVIDIA H100 80GB HBM3
# or one NVIDIA H200 141 GB, each with 16 CPU cores, torch 2.11 + CUDA 13, Triton 3.6, pytest,
# pytest-xdist and no network), in at most 8 minutes, in this order, each step time-boxed so that what
# finished still comes back under $OUT:
#
#   1. the GPU test subset with real Triton: parity and contracts of every op in every dtype on the
#      triton-cuda and torch-cuda backends (pytest -k cuda, over 8 pytest-xdist workers where it is
#      installed; -v, so a step cut short keeps its lines);
#   2. bench_search at N = 65 536, K in {1 024, 8 192, 65 536}, D in {64, 256}, fp32 then bf16 (one
#      run each, so each writes its rows), against the bare matmul and cdist + argmin (no FAISS/cuVS:
#      see fetch_wheels.sh);
#   3. bench_layers at K = 16 384 (N = 65 536, D = 256) against vector-quantize-pytorch;
#   4. bench_masked_conv, the 7 x 7 type A/B headline points, against cuDNN on the masked dense weight.
#
# Results go to benchmarks/results/<family>/<device>.csv and .md (the harness's layout; <device> is the
# card's name as torch.cuda.get_device_name gives it, e.g. nvidia-h100-80gb-hbm3 or nvidia-h200) and come
# back as $OUT/results.tar.gz, with each step's log, the machine's description (env.txt) and run.log,
# which says how each step ended. Every row names the card (gpu_name, gpu_memory_gib,
# gpu_multiprocessors) and how close it came to the card's peak (fraction_of_peak against the measured
# matmul peak of its dtype, fraction_of_datasheet_peak against NVIDIA's figure; see benchmarks/_harness.py).
#
# Before the call, here: bash benchmarks/gpu/fetch_wheels.sh   (vector-quantize-pytorch into .whl/)
# On the device (carry .whl):  bash benchmarks/gpu/run.sh
# The steps' commands, running nothing:  bash benchmarks/gpu/run.sh --dry-run   (any machine, no OUT;
#   tests/app/test_benchmark_results.py checks that each bench accepts them, with the harness's --list)
# Rehearsal on a CPU machine:  FASTVQ_GPU_REHEARSAL=1 OUT=$(mktemp -d) bash benchmarks/gpu/run.sh
#   (every step on the CPU with tiny sizes, results under $OUT/results instead of benchmarks/results)
set -uo pipefail

DRY=0
case "${1:-}" in
  -h|--help) sed -n '2,/^set -uo pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--help | --dry-run]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
REHEARSAL="${FASTVQ_GPU_REHEARSAL:-0}"
if [[ "$DRY" == 1 ]]; then
  OUT="${OUT:-\$OUT}"  # only printed
else
  OUT="${OUT:?set OUT to the folder whose files come back}"
  mkdir -p "$OUT"
fi
STARTED=$(date +%s)

log() {
  if [[ "$DRY" == 1 ]]; then echo "$*"; else echo "[$(( $(date +%s) - STARTED ))s] $*" | tee -a "$OUT/run.log"; fi
}

# step NAME SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log, killed after SECONDS
# (--dry-run: prints "step NAME SECONDS: COMMAND" instead).
step() {
  local name="$1" seconds="$2"
  shift 2
  if [[ "$DRY" == 1 ]]; then
    echo "step $name $seconds: $(printf '%q ' "$@")"
    return 0
  fi
  log "$name: start (time box ${seconds}s): $*"
  local begun=$(date +%s)
  PYTHONUNBUFFERED=1 timeout --kill-after=10 "$seconds" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - begun ))
  case $rc in
    0) log "$name: passed in ${took}s" ;;
    124|137) log "$name: CUT at its ${seconds}s time box (what it finished is in $name.log)" ;;
    *) log "$name: FAILED with exit status $rc after ${took}s (see $name.log)" ;;
  esac
}

if [[ "$DRY" != 1 ]]; then  # --dry-run installs and describes nothing: it prints the steps below
MARK="$(mktemp)"  # results files newer than this were written by this run
# Wheels the image lacks (vector-quantize-pytorch and its needs), into a folder of this run only.
SITE="$(mktemp -d)"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    >>"$OUT/run.log" 2>&1 || log "wheels: install FAILED (bench_layers will miss vector-quantize-pytorch)"
else
  log "wheels: none in .whl/ (run benchmarks/gpu/fetch_wheels.sh here first); bench_layers will fail"
fi
export PYTHONPATH="$SITE:$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  uname -a
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import torch, triton
print("python torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
import fastvq.backends as b
print("fastvq backends:", {op: b.backend_for("cuda", torch.float32) for op in ("nearest_code",)})
EOF
} >"$OUT/env.txt" 2>&1
fi

if [[ "$REHEARSAL" == 1 ]]; then
  log "REHEARSAL on the CPU: tiny sizes, Triton under its interpreter, results in $OUT/results"
  export TRITON_INTERPRET=1
  DEVICE=cpu
  RESULTS=(--out "$OUT/results")
  TESTS=(tests/ops/test_search.py -k "triton-cpu-N1-K129-D70")
  SEARCH=(--small)
  LAYERS=(--small)
  CONV=(--small --conv-only)
  BOX_TESTS=300 BOX_SEARCH=300 BOX_LAYERS=300 BOX_CONV=300
else
  DEVICE=cuda
  RESULTS=()
  # The ops' parity and contract tests, most important first; -k cuda keeps the CUDA backends.
  TESTS=(tests/backends/test_precision_flags.py tests/ops/test_search.py tests/ops/test_vector_quantize.py
         tests/ops/test_segment_reduce.py tests/ops/test_masked_conv.py tests/contracts/test_contracts.py
         tests/contracts/test_opcheck.py tests/ops/test_soft_quantize.py tests/ops/test_code_entropy.py
         tests/ops/test_topk.py -k "cuda or precision")
  SEARCH=()
  LAYERS=(--target-only)
  CONV=(--conv-only --headline-only)
  # 8 minutes in all: 150 + 2 x 60 + 80 + 2 x 45 = 440 s of steps, the rest for start-up.
  BOX_TESTS=150 BOX_SEARCH=60 BOX_LAYERS=80 BOX_CONV=45
fi

# Triton compiles on the host's CPU (each dtype, metric, shape bucket and config): spread the tests over
# worker processes where pytest-xdist is there (the H200 machine has 16 cores and pytest-xdist).
PARALLEL=()
if [[ "$REHEARSAL" != 1 ]] && "$PY" -c "import xdist" 2>/dev/null; then
  PARALLEL=(-n 8)
fi
step tests "$BOX_TESTS" "$PY" -m pytest -v -p no:cacheprovider -rfE --durations=10 "${PARALLEL[@]}" "${TESTS[@]}"
step search "$BOX_SEARCH" "$PY" benchmarks/bench_search.py --device "$DEVICE" --dtypes fp32 --metrics l2 "${SEARCH[@]}" "${RESULTS[@]}"
step search "$BOX_SEARCH" "$PY" benchmarks/bench_search.py --device "$DEVICE" --dtypes bf16 --metrics l2 "${SEARCH[@]}" "${RESULTS[@]}"
step layers "$BOX_LAYERS" "$PY" benchmarks/bench_layers.py --device "$DEVICE" "${LAYERS[@]}" "${RESULTS[@]}"
step conv "$BOX_CONV" "$PY" benchmarks/bench_masked_conv.py --device "$DEVICE" --dtypes bf16 "${CONV[@]}" "${RESULTS[@]}"
step conv "$BOX_CONV" "$PY" benchmarks/bench_masked_conv.py --device "$DEVICE" --dtypes tf32 fp32 "${CONV[@]}" "${RESULTS[@]}"

[[ "$DRY" == 1 ]] && exit 0
RESULT_ROOT="benchmarks/results"
[[ "$REHEARSAL" == 1 ]] && RESULT_ROOT="$OUT/results"
find "$RESULT_ROOT" -type f -newer "$MARK" -print0 2>/dev/null | tar -czf "$OUT/results.tar.gz" --null -T - 2>>"$OUT/run.log"
[[ "$REHEARSAL" == 1 ]] && rm -rf "$OUT/results"  # it came back as results.tar.gz; $OUT keeps at most 8 files
log "done: $(tar -tzf "$OUT/results.tar.gz" | tr '\n' ' ')"
rm -f "$MARK"
rm -rf "$SITE"
