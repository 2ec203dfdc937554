#pragma once
// Wall-clock split of MoE layer forwards into their spine steps (route, permute, dispatch
// all-to-all, experts, combine all-to-all, unpermute), accumulated over calls. Benchmarks attach
// one to a layer as its PhaseObserver.
#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "moe/phase_observer.hpp"

namespace moeforge::moe {

class PhaseTimer final : public PhaseObserver {
 public:
  using Totals = std::vector<std::pair<std::string, double>>;  // phase -> seconds, first-seen order

  void forward_started() override { last_ = Clock::now(); }

  // Charges the time since the previous forward_started()/phase_done() to `phase`.
  void phase_done(const char* phase) override {
    const auto now = Clock::now();
    const double seconds = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    for (auto& [name, total] : totals_)
      if (name == phase) {
        total += seconds;
        return;
      }
    totals_.emplace_back(phase, seconds);
  }

  const Totals& totals() const { return totals_; }
  void clear() { totals_.clear(); }

 private:
  using Clock = std::chrono::steady_clock;
  Clock::time_point last_ = Clock::now();
  Totals totals_;
};

}  // namespace moeforge::moe
