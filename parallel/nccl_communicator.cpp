#include "parallel/nccl_communicator.hpp"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

namespace moeforge::parallel {
namespace {

void check_nccl(ncclResult_t result, const char* what) {
  if (result != ncclSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + ncclGetErrorString(result));
}

ncclDataType_t nccl_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return ncclFloat32;
    case at::kDouble:
      return ncclFloat64;
    case at::kHalf:
      return ncclFloat16;
    case at::kBFloat16:
      return ncclBfloat16;
    case at::kLong:
      return ncclInt64;
    case at::kInt:
      return ncclInt32;
    case at::kByte:
      return ncclUint8;
    case at::kChar:
      return ncclInt8;
    default:
      throw std::runtime_error(std::string("NCCL: unsupported dtype ") + c10::toString(type));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

cudaStream_t current_stream(int device) {
  return at::cuda::getCurrentCUDAStream(device).stream();
}

}  // namespace

struct NcclCommunicator::Handle {
  ncclComm_t comm = nullptr;
  std::optional<c10::cuda::CUDAStream> comm_stream;  // created on first async call
};

bool nccl_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

NcclCommunicator::NcclCommunicator(Communicator& bootstrap, int device)
    : handle_(std::make_unique<Handle>()),
      rank_(bootstrap.rank()),
      size_(bootstrap.size()),
      device_(device) {
  ncclUniqueId id;
  if (rank_ == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  // The id is plain bytes: broadcast it over the bootstrap communicator.
  auto bytes = at::empty({static_cast<int64_t>(sizeof(id))}, at::kByte);
  if (rank_ == 0) std::memcpy(bytes.data_ptr(), &id, sizeof(id));
  bootstrap.broadcast(bytes, 0);
  std::memcpy(&id, bytes.data_ptr(), sizeof(id));
  c10::cuda::CUDAGuard guard(device_);
  check_nccl(ncclCommInitRank(&handle_->comm, size_, id, rank_), "ncclCommInitRank");
}

NcclCommunicator::~NcclCommunicator() {
  if (handle_ && handle_->comm != nullptr) ncclCommDestroy(handle_->comm);
}

void NcclCommunicator::all_reduce(at::Tensor& tensor, ReduceOp op) {
  TORCH_CHECK(tensor.is_cuda() && tensor.is_contiguous(),
              "NCCL all_reduce needs a contiguous CUDA tensor");
  c10::cuda::CUDAGuard guard(device_);
  check_nccl(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                           nccl_type(tensor.scalar_type()), nccl_op(op), handle_->comm,
                           current_stream(device_)),
             "ncclAllReduce");
}

at::Tensor NcclCommunicator::all_to_all_v(const at::Tensor& input,
                                          const std::vector<int64_t>& send_rows,
                                          const std::vector<int64_t>& recv_rows) {
  TORCH_CHECK(
      static_cast<int>(send_rows.size()) == size_ && static_cast<int>(recv_rows.size()) == size_,
      "all_to_all_v: need one split size per peer");
  // One block per peer at the running offsets: the block exchange is the same grouped
  // send/recv NCCL would do for an all-to-all-v.
  std::vector<RowBlock> send, recv;
  int64_t send_offset = 0, recv_offset = 0;
  for (int peer = 0; peer < size_; ++peer) {
    send.push_back({peer, send_offset, send_rows[peer]});
    recv.push_back({peer, recv_offset, recv_rows[peer]});
    send_offset += send_rows[peer];
    recv_offset += recv_rows[peer];
  }
  TORCH_CHECK(input.dim() >= 1 && input.size(0) == send_offset,
              "all_to_all_v: send split sizes sum to ", send_offset, " but input has ",
              input.dim() ? input.size(0) : 0, " rows");
  return all_to_all_blocks(input, send, recv, recv_offset);
}

at::Tensor NcclCommunicator::all_to_all_blocks(const at::Tensor& input,
                                               const std::vector<RowBlock>& send,
                                               const std::vector<RowBlock>& recv,
                                               int64_t output_rows) {
  TORCH_CHECK(input.is_cuda(), "NCCL all_to_all_blocks needs CUDA tensors");
  c10::cuda::CUDAGuard guard(device_);
  const auto source = input.contiguous();
  auto output = block_exchange_output(source, send, recv, output_rows, size_);
  int64_t row = 1;  // elements per row
  for (int64_t d = 1; d < source.dim(); ++d) row *= source.size(d);
  const int64_t row_bytes = row * source.element_size();
  const auto type = nccl_type(source.scalar_type());
  auto* send_base = static_cast<char*>(source.data_ptr());
  auto* recv_base = static_cast<char*>(output.data_ptr());
  const auto stream = current_stream(device_);
  // NCCL matches send/recv pairs per peer in posting order, which is the block order.
  check_nccl(ncclGroupStart(), "ncclGroupStart");
  for (const auto& block : recv)
    if (block.rows > 0)
      check_nccl(ncclRecv(recv_base + block.offset * row_bytes, block.rows * row, type, block.peer,
                          handle_->comm, stream),
                 "ncclRecv");
  for (const auto& block : send)
    if (block.rows > 0)
      check_nccl(ncclSend(send_base + block.offset * row_bytes, block.rows * row, type, block.peer,
                          handle_->comm, stream),
                 "ncclSend");
  check_nccl(ncclGroupEnd(), "ncclGroupEnd");
  return output;
}

void NcclCommunicator::broadcast(at::Tensor& tensor, int root) {
  TORCH_CHECK(tensor.is_cuda() && tensor.is_contiguous(),
              "NCCL broadcast needs a contiguous CUDA tensor");
  c10::cuda::CUDAGuard guard(device_);
  check_nccl(
      ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                    nccl_type(tensor.scalar_type()), root, handle_->comm, current_stream(device_)),
      "ncclBroadcast");
}

at::Tensor NcclCommunicator::all_gather(const at::Tensor& tensor) {
  TORCH_CHECK(tensor.is_cuda(), "NCCL all_gather needs CUDA tensors");
  c10::cuda::CUDAGuard guard(device_);
  const auto source = tensor.contiguous();
  auto shape = source.sizes().vec();
  shape.insert(shape.begin(), size_);
  auto output = at::empty(shape, source.options());
  check_nccl(ncclAllGather(source.data_ptr(), output.data_ptr(), source.numel(),
                           nccl_type(source.scalar_type()), handle_->comm, current_stream(device_)),
             "ncclAllGather");
  return output;
}

void NcclCommunicator::barrier() {
  c10::cuda::CUDAGuard guard(device_);
  auto token = at::ones({1}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device_));
  all_reduce(token, ReduceOp::kSum);
  at::cuda::getCurrentCUDAStream(device_).synchronize();
}

Work NcclCommunicator::on_comm_stream(const std::vector<at::Tensor>& inputs,
                                      const std::function<at::Tensor()>& enqueue) {
  c10::cuda::CUDAGuard guard(device_);
  if (!handle_->comm_stream)
    handle_->comm_stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_);
  const auto comm_stream = *handle_->comm_stream;
  const auto compute_stream = at::cuda::getCurrentCUDAStream(device_);
  at::cuda::CUDAEvent inputs_ready;
  inputs_ready.record(compute_stream);
  inputs_ready.block(comm_stream);
  // The inputs are read on the communication stream: keep their memory from being reused by
  // the compute stream's allocations until that stream's work is done.
  for (const auto& input : inputs)
    if (input.defined() && input.numel() > 0)
      c10::cuda::CUDACachingAllocator::recordStream(input.storage().data_ptr(), comm_stream);
  at::Tensor result;
  {
    c10::cuda::CUDAStreamGuard stream_guard(comm_stream);
    result = enqueue();
  }
  auto done = std::make_shared<at::cuda::CUDAEvent>();
  done->record(comm_stream);
  const int device = device_;
  return Work::completed(result, [done, result, device] {
    const auto waiting = at::cuda::getCurrentCUDAStream(device);
    done->block(waiting);
    // The result was allocated on the communication stream and is now used on this one.
    if (result.defined() && result.numel() > 0)
      c10::cuda::CUDACachingAllocator::recordStream(result.storage().data_ptr(), waiting);
  });
}

Work NcclCommunicator::all_to_all_blocks_async(const at::Tensor& input,
                                               const std::vector<RowBlock>& send,
                                               const std::vector<RowBlock>& recv,
                                               int64_t output_rows) {
  return on_comm_stream({input}, [&] { return all_to_all_blocks(input, send, recv, output_rows); });
}

Work NcclCommunicator::all_reduce_async(at::Tensor tensor, ReduceOp op) {
  return on_comm_stream({tensor}, [&] {
    all_reduce(tensor, op);
    return tensor;
  });
}

at::Tensor NcclCommunicator::reduce_scatter(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "NCCL reduce_scatter needs CUDA tensors");
  TORCH_CHECK(input.numel() % size_ == 0, "reduce_scatter: ", input.numel(),
              " elements do not split into ", size_, " equal slices");
  c10::cuda::CUDAGuard guard(device_);
  const auto source = input.contiguous();
  auto output = at::empty({source.numel() / size_}, source.options());
  check_nccl(ncclReduceScatter(source.data_ptr(), output.data_ptr(), output.numel(),
                               nccl_type(source.scalar_type()), ncclSum, handle_->comm,
                               current_stream(device_)),
             "ncclReduceScatter");
  return output;
}

Work NcclCommunicator::reduce_scatter_async(at::Tensor input) {
  return on_comm_stream({input}, [&] { return reduce_scatter(input); });
}

Work NcclCommunicator::all_gather_async(at::Tensor tensor) {
  return on_comm_stream({tensor}, [&] { return all_gather(tensor); });
}

}  // namespace moeforge::parallel
