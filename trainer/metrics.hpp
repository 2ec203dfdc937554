#pragma once
// Step metrics: one console line per logged step and the same as one JSON object per line in
// <out_dir>/metrics.jsonl (rank 0 writes; other ranks only compute); optionally the same numbers
// as TensorBoard scalars (logging.tensorboard) and, every logging.expert_load_every steps, each
// rank's tokens per expert in <out_dir>/expert_load.jsonl. Stable keys: step, loss, aux_loss,
// z_loss, lr, grad_norm, tokens_per_s, step_seconds, peak_memory_mib, tflops, mfu, hfu, max_vio,
// max_vio_micro, max_vio_p50, max_vio_p90, load_cv_p50, load_cv_p90, load_cv_max, dropped_frac,
// null_frac, bias_abs_max, and per MoE layer `moe_layers`: [{layer, expert_load: [...],
// load_min, load_max, load_cv, max_vio, max_vio_micro, router_entropy, dropped_frac, null_frac,
// bias_abs_max, bias_abs_mean}]. docs/observability.md says what each means.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

class EventFileWriter;

struct MoeLayerMetrics {
  int64_t layer = 0;                 // block index
  std::vector<int64_t> expert_load;  // routed slots per global expert, whole global batch
  double load_min = 0.0;             // fewest / most slots of an expert in expert_load
  double load_max = 0.0;
  double load_cv = 0.0;        // coefficient of variation of expert_load (std / mean)
  double max_vio = 0.0;        // MaxVio of the global batch's load
  double max_vio_micro = 0.0;  // MaxVio of each rank's micro-batch load, averaged
  double router_entropy = 0.0;
  double dropped_frac = 0.0;  // of the slots routed to real experts
  double null_frac = 0.0;     // of all selected slots, those that picked a null expert
  double bias_abs_max = 0.0;  // expert bias magnitude (aux-loss-free balancing)
  double bias_abs_mean = 0.0;
};

struct StepMetrics {
  int64_t step = 0;  // 1-based: the step just completed
  int64_t total_steps = 0;
  double loss = 0.0;  // language-model cross-entropy, mean over the global batch
  double aux_loss = 0.0;
  double z_loss = 0.0;
  double lr = 0.0;
  double grad_norm = 0.0;  // before clipping
  double tokens_per_s = 0.0;
  double step_seconds = 0.0;
  double elapsed_seconds = 0.0;  // since this invocation's first step started
  double eta_seconds = 0.0;      // to the last step, at this invocation's mean step time
  double peak_memory_mib = 0.0;  // max over ranks of the peak so far (CUDA allocator / RSS)
  double max_vio = 0.0;          // max over MoE layers of the global-batch MaxVio
  double max_vio_micro = 0.0;    // max over MoE layers of the mean micro-batch MaxVio
  double tflops = 0.0;  // model FLOPs per second per rank / 10¹² (trainer/model/flops.hpp)
  double mfu = 0.0;     // model FLOPs utilisation: tflops / peak TFLOP/s of one rank
  double hfu = 0.0;     // hardware FLOPs utilisation: with recomputed forwards
  // Across MoE layers (trainer/load_statistics.hpp): percentiles of the per-layer MaxVio and
  // load CV, mean dropped and null fractions, largest expert-bias magnitude.
  double max_vio_p50 = 0.0, max_vio_p90 = 0.0;
  double load_cv_p50 = 0.0, load_cv_p90 = 0.0, load_cv_max = 0.0;
  double dropped_frac = 0.0, null_frac = 0.0, bias_abs_max = 0.0;
  // Every logging.expert_load_every steps, else empty: [MoE layer][rank][expert] the slots each
  // rank's micro-batches routed to each real expert in this step.
  std::vector<std::vector<std::vector<int64_t>>> expert_load_by_rank;
  bool skipped = false;         // gradients were not finite: no update this step
  bool stop_requested = false;  // a rank received a stop signal (agreed by every rank)
  std::vector<MoeLayerMetrics> layers;
};

struct EvalMetrics {
  int64_t step = 0;
  double val_loss = 0.0;
};

// "1h02m", "3m05s", "12.3s" ("?" when not finite).
std::string format_duration(double seconds);

class MetricsLog {
 public:
  // `path` empty = no file. A fresh run (`resumed_at_step` unset) starts the file anew; a run
  // resumed at step S keeps the rows of steps ≤ S (rows a crashed run wrote after its last
  // checkpoint are dropped, so every step appears once) and appends. Every write is checked:
  // UserError naming the file when it fails (a full disk). `console`: also print to stdout.
  MetricsLog(const std::string& path, std::optional<int64_t> resumed_at_step, bool console);
  ~MetricsLog();
  // Also writes every row's numbers as TensorBoard scalars to a new event file in `dir` (tags:
  // docs/observability.md); a resumed run's file first tells TensorBoard to drop later steps.
  void write_tensorboard_to(const std::string& dir);
  // Rows of log_expert_load go to `path` (same resume rule as the metrics file).
  void write_expert_load_to(const std::string& path);

  void log(const StepMetrics& metrics);
  void log(const EvalMetrics& metrics);
  // m.expert_load_by_rank as one row {step, moe_layers: [{layer, tokens_per_expert_by_rank}]}.
  void log_expert_load(const StepMetrics& metrics);

  static std::string console_line(const StepMetrics& metrics);

 private:
  class JsonlFile;  // one JSON object per line, rows of a resumed run's later steps dropped
  std::optional<int64_t> resumed_at_step_;
  bool console_;
  std::unique_ptr<JsonlFile> metrics_;
  std::unique_ptr<JsonlFile> expert_load_;
  std::unique_ptr<EventFileWriter> tensorboard_;
};

}  // namespace moeforge
