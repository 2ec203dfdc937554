#include "trainer/step_profiler.hpp"

#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdlib>
#include <iostream>
#include <set>

namespace moeforge {
namespace {

namespace profiler = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;

profiler::ProfilerConfig kineto_config() {
  return profiler::ProfilerConfig(torch::profiler::impl::ProfilerState::KINETO);
}

std::set<ActivityType> activities(bool cuda) {
  std::set<ActivityType> result{ActivityType::CPU};
  if (cuda) result.insert(ActivityType::CUDA);
  return result;
}

}  // namespace

StepProfiler::StepProfiler(int64_t first_step, int64_t last_step, bool write, bool cuda)
    : first_(first_step), last_(last_step), cuda_(cuda) {
  const char* path = std::getenv("MOEFORGE_PROFILE");
  if (write && path != nullptr && *path != '\0' && first_ <= last_) path_ = path;
}

StepProfiler::~StepProfiler() {
  if (running_) profiler::disableProfiler();  // the run ended early: drop the partial profile
}

void StepProfiler::before_step(int64_t step) {
  if (path_.empty() || step != first_) return;
  profiler::prepareProfiler(kineto_config(), activities(cuda_));
  profiler::enableProfiler(kineto_config(), activities(cuda_));
  running_ = true;
}

void StepProfiler::after_step(int64_t step, bool print) {
  if (!running_ || step != last_) return;
  running_ = false;
  profiler::disableProfiler()->save(path_);
  if (print)
    std::cout << fmt::format("profile of steps {}-{} written to {}", first_, last_, path_)
              << std::endl;
}

}  // namespace moeforge
