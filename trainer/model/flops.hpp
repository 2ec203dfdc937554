#pragma once
// Model FLOPs per token, MoE-aware: what one token actually computes, so TFLOP/s and MFU
// compare fairly with dense models and with other frameworks.
//
//   matmul parameters a token touches (active): attention projections; per MoE block the router,
//   k of the E routed experts (3·H·F each: gate, up, down) and the shared experts; per dense
//   block the dense SwiGLU; the LM head. The embedding lookup is not a matmul and is not counted.
//   forward   = 2 · active + attention core, where the core is Q·Kᵀ and P·V over the causal half
//               of the S×S scores: 2 · (2 · S · heads · head_dim) / 2 per token per layer;
//   training  = 3 · forward (backward computes two products per forward product).
// With recompute, the extra forward is real work but not model FLOPs (MFU counts model FLOPs).
#include <cstdint>

#include "trainer/config/config.hpp"

namespace moeforge {

struct FlopCount {
  int64_t total_params = 0;   // every parameter of the model (all experts)
  int64_t active_params = 0;  // matmul parameters one token uses (see above)
  double forward_per_token = 0.0;
  double training_per_token = 0.0;
};

// For sequences of `seq_len` tokens.
FlopCount count_flops(const Config& config, int64_t seq_len);

}  // namespace moeforge
