// Fuzz target for the safetensors header parser (the part of the reader that sees untrusted
// bytes before any tensor data is touched). Built two ways:
//   - with libFuzzer (clang -fsanitize=fuzzer,address,undefined): launch/fuzz.sh
//   - with tests/fuzz/replay_main.cpp (any compiler): ctest `safetensors_fuzz`, which replays
//     seeds and deterministic mutations of them on every test run.
// Contract checked: parse_header either throws UserError or returns tensors whose byte ranges
// lie inside the file, match dtype × shape, and do not overlap.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>

#include "trainer/checkpoint/safetensors.hpp"
#include "trainer/common/user_error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moeforge;
  uint64_t data_start = 0;
  std::map<std::string, std::string> metadata;
  std::vector<safetensors::TensorInfo> tensors;
  try {
    tensors = safetensors::parse_header(data, size, "fuzz-input", &data_start, &metadata);
  } catch (const UserError&) {
    return 0;  // a clear error is the expected outcome for bad input
  }
  if (data_start > size) std::abort();
  const uint64_t data_bytes = size - data_start;
  uint64_t previous_end = 0;  // tensors come back sorted by begin offset
  for (const auto& t : tensors) {
    uint64_t elements = 1;
    for (const int64_t d : t.shape) {
      if (d < 0) std::abort();
      elements *= static_cast<uint64_t>(d);
    }
    if (t.begin > t.end || t.end > data_bytes || t.begin < previous_end) std::abort();
    if (elements * c10::elementSize(t.dtype) != t.end - t.begin) std::abort();
    previous_end = t.end;
  }
  return 0;
}
