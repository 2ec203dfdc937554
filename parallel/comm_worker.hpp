#pragma once
// The communication worker: one thread per process that starts submitted collectives in
// submission order, like a CUDA stream, so the compute thread posts a collective, computes, and
// waits only when it needs the result.
//
// Split-phase collectives (submit_posted; every MPI collective on host tensors) are started in
// order and then polled together, so they finish in whatever order the network delivers them:
// a small counts exchange or gradient bucket is not held behind a large exchange posted before
// it. Others (submit; a modelled link, staged device tensors) run to completion in turn, while
// MPI keeps progressing what is in flight.
//
// Threading contract (why MPI_THREAD_SERIALIZED is enough and chosen): while the worker runs,
// every MPI call of the process is made by the worker thread (communicators are wrapped in
// QueuedCommunicator, whose synchronous calls are submit + wait). MPI calls therefore never
// overlap in time, which is what SERIALIZED promises; MULTIPLE would add locking inside
// OpenMPI on every call and is not needed. Collectives of all process groups share this one
// queue, so every rank must submit them in the same order — as MPI already requires per group.
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/trace.hpp"
#include "parallel/work.hpp"

namespace moeforge::parallel {

class CommWorker {
 public:
  // The process's worker (started on first use, joined at exit).
  static CommWorker& instance();

  // Queues `operation`; it runs on the worker thread after everything submitted before it has
  // been started. `name` labels it in traces.
  // `in_order`: as for submit_posted (a collective that must not overtake, or be overtaken by,
  // posted ones of the same key).
  Work submit(std::function<at::Tensor()> operation, std::string name = "collective",
              const void* in_order = nullptr);
  // Queues a split-phase collective: `start` posts it (after everything submitted before it has
  // been started) and the worker polls the returned Posted until it completes. Collectives
  // with the same non-null `in_order` key are posted one at a time, each after the previous
  // one completed: bulk transfers that must cross the link in order (the chunks of a pipelined
  // exchange) instead of sharing it and all arriving last.
  Work submit_posted(std::function<std::unique_ptr<Posted>()> start,
                     std::string name = "collective", const void* in_order = nullptr);

  // True on the worker thread (synchronous calls made there run inline, not re-queued).
  bool on_worker_thread() const;

  ~CommWorker();

 private:
  struct Item {
    Work work;
    std::function<at::Tensor()> operation;           // run to completion, or
    std::function<std::unique_ptr<Posted>()> start;  // post and poll
    std::string name;
    const void* in_order = nullptr;
  };
  struct Running {
    Work work;
    std::unique_ptr<Posted> posted;
    std::string name;
    trace::Clock::time_point start;
    int lane = 0;  // of the trace
    const void* in_order = nullptr;
  };

  CommWorker();
  Work enqueue(Item item);
  void loop();
  // Starts `item`, or holds it behind its in-order predecessor.
  void start(Item item);
  // Runs it to completion, or posts it into running_.
  void launch(Item item);
  // Starts the next collective held behind `key`, if any.
  void release(const void* key);
  int free_lane() const;  // of the trace
  // Completes the finished collectives in flight (posting their held successors); true when
  // any did.
  bool poll();

  // Worker thread only: collectives in flight, and those held behind an in-order key.
  std::vector<Running> running_;
  std::map<const void*, std::deque<Item>> held_;

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Item> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace moeforge::parallel
