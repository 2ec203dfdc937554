#include "parallel/communicator.hpp"

#include <ATen/ATen.h>

namespace moeforge::parallel {

at::Tensor SelfCommunicator::all_to_all_v(const at::Tensor& input,
                                          const std::vector<int64_t>& send_rows,
                                          const std::vector<int64_t>& recv_rows) {
  TORCH_CHECK(send_rows.size() == 1 && recv_rows.size() == 1 && send_rows[0] == recv_rows[0] &&
                  input.size(0) == send_rows[0],
              "all_to_all_v on a one-process group: split sizes must match the input");
  return input.clone();
}

at::Tensor SelfCommunicator::all_gather(const at::Tensor& tensor) { return tensor.unsqueeze(0).clone(); }

std::vector<int64_t> exchange_counts(Communicator& comm, const std::vector<int64_t>& send) {
  TORCH_CHECK(static_cast<int>(send.size()) == comm.size(), "exchange_counts: need one count per peer");
  auto input = at::tensor(send, at::kLong).view({comm.size(), 1});
  std::vector<int64_t> ones(comm.size(), 1);
  auto received = comm.all_to_all_v(input, ones, ones).contiguous();
  const int64_t* data = received.data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + comm.size());
}

std::vector<int64_t> all_reduce_counts(Communicator& comm, const std::vector<int64_t>& values) {
  auto tensor = at::tensor(values, at::kLong);
  comm.all_reduce(tensor);
  const int64_t* data = tensor.data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + values.size());
}

double all_reduce_mean(Communicator& comm, double value) {
  auto tensor = at::tensor({value}, at::kDouble);
  comm.all_reduce(tensor);
  return tensor.item<double>() / comm.size();
}

}  // namespace moeforge::parallel
