#include "parallel/all_to_all.hpp"

#include <torch/autograd.h>

namespace moeforge::parallel {
namespace {

std::vector<int64_t> flatten(const std::vector<RowBlock>& blocks) {
  std::vector<int64_t> flat;
  flat.reserve(blocks.size() * 3);
  for (const auto& b : blocks) flat.insert(flat.end(), {b.peer, b.offset, b.rows});
  return flat;
}

std::vector<RowBlock> unflatten(const std::vector<int64_t>& flat) {
  std::vector<RowBlock> blocks(flat.size() / 3);
  for (size_t i = 0; i < blocks.size(); ++i)
    blocks[i] = {static_cast<int>(flat[3 * i]), flat[3 * i + 1], flat[3 * i + 2]};
  return blocks;
}

class AllToAllBlocks : public torch::autograd::Function<AllToAllBlocks> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            Communicator* comm, const std::vector<RowBlock>& send,
                            const std::vector<RowBlock>& recv, int64_t output_rows) {
    // The communicator outlives the graph (it is owned by the process groups).
    ctx->saved_data["comm"] = reinterpret_cast<int64_t>(comm);
    ctx->saved_data["send"] = flatten(send);
    ctx->saved_data["recv"] = flatten(recv);
    ctx->saved_data["input_rows"] = input.size(0);
    return comm->all_to_all_blocks(input, send, recv, output_rows);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_outputs) {
    auto* comm = reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt());
    const auto send = unflatten(ctx->saved_data["send"].toIntVector());
    const auto recv = unflatten(ctx->saved_data["recv"].toIntVector());
    const int64_t input_rows = ctx->saved_data["input_rows"].toInt();
    // Input rows sent nowhere get no gradient through the exchange: start from zeros only when
    // the send blocks do not cover the input.
    int64_t covered = 0;
    for (const auto& block : send) covered += block.rows;
    auto grad_input = comm->all_to_all_blocks(grad_outputs[0], recv, send, input_rows);
    if (covered != input_rows) {
      auto full = at::zeros_like(grad_input);
      for (const auto& block : send)
        full.narrow(0, block.offset, block.rows)
            .copy_(grad_input.narrow(0, block.offset, block.rows));
      grad_input = full;
    }
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor all_to_all_blocks_autograd(const at::Tensor& input, Communicator& comm,
                                      const std::vector<RowBlock>& send,
                                      const std::vector<RowBlock>& recv, int64_t output_rows) {
  return AllToAllBlocks::apply(input, &comm, send, recv, output_rows);
}

}  // namespace moeforge::parallel
