#!/usr/bin/env bash
# Builds the safetensors header fuzz target with clang + libFuzzer (+ AddressSanitizer and
# UndefinedBehaviorSanitizer) against the project's LibTorch, and fuzzes it.
#   launch/fuzz.sh [SECONDS]        (default 60; corpus kept in build-fuzz/corpus)
# Needs clang (Debian: clang, which ships libFuzzer); launch/setup.sh must have run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_TO_RUN="${1:-60}"
OUT="$ROOT/build-fuzz"
TORCH="$("$ROOT/.venv/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found (apt-get install clang)"; exit 1; }
mkdir -p "$OUT/corpus"
echo "[fuzz] building $OUT/fuzz_safetensors_header"
clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -D_GLIBCXX_USE_CXX11_ABI=1 -DFMT_HEADER_ONLY=1 -I"$ROOT" -isystem "$TORCH/include" \
  -isystem "$TORCH/include/torch/csrc/api/include" \
  "$ROOT/tests/fuzz/fuzz_safetensors_header.cpp" "$ROOT/trainer/checkpoint/safetensors.cpp" \
  "$ROOT/trainer/common/user_error.cpp" \
  -L"$TORCH/lib" -Wl,-rpath,"$TORCH/lib" -lc10 -ltorch_cpu -lz \
  -o "$OUT/fuzz_safetensors_header"
# Seeds: the replay driver's built-in valid files.
"$ROOT/build/tests/fuzz_safetensors_header" --write-seeds "$OUT/corpus"
echo "[fuzz] fuzzing for ${SECONDS_TO_RUN}s"
"$OUT/fuzz_safetensors_header" -max_total_time="$SECONDS_TO_RUN" -max_len=4096 "$OUT/corpus"
