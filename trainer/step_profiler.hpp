#pragma once
// MOEFORGE_PROFILE=FILE: a Kineto profile (CPU ops; CUDA kernels on a GPU) of the steps that
// logging.trace would trace, written as a Chrome trace to FILE by the root rank.
// bench/profile_step_summary.py turns it into milliseconds per category (attention, norms,
// MoE phases, loss, optimizer, autograd bookkeeping) using the user scopes that the model and
// the trainer open with RECORD_USER_SCOPE (free when no profiler runs).
#include <cstdint>
#include <string>

namespace moeforge {

class StepProfiler {
 public:
  // Steps first..last (1-based, inclusive); off unless MOEFORGE_PROFILE is set and `write`.
  StepProfiler(int64_t first_step, int64_t last_step, bool write, bool cuda);
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  void before_step(int64_t step);
  void after_step(int64_t step, bool print);

 private:
  std::string path_;  // empty: off
  int64_t first_, last_;
  bool cuda_, running_ = false;
};

}  // namespace moeforge
