#pragma once
// Differentiable block all-to-all (Communicator::all_to_all_blocks): forward sends each send
// block to its peer; backward sends the incoming gradient rows back with the send and receive
// block lists swapped (the reverse exchange). Collective: every member of the group must call
// it (and run backward) in the same order.
#include <ATen/core/Tensor.h>

#include <vector>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

at::Tensor all_to_all_blocks_autograd(const at::Tensor& input, Communicator& comm,
                                      const std::vector<RowBlock>& send,
                                      const std::vector<RowBlock>& recv, int64_t output_rows);

}  // namespace moeforge::parallel
