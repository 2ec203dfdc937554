#pragma once
// The communication worker: one thread per process that executes submitted collectives in
// submission order, like a CUDA stream, so the compute thread posts a collective, computes, and
// waits only when it needs the result.
//
// Threading contract (why MPI_THREAD_SERIALIZED is enough and chosen): while the worker runs,
// every MPI call of the process is made by the worker thread (communicators are wrapped in
// QueuedCommunicator, whose synchronous calls are submit + wait). MPI calls therefore never
// overlap in time, which is what SERIALIZED promises; MULTIPLE would add locking inside
// OpenMPI on every call and is not needed. Collectives of all process groups share this one
// FIFO, so every rank must submit them in the same order — as MPI already requires per group.
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "parallel/work.hpp"

namespace moeforge::parallel {

class CommWorker {
 public:
  // The process's worker (started on first use, joined at exit).
  static CommWorker& instance();

  // Queues `operation`; it runs on the worker thread after everything submitted before it.
  // `name` labels it in traces.
  Work submit(std::function<at::Tensor()> operation, std::string name = "collective");

  // True on the worker thread (synchronous calls made there run inline, not re-queued).
  bool on_worker_thread() const;

  ~CommWorker();

 private:
  CommWorker();
  void loop();

  std::mutex mutex_;
  std::condition_variable wake_;
  struct Item {
    Work work;
    std::function<at::Tensor()> operation;
    std::string name;
  };
  std::deque<Item> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace moeforge::parallel
