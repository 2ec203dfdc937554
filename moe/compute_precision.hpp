#pragma once
// Mixed precision inside the MoE layer follows the autocast state of the input's device, which
// the trainer sets for train.precision: bf16 (fp32 parameters, bf16 compute). Under autocast
// the tokens are cast once before they are permuted, so the experts' grouped GEMMs and the
// all-to-all carry bf16 rows (half the bytes); the router always computes in fp32, since routing
// in bf16 is a known source of imbalance and divergence.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace moeforge::moe {

// `t` in the autocast dtype of `like`'s device when autocast is on there (floating `t` only).
inline at::Tensor to_compute_dtype(const at::Tensor& t, const at::Tensor& like) {
  const auto device = like.device().type();
  if (!at::autocast::is_autocast_enabled(device) || !t.is_floating_point()) return t;
  return t.to(at::autocast::get_autocast_dtype(device));
}

// Turns autocast off for the enclosed ops (the router's fp32 math).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace moeforge::moe
