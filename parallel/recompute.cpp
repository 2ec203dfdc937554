#include "parallel/recompute.hpp"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <array>
#include <atomic>
#include <utility>

namespace moeforge::parallel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Exchange results of one recomputed region, in call order: (this rank's part, result).
struct ExchangeTape {
  std::vector<std::pair<at::Tensor, at::Tensor>> records;
  size_t next = 0;  // replay position
};

enum class TapeMode { kRecord, kReplay };

// The innermost recomputed region running on this thread, and the one around it.
struct TapeScope {
  ExchangeTape* tape;
  TapeMode mode;
  TapeScope* outer;
};
thread_local TapeScope* current_scope = nullptr;
std::atomic<int64_t> replay_count{0};  // every thread: backward may run on a device thread

class TapeScopeGuard {
 public:
  TapeScopeGuard(ExchangeTape& tape, TapeMode mode) : scope_{&tape, mode, current_scope} {
    current_scope = &scope_;
  }
  ~TapeScopeGuard() { current_scope = scope_.outer; }
  TapeScopeGuard(const TapeScopeGuard&) = delete;
  TapeScopeGuard& operator=(const TapeScopeGuard&) = delete;

 private:
  TapeScope scope_;
};

// A recording region inside a replaying one (a MoE-layer region recomputed as part of a block
// region) records what the outer region replays, so only the outermost forward exchanges.
at::Tensor resolve(TapeScope* scope, const at::Tensor& local,
                   const std::function<at::Tensor()>& exchange) {
  if (scope == nullptr) return exchange();
  auto& tape = *scope->tape;
  if (scope->mode == TapeMode::kRecord) {
    auto result = resolve(scope->outer, local, exchange);
    tape.records.emplace_back(local.clone(), result);
    return result;
  }
  TORCH_CHECK(tape.next < tape.records.size(),
              "recompute: the recomputed region made more exchanges than its forward (",
              tape.records.size(), ")");
  const auto& [recorded_local, result] = tape.records[tape.next++];
  TORCH_CHECK(at::equal(local, recorded_local), "recompute: this rank's contribution to exchange ",
              tape.next, " differs from the forward's; the region did not recompute identically");
  ++replay_count;
  return result;
}

// Autocast settings of the device types a region can compute on.
constexpr std::array kAutocastDevices = {at::kCPU, at::kCUDA};
struct AutocastState {
  std::array<bool, kAutocastDevices.size()> enabled{};
  std::array<at::ScalarType, kAutocastDevices.size()> dtype{};
  bool cache_enabled = true;

  static AutocastState current() {
    AutocastState s;
    for (size_t i = 0; i < kAutocastDevices.size(); ++i) {
      s.enabled[i] = at::autocast::is_autocast_enabled(kAutocastDevices[i]);
      s.dtype[i] = at::autocast::get_autocast_dtype(kAutocastDevices[i]);
    }
    s.cache_enabled = at::autocast::is_autocast_cache_enabled();
    return s;
  }
  void apply() const {
    for (size_t i = 0; i < kAutocastDevices.size(); ++i) {
      at::autocast::set_autocast_dtype(kAutocastDevices[i], dtype[i]);
      at::autocast::set_autocast_enabled(kAutocastDevices[i], enabled[i]);
    }
    at::autocast::set_autocast_cache_enabled(cache_enabled);
  }
};

// Runs a region pass under `state` (autocast of the forward) with autocast's weight cache off:
// a bf16 copy cached by the no-grad forward has no grad_fn and would cut the parameters out of
// the recompute's graph.
class AutocastStateGuard {
 public:
  explicit AutocastStateGuard(AutocastState state) : previous_(AutocastState::current()) {
    state.cache_enabled = false;
    state.apply();
  }
  ~AutocastStateGuard() { previous_.apply(); }
  AutocastStateGuard(const AutocastStateGuard&) = delete;
  AutocastStateGuard& operator=(const AutocastStateGuard&) = delete;

 private:
  AutocastState previous_;
};

// States of the default generators the region may draw from (CPU, and the inputs' device).
struct GeneratorStates {
  std::vector<std::pair<at::Generator, at::Tensor>> states;

  static GeneratorStates current(const std::vector<c10::Device>& devices) {
    GeneratorStates s;
    for (const auto& device : devices) {
      auto generator = at::globalContext().defaultGenerator(device);
      std::lock_guard<std::mutex> lock(generator.mutex());
      s.states.emplace_back(generator, generator.get_state());
    }
    return s;
  }
  void apply() const {
    for (const auto& [generator, state] : states) {
      auto g = generator;
      std::lock_guard<std::mutex> lock(g.mutex());
      g.set_state(state);
    }
  }
};

std::vector<c10::Device> generator_devices(at::TensorList inputs) {
  std::vector<c10::Device> devices = {c10::Device(at::kCPU)};
  for (const auto& input : inputs)
    if (input.device().type() != at::kCPU) {
      devices.push_back(input.device());
      break;
    }
  return devices;
}

struct RegionState : torch::CustomClassHolder {
  Region region;
  ExchangeTape tape;
  AutocastState autocast;
  GeneratorStates generators;
  std::vector<bool> input_requires_grad;
  size_t num_inputs = 0;  // the saved tensors are the inputs, then the parameters
};

c10::intrusive_ptr<RegionState> region_state(AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<RegionState>(ctx->saved_data["state"].toCapsule());
}

// Inputs of the recompute: the saved inputs cut off from the forward graph, requiring grad as
// the originals did, so the region's backward stops at them.
std::vector<at::Tensor> detached_inputs(const variable_list& saved, const RegionState& state) {
  std::vector<at::Tensor> detached;
  for (size_t i = 0; i < state.num_inputs; ++i)
    detached.push_back(saved[i].detach().requires_grad_(state.input_requires_grad[i]));
  return detached;
}

class RecomputedRegion : public torch::autograd::Function<RecomputedRegion> {
 public:
  // The parameters are inputs of this node, so their gradients leave through its edges into
  // their AccumulateGrad nodes in the outer graph: a parameter used by several regions (the
  // experts of every pipeline chunk) is accumulated once, its contributions summed first, as
  // without recompute — and the gradient synchronisers' hooks fire once.
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<RegionState> state,
                               at::TensorList inputs, at::TensorList parameters) {
    // Function::apply runs this with gradients off: nothing inside is kept for backward.
    state->autocast = AutocastState::current();
    state->generators = GeneratorStates::current(generator_devices(inputs));
    for (const auto& input : inputs) state->input_requires_grad.push_back(input.requires_grad());
    state->num_inputs = inputs.size();
    auto saved = inputs.vec();
    saved.insert(saved.end(), parameters.begin(), parameters.end());
    ctx->save_for_backward(saved);
    ctx->set_materialize_grads(false);  // outputs nobody used get no gradient, not zeros
    variable_list outputs;
    {
      const AutocastStateGuard autocast(state->autocast);
      const TapeScopeGuard record(state->tape, TapeMode::kRecord);
      outputs = state->region(inputs.vec());
    }
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto state = region_state(ctx);
    const auto saved = ctx->get_saved_variables();
    const auto inputs = detached_inputs(saved, *state);
    const auto outputs = rerun(*state, inputs);
    std::vector<at::Tensor> roots, grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (!grad_outputs[i].defined() || !outputs[i].requires_grad()) continue;
      roots.push_back(outputs[i]);
      grads.push_back(grad_outputs[i]);
    }
    // Gradients of everything this node has edges to: the inputs, then the parameters.
    std::vector<at::Tensor> targets(inputs.begin(), inputs.end());
    targets.insert(targets.end(), saved.begin() + static_cast<int64_t>(state->num_inputs),
                   saved.end());
    variable_list result = {at::Tensor()};  // the state argument
    std::vector<at::Tensor> wrt;
    std::vector<size_t> wrt_index;
    for (size_t i = 0; i < targets.size(); ++i)
      if (targets[i].requires_grad()) {
        wrt.push_back(targets[i]);
        wrt_index.push_back(i);
      }
    result.resize(1 + targets.size());
    if (roots.empty() || wrt.empty()) return result;
    const auto computed = torch::autograd::grad(roots, wrt, grads, /*retain_graph=*/false,
                                                /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t j = 0; j < wrt.size(); ++j) result[1 + wrt_index[j]] = computed[j];
    return result;
  }

 private:
  static variable_list rerun(RegionState& state, const std::vector<at::Tensor>& inputs) {
    const at::AutoGradMode grad(true);
    const AutocastStateGuard autocast(state.autocast);
    const auto now = GeneratorStates::current(generator_devices(inputs));
    state.generators.apply();  // draw what the forward drew...
    const TapeScopeGuard replay(state.tape, TapeMode::kReplay);
    state.tape.next = 0;
    auto outputs = state.region(inputs);
    now.apply();  // ...and leave the generators where they were
    return outputs;
  }
};

}  // namespace

std::vector<at::Tensor> recompute_in_backward(const Region& region,
                                              const std::vector<at::Tensor>& inputs,
                                              const std::vector<at::Tensor>& parameters) {
  bool needs_grad = false;
  for (const auto& t : inputs) needs_grad = needs_grad || t.requires_grad();
  for (const auto& t : parameters) needs_grad = needs_grad || t.requires_grad();
  if (!at::GradMode::is_enabled() || !needs_grad) return region(inputs);
  auto state = c10::make_intrusive<RegionState>();
  state->region = region;
  return RecomputedRegion::apply(std::move(state), at::TensorList(inputs),
                                 at::TensorList(parameters));
}

at::Tensor replayed_exchange(const at::Tensor& local, const std::function<at::Tensor()>& exchange) {
  return resolve(current_scope, local, exchange);
}

int64_t replayed_exchanges() {
  return replay_count.load();
}

}  // namespace moeforge::parallel
