#pragma once
// Memory accounting printed at the start of a run, per rank: what the weights, the gradients
// and the optimizer state hold (counted from the tensors themselves, so precision and ZeRO-1
// sharding show), and an estimate of one micro-batch's activations.
//
// Activation estimate, bytes per token (b = 2 under train.precision: bf16, else 4; fp32 parts
// are 4 either way; H hidden, q/kv attention widths, F the FFN width, k top-k, P router pool):
//   every block: residual b·H, norm input 4·H
//   attention:   b·(H + 2·q + 2·kv)            normed input, q, k, v, output (saved by SDPA)
//   dense MLP:   b·(H + 4·F)                   normed input, gate|up, act, act·up
//   MoE MLP:     b·H + 4·2·P                   normed input; router logits and scores (fp32)
//                + k·(b·(H + 4·F) + 4·H)       per routed copy: row, expert SwiGLU, fp32 combine
//                + shared experts like a dense MLP of their width
//   LM head:     (b + 8)·V                     logits, fp32 logits and softmax for the loss
// It ignores allocator slack and temporaries that die within an op, so it is a lower bound;
// docs/benchmarks.md compares it with the measured peak.
#include <cstdint>
#include <string>

#include "trainer/config/config.hpp"
#include "trainer/optim/optimizer.hpp"

namespace moeforge {

struct MemoryReport {
  int64_t parameters = 0;                   // the model's weights in their compute dtype
  int64_t gradients = 0;                    // gradient buffers while backward runs
  int64_t optimizer = 0;                    // fp32 masters (when separate) and AdamW moments
  int64_t activations_per_micro_batch = 0;  // estimate (see above)
};

MemoryReport memory_report(const Config& config, const AdamW& optimizer);

// Activation bytes of one token through the whole model (the estimate above).
int64_t activation_bytes_per_token(const Config& config);

// "parameters 12.3 MiB | gradients ... | optimizer ... | activations ~... per micro-batch".
std::string describe(const MemoryReport& report);

}  // namespace moeforge
