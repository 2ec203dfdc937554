#!/usr/bin/env bash
# The whole GPU check in one call, for a lent GPU machine (one H100, torch 2.11+cu130, nvcc,
# CMake, ninja; no apt, no network): unpack the carried Debian packages into a local prefix,
# configure against the machine's torch with CUDA on, build only test_cuda and bench_gpu, run
# the CUDA tests, the GPU benchmarks and the PyTorch-eager reference, and leave logs and a
# results summary in OUTDIR.
#
#   launch/fetch-gpu-debs.sh                       # here, once: .deps/gpu-debs/ (git-ignored)
#   launch/gpu-check.sh OUTDIR                     # on the GPU machine, .deps carried along
#   MOEFORGE_GPU_REHEARSAL=1 launch/gpu-check.sh /tmp/gpu   # here: same steps, CUDA ones on CPU
#
# MOEFORGE_PREBUILT=DIR skips configure and build and runs DIR/{test_cuda,bench_gpu,moeforge}
# instead: binaries built on a machine with the same torch wheel (2.11.0+cu130) and the same
# carried packages (a rehearsal's build-gpu/, copied to .deps/gpu-bin/), which saves the
# build's minutes of GPU time.
# MOEFORGE_GPU_TESTS_ONLY=1 stops after the CUDA tests (a build check in less device time).
# MOEFORGE_GPU_TRAIN_ONLY=1 runs the CUDA tests and then only bench_gpu's peak matmul and
# whole-model training (no layer sweep, traces or reference): a short device budget.
# Exit status: non-zero when a step fails (the failing step is named last in the log).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: launch/gpu-check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REHEARSAL="${MOEFORGE_GPU_REHEARSAL:-0}"
PREFIX="${MOEFORGE_GPU_PREFIX:-/tmp/moeforge-gpu-prefix}"
BUILD="${MOEFORGE_GPU_BUILD:-$ROOT/build-gpu}"
PYTHON="${PYTHON:-python3}"
[[ -x "$ROOT/.venv/bin/python" && "$REHEARSAL" == 1 ]] && PYTHON="$ROOT/.venv/bin/python"
LOG="$OUT/gpu-check.log"
: >"$LOG"
say() { echo "[gpu-check $(date +%T)] $*" | tee -a "$LOG"; }
fail() { say "FAILED: $*"; exit 1; }
step() {  # step NAME TIMEOUT_S COMMAND...: runs with output in OUT/NAME.log and the main log
  local name="$1" limit="$2"; shift 2
  say "$name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" >>"$LOG"
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc after $((SECONDS - start)) s"
  return "$rc"
}

# ---- 1. carried packages ------------------------------------------------------------------
compgen -G "$ROOT/.deps/gpu-debs/*.deb" >/dev/null ||
  fail "no .deps/gpu-debs/*.deb: run launch/fetch-gpu-debs.sh here and carry .deps"
mkdir -p "$PREFIX"
for deb in "$ROOT"/.deps/gpu-debs/*.deb; do dpkg -x "$deb" "$PREFIX" || fail "dpkg -x $deb"; done
LIBDIR="$PREFIX/usr/lib/x86_64-linux-gnu"
say "unpacked $(ls "$ROOT"/.deps/gpu-debs/*.deb | wc -l) packages into $PREFIX"

# ---- 2. the machine's torch, CUDA and NCCL ------------------------------------------------
TORCH_DIR="$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')" ||
  fail "$PYTHON cannot import torch"
SITE="$(dirname "$TORCH_DIR")"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "available", torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' | tee -a "$LOG"
NVIDIA_LIBS="$(find "$SITE/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')"
export LD_LIBRARY_PATH="$LIBDIR:$LIBDIR/openmpi/lib:$TORCH_DIR/lib:$NVIDIA_LIBS/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export OPAL_PREFIX="$PREFIX/usr"  # relocated OpenMPI finds its components and help files
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee -a "$LOG"

# ---- 3. build (only what the check needs) ---------------------------------------------------
if [[ -n "${MOEFORGE_PREBUILT:-}" ]]; then
  BIN="$(cd "$MOEFORGE_PREBUILT" && pwd)"
  TEST_CUDA="$BIN/test_cuda"
  BENCH_GPU="$BIN/bench_gpu"
  MOEFORGE="$BIN/moeforge"
  say "using prebuilt binaries in $BIN"
else
  CUDA_FLAG=ON
  [[ "$REHEARSAL" == 1 ]] && CUDA_FLAG=AUTO  # this machine's wheel has CUDA too: same flags
  step configure 300 cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$TORCH_DIR/share/cmake;$PREFIX/usr" \
    -DMOEFORGE_WITH_CUDA="$CUDA_FLAG" -DMOEFORGE_PYTHON="$PYTHON" \
    -DMPI_SKIP_COMPILER_WRAPPER=ON -DMPI_C_HEADER_DIR="$LIBDIR/openmpi/include" \
    -DMPI_C_LIB_NAMES=mpi -DMPI_mpi_LIBRARY="$LIBDIR/openmpi/lib/libmpi.so" ||
    fail "configure (see $OUT/configure.log)"
  step build 900 cmake --build "$BUILD" --target test_cuda bench_gpu moeforge -- -j"$(nproc)" ||
    fail "build (see $OUT/build.log)"
  TEST_CUDA="$BUILD/tests/test_cuda"
  BENCH_GPU="$BUILD/bench/bench_gpu"
  MOEFORGE="$BUILD/moeforge"
fi

# ---- 4. every library resolves (names the missing one instead of a loader error) ----------
for binary in "$TEST_CUDA" "$BENCH_GPU" "$MOEFORGE"; do
  missing="$(ldd "$binary" | grep 'not found')"
  [[ -z "$missing" ]] || fail "$(basename "$binary") cannot load: $missing"
done
say "every shared library of test_cuda, bench_gpu and moeforge resolves"

# ---- 5. CUDA tests, benchmarks, eager reference -------------------------------------------
status=0
cd "$ROOT"
step test_cuda 180 "$TEST_CUDA" --gtest_output="xml:$OUT/test_cuda.xml" || status=1
if [[ "$REHEARSAL" == 1 ]]; then
  BENCH_ARGS=(--device cpu --quick --train-config configs/tiny.yaml --train-steps 3)
  REF_ARGS=(--device cpu --quick)
else
  BENCH_ARGS=(--train-config configs/gpu_moe_1b.yaml --train-steps 12)
  REF_ARGS=()
fi
if [[ "${MOEFORGE_GPU_TESTS_ONLY:-0}" == 1 ]]; then  # build + CUDA tests only
  say "done (status $status, tests only)"
  exit "$status"
fi
rm -rf "$OUT/bench.jsonl" "$OUT/reference.jsonl" "$OUT/traces"
if [[ "${MOEFORGE_GPU_TRAIN_ONLY:-0}" == 1 ]]; then
  step bench_gpu 240 "$BENCH_GPU" --json "$OUT/bench.jsonl" --skip-layers "${BENCH_ARGS[@]}" ||
    status=1
  say "done (status $status, tests and training only)"
  exit "$status"
fi
mkdir -p "$OUT/traces"  # Chrome traces of one layer f+b per traced shape and one training step
step bench_gpu 240 "$BENCH_GPU" --json "$OUT/bench.jsonl" --profile "$OUT/traces" \
  "${BENCH_ARGS[@]}" || status=1
for trace in "$OUT"/traces/*.json; do
  "$PYTHON" bench/trace_summary.py "$trace" --top 12
done >"$OUT/traces.txt" 2>&1
step reference 150 "$PYTHON" bench/gpu_moe_reference.py --json "$OUT/reference.jsonl" \
  "${REF_ARGS[@]}" || status=1
# The user's path: `moeforge train` under the carried OpenMPI's mpirun, on the device.
export PATH="$PREFIX/usr/bin:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
TRAIN_CONFIG=configs/gpu_moe_1b.yaml
TRAIN_SETS=(--set train.steps=6 --set train.warmup_steps=2 --set train.eval_batches=1
  --set checkpoint.every=0 --set model.num_layers=2 --set train.out_dir="$OUT/run")
[[ "$REHEARSAL" == 1 ]] && TRAIN_CONFIG=configs/tiny.yaml
step train_cli 120 mpirun --allow-run-as-root -n 1 "$MOEFORGE" train --config "$TRAIN_CONFIG" \
  "${TRAIN_SETS[@]}" || status=1
if [[ -s "$OUT/bench.jsonl" && -s "$OUT/reference.jsonl" ]]; then
  "$PYTHON" bench/gpu_moe_reference.py --compare "$OUT/bench.jsonl" "$OUT/reference.jsonl" \
    >"$OUT/summary.txt"
fi
{
  echo "== test_cuda =="
  grep -E '^\[ +(OK|FAILED|SKIPPED|PASSED) +\]|rel|\|out-ref\|' "$OUT/test_cuda.log" | tail -40
  echo "== bench_gpu =="
  cat "$OUT/bench_gpu.log" | grep -v '^step\|^eval' | tail -12
  echo "== moeforge train (mpirun -n 1) =="
  grep -E '^step|summary|throughput|error|Error' "$OUT/train_cli.log" | tail -8
  echo "== where the GPU time goes (traces.txt) =="
  cat "$OUT/traces.txt"
  echo "== MoE layer vs eager torch._grouped_mm =="
  cat "$OUT/summary.txt" 2>/dev/null
} | tee -a "$OUT/summary.txt.tmp"
mv "$OUT/summary.txt.tmp" "$OUT/results.txt"
say "done (status $status); results in $OUT/results.txt"
exit "$status"
