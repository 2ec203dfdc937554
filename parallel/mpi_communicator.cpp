#include "parallel/mpi_communicator.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

namespace moeforge::parallel {
namespace {

void check_mpi(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw std::runtime_error(std::string(what) + " failed: " + std::string(text, length));
}

// MPI has no bfloat16: bf16 sums (parallel.grad_reduce_dtype: bf16) travel as 16-bit words
// and are added by this user-defined operation, rounding each partial sum to bf16 as a native
// bf16 reduction would.
void add_bf16(void* in, void* inout, int* length, MPI_Datatype*) {
  const auto* a = static_cast<const c10::BFloat16*>(in);
  auto* b = static_cast<c10::BFloat16*>(inout);
  for (int i = 0; i < *length; ++i) b[i] = static_cast<float>(a[i]) + static_cast<float>(b[i]);
}

MPI_Op bf16_sum() {
  static const MPI_Op op = [] {
    MPI_Op created;
    check_mpi(MPI_Op_create(&add_bf16, /*commute=*/1, &created), "MPI_Op_create");
    return created;
  }();
  return op;
}

// Datatype for element-wise reductions (bf16: 16-bit words, summed by bf16_sum()).
MPI_Datatype reduction_type(at::ScalarType type) {
  switch (type) {
    case at::kBFloat16:
      return MPI_UINT16_T;
    case at::kFloat:
      return MPI_FLOAT;
    case at::kDouble:
      return MPI_DOUBLE;
    case at::kLong:
      return MPI_INT64_T;
    case at::kInt:
      return MPI_INT32_T;
    case at::kByte:
      return MPI_UINT8_T;
    default:
      throw std::runtime_error(std::string("MPI all_reduce: unsupported dtype ") +
                               c10::toString(type));
  }
}

MPI_Op mpi_op(ReduceOp op, at::ScalarType type) {
  if (type == at::kBFloat16) {
    TORCH_CHECK(op == ReduceOp::kSum, "MPI: bf16 reductions support sum only");
    return bf16_sum();
  }
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_SUM;
}

// A committed datatype of `bytes` contiguous bytes; freed when it goes out of scope.
class RowType {
 public:
  explicit RowType(int64_t bytes) {
    check_mpi(MPI_Type_contiguous(static_cast<int>(bytes), MPI_BYTE, &type_),
              "MPI_Type_contiguous");
    check_mpi(MPI_Type_commit(&type_), "MPI_Type_commit");
  }
  ~RowType() { MPI_Type_free(&type_); }
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_;
};

std::vector<int> to_int_counts(const std::vector<int64_t>& rows, const char* what) {
  std::vector<int> counts(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] < 0 || rows[i] > std::numeric_limits<int>::max())
      throw std::runtime_error(std::string(what) + ": row count out of range");
    counts[i] = static_cast<int>(rows[i]);
  }
  return counts;
}

std::vector<int> displacements(const std::vector<int>& counts) {
  std::vector<int> displs(counts.size(), 0);
  for (size_t i = 1; i < counts.size(); ++i) displs[i] = displs[i - 1] + counts[i - 1];
  return displs;
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm) : comm_(comm) {
  check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  // World ranks of the members, for messages about a peer that stopped answering.
  MPI_Group group, world_group;
  check_mpi(MPI_Comm_group(comm_, &group), "MPI_Comm_group");
  check_mpi(MPI_Comm_group(MPI_COMM_WORLD, &world_group), "MPI_Comm_group");
  std::vector<int> members(size_);
  std::iota(members.begin(), members.end(), 0);
  world_ranks_.resize(size_);
  check_mpi(
      MPI_Group_translate_ranks(group, size_, members.data(), world_group, world_ranks_.data()),
      "MPI_Group_translate_ranks");
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
}

struct MpiCommunicator::InFlight {
  bool started = false;  // one collective per post()
  std::vector<MPI_Request> requests;
  std::vector<int> peers;
  const char* what = "";
  std::vector<std::shared_ptr<const void>> held;
};

class MpiCommunicator::PostedRequests final : public Posted {
 public:
  PostedRequests(const MpiCommunicator& comm, InFlight flight)
      : comm_(comm), flight_(std::move(flight)), start_(std::chrono::steady_clock::now()) {}

  bool test() override {
    int done = 0;
    check_mpi(MPI_Testall(static_cast<int>(flight_.requests.size()), flight_.requests.data(), &done,
                          MPI_STATUSES_IGNORE),
              flight_.what);
    if (done) return true;
    const std::chrono::duration<double> waited = std::chrono::steady_clock::now() - start_;
    if (comm_.timeout_s_ > 0 && waited.count() > comm_.timeout_s_)
      comm_.abort_on_timeout(flight_.requests, flight_.what, flight_.peers);
    return false;
  }

 private:
  const MpiCommunicator& comm_;
  InFlight flight_;
  std::chrono::steady_clock::time_point start_;
};

std::unique_ptr<Posted> MpiCommunicator::post(const Collective& collective) {
  InFlight flight;
  posting_ = &flight;
  at::Tensor result;
  try {
    result = collective(*this);
  } catch (...) {
    posting_ = nullptr;  // nothing was posted: MPI checks its arguments before starting
    throw;
  }
  posting_ = nullptr;
  auto posted = std::make_unique<PostedRequests>(*this, std::move(flight));
  posted->result = std::move(result);
  return posted;
}

void MpiCommunicator::hold(std::shared_ptr<const void> buffer) const {
  if (posting_) posting_->held.push_back(std::move(buffer));
}

void MpiCommunicator::hold(const at::Tensor& buffer) const {
  if (posting_) hold(std::make_shared<const at::Tensor>(buffer));
}

void MpiCommunicator::wait(std::vector<MPI_Request>& requests, const char* what,
                           const std::vector<int>& peers) const {
  if (posting_) {
    if (posting_->started) throw std::logic_error("MpiCommunicator::post: one collective per post");
    posting_->started = true;
    posting_->requests = std::move(requests);
    posting_->peers = peers;
    posting_->what = what;
    return;
  }
  if (requests.empty()) return;
  // Yielding polls for the first 100 µs (most exchanges end there; yield hands the core to
  // whoever needs it), then sleeps of 20-100 µs. A blocking MPI wait busy-polls in OpenMPI,
  // which on a shared or oversubscribed node steals the core the compute thread (or a peer
  // rank) needs. Each poll is the posted form's test(), watchdog included (one clock read).
  PostedRequests pending(
      *this, {.requests = std::move(requests), .peers = peers, .what = what, .held = {}});
  const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
  auto sleep = std::chrono::microseconds(20);
  while (!pending.test()) {
    if (std::chrono::steady_clock::now() < spin_until) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::microseconds(100));
    }
  }
}

void MpiCommunicator::wait(MPI_Request request, const char* what) const {
  std::vector<MPI_Request> requests = {request};
  wait(requests, what);
}

void MpiCommunicator::abort_on_timeout(std::vector<MPI_Request>& requests, const char* what,
                                       const std::vector<int>& peers) const {
  std::set<int> silent;  // point-to-point: the peers whose messages did not complete
  for (size_t i = 0; i < requests.size() && i < peers.size(); ++i) {
    int complete = 0;
    MPI_Test(&requests[i], &complete, MPI_STATUS_IGNORE);
    if (!complete) silent.insert(world_ranks_[peers[i]]);
  }
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  const std::string who = silent.empty()
                              ? fmt::format("a member of ranks [{}]", fmt::join(world_ranks_, ", "))
                              : fmt::format("rank(s) [{}]", fmt::join(silent, ", "));
  std::cerr << fmt::format(
                   "moeforge: error on rank {}: {} made no progress for {:g} s "
                   "(parallel.timeout_s): {} stopped, died or is stuck; aborting the job",
                   world_rank, what, timeout_s_, who)
            << std::endl;
  MPI_Abort(MPI_COMM_WORLD, 3);
  std::abort();  // MPI_Abort does not return; this keeps [[noreturn]] honest if it did
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_SELF && comm_ != MPI_COMM_NULL)
    MPI_Comm_free(&comm_);
}

void MpiCommunicator::all_reduce(at::Tensor& tensor, ReduceOp op) {
  TORCH_CHECK(tensor.is_contiguous() && tensor.device().is_cpu(),
              "MPI all_reduce needs a contiguous CPU tensor");
  if (size_ == 1 || tensor.numel() == 0) return;
  hold(tensor);
  MPI_Request request;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, tensor.data_ptr(), static_cast<int>(tensor.numel()),
                           reduction_type(tensor.scalar_type()), mpi_op(op, tensor.scalar_type()),
                           comm_, &request),
            "MPI_Iallreduce");
  wait(request, "MPI_Iallreduce");
}

at::Tensor MpiCommunicator::all_to_all_v(const at::Tensor& input,
                                         const std::vector<int64_t>& send_rows,
                                         const std::vector<int64_t>& recv_rows) {
  TORCH_CHECK(
      static_cast<int>(send_rows.size()) == size_ && static_cast<int>(recv_rows.size()) == size_,
      "all_to_all_v: need one split size per peer");
  TORCH_CHECK(input.device().is_cpu(), "MPI all_to_all_v needs CPU tensors");
  const auto source = input.contiguous();
  const int64_t total_send = std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
  const int64_t total_recv = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
  TORCH_CHECK(source.dim() >= 1 && source.size(0) == total_send,
              "all_to_all_v: send split sizes sum to ", total_send, " but input has ",
              source.dim() ? source.size(0) : 0, " rows");
  auto out_shape = source.sizes().vec();
  out_shape[0] = total_recv;
  auto output = at::empty(out_shape, source.options());
  int64_t row_elements = 1;  // product of the trailing dims (valid with zero rows too)
  for (int64_t d = 1; d < source.dim(); ++d) row_elements *= source.size(d);
  const int64_t row_bytes = row_elements * source.element_size();
  if (size_ == 1) {
    if (total_send > 0) output.copy_(source);
    return output;
  }
  if (row_bytes == 0) return output;
  const auto row = std::make_shared<const RowType>(row_bytes);
  hold(row);
  // A nonblocking v-collective reads its count arrays until it completes.
  struct Layout {
    std::vector<int> send_counts, recv_counts, send_displs, recv_displs;
  };
  auto layout = std::make_shared<Layout>();
  layout->send_counts = to_int_counts(send_rows, "all_to_all_v");
  layout->recv_counts = to_int_counts(recv_rows, "all_to_all_v");
  layout->send_displs = displacements(layout->send_counts);
  layout->recv_displs = displacements(layout->recv_counts);
  hold(layout);
  hold(source);
  MPI_Request request;
  check_mpi(
      MPI_Ialltoallv(source.data_ptr(), layout->send_counts.data(), layout->send_displs.data(),
                     row->get(), output.data_ptr(), layout->recv_counts.data(),
                     layout->recv_displs.data(), row->get(), comm_, &request),
      "MPI_Ialltoallv");
  wait(request, "MPI_Ialltoallv");
  return output;
}

at::Tensor MpiCommunicator::all_to_all_blocks(const at::Tensor& input,
                                              const std::vector<RowBlock>& send,
                                              const std::vector<RowBlock>& recv,
                                              int64_t output_rows) {
  TORCH_CHECK(input.device().is_cpu(), "MPI all_to_all_blocks needs CPU tensors");
  const auto source = input.contiguous();
  auto output = block_exchange_output(source, send, recv, output_rows, size_);
  copy_self_blocks(source, send, recv, rank_, output);
  const int64_t row_bytes = source.dim() == 0 ? 0 : source.stride(0) * source.element_size();
  if (size_ == 1 || row_bytes == 0) return output;
  // Point-to-point per block, every block contiguous on both sides: the data lands in place
  // with one copy (no packing), which a derived-datatype Alltoallw does not guarantee. The tag
  // is the block's position among the non-empty blocks exchanged with that peer.
  const auto row = std::make_shared<const RowType>(row_bytes);
  hold(row);
  std::vector<MPI_Request> requests;
  requests.reserve(send.size() + recv.size());
  const auto post = [&](const std::vector<RowBlock>& blocks, void* base, bool sending) {
    std::vector<int> next_tag(size_, 0);
    for (const auto& block : blocks) {
      if (block.peer == rank_ || block.rows == 0) continue;
      requests.emplace_back();
      char* first_row = static_cast<char*>(base) + block.offset * row_bytes;
      const int rows = to_int_counts({block.rows}, "all_to_all_blocks")[0];
      const int tag = next_tag[block.peer]++;
      check_mpi(
          sending
              ? MPI_Isend(first_row, rows, row->get(), block.peer, tag, comm_, &requests.back())
              : MPI_Irecv(first_row, rows, row->get(), block.peer, tag, comm_, &requests.back()),
          sending ? "MPI_Isend" : "MPI_Irecv");
    }
  };
  hold(source);
  post(recv, output.data_ptr(), /*sending=*/false);  // receives first: no unexpected messages
  post(send, source.data_ptr(), /*sending=*/true);
  std::vector<int> peers;  // of each request, in posting order
  for (const auto* blocks : {&recv, &send})
    for (const auto& block : *blocks)
      if (block.peer != rank_ && block.rows > 0) peers.push_back(block.peer);
  wait(requests, "the block all-to-all (MPI_Isend/MPI_Irecv)", peers);
  return output;
}

void MpiCommunicator::broadcast(at::Tensor& tensor, int root) {
  TORCH_CHECK(tensor.is_contiguous() && tensor.device().is_cpu(),
              "MPI broadcast needs a contiguous CPU tensor");
  if (size_ == 1 || tensor.numel() == 0) return;
  const int64_t bytes = tensor.numel() * tensor.element_size();
  const auto row = std::make_shared<const RowType>(bytes);
  hold(row);
  hold(tensor);
  MPI_Request request;
  check_mpi(MPI_Ibcast(tensor.data_ptr(), 1, row->get(), root, comm_, &request), "MPI_Ibcast");
  wait(request, "MPI_Ibcast");
}

at::Tensor MpiCommunicator::all_gather(const at::Tensor& tensor) {
  const auto source = tensor.contiguous();
  auto shape = source.sizes().vec();
  shape.insert(shape.begin(), size_);
  auto output = at::empty(shape, source.options());
  const int64_t bytes = source.numel() * source.element_size();
  if (bytes == 0) return output;
  if (size_ == 1) {
    output[0].copy_(source);
    return output;
  }
  const auto row = std::make_shared<const RowType>(bytes);
  hold(row);
  hold(source);
  MPI_Request request;
  check_mpi(MPI_Iallgather(source.data_ptr(), 1, row->get(), output.data_ptr(), 1, row->get(),
                           comm_, &request),
            "MPI_Iallgather");
  wait(request, "MPI_Iallgather");
  return output;
}

at::Tensor MpiCommunicator::reduce_scatter(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "MPI reduce_scatter needs CPU tensors");
  TORCH_CHECK(input.numel() % size_ == 0, "reduce_scatter: ", input.numel(),
              " elements do not split into ", size_, " equal slices");
  const auto source = input.contiguous();
  const int64_t count = source.numel() / size_;
  if (size_ == 1) return source.clone();
  auto output = at::empty({count}, source.options());
  if (count == 0) return output;
  const auto type = source.scalar_type();
  hold(source);
  MPI_Request request;
  check_mpi(MPI_Ireduce_scatter_block(source.data_ptr(), output.data_ptr(), static_cast<int>(count),
                                      reduction_type(type), mpi_op(ReduceOp::kSum, type), comm_,
                                      &request),
            "MPI_Ireduce_scatter_block");
  wait(request, "MPI_Ireduce_scatter_block");
  return output;
}

void MpiCommunicator::barrier() {
  MPI_Request request;
  check_mpi(MPI_Ibarrier(comm_, &request), "MPI_Ibarrier");
  wait(request, "MPI_Ibarrier");
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split(int color, int key) const {
  MPI_Comm child;
  check_mpi(MPI_Comm_split(comm_, color, key, &child), "MPI_Comm_split");
  auto split = std::make_unique<MpiCommunicator>(child);
  split->set_timeout(timeout_s_);
  return split;
}

}  // namespace moeforge::parallel
