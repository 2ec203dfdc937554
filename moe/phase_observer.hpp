#pragma once
// Observer of a MoE layer's phases: forward (route, ..., unpermute) and, if set while it ran, its
// backward ("… backward", see moe_layer.cpp; forward_started() also marks backward's start).
// Tracing and timing attach from outside (trainer trace, PhaseTimer); moe/ writes no globals.
namespace moeforge::moe {

class PhaseObserver {
 public:
  virtual ~PhaseObserver() = default;
  virtual void forward_started() = 0;
  // The phase that ended now (the time since the previous call belongs to it).
  virtual void phase_done(const char* phase) = 0;
};

}  // namespace moeforge::moe
