#include "parallel/communicator.hpp"

#include <ATen/ATen.h>

namespace moeforge::parallel {

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
