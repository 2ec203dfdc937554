#pragma once
// Per-rank timeline of compute and communication as Chrome trace events (JSON; open in
// Perfetto or chrome://tracing). Off unless enabled; recording then costs a mutex and a vector
// push per span. Lanes: "compute" (the training thread's phases) and "comm", "comm 2", ...
// (each collective from its start to its completion on the communication worker; several can
// be in flight at once, each on the first lane free when it started).
#include <chrono>
#include <string>

namespace moeforge::parallel::trace {

using Clock = std::chrono::steady_clock;

void enable(bool on);
bool enabled();

// Records [start, end) on `lane` named `name` (no-op when disabled).
void record(const char* lane, const std::string& name, Clock::time_point start,
            Clock::time_point end);

// Writes everything recorded so far as {"traceEvents": [...]} with pid = rank and clears it.
void write(const std::string& path, int rank);

// Scoped span on a lane.
class Span {
 public:
  Span(const char* lane, std::string name)
      : lane_(lane), name_(std::move(name)), start_(Clock::now()) {}
  ~Span() { record(lane_, name_, start_, Clock::now()); }
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;

 private:
  const char* lane_;
  std::string name_;
  Clock::time_point start_;
};

}  // namespace moeforge::parallel::trace
