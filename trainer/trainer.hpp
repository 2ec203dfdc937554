#pragma once
// The training loop: a short list of steps per optimizer step —
//   for each micro-batch: forward, loss (+ weighted aux / z losses), backward
//   synchronise gradients (non-expert over world, expert over EDP), clip by the global norm,
//   AdamW step, expert-bias update, metrics, periodic eval and checkpoint.
// Parallelism is applied from outside (process groups); the loop only sequences.
// Collective: every rank of the world runs it together.
#include <array>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "parallel/grad_sync.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/checkpoint/checkpoint.hpp"
#include "trainer/config/config.hpp"
#include "trainer/data/data.hpp"
#include "trainer/metrics.hpp"
#include "trainer/model/flops.hpp"
#include "trainer/model/model.hpp"
#include "trainer/optim/optimizer.hpp"

namespace moeforge {

struct RunOptions {
  std::optional<std::string> resume;     // set = resume; "" or "latest" = newest in out_dir
  std::optional<std::string> init_from;  // weights only (checkpoint or HF dir), fresh optimizer
  bool write_outputs = true;             // metrics.jsonl, config.resolved.yaml, checkpoints
  bool print = true;                     // console lines (rank 0 only in any case)
  std::string run_id;        // fresh runs: the id start_fresh_run wrote (checkpoints record it)
  int64_t stop_at_step = 0;  // > 0: stop (and checkpoint) there; the LR schedule still
                             // follows train.steps, so a later --resume continues it
};

struct RunSummary {
  std::vector<StepMetrics> steps;
  std::vector<EvalMetrics> evals;
  double final_train_loss = 0.0;  // mean of the last `loss_steps_averaged` (≤ 10) steps' loss
  int64_t loss_steps_averaged = 0;
  int64_t first_step = 0;     // the first step this invocation trained (1-based)
  double wall_seconds = 0.0;  // of the training loop (evaluations and checkpoints included)
  double final_val_loss = 0.0;
  double tokens_per_s = 0.0;  // mean over steps after the first
  double tflops = 0.0;        // model TFLOP/s per rank, mean over steps after the first
  double mfu = 0.0;           // of peak_tflops, mean over steps after the first
  double peak_tflops = 0.0;   // one rank's peak: logging.peak_tflops or measured at start
  double unigram_entropy = 0.0;
  std::string out_dir;
  std::string last_checkpoint;
  int64_t skipped_steps = 0;  // steps without an update (non-finite gradients)
  int stop_signal = 0;        // > 0: stopped early by this signal (checkpoint written first)
};

class Trainer {
 public:
  Trainer(const Config& config, const parallel::ProcessGroups& groups, TokenDataset data,
          RunOptions options);

  // Trains from the current state (0, or the resumed checkpoint) to train.steps.
  RunSummary run();

  // Forward + backward over one global batch (all micro-batches of this rank) and gradient
  // synchronisation, without the optimizer step. Returns the loss terms (world means).
  struct LossTerms {
    double loss = 0.0, aux = 0.0, z = 0.0;
  };
  LossTerms compute_gradients(int64_t samples_consumed);

  // Mean validation loss over train.eval_batches micro-batches per rank (world mean).
  double evaluate();

  DecoderLMImpl& model() { return *model_; }
  const AdamW& optimizer() const { return *optimizer_; }
  // Every parameter's gradient as the optimizer sees it after the last synchronisation (fp32
  // for bf16 parameters; this rank's chunk when the optimizer is sharded), by parameter name.
  std::map<std::string, at::Tensor> gradients() const;
  const c10::Device& device() const { return device_; }
  // Gradient buckets all-reduced while the last backward was still running (overlap proof).
  int64_t buckets_launched_during_backward() const {
    return dense_sync_->launched_during_backward() + expert_sync_->launched_during_backward();
  }
  const TrainingState& state() const { return state_; }

 private:
  // Sums over this rank's micro-batches of one optimizer step (loss terms are means), kept on
  // the device until the step reads them all at once.
  struct MicroBatchTotals {
    at::Tensor losses;                // [3] float64: loss, aux, z
    std::vector<at::Tensor> load;     // per MoE layer [P] int64
    std::vector<at::Tensor> routing;  // per MoE layer [kRoutingValues] float64 (see below)
  };
  // Positions in MicroBatchTotals::routing: per-layer sums over micro-batches.
  enum RoutingValue : int64_t {
    kDropped,      // slots dropped by the capacity limit
    kRealSlots,    // selected slots of real experts
    kNullSlots,    // selected slots of null experts
    kEntropy,      // router entropy / grad_accum
    kMicroMaxVio,  // micro-batch MaxVio / grad_accum
    kRoutingValues
  };
  // The step's numbers summed over the world (one all-reduce), by name.
  struct WorldSums {
    double loss = 0.0, aux = 0.0, z = 0.0;  // sums of the ranks' means
    bool stop_requested = false;            // some rank received a stop signal
    std::vector<std::array<double, kRoutingValues>> layers;
  };
  WorldSums sum_over_world(const MicroBatchTotals& totals) const;
  MoeLayerMetrics layer_metrics(size_t index, const std::array<double, kRoutingValues>& sums,
                                const at::Tensor& global_load) const;
  MicroBatchTotals forward_backward(int64_t samples_consumed);
  // The forward of micro-batches [micro, micro + count): one, or two interleaved
  // (parallel.micro_batch_overlap). `total`: the loss their one backward starts from.
  struct MicroBatchForward {
    std::vector<LmOutput> outs;
    std::vector<at::Tensor> lm_losses;
    at::Tensor total;  // Σ CE + aux.coeff·aux + z.coeff·z over the micro-batches
  };
  MicroBatchForward forward_micro_batches(int64_t samples_consumed, int64_t micro, int64_t count,
                                          const std::vector<at::Tensor>& fractions);
  // Adds every MoE layer's counters of the micro-batch just run to `totals`.
  void accumulate_routing(const std::vector<moe::RoutingCounters>& routing,
                          MicroBatchTotals& totals) const;
  // Weights from a checkpoint (or HF directory); optimizer and step start fresh.
  void initialize_from(const std::string& path);
  // Global-batch aux scope: a no-grad routing pass over this step's micro-batches gives the load
  // fraction of the whole global batch per MoE layer, which the real micro-batches then use.
  std::vector<at::Tensor> global_load_fractions(int64_t samples_consumed);
  // Sample index of the first sequence of this rank's micro-batch `micro`.
  int64_t first_sample(int64_t samples_consumed, int64_t micro) const;
  // Per MoE layer: the jitter seed of this micro-batch (the same whenever it is routed again:
  // replay, pre-pass) and the global-batch load fraction when given.
  std::vector<moe::RoutingInputs> routing_inputs(
      int64_t first_sample_index, const std::vector<at::Tensor>& global_fractions) const;
  StepMetrics train_step();
  // Non-finite gradient norm: the step is skipped (every rank sees the same norm); too many in
  // a row stop the run. Returns whether to apply the update.
  bool accept_update(double grad_norm);
  // Refuses (CollectiveError) to checkpoint weights or optimizer state that are not finite.
  void check_state_finite() const;
  // One step's bookkeeping after the update: log, evaluate, checkpoint.
  void record_step(const StepMetrics& m, int64_t end_step, const std::string& resolved,
                   MetricsLog& log, RunSummary& summary);
  void update_expert_biases(const std::vector<at::Tensor>& global_load);
  // Warns once (rank 0) when the global MaxVio stays above logging.max_vio_warning for
  // kUnbalancedStepsBeforeWarning steps in a row: the router is collapsing.
  void warn_if_unbalanced(const StepMetrics& m);
  static constexpr int64_t kUnbalancedStepsBeforeWarning = 20;
  // The peak MFU divides by: logging.peak_tflops, or (0) a matmul of the model's shape
  // [micro-batch tokens, hidden]·[hidden, ffn] in train.precision timed on every rank (mean).
  double establish_peak_tflops(bool print) const;
  // Fills m.tflops, m.mfu, m.hfu from m.tokens_per_s (the world's) and peak_tflops_.
  void add_flop_rates(StepMetrics& m) const;
  // [MoE layer][rank][expert]: every rank's slots per real expert this step (one all-gather).
  std::vector<std::vector<std::vector<int64_t>>> expert_load_by_rank(
      const MicroBatchTotals& totals) const;
  // AdamW over every parameter; sharded over world / EDP with parallel.distributed_optimizer.
  void build_optimizer();
  // Dense gradients over world, expert gradients over EDP; fp32 accumulation for bf16.
  void build_gradient_synchronizers();
  // Slot i's averaged gradient (whole, or this rank's chunk when sharded), in slot order.
  std::vector<at::Tensor> synced_gradients() const;
  // AdamW step on the masters, then the compute weights from them (all-gathered if sharded).
  void apply_update(double lr);
  double clip_gradients();
  // Next-token targets of a [B, S+1] batch; -100 (ignored) after an end-of-document token when
  // data.mask_loss_after_eod.
  at::Tensor targets_of(const at::Tensor& batch) const;

  Config config_;
  c10::Device device_;
  bool bf16_ = false;  // train.precision: bf16 (bf16 parameters, autocast around forwards)
  std::optional<std::pair<int, int64_t>> fail_at_;  // test hook MOEFORGE_FAIL_AT (rank, step)
  std::set<int64_t> nan_grad_steps_;  // test hook MOEFORGE_NAN_GRAD_AT (steps, every rank)
  int64_t consecutive_skips_ = 0;
  int64_t unbalanced_steps_ = 0;  // consecutive steps with MaxVio above the warning threshold
  bool warned_unbalanced_ = false;
  parallel::ProcessGroups groups_;  // with the communication worker / simulated link applied
  TokenDataset data_;
  RunOptions options_;
  DecoderLM model_{nullptr};
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<parallel::GradientSynchronizer> dense_sync_;
  std::unique_ptr<parallel::GradientSynchronizer> expert_sync_;
  struct GradientSource {
    parallel::GradientSynchronizer* sync;
    size_t index;
  };
  std::vector<GradientSource> gradient_sources_;  // per optimizer slot
  std::unique_ptr<CheckpointManager> checkpoints_;
  std::unique_ptr<moe::PhaseObserver> phase_trace_;  // MoE phases into the trace
  TrainingState state_;
  bool is_root_ = false;
  FlopCount flops_;           // per token at train.seq_len
  double peak_tflops_ = 0.0;  // set by run()
};

}  // namespace moeforge
