#include "trainer/trainer.hpp"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "moe/expert_bias.hpp"
#include "moe/load_balancing.hpp"
#include "parallel/simulated_link.hpp"
#include "parallel/trace.hpp"
#include "trainer/common/file_io.hpp"
#include "trainer/common/hashing.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/convert/model_source.hpp"
#include "trainer/convert/tokenizer_files.hpp"
#include "trainer/load_statistics.hpp"
#include "trainer/memory_report.hpp"
#include "trainer/model/model_weights.hpp"
#include "trainer/run_banner.hpp"
#include "trainer/runtime/device.hpp"
#include "trainer/step_profiler.hpp"
#include "trainer/stop_signal.hpp"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

using Clock = std::chrono::steady_clock;

// Each layer's [P] int64 load summed over the group's members, with one all-reduce for all.
std::vector<at::Tensor> sum_loads(parallel::Communicator& group,
                                  const std::vector<at::Tensor>& loads) {
  if (loads.empty()) return {};
  auto packed = at::cat(loads).contiguous();
  group.all_reduce(packed);
  std::vector<at::Tensor> result;
  int64_t offset = 0;
  for (const auto& load : loads) {
    result.push_back(packed.narrow(0, offset, load.numel()));
    offset += load.numel();
  }
  return result;
}

// Stores every parameter in `type` (train.precision: bf16; the router and RMSNorm upcast to
// fp32 inside); buffers (expert biases, RoPE tables) keep theirs. Done after the optimizer took
// its fp32 masters and before gradient hooks exist, so set_data keeps each parameter's identity.
void cast_parameters(DecoderLMImpl& model, at::ScalarType type) {
  at::NoGradGuard no_grad;
  for (auto& param : model.parameters()) param.set_data(param.to(type));
}

std::vector<at::Tensor> select_parameters(DecoderLMImpl& model, bool experts) {
  std::vector<at::Tensor> result;
  for (const auto& item : model.named_parameters())
    if (is_expert_parameter(item.key()) == experts) result.push_back(item.value());
  return result;
}

// Test hook (documented in docs/architecture.md, "Errors"): MOEFORGE_FAIL_AT="rank:step" makes
// that rank throw at that step, to prove that one failing rank stops the whole job. Read once.
std::optional<std::pair<int, int64_t>> injected_failure() {
  const char* spec = std::getenv("MOEFORGE_FAIL_AT");
  int rank = -1;
  long long step = -1;
  if (spec == nullptr || std::sscanf(spec, "%d:%lld", &rank, &step) != 2) return std::nullopt;
  return std::pair<int, int64_t>{rank, step};
}

// Test hook (docs/architecture.md, "Errors"): MOEFORGE_NAN_GRAD_AT="3,4" makes the gradients of
// those steps non-finite on every rank, to prove that such steps are skipped.
std::set<int64_t> injected_nan_steps() {
  std::set<int64_t> steps;
  const char* spec = std::getenv("MOEFORGE_NAN_GRAD_AT");
  for (std::string_view rest = spec ? spec : ""; !rest.empty();) {
    const auto comma = rest.find(',');
    steps.insert(std::atoll(std::string(rest.substr(0, comma)).c_str()));
    rest = comma == std::string_view::npos ? "" : rest.substr(comma + 1);
  }
  return steps;
}

// Turns on bf16 autocast on `device` for its lifetime when `enabled` (train.precision: bf16).
// Forward passes run inside one; backward runs outside, as autocast prescribes.
class AutocastScope {
 public:
  AutocastScope(const c10::Device& device, bool enabled) : type_(device.type()), enabled_(enabled) {
    if (!enabled_) return;
    at::autocast::set_autocast_dtype(type_, at::kBFloat16);
    at::autocast::set_autocast_enabled(type_, true);
  }
  ~AutocastScope() {
    if (!enabled_) return;
    at::autocast::set_autocast_enabled(type_, false);
    at::autocast::clear_cache();  // weights change every step: no stale bf16 copies
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType type_;
  bool enabled_;
};

// Writes the MoE layers' phases to the trace (logging.trace) as compute spans.
class TracedPhases final : public moe::PhaseObserver {
 public:
  void forward_started() override { last_ = parallel::trace::Clock::now(); }
  void phase_done(const char* phase) override {
    if (!parallel::trace::enabled()) return;
    const auto now = parallel::trace::Clock::now();
    parallel::trace::record("compute", phase, last_, now);
    last_ = now;
  }

 private:
  parallel::trace::Clock::time_point last_ = parallel::trace::Clock::now();
};

// Which steps logging.trace records (after the first, warm-up step) and the file they go to.
class TraceWindow {
 public:
  TraceWindow(const LoggingConfig& logging, int64_t start_step, int64_t end_step)
      : on_(logging.trace),
        first_(start_step + 2),
        last_(std::min(start_step + 2 + logging.trace_steps - 1, end_step)) {}

  void before_step(int64_t step) const {
    parallel::trace::enable(on_ && step >= first_ && step <= last_);
  }

  int64_t first_step() const { return first_; }
  int64_t last_step() const { return last_; }

  void after_step(int64_t step, const std::string& out_dir, int rank, bool print) const {
    if (!on_ || step != last_ || step < first_) return;
    parallel::trace::enable(false);
    const auto dir = fs::path(out_dir) / "trace";
    fs::create_directories(dir);
    parallel::trace::write((dir / fmt::format("rank-{}.json", rank)).string(), rank);
    if (print)
      std::cout << fmt::format("trace of steps {}-{} written to {}/rank-*.json", first_, step,
                               dir.string())
                << std::endl;
  }

 private:
  bool on_;
  int64_t first_, last_;
};

// Final train loss (mean of the last ≤ 10 steps), throughput (mean after the first step),
// final validation loss.
void summarise(RunSummary& summary) {
  const size_t n = summary.steps.size();
  if (n > 0) {
    const size_t tail = std::min<size_t>(10, n);
    summary.loss_steps_averaged = static_cast<int64_t>(tail);
    double loss = 0.0;
    for (size_t i = n - tail; i < n; ++i) loss += summary.steps[i].loss;
    summary.final_train_loss = loss / static_cast<double>(tail);
    double tokens_per_s = 0.0;
    const size_t first = n > 1 ? 1 : 0;
    double tflops = 0.0, mfu = 0.0;
    for (size_t i = first; i < n; ++i) {
      tokens_per_s += summary.steps[i].tokens_per_s;
      tflops += summary.steps[i].tflops;
      mfu += summary.steps[i].mfu;
    }
    summary.tokens_per_s = tokens_per_s / static_cast<double>(n - first);
    summary.tflops = tflops / static_cast<double>(n - first);
    summary.mfu = mfu / static_cast<double>(n - first);
  }
  if (!summary.evals.empty()) summary.final_val_loss = summary.evals.back().val_loss;
}

}  // namespace

Trainer::Trainer(const Config& config, const parallel::ProcessGroups& groups, TokenDataset data,
                 RunOptions options)
    : config_(config),
      device_(resolve_device(config)),
      bf16_(config.train.precision == Precision::kBf16),
      fail_at_(injected_failure()),
      nan_grad_steps_(injected_nan_steps()),
      groups_(communication_groups(config, groups, device_)),
      data_(std::move(data)),
      options_(std::move(options)),
      flops_(count_flops(config, config.train.seq_len)) {
  is_root_ = groups_.world->rank() == 0;
  const auto& link = config_.parallel.simulated_link;
  if (link.bandwidth_gbps > 0 && is_root_ && options_.print)
    std::cout << fmt::format(
                     "*** SIMULATED LINK ON: every collective takes at least {} us latency + "
                     "bytes / {} GB/s (parallel.simulated_link) — timings model a slower "
                     "network, not this machine ***",
                     link.latency_us, link.bandwidth_gbps)
              << std::endl;
  at::manual_seed(static_cast<uint64_t>(config_.train.seed));
  model_ = DecoderLM(config_, *groups_.ep);
  phase_trace_ = std::make_unique<TracedPhases>();
  bool node_hop = false;
  for (auto& layer : model_->moe_layers()) {
    layer->set_overlap_degree(config_.parallel.overlap_degree);
    layer->set_dedup_dispatch(config_.parallel.dedup_dispatch, groups_.ep_ranks_per_node);
    node_hop = layer->uses_node_hop();
    if (config_.logging.trace) layer->set_observer(phase_trace_.get());  // hooks cost nothing off
  }
  if (config_.parallel.dedup_dispatch == moe::DispatchDedup::kNode && !node_hop && is_root_ &&
      options_.print)
    std::cout << "parallel.dedup_dispatch: node — the EP group is on one node (or its ranks are "
                 "not in equal consecutive runs per node): one row per (token, rank) instead"
              << std::endl;
  initialize_parameters(*model_, config_, static_cast<uint64_t>(config_.train.seed));
  model_->to(device_);  // initialised on the host, so every device starts from the same weights
  model_->train();
  if (options_.init_from) initialize_from(*options_.init_from);
  build_optimizer();  // fp32 masters from the fp32 weights, before they are cast for compute
  if (bf16_) cast_parameters(*model_, at::kBFloat16);
  build_gradient_synchronizers();
  checkpoints_ = std::make_unique<CheckpointManager>(
      (fs::path(config_.train.out_dir) / "checkpoints").string(), groups_);
  checkpoints_->set_run_id(options_.run_id);
  if (options_.resume) {
    const auto dir = checkpoints_->resolve(*options_.resume);
    checkpoints_->set_run_id(checkpoint_info(dir).run_id);  // a resumed run stays the same run
    state_ = checkpoints_->load(dir, *model_, *optimizer_);
    if (is_root_ && options_.print)
      std::cout << fmt::format("resumed from {} (step {}, {} samples consumed)", dir, state_.step,
                               state_.samples_consumed)
                << std::endl;
  }
}

void Trainer::build_optimizer() {
  const bool shard = config_.parallel.distributed_optimizer;
  std::vector<ParameterToOptimize> parameters;
  for (const auto& [name, param] : named_parameter_list(*model_)) {
    auto* group = is_expert_parameter(name) ? groups_.edp.get() : groups_.world.get();
    parameters.push_back({name, param, shard ? group : nullptr, /*separate_master=*/bf16_});
  }
  optimizer_ = std::make_unique<AdamW>(parameters, config_.train);
}

void Trainer::build_gradient_synchronizers() {
  parallel::GradSyncOptions options;
  options.bucket_bytes = static_cast<int64_t>(config_.parallel.bucket_mb * 1024 * 1024);
  // Overlapping the gradient reduction with backward needs the communication worker.
  options.overlap = config_.parallel.overlap_grad_sync && config_.parallel.comm_worker;
  options.shard = config_.parallel.distributed_optimizer;
  options.reduce_in_bf16 = config_.parallel.grad_reduce_dtype == Precision::kBf16;
  const int world = groups_.world->size();
  dense_sync_ = std::make_unique<parallel::GradientSynchronizer>(select_parameters(*model_, false),
                                                                 *groups_.world, world, options);
  expert_sync_ = std::make_unique<parallel::GradientSynchronizer>(select_parameters(*model_, true),
                                                                  *groups_.edp, world, options);
  // Slots follow the model's parameter order; each synchronizer holds its subset in that order.
  size_t dense = 0, expert = 0;
  for (const auto& slot : optimizer_->slots()) {
    const bool is_expert = is_expert_parameter(slot.name);
    gradient_sources_.push_back(is_expert ? GradientSource{expert_sync_.get(), expert++}
                                          : GradientSource{dense_sync_.get(), dense++});
  }
}

std::vector<at::Tensor> Trainer::synced_gradients() const {
  std::vector<at::Tensor> grads;
  for (const auto& [sync, index] : gradient_sources_) grads.push_back(sync->gradient(index));
  return grads;
}

std::map<std::string, at::Tensor> Trainer::gradients() const {
  std::map<std::string, at::Tensor> named;
  const auto grads = synced_gradients();
  for (size_t i = 0; i < grads.size(); ++i) named[optimizer_->slots()[i].name] = grads[i];
  return named;
}

void Trainer::apply_update(double lr) {
  optimizer_->step(lr, synced_gradients());
  if (!config_.parallel.distributed_optimizer) return;
  for (auto* sync : {dense_sync_.get(), expert_sync_.get()}) {
    std::vector<at::Tensor> chunks;
    for (size_t i = 0; i < optimizer_->slots().size(); ++i)
      if (gradient_sources_[i].sync == sync) chunks.push_back(optimizer_->slots()[i].master);
    sync->all_gather_parameters(chunks);
  }
}

int64_t Trainer::first_sample(int64_t samples_consumed, int64_t micro) const {
  // Global batch = [samples_consumed, +world·accum·mbs); this rank's micro-batch slice:
  const int64_t world = groups_.world->size();
  const int64_t rank = groups_.world->rank();
  return samples_consumed + (micro * world + rank) * config_.train.micro_batch_size;
}

std::vector<moe::RoutingInputs> Trainer::routing_inputs(
    int64_t first_sample_index, const std::vector<at::Tensor>& global_fractions) const {
  const size_t layers = model_->moe_layers().size();
  std::vector<moe::RoutingInputs> inputs(layers);
  for (size_t i = 0; i < layers; ++i) {
    // The same (seed, step, first sample, layer) always gives the same jitter.
    inputs[i].noise_seed =
        mix_seeds({static_cast<uint64_t>(config_.train.seed), static_cast<uint64_t>(state_.step),
                   static_cast<uint64_t>(first_sample_index), i});
    if (i < global_fractions.size()) inputs[i].global_load_fraction = global_fractions[i];
  }
  return inputs;
}

std::vector<at::Tensor> Trainer::global_load_fractions(int64_t samples_consumed) {
  const auto& t = config_.train;
  const size_t layers = model_->moe_layers().size();
  std::vector<at::Tensor> load(layers);
  {
    at::NoGradGuard no_grad;
    for (int64_t micro = 0; micro < t.grad_accum; ++micro) {
      const int64_t first = first_sample(samples_consumed, micro);
      const auto batch = data_.train_samples(first, t.micro_batch_size, t.seed).to(device_);
      const AutocastScope autocast(device_, bf16_);
      const auto out = model_->forward(batch.narrow(1, 0, t.seq_len), routing_inputs(first, {}));
      for (size_t i = 0; i < layers; ++i)
        load[i] = load[i].defined() ? load[i] + out.routing[i].load : out.routing[i].load;
    }
  }
  const auto global = sum_loads(*groups_.world, load);  // over the data-parallel world
  std::vector<at::Tensor> fractions;
  for (const auto& counts : global) {
    const auto as_float = counts.to(at::kFloat);
    fractions.push_back(as_float / as_float.sum().clamp_min(1.0));
  }
  return fractions;
}

void Trainer::initialize_from(const std::string& path) {
  // Weights only (any format, any ep_size); the optimizer and step start fresh.
  const auto source = load_model_source(path, config_, "initialise from");
  load_model_weights(*model_, source.weights, source.description, source.origin);
  if (is_root_ && options_.print)
    std::cout << fmt::format("initialised weights from {} (step 0, fresh optimizer)", path)
              << std::endl;
}

Trainer::MicroBatchTotals Trainer::forward_backward(int64_t samples_consumed) {
  const auto& t = config_.train;
  const int rank = groups_.world->rank();
  const auto& balancing = config_.moe.balancing;
  auto layers = model_->moe_layers();
  const auto on_device = at::TensorOptions(device_);
  MicroBatchTotals totals;
  totals.losses = at::zeros({3}, on_device.dtype(at::kDouble));
  for (auto& layer : layers) {  // one tensor each: they are summed in place
    totals.load.push_back(at::zeros({layer->pool_size()}, on_device.dtype(at::kLong)));
    totals.routing.push_back(at::zeros({kRoutingValues}, on_device.dtype(at::kDouble)));
  }
  const bool global_aux =
      balancing.aux_loss.coeff > 0 && balancing.aux_loss.scope == moe::AuxLossScope::kGlobalBatch;
  const auto fractions =
      global_aux ? global_load_fractions(samples_consumed) : std::vector<at::Tensor>{};
  dense_sync_->zero_grad();
  expert_sync_->zero_grad();
  // parallel.micro_batch_overlap: two micro-batches per forward and backward, interleaved.
  const int64_t group = config_.parallel.micro_batch_overlap && t.grad_accum % 2 == 0 ? 2 : 1;
  for (int64_t micro = 0; micro < t.grad_accum; micro += group) {
    const auto forward = forward_micro_batches(samples_consumed, micro, group, fractions);
    if (micro + group == t.grad_accum) {  // gradients are final in this backward: sync as they come
      dense_sync_->prepare_for_backward();
      expert_sync_->prepare_for_backward();
    }
    {
      const parallel::trace::Span span("compute", "backward");
      RECORD_USER_SCOPE("backward");
      (forward.total / static_cast<double>(t.grad_accum)).backward();
    }
    for (size_t m = 0; m < forward.outs.size(); ++m) {
      const auto& out = forward.outs[m];
      totals.losses +=
          at::stack({forward.lm_losses[m].detach(), out.aux_loss.detach(), out.z_loss.detach()})
              .to(at::kDouble) /
          static_cast<double>(t.grad_accum);
      accumulate_routing(out.routing, totals);
    }
  }
  // Read once per step (on a GPU, the step's only wait for the device besides the MoE counts).
  const double loss = totals.losses[0].item<double>();
  if (!std::isfinite(loss))
    throw std::runtime_error(
        fmt::format("non-finite loss ({}) on rank {} at step {}: lower train.lr or check the data",
                    loss, rank, state_.step + 1));
  const parallel::trace::Span span("compute", "gradient sync (wait)");
  RECORD_USER_SCOPE("gradient sync");
  dense_sync_->synchronize();
  expert_sync_->synchronize();
  return totals;
}

Trainer::MicroBatchForward Trainer::forward_micro_batches(
    int64_t samples_consumed, int64_t micro, int64_t count,
    const std::vector<at::Tensor>& fractions) {
  const auto& t = config_.train;
  std::vector<at::Tensor> batches;  // [B, S+1] each
  std::vector<std::vector<moe::RoutingInputs>> routing;
  for (int64_t m = micro; m < micro + count; ++m) {
    const int64_t first = first_sample(samples_consumed, m);
    batches.push_back(data_.train_samples(first, t.micro_batch_size, t.seed).to(device_));
    routing.push_back(routing_inputs(first, fractions));
  }
  const auto inputs = [&](size_t m) { return batches[m].narrow(1, 0, t.seq_len); };
  const auto forward_start = parallel::trace::Clock::now();
  MicroBatchForward result;
  {
    const AutocastScope autocast(device_, bf16_);
    {
      RECORD_USER_SCOPE("forward");
      if (count == 2) {
        auto pair = model_->forward_pair({inputs(0), inputs(1)}, {routing[0], routing[1]});
        result.outs = {std::move(pair[0]), std::move(pair[1])};
      } else {
        result.outs.push_back(model_->forward(inputs(0), routing[0]));
      }
    }
    RECORD_USER_SCOPE("loss");
    for (size_t m = 0; m < batches.size(); ++m)
      result.lm_losses.push_back(
          language_model_loss(result.outs[m].logits, targets_of(batches[m])));
  }
  parallel::trace::record("compute", "forward", forward_start, parallel::trace::Clock::now());
  const auto& balancing = config_.moe.balancing;
  for (size_t m = 0; m < batches.size(); ++m) {
    const auto& out = result.outs[m];
    const auto one = result.lm_losses[m] + balancing.aux_loss.coeff * out.aux_loss +
                     balancing.z_loss.coeff * out.z_loss;
    result.total = result.total.defined() ? result.total + one : one;
  }
  return result;
}

void Trainer::accumulate_routing(const std::vector<moe::RoutingCounters>& routing,
                                 MicroBatchTotals& totals) const {
  const int64_t num_experts = config_.moe.num_experts;
  const double accum = static_cast<double>(config_.train.grad_accum);
  for (size_t i = 0; i < routing.size(); ++i) {
    const auto& counters = routing[i];
    totals.load[i] += counters.load;
    const auto counts = counters.slot_counts.to(at::kDouble);  // selected, null, kept rows
    const auto selected = counts[0], null_slots = counts[1], rows = counts[2];
    // In RoutingValue order: dropped, real slots, null slots, entropy, micro-batch MaxVio.
    totals.routing[i] += at::stack(
        {selected - null_slots - rows, selected - null_slots, null_slots, counters.entropy / accum,
         moe::max_violation_tensor(counters.load.narrow(0, 0, num_experts)) / accum});
  }
}

Trainer::LossTerms Trainer::compute_gradients(int64_t samples_consumed) {
  const auto totals = forward_backward(samples_consumed);
  auto packed = totals.losses.cpu();
  groups_.world->all_reduce(packed);
  const double world = groups_.world->size();
  return {packed[0].item<double>() / world, packed[1].item<double>() / world,
          packed[2].item<double>() / world};
}

double Trainer::clip_gradients() {
  at::NoGradGuard no_grad;
  // Non-expert gradients are identical on every rank after sync: count them once. Expert
  // gradients are distinct across the EP group (and identical across EDP): sum over EP.
  // Sharded, each rank holds a chunk of each: sum the chunks over world (dense) and over
  // EDP (experts) first. Summed on the device in float64, read once.
  const auto grads = synced_gradients();
  auto squares = at::zeros({2}, at::TensorOptions(device_).dtype(at::kDouble));  // dense, expert
  for (size_t i = 0; i < grads.size(); ++i)
    squares[is_expert_parameter(optimizer_->slots()[i].name) ? 1 : 0] +=
        grads[i].to(at::kDouble).square().sum();
  auto dense_sq = squares.narrow(0, 0, 1).cpu(), expert_sq = squares.narrow(0, 1, 1).cpu();
  if (config_.parallel.distributed_optimizer) {
    groups_.world->all_reduce(dense_sq);
    groups_.edp->all_reduce(expert_sq);
  }
  groups_.ep->all_reduce(expert_sq);
  const double norm = std::sqrt(dense_sq.item<double>() + expert_sq.item<double>());
  const double clip = config_.train.grad_clip;
  if (clip > 0 && norm > clip) {
    const double scale = clip / (norm + 1e-6);
    for (const auto& grad : grads) grad.mul_(scale);
  }
  return norm;
}

void Trainer::update_expert_biases(const std::vector<at::Tensor>& global_load) {
  // Once per optimizer step, from loads summed over the whole world and all micro-batches, so
  // every rank applies the same update to its replica of the bias.
  const auto& bias_config = config_.moe.balancing.expert_bias;
  if (bias_config.rate <= 0) return;
  const double rate = moe::expert_bias_rate(bias_config, state_.step, config_.train.steps);
  auto layers = model_->moe_layers();
  for (size_t i = 0; i < layers.size(); ++i)
    moe::update_expert_bias(layers[i]->router->expert_bias, global_load[i], rate,
                            bias_config.mean_center);
}

StepMetrics Trainer::train_step() {
  const auto& t = config_.train;
  const auto start = Clock::now();
  const int world = groups_.world->size();
  if (fail_at_ && fail_at_->first == groups_.world->rank() && fail_at_->second == state_.step + 1)
    throw std::runtime_error(
        fmt::format("injected failure on rank {} at step {} (MOEFORGE_FAIL_AT)", fail_at_->first,
                    fail_at_->second));
  const double lr = learning_rate(t, state_.step);

  const auto totals = forward_backward(state_.samples_consumed);
  if (nan_grad_steps_.count(state_.step + 1)) dense_sync_->gradient(0).fill_(std::nan(""));
  double grad_norm = 0.0;
  bool update = false;
  {
    const parallel::trace::Span span("compute", "clip + optimizer");
    RECORD_USER_SCOPE("clip + optimizer");
    grad_norm = clip_gradients();
    update = accept_update(grad_norm);
    if (update) apply_update(lr);
  }

  const auto sums = sum_over_world(totals);
  auto global_load = sum_loads(*groups_.world, totals.load);
  if (update) update_expert_biases(global_load);

  state_.step += 1;
  state_.samples_consumed += static_cast<int64_t>(world) * t.grad_accum * t.micro_batch_size;

  StepMetrics m;
  m.step = state_.step;
  m.total_steps = t.steps;
  m.loss = sums.loss / world;
  m.aux_loss = sums.aux / world;
  m.z_loss = sums.z / world;
  m.lr = lr;
  m.grad_norm = grad_norm;
  m.skipped = !update;
  m.stop_requested = sums.stop_requested;
  m.step_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  m.tokens_per_s =
      static_cast<double>(world * t.grad_accum * t.micro_batch_size * t.seq_len) / m.step_seconds;
  auto peak = at::tensor({static_cast<double>(peak_memory_bytes(device_))}, at::kDouble);
  groups_.world->all_reduce(peak, parallel::ReduceOp::kMax);
  m.peak_memory_mib = peak.item<double>() / (1 << 20);
  add_flop_rates(m);
  for (size_t i = 0; i < sums.layers.size(); ++i) {
    m.layers.push_back(layer_metrics(i, sums.layers[i], global_load[i]));
    m.max_vio = std::max(m.max_vio, m.layers.back().max_vio);
    m.max_vio_micro = std::max(m.max_vio_micro, m.layers.back().max_vio_micro);
  }
  summarize_layers(m);
  const int64_t dump_every = config_.logging.expert_load_every;
  if (dump_every > 0 && m.step % dump_every == 0)
    m.expert_load_by_rank = expert_load_by_rank(totals);
  return m;
}

Trainer::WorldSums Trainer::sum_over_world(const MicroBatchTotals& totals) const {
  std::vector<at::Tensor> parts = {totals.losses};  // [loss, aux, z], then kRoutingValues a layer
  parts.insert(parts.end(), totals.routing.begin(), totals.routing.end());
  // Last: whether this rank received a stop signal, so every rank agrees in the same reduce.
  parts.push_back(at::full({1}, requested_stop_signal() != 0 ? 1.0 : 0.0, totals.losses.options()));
  auto packed = at::cat(parts).cpu();
  groups_.world->all_reduce(packed);
  const double* values = packed.data_ptr<double>();
  WorldSums sums{values[0], values[1], values[2], values[packed.numel() - 1] > 0, {}};
  for (size_t i = 0; i < totals.routing.size(); ++i) {
    std::array<double, kRoutingValues> layer{};
    std::copy_n(values + 3 + kRoutingValues * i, kRoutingValues, layer.begin());
    sums.layers.push_back(layer);
  }
  return sums;
}

MoeLayerMetrics Trainer::layer_metrics(size_t index, const std::array<double, kRoutingValues>& sums,
                                       const at::Tensor& global_load) const {
  const int64_t num_experts = config_.moe.num_experts;
  const double world = groups_.world->size();
  MoeLayerMetrics layer;
  for (int64_t b = 0, seen = 0; b < config_.model.num_layers; ++b)
    if (is_moe_block(config_.moe, b) && seen++ == static_cast<int64_t>(index)) layer.layer = b;
  const auto load = global_load.cpu();
  const auto* counts = load.data_ptr<int64_t>();
  layer.expert_load.assign(counts, counts + num_experts);  // real experts (not null ones)
  layer.max_vio = moe::max_violation(load.narrow(0, 0, num_experts));
  const auto spread = load_spread(layer.expert_load);
  layer.load_min = spread.min;
  layer.load_max = spread.max;
  layer.load_cv = spread.cv;
  const double real = sums[kRealSlots], null_slots = sums[kNullSlots];
  layer.dropped_frac = real > 0 ? sums[kDropped] / real : 0.0;
  layer.null_frac = real + null_slots > 0 ? null_slots / (real + null_slots) : 0.0;
  layer.router_entropy = sums[kEntropy] / world;
  layer.max_vio_micro = sums[kMicroMaxVio] / world;
  const auto bias_abs = model_->moe_layers()[index]->router->expert_bias.abs();
  layer.bias_abs_max = bias_abs.max().item<double>();
  layer.bias_abs_mean = bias_abs.mean().item<double>();
  return layer;
}

std::vector<std::vector<std::vector<int64_t>>> Trainer::expert_load_by_rank(
    const MicroBatchTotals& totals) const {
  const int64_t num_experts = config_.moe.num_experts;
  std::vector<at::Tensor> real;  // null experts are not experts: left out
  for (const auto& load : totals.load) real.push_back(load.narrow(0, 0, num_experts));
  if (real.empty()) return {};
  const auto gathered = groups_.world->all_gather(at::cat(real).contiguous()).cpu();  // [W, L·E]
  const auto* counts = gathered.data_ptr<int64_t>();
  const int64_t layers = static_cast<int64_t>(real.size()), ranks = gathered.size(0);
  std::vector<std::vector<std::vector<int64_t>>> result(layers);
  for (int64_t layer = 0; layer < layers; ++layer)
    for (int64_t rank = 0; rank < ranks; ++rank) {
      const auto* row = counts + (rank * layers + layer) * num_experts;
      result[layer].emplace_back(row, row + num_experts);
    }
  return result;
}

void Trainer::add_flop_rates(StepMetrics& m) const {
  // tokens_per_s is the world's; TFLOP/s and MFU are per rank, as Megatron reports them.
  const double tokens_per_rank = m.tokens_per_s / groups_.world->size();
  m.tflops = flops_.training_per_token * tokens_per_rank / 1e12;
  if (peak_tflops_ <= 0) return;
  m.mfu = m.tflops / peak_tflops_;
  m.hfu = flops_.hardware_per_token * tokens_per_rank / 1e12 / peak_tflops_;
}

double Trainer::establish_peak_tflops(bool print) const {
  const auto& logging = config_.logging;
  if (logging.peak_tflops > 0) {
    if (print)
      std::cout << fmt::format("MFU relative to logging.peak_tflops = {} TFLOP/s per rank",
                               logging.peak_tflops)
                << std::endl;
    return logging.peak_tflops;
  }
  const auto& t = config_.train;
  const int64_t tokens = t.micro_batch_size * t.seq_len, hidden = config_.model.hidden_size;
  const int64_t ffn = config_.model.ffn_size;
  const double measured = parallel::all_reduce_mean(
      *groups_.world,
      measure_matmul_tflops(device_, bf16_ ? at::kBFloat16 : at::kFloat, tokens, hidden, ffn));
  if (print)
    std::cout << fmt::format(
                     "MFU relative to a measured peak of {:.3g} TFLOP/s per rank ({} matmul "
                     "[{}, {}]·[{}, {}] on {}, mean of the ranks); set logging.peak_tflops to "
                     "use a datasheet figure",
                     measured, enum_text(t.precision), tokens, hidden, hidden, ffn, device_.str())
              << std::endl;
  return measured;
}

at::Tensor Trainer::targets_of(const at::Tensor& batch) const {
  return next_token_targets(batch, config_.train.seq_len, config_.data);
}

double Trainer::evaluate() {
  const auto& t = config_.train;
  const int world = groups_.world->size();
  const int rank = groups_.world->rank();
  at::NoGradGuard no_grad;
  model_->eval();
  double loss_sum = 0.0;
  for (int64_t b = 0; b < t.eval_batches; ++b) {
    const auto batch =
        data_.val_samples((b * world + rank) * t.micro_batch_size, t.micro_batch_size).to(device_);
    const AutocastScope autocast(device_, bf16_);
    const auto out = model_->forward(batch.narrow(1, 0, t.seq_len));
    loss_sum += language_model_loss(out.logits, targets_of(batch)).item<double>();
  }
  model_->train();
  return parallel::all_reduce_mean(*groups_.world, loss_sum / std::max<int64_t>(1, t.eval_batches));
}

RunSummary Trainer::run() {
  const auto& t = config_.train;
  const bool print = is_root_ && options_.print;
  const bool write = options_.write_outputs;
  RunSummary summary;
  summary.out_dir = t.out_dir;
  summary.unigram_entropy = data_.unigram_entropy_nats();
  const std::string resolved = to_yaml(config_);
  if (write && is_root_) {
    fs::create_directories(t.out_dir);
    write_file_atomically((fs::path(t.out_dir) / "config.resolved.yaml").string(), resolved);
    if (!config_.data.tokenizer.empty())  // generate / eval / export find it in the run
      copy_tokenizer(tokenizer_directory(config_.data.tokenizer, "data.tokenizer"), t.out_dir,
                     config_.model.vocab_size);
    checkpoints_->remove_incomplete();
  }
  MetricsLog log(write && is_root_ ? (fs::path(t.out_dir) / "metrics.jsonl").string() : "",
                 options_.resume ? std::optional<int64_t>(state_.step) : std::nullopt, print);
  if (write && is_root_ && config_.logging.tensorboard)
    log.write_tensorboard_to((fs::path(t.out_dir) / "tensorboard").string());
  if (write && is_root_ && config_.logging.expert_load_every > 0)
    log.write_expert_load_to((fs::path(t.out_dir) / "expert_load.jsonl").string());
  groups_.world->barrier();
  peak_tflops_ = summary.peak_tflops = establish_peak_tflops(print);
  const int64_t end_step =
      options_.stop_at_step > 0 ? std::min(options_.stop_at_step, t.steps) : t.steps;
  summary.first_step = state_.step + 1;
  if (print)
    std::cout << run_banner(config_, data_, *optimizer_,
                            {groups_.world->size(), groups_.ep_size, state_.step, end_step})
              << std::endl;
  const TraceWindow trace(config_.logging, state_.step, end_step);
  StepProfiler profiler(trace.first_step(), trace.last_step(), write && is_root_,
                        device_.is_cuda());
  const auto run_start = Clock::now();
  const int64_t start_step = state_.step;
  while (state_.step < end_step) {
    trace.before_step(state_.step + 1);
    profiler.before_step(state_.step + 1);
    const auto step_start = parallel::trace::Clock::now();
    auto m = [this] {
      RECORD_USER_SCOPE("train_step");
      return train_step();
    }();
    parallel::trace::record("step", fmt::format("step {}", m.step), step_start,
                            parallel::trace::Clock::now());  // boundaries for plot_trace.py
    m.elapsed_seconds = std::chrono::duration<double>(Clock::now() - run_start).count();
    m.eta_seconds = m.elapsed_seconds / static_cast<double>(state_.step - start_step) *
                    static_cast<double>(end_step - state_.step);
    warn_if_unbalanced(m);
    trace.after_step(m.step, t.out_dir, groups_.world->rank(), print);
    profiler.after_step(m.step, print);
    summary.steps.push_back(m);
    summary.skipped_steps += m.skipped ? 1 : 0;
    if (m.stop_requested) {  // every rank agreed: record the step, checkpoint, stop
      if (is_root_) log.log(m);
      if (write && config_.checkpoint.on_signal) {
        check_state_finite();
        summary.last_checkpoint =
            checkpoints_->save(*model_, *optimizer_, state_, resolved, config_.checkpoint.keep);
      }
      summary.stop_signal = std::max(1, requested_stop_signal());
      break;
    }
    record_step(m, end_step, resolved, log, summary);
  }
  summary.wall_seconds = std::chrono::duration<double>(Clock::now() - run_start).count();
  summarise(summary);
  return summary;
}

void Trainer::warn_if_unbalanced(const StepMetrics& m) {
  const double threshold = config_.logging.max_vio_warning;
  if (threshold <= 0 || m.layers.empty() || warned_unbalanced_) return;
  unbalanced_steps_ = m.max_vio > threshold ? unbalanced_steps_ + 1 : 0;
  if (unbalanced_steps_ < kUnbalancedStepsBeforeWarning) return;
  warned_unbalanced_ = true;
  if (!is_root_ || !options_.print) return;
  const auto& balancing = config_.moe.balancing;
  std::cout << fmt::format(
                   "warning: step {}: MaxVio has been above {} for {} steps (now {:.2f}; 0 = "
                   "every expert equally loaded, {} = all tokens on one expert): the router is "
                   "collapsing onto a few experts. Balancing now: aux loss {}, expert bias rate "
                   "{}; raise moe.balancing.aux_loss.coeff (e.g. 0.01) or set "
                   "moe.balancing.expert_bias.rate (e.g. 0.001), see docs/balancing.md",
                   m.step, threshold, unbalanced_steps_, m.max_vio, config_.moe.num_experts - 1,
                   balancing.aux_loss.coeff, balancing.expert_bias.rate)
            << std::endl;
}

void Trainer::record_step(const StepMetrics& m, int64_t end_step, const std::string& resolved,
                          MetricsLog& log, RunSummary& summary) {
  const auto& t = config_.train;
  const bool last = state_.step == end_step;
  if (is_root_ && (state_.step % config_.logging.every == 0 || last)) log.log(m);
  if (is_root_) log.log_expert_load(m);  // on the steps that carry it
  if ((t.eval_every > 0 && state_.step % t.eval_every == 0) || last) {
    EvalMetrics e{state_.step, evaluate()};
    summary.evals.push_back(e);
    if (is_root_) log.log(e);
  }
  const bool save_now =
      (config_.checkpoint.every > 0 && state_.step % config_.checkpoint.every == 0) || last;
  if (options_.write_outputs && save_now) {
    check_state_finite();
    summary.last_checkpoint =
        checkpoints_->save(*model_, *optimizer_, state_, resolved, config_.checkpoint.keep);
  }
}

bool Trainer::accept_update(double grad_norm) {
  if (std::isfinite(grad_norm)) {
    consecutive_skips_ = 0;
    return true;
  }
  ++consecutive_skips_;
  if (consecutive_skips_ > config_.train.max_skipped_steps)
    throw CollectiveError(fmt::format(
        "step {}: the gradient norm is {} for the {} step(s) in a row, more than "
        "train.max_skipped_steps = {}: stopping (no checkpoint of this state is written; the "
        "last good one is kept). Lower train.lr, raise train.grad_clip's effect or check the data",
        state_.step + 1, grad_norm, consecutive_skips_, config_.train.max_skipped_steps));
  if (is_root_ && options_.print)
    std::cout << fmt::format(
                     "warning: step {}: gradient norm {} is not finite; update skipped "
                     "({} in a row, train.max_skipped_steps = {})",
                     state_.step + 1, grad_norm, consecutive_skips_,
                     config_.train.max_skipped_steps)
              << std::endl;
  return false;
}

void Trainer::check_state_finite() const {
  at::NoGradGuard no_grad;
  auto bad = at::zeros({1}, at::TensorOptions(device_).dtype(at::kDouble));
  for (const auto& slot : optimizer_->slots())
    for (const auto* tensor : {&slot.master, &slot.exp_avg, &slot.exp_avg_sq})
      bad += at::logical_not(at::isfinite(*tensor)).any().to(at::kDouble);
  auto host = bad.cpu();
  groups_.world->all_reduce(host);
  if (host.item<double>() > 0)
    throw CollectiveError(fmt::format(
        "step {}: the weights or optimizer state are not finite: refusing to write a checkpoint "
        "of them (the last good checkpoint is kept). Lower train.lr and resume from it",
        state_.step));
}

}  // namespace moeforge
