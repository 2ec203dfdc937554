#include "parallel/comm_worker.hpp"

#include <algorithm>
#include <chrono>

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
  try {
    complete(operation());
  } catch (...) {
    fail(std::current_exception());
  }
}

void Work::complete(at::Tensor result) const {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->result = std::move(result);
    state_->done = true;
  }
  state_->finished.notify_all();
}

void Work::fail(std::exception_ptr error) const {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->error = std::move(error);
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

Work CommWorker::submit(std::function<at::Tensor()> operation, std::string name,
                        const void* in_order) {
  return enqueue({Work(), std::move(operation), {}, std::move(name), in_order});
}

Work CommWorker::submit_posted(std::function<std::unique_ptr<Posted>()> start, std::string name,
                               const void* in_order) {
  return enqueue({Work(), {}, std::move(start), std::move(name), in_order});
}

Work CommWorker::enqueue(Item item) {
  Work work = item.work;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(item));
  }
  wake_.notify_one();
  return work;
}

namespace {

// Trace lanes of collectives in flight at once: each gets the first lane free when it starts,
// so a lane's spans never overlap.
constexpr const char* kLanes[] = {"comm", "comm 2", "comm 3", "comm 4"};
constexpr int kLaneCount = sizeof(kLanes) / sizeof(kLanes[0]);

}  // namespace

void CommWorker::start(Item item) {
  const auto same_key = [&](const Running& r) { return r.in_order == item.in_order; };
  if (item.in_order &&
      (held_.count(item.in_order) || std::any_of(running_.begin(), running_.end(), same_key))) {
    held_[item.in_order].push_back(std::move(item));
    return;
  }
  launch(std::move(item));
}

int CommWorker::free_lane() const {
  std::vector<bool> busy(kLaneCount, false);
  for (const auto& r : running_) busy[r.lane] = true;
  return static_cast<int>(std::find(busy.begin(), busy.end() - 1, false) - busy.begin());
}

void CommWorker::launch(Item item) {
  const int lane = free_lane();
  const auto started = trace::Clock::now();
  const void* key = item.in_order;
  if (item.operation) {
    item.work.run(item.operation);
    trace::record(kLanes[lane], item.name, started, trace::Clock::now());
    if (key) release(key);
    return;
  }
  try {
    running_.push_back({item.work, item.start(), std::move(item.name), started, lane, key});
  } catch (...) {
    item.work.fail(std::current_exception());
    if (key) release(key);  // nothing of it is in flight: its successor may go
  }
}

void CommWorker::release(const void* key) {
  const auto held = held_.find(key);
  if (held == held_.end()) return;
  Item next = std::move(held->second.front());
  held->second.pop_front();
  if (held->second.empty()) held_.erase(held);
  launch(std::move(next));
}

bool CommWorker::poll() {
  std::vector<const void*> freed;  // in-order keys whose collective completed
  bool progressed = false;
  for (auto it = running_.begin(); it != running_.end();) {
    bool done = false;
    try {
      done = it->posted->test();
      if (done) {
        trace::record(kLanes[it->lane], it->name, it->start, trace::Clock::now());
        it->work.complete(std::move(it->posted->result));
      }
    } catch (...) {
      it->work.fail(std::current_exception());
      done = true;
    }
    if (!done) {
      ++it;
      continue;
    }
    progressed = true;
    if (it->in_order) freed.push_back(it->in_order);
    it = running_.erase(it);
  }
  for (const void* key : freed) release(key);
  return progressed;
}

void CommWorker::loop() {
  // While collectives are in flight: yield for the first 100 µs without progress (most finish
  // there), then sleep between polls, 20 µs doubling up to 1 ms, waking at once for new
  // submissions; a completion is thus seen at most about as late as it has already been
  // waited for, and never more than 1 ms late. Each poll (MPI_Testall) makes OpenMPI read every
  // socket: polling every 100 µs through a step whose link is always busy cost the compute
  // threads 0.3 s of a 4.4 s step on 2 emulated nodes (docs/benchmarks.md); the kernel's socket
  // buffers keep the link busy between polls.
  auto last_progress = std::chrono::steady_clock::now();
  auto sleep = std::chrono::microseconds(20);
  for (;;) {
    std::deque<Item> ready;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      const auto has_work = [&] { return stopping_ || !queue_.empty(); };
      if (running_.empty()) {
        wake_.wait(lock, has_work);
      } else if (std::chrono::steady_clock::now() - last_progress >
                 std::chrono::microseconds(100)) {
        wake_.wait_for(lock, sleep, has_work);
        sleep = std::min(sleep * 2, std::chrono::microseconds(1000));
      }
      if (stopping_ && queue_.empty() && running_.empty()) return;  // stopping and drained
      ready.swap(queue_);
    }
    for (auto& item : ready) start(std::move(item));
    if (poll() || !ready.empty()) {
      last_progress = std::chrono::steady_clock::now();
      sleep = std::chrono::microseconds(20);
    } else if (std::chrono::steady_clock::now() - last_progress <= std::chrono::microseconds(100)) {
      std::this_thread::yield();
    }
  }
}

}  // namespace moeforge::parallel
