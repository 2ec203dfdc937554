#include "parallel/comm_worker.hpp"

#include "parallel/trace.hpp"

namespace moeforge::parallel {

Work::Work() : state_(std::make_shared<State>()) {}

Work Work::completed(at::Tensor result, std::function<void()> on_wait) {
  Work work;
  work.state_->done = true;
  work.state_->result = std::move(result);
  work.state_->on_wait = std::move(on_wait);
  return work;
}

at::Tensor Work::wait() const {
  std::unique_lock<std::mutex> lock(state_->mutex);
  state_->finished.wait(lock, [&] { return state_->done; });  // sleeps, no spinning
  if (state_->error) std::rethrow_exception(state_->error);
  if (state_->on_wait) state_->on_wait();
  return state_->result;
}

bool Work::done() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->done;
}

void Work::run(const std::function<at::Tensor()>& operation) const {
  at::Tensor result;
  std::exception_ptr error;
  try {
    result = operation();
  } catch (...) {
    error = std::current_exception();
  }
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->result = std::move(result);
    state_->error = error;
    state_->done = true;
  }
  state_->finished.notify_all();
}

CommWorker& CommWorker::instance() {
  static CommWorker worker;
  return worker;
}

CommWorker::CommWorker() : thread_([this] { loop(); }) {}

CommWorker::~CommWorker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

bool CommWorker::on_worker_thread() const {
  return std::this_thread::get_id() == thread_.get_id();
}

Work CommWorker::submit(std::function<at::Tensor()> operation, std::string name) {
  Work work;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back({work, std::move(operation), std::move(name)});
  }
  wake_.notify_one();
  return work;
}

void CommWorker::loop() {
  for (;;) {
    Item item;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    const trace::Span span("comm", item.name);
    item.work.run(item.operation);
  }
}

}  // namespace moeforge::parallel
