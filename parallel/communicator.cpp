#include "parallel/communicator.hpp"

#include <ATen/ATen.h>

namespace moeforge::parallel {

std::unique_ptr<Posted> Communicator::post(const Collective& collective) {
  struct Finished final : Posted {
    bool test() override { return true; }
  };
  auto finished = std::make_unique<Finished>();
  finished->result = collective(*this);
  return finished;
}

at::Tensor SelfCommunicator::all_to_all_v(const at::Tensor& input,
                                          const std::vector<int64_t>& send_rows,
                                          const std::vector<int64_t>& recv_rows) {
  TORCH_CHECK(send_rows.size() == 1 && recv_rows.size() == 1 && send_rows[0] == recv_rows[0] &&
                  input.size(0) == send_rows[0],
              "all_to_all_v on a one-process group: split sizes must match the input");
  return input.clone();
}

at::Tensor SelfCommunicator::all_to_all_blocks(const at::Tensor& input,
                                               const std::vector<RowBlock>& send,
                                               const std::vector<RowBlock>& recv,
                                               int64_t output_rows) {
  auto output = block_exchange_output(input, send, recv, output_rows, 1);
  copy_self_blocks(input, send, recv, 0, output);
  return output;
}

at::Tensor block_exchange_output(const at::Tensor& input, const std::vector<RowBlock>& send,
                                 const std::vector<RowBlock>& recv, int64_t output_rows,
                                 int group_size) {
  TORCH_CHECK(input.dim() >= 1, "all_to_all_blocks: input needs a row dimension");
  const auto check = [group_size](const RowBlock& block, int64_t limit, const char* side) {
    TORCH_CHECK(block.peer >= 0 && block.peer < group_size && block.rows >= 0 &&
                    block.offset >= 0 && block.offset + block.rows <= limit,
                "all_to_all_blocks: ", side, " block (peer ", block.peer, ", offset ", block.offset,
                ", rows ", block.rows, ") outside ", limit, " rows / ", group_size, " members");
  };
  for (const auto& block : send) check(block, input.size(0), "send");
  for (const auto& block : recv) check(block, output_rows, "receive");
  auto shape = input.sizes().vec();
  shape[0] = output_rows;
  return at::empty(shape, input.options());
}

void copy_self_blocks(const at::Tensor& input, const std::vector<RowBlock>& send,
                      const std::vector<RowBlock>& recv, int self, at::Tensor& output) {
  std::vector<const RowBlock*> incoming;
  for (const auto& block : recv)
    if (block.peer == self && block.rows > 0) incoming.push_back(&block);
  size_t next = 0;
  for (const auto& block : send) {
    if (block.peer != self || block.rows == 0) continue;
    TORCH_CHECK(next < incoming.size() && incoming[next]->rows == block.rows,
                "all_to_all_blocks: blocks sent to self do not match blocks received from self");
    output.narrow(0, incoming[next]->offset, block.rows)
        .copy_(input.narrow(0, block.offset, block.rows));
    ++next;
  }
  TORCH_CHECK(next == incoming.size(),
              "all_to_all_blocks: blocks sent to self do not match blocks received from self");
}

at::Tensor SelfCommunicator::all_gather(const at::Tensor& tensor) {
  return tensor.unsqueeze(0).clone();
}

at::Tensor Communicator::reduce_scatter(const at::Tensor& input) {
  TORCH_CHECK(input.numel() % size() == 0, "reduce_scatter: ", input.numel(),
              " elements do not split into ", size(), " equal slices");
  auto sum = input.contiguous().clone();
  all_reduce(sum);
  return sum.view({size(), -1})[rank()].clone();
}

double all_reduce_mean(Communicator& comm, double value) {
  auto tensor = at::tensor({value}, at::kDouble);
  comm.all_reduce(tensor);
  return tensor.item<double>() / comm.size();
}

}  // namespace moeforge::parallel
