#pragma once
// Differentiable block all-to-all (Communicator::all_to_all_blocks): forward sends each send
// block to its peer; backward sends the incoming gradient rows back with the send and receive
// block lists swapped (the reverse exchange). Collective: every member of the group must call
// it (and run backward) in the same order.
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <vector>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

at::Tensor all_to_all_blocks_autograd(const at::Tensor& input, Communicator& comm,
                                      const std::vector<RowBlock>& send,
                                      const std::vector<RowBlock>& recv, int64_t output_rows);

// The same exchange in two autograd steps, so compute runs while rows are in flight:
//   auto pending = start_all_to_all_blocks(input, comm, send, recv, rows);  // posts, returns
//   ... compute ...
//   at::Tensor out = finish_all_to_all_blocks(pending);                      // waits
// Backward mirrors it: finish's backward posts the gradient's reverse exchange, start's
// backward waits for it, and the autograd engine runs other nodes in between. The overlap is
// real when `comm` runs collectives on the communication worker (QueuedCommunicator).
struct ExchangeState : torch::CustomClassHolder {
  Communicator* comm = nullptr;  // owned by the process groups, outlives the graph
  std::vector<RowBlock> send, recv;
  int64_t input_rows = 0, output_rows = 0;
  Work forward_work, backward_work;
};
struct PendingExchange {
  at::Tensor token;  // autograd link from start to finish (an empty tensor)
  c10::intrusive_ptr<ExchangeState> state;
};
PendingExchange start_all_to_all_blocks(const at::Tensor& input, Communicator& comm,
                                        const std::vector<RowBlock>& send,
                                        const std::vector<RowBlock>& recv, int64_t output_rows);
at::Tensor finish_all_to_all_blocks(const PendingExchange& pending);

}  // namespace moeforge::parallel
