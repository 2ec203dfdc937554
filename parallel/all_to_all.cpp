#include "parallel/all_to_all.hpp"

#include <torch/autograd.h>

namespace moeforge::parallel {
namespace {

// Input rows sent nowhere get no gradient through the exchange: zero them when the send blocks
// do not cover the input.
at::Tensor zero_uncovered_rows(at::Tensor grad_input, const std::vector<RowBlock>& send) {
  int64_t covered = 0;
  for (const auto& block : send) covered += block.rows;
  if (covered == grad_input.size(0)) return grad_input;
  auto full = at::zeros_like(grad_input);
  for (const auto& block : send)
    full.narrow(0, block.offset, block.rows).copy_(grad_input.narrow(0, block.offset, block.rows));
  return full;
}

c10::intrusive_ptr<ExchangeState> state_of(torch::autograd::AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<ExchangeState>(ctx->saved_data["state"].toCapsule());
}

class StartExchange : public torch::autograd::Function<StartExchange> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            c10::intrusive_ptr<ExchangeState> state) {
    state->forward_work = state->comm->all_to_all_blocks_async(input.contiguous(), state->send,
                                                               state->recv, state->output_rows);
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    return at::zeros({0}, input.options());
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list) {
    const auto state = state_of(ctx);
    auto received = state->backward_work.wait();
    state->backward_work = Work();  // the state outlives this call: hold no gradient rows
    return {zero_uncovered_rows(std::move(received), state->send), at::Tensor()};
  }
};

class FinishExchange : public torch::autograd::Function<FinishExchange> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& token,
                            c10::intrusive_ptr<ExchangeState> state) {
    (void)token;  // only links this step to StartExchange in the graph
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    // Hand the received rows over and drop the state's reference to them: the output gets this
    // node as its grad_fn, and the node holds the state, so a reference kept in the state would
    // be a cycle (output -> node -> state -> output) that leaks every exchanged tensor.
    auto received = state->forward_work.wait();
    state->forward_work = Work();
    return received;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_outputs) {
    const auto state = state_of(ctx);
    // Reverse exchange of the gradient, posted now and awaited by StartExchange::backward.
    state->backward_work = state->comm->all_to_all_blocks_async(
        grad_outputs[0].contiguous(), state->recv, state->send, state->input_rows);
    return {at::zeros({0}, grad_outputs[0].options()), at::Tensor()};
  }
};

}  // namespace

PendingExchange start_all_to_all_blocks(const at::Tensor& input, Communicator& comm,
                                        const std::vector<RowBlock>& send,
                                        const std::vector<RowBlock>& recv, int64_t output_rows) {
  auto state = c10::make_intrusive<ExchangeState>();
  state->comm = &comm;
  state->send = send;
  state->recv = recv;
  state->input_rows = input.size(0);
  state->output_rows = output_rows;
  return {StartExchange::apply(input, state), state};
}

at::Tensor finish_all_to_all_blocks(const PendingExchange& pending) {
  return FinishExchange::apply(pending.token, pending.state);
}

at::Tensor all_to_all_blocks_autograd(const at::Tensor& input, Communicator& comm,
                                      const std::vector<RowBlock>& send,
                                      const std::vector<RowBlock>& recv, int64_t output_rows) {
  // The blocking form is the asynchronous one with nothing in between.
  return finish_all_to_all_blocks(start_all_to_all_blocks(input, comm, send, recv, output_rows));
}

}  // namespace moeforge::parallel
