#pragma once
// Work: the handle of a collective submitted to the communication worker (or already done).
// wait() blocks until it finished and returns its result tensor (undefined for in-place ops),
// rethrowing the worker's exception if it failed. Copies share the same state.
#include <ATen/core/Tensor.h>

#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>

namespace moeforge::parallel {

class Work {
 public:
  Work();
  // Already finished. `on_wait` (optional) runs in every wait() before the result is returned:
  // a GPU backend makes the waiting stream wait for the communication stream's event there.
  static Work completed(at::Tensor result = {}, std::function<void()> on_wait = {});

  // Blocks until done; returns the result or rethrows the operation's exception.
  at::Tensor wait() const;
  bool done() const;

  // Called by whoever executes the operation (the worker): runs it and publishes the outcome.
  void run(const std::function<at::Tensor()>& operation) const;
  // Or publishes an outcome obtained otherwise (a split-phase collective that completed).
  void complete(at::Tensor result) const;
  void fail(std::exception_ptr error) const;

 private:
  struct State {
    std::mutex mutex;
    std::condition_variable finished;
    bool done = false;
    at::Tensor result;
    std::exception_ptr error;
    std::function<void()> on_wait;
  };
  std::shared_ptr<State> state_;
};

// A collective started by its backend but not finished: the communication worker polls test()
// (it also enforces the backend's timeout) and, once it returns true, hands `result` to the
// waiting Work. Inputs and output stay alive in the Posted until then.
class Posted {
 public:
  virtual ~Posted() = default;
  virtual bool test() = 0;
  at::Tensor result;
};

}  // namespace moeforge::parallel
