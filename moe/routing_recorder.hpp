#pragma once
// Observer of what a MoE layer's forward routed, for routing analysis (`moeforge analyze`):
// per token slot the expert picked, whether the pick reached its expert, and the size of that
// expert's output. Attached from outside (MoeLayerImpl::set_recorder); with none attached the
// layer computes nothing extra, so training pays nothing for it.
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace moeforge::moe {

// One forward's routing over its T tokens (tensors on the layer's device, no gradient).
struct RoutingRecord {
  int64_t seq_len = 0;    // tokens per sequence: token t sits at position t % seq_len
  at::Tensor expert_ids;  // [T, k] int64 pool ids (≥ E: null expert); expert_choice: k = P
  at::Tensor selected;    // [T, k] bool: the pick is real (expert_choice: the expert took t)
  at::Tensor kept;        // [T, k] bool: dispatched (selected, a real expert, within capacity)
  at::Tensor output_norm;  // [T, k] fp32: ‖expert output‖₂ of a kept slot, before its gate; else 0
};

class RoutingRecorder {
 public:
  virtual ~RoutingRecorder() = default;
  // Called once per forward of the layer (a recomputed layer's backward replay included).
  virtual void record(const RoutingRecord& record) = 0;
};

}  // namespace moeforge::moe
