#pragma once
// Differentiable all-to-all-v: forward sends rows to peers by split sizes; backward sends the
// incoming gradient rows back by the swapped split sizes (the reverse exchange). Collective:
// every member of the group must call it (and run backward) in the same order.
#include <ATen/core/Tensor.h>

#include <vector>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

// input [sum(send_rows), ...] -> [sum(recv_rows), ...], rows grouped by source member.
at::Tensor all_to_all_v_autograd(const at::Tensor& input, Communicator& comm,
                                 const std::vector<int64_t>& send_rows,
                                 const std::vector<int64_t>& recv_rows);

}  // namespace moeforge::parallel
