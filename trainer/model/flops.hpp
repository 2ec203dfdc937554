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
// These are model FLOPs: MFU divides them by time (Megatron-LM and PaLM do the same).
// Hardware FLOPs add the forwards the run computes again (HFU): train.recompute's regions —
// block (attention + MLP), attention, moe (router, k experts, shared experts), moe_act (the
// routed experts' down GEMM, 2·H·F per slot); nested regions rerun once more per enclosing
// region — and the no-grad routing pre-pass of the global-batch aux loss (one whole forward).
// Counts follow the config: top_k slots per token whether capacity drops them or a null
// expert takes them.
#include <cstdint>

#include "trainer/config/config.hpp"

namespace moeforge {

struct FlopCount {
  int64_t total_params = 0;   // every parameter of the model (all experts)
  int64_t active_params = 0;  // matmul parameters one token uses (see above)
  double forward_per_token = 0.0;
  double training_per_token = 0.0;   // model FLOPs: 3 · forward
  double recompute_per_token = 0.0;  // forwards computed again (recompute, aux pre-pass)
  double hardware_per_token = 0.0;   // training + recompute
};

// For sequences of `seq_len` tokens.
FlopCount count_flops(const Config& config, int64_t seq_len);

}  // namespace moeforge
