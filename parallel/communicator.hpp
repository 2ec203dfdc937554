#pragma once
// Communicator: the collectives the trainer needs, on tensors, within one process group.
//
// Contract:
//  - Every member of the group must call the same collectives in the same order (like MPI).
//  - Calls block until this rank's part is complete; input tensors are not modified unless the
//    call says "in place"; returned tensors are freshly allocated and owned by the caller.
//  - Row-wise calls treat dim 0 as rows; a row is the contiguous slice input[i].
//  - Not thread-safe: one thread at a time uses a given communicator.
//  - Errors (unsupported dtype, bad split sizes) throw std::exception subclasses
//    (std::runtime_error, or c10::Error from tensor checks); a failed peer makes MPI abort the
//    whole job rather than hang.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "parallel/work.hpp"

namespace moeforge::parallel {

enum class ReduceOp { kSum, kMax, kMin };

// A run of `rows` consecutive rows starting at row `offset`, exchanged with member `peer`.
struct RowBlock {
  int peer = 0;
  int64_t offset = 0;
  int64_t rows = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  // In place: tensor <- op over all members' tensors. `tensor` must be contiguous.
  virtual void all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum) = 0;

  // Sends rows [offset_p, offset_p + send_rows[p]) of `input` to member p (offsets are the
  // running sum of send_rows) and returns the rows received, ordered by source member:
  // shape [sum(recv_rows), input.sizes()[1:]...]. recv_rows must match the peers' send_rows.
  virtual at::Tensor all_to_all_v(const at::Tensor& input, const std::vector<int64_t>& send_rows,
                                  const std::vector<int64_t>& recv_rows) = 0;

  // Block all-to-all: sends each block of `send` (rows of `input`) to its peer and receives each
  // block of `recv` into the returned [output_rows, ...] tensor. The k-th non-empty block this
  // member sends to p is the k-th non-empty block p lists in `recv` for this member, with the
  // same row count. Lets the receiver place rows straight into the layout it needs (the MoE
  // dispatcher's expert-major order) instead of reordering after an all-to-all-v. Output rows
  // covered by no block are left uninitialised.
  virtual at::Tensor all_to_all_blocks(const at::Tensor& input, const std::vector<RowBlock>& send,
                                       const std::vector<RowBlock>& recv, int64_t output_rows) = 0;

  // In place: every member's `tensor` becomes root's.
  virtual void broadcast(at::Tensor& tensor, int root) = 0;

  // Returns [size(), tensor.sizes()...]: member i's tensor in slot i. Same shape on all members.
  virtual at::Tensor all_gather(const at::Tensor& tensor) = 0;

  // `input` is [size() · n] (contiguous); returns [n]: the sum over members of their slice
  // rank(). Same dtype and device as `input`. Backends without a native form all-reduce and
  // keep their slice (same result, twice the bytes).
  virtual at::Tensor reduce_scatter(const at::Tensor& input);

  virtual void barrier() = 0;

  // Asynchronous forms, for overlapping communication with compute. A QueuedCommunicator runs
  // them on the communication worker and returns at once; by default they run now and return
  // finished work. The result (all_to_all_blocks: the output rows; all_reduce: `tensor`
  // reduced in place) is available from Work::wait(). Inputs must stay unchanged until then.
  virtual Work all_to_all_blocks_async(const at::Tensor& input, const std::vector<RowBlock>& send,
                                       const std::vector<RowBlock>& recv, int64_t output_rows) {
    return Work::completed(all_to_all_blocks(input, send, recv, output_rows));
  }
  virtual Work all_reduce_async(at::Tensor tensor, ReduceOp op = ReduceOp::kSum) {
    all_reduce(tensor, op);
    return Work::completed(tensor);
  }
  virtual Work reduce_scatter_async(at::Tensor input) {
    return Work::completed(reduce_scatter(input));
  }
  virtual Work all_gather_async(at::Tensor tensor) { return Work::completed(all_gather(tensor)); }

  // Split-phase execution, for the communication worker (parallel/comm_worker.hpp): `post`
  // runs `collective` (exactly one call of this communicator's blocking forms, whose result it
  // returns) but returns once the backend has started it; the Posted finishes it, so several
  // collectives can be in flight at once. The default runs it to completion here.
  using Collective = std::function<at::Tensor(Communicator&)>;
  virtual std::unique_ptr<Posted> post(const Collective& collective);

  // The communicator that can post() this one's collectives on CPU tensors, or nullptr. A
  // wrapper that hands CPU tensors through unchanged forwards its inner's; one that works on
  // the data around the call (staging to a device, a modelled link) has none.
  virtual Communicator* split_phase_for_cpu() { return nullptr; }
};

// The group of one process: every collective is a copy. Needs no MPI (tools, benchmarks, tests).
class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "self"; }
  void all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum) override {}
  at::Tensor all_to_all_v(const at::Tensor& input, const std::vector<int64_t>& send_rows,
                          const std::vector<int64_t>& recv_rows) override;
  at::Tensor all_to_all_blocks(const at::Tensor& input, const std::vector<RowBlock>& send,
                               const std::vector<RowBlock>& recv, int64_t output_rows) override;
  void broadcast(at::Tensor& tensor, int root) override {}
  at::Tensor all_gather(const at::Tensor& tensor) override;
  void barrier() override {}
};

// Output tensor of an all_to_all_blocks call, after checking every block lies inside its tensor
// and names a valid peer.
at::Tensor block_exchange_output(const at::Tensor& input, const std::vector<RowBlock>& send,
                                 const std::vector<RowBlock>& recv, int64_t output_rows,
                                 int group_size);

// Copies the blocks this member sends to itself into their places in `output` (matched in order
// as all_to_all_blocks says); every backend does its self-exchange this way.
void copy_self_blocks(const at::Tensor& input, const std::vector<RowBlock>& send,
                      const std::vector<RowBlock>& recv, int self, at::Tensor& output);

// Mean of a double over the group.
double all_reduce_mean(Communicator& comm, double value);

}  // namespace moeforge::parallel
