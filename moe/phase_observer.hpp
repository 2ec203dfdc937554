#pragma once
// Observer of a MoE layer forward's phases (route, balance, capacity, plan, permute, dispatch,
// experts, combine, unpermute, shared experts). Tracing and timing attach here from outside
// (the trainer's trace, a benchmark's PhaseTimer); moe/ itself writes no global state.
namespace moeforge::moe {

class PhaseObserver {
 public:
  virtual ~PhaseObserver() = default;
  virtual void forward_started() = 0;
  // The phase that ended now (the time since the previous call belongs to it).
  virtual void phase_done(const char* phase) = 0;
};

}  // namespace moeforge::moe
