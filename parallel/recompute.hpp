#pragma once
// Activation recompute (selective activation checkpointing, like Megatron-Core's
// --recompute-modules): a region's forward keeps only its inputs, and backward runs the region
// again with gradients enabled and backpropagates through the fresh graph.
//
//   auto outs = recompute_in_backward(region, {x});   // region: inputs -> outputs
//
// The region's parameters are named: their gradients leave the recompute through the region's
// node into their usual AccumulateGrad nodes, so a parameter used by several regions (or several
// times) is accumulated once with its contributions summed first, exactly as without recompute,
// and gradient hooks, bucketed all-reduces and gradient accumulation behave as without. The
// recompute runs under the autocast state and with the default generators' state of the forward.
//
// Collectives whose results decide the region's shapes (the MoE counts exchange) must not run
// again: a rank that re-agreed on different counts would deadlock or misplace rows, and it
// costs a round trip. Code inside a region wraps such a collective in replayed_exchange(): the
// forward records its result, the recompute reads it back (data exchanges like the row
// all-to-all simply run again). Lives in parallel/ because both the model and the MoE layer
// use it and parallel/ includes no other project folder.
#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

namespace moeforge::parallel {

using Region = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// Runs `region(inputs)`. When gradients are enabled and some input or parameter requires grad,
// the forward runs without storing activations and backward recomputes them; otherwise it is a
// plain call. `parameters`: every leaf the region uses that needs a gradient (a leaf left out
// gets none from the region). Outputs that need no gradient (counters) should be returned
// through the region's captures, not as outputs. The region must outlive backward (capture by
// value or shared ownership) and compute the same thing every time it runs (it gets the same
// inputs, parameters and seeds).
std::vector<at::Tensor> recompute_in_backward(const Region& region,
                                              const std::vector<at::Tensor>& inputs,
                                              const std::vector<at::Tensor>& parameters);

// The result of `exchange()` (a collective), recorded when a recomputed region first runs and
// read back when it is recomputed, instead of exchanging again. `local` is this rank's
// contribution: the recompute checks it equals the recorded one (a region that recomputed
// differently fails loudly instead of using a stale plan). Outside any recomputed region it is
// just exchange(). Regions nest (a block region around a MoE-layer region).
at::Tensor replayed_exchange(const at::Tensor& local, const std::function<at::Tensor()>& exchange);

// How many replayed_exchange() calls were served from a record so far, in this process (tests).
int64_t replayed_exchanges();

}  // namespace moeforge::parallel
