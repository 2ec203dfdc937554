#include "parallel/all_to_all.hpp"

#include <torch/autograd.h>

namespace moeforge::parallel {
namespace {

class AllToAllV : public torch::autograd::Function<AllToAllV> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            Communicator* comm, std::vector<int64_t> send_rows,
                            std::vector<int64_t> recv_rows) {
    // The communicator outlives the graph (it is owned by the process groups).
    ctx->saved_data["comm"] = reinterpret_cast<int64_t>(comm);
    ctx->saved_data["send_rows"] = send_rows;
    ctx->saved_data["recv_rows"] = recv_rows;
    return comm->all_to_all_v(input, send_rows, recv_rows);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_outputs) {
    auto* comm = reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt());
    const auto send_rows = ctx->saved_data["send_rows"].toIntVector();
    const auto recv_rows = ctx->saved_data["recv_rows"].toIntVector();
    auto grad_input = comm->all_to_all_v(grad_outputs[0], recv_rows, send_rows);
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor all_to_all_v_autograd(const at::Tensor& input, Communicator& comm,
                                 const std::vector<int64_t>& send_rows,
                                 const std::vector<int64_t>& recv_rows) {
  return AllToAllV::apply(input, &comm, send_rows, recv_rows);
}

}  // namespace moeforge::parallel
