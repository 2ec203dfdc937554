#pragma once
// Step metrics: one console line per logged step and the same as one JSON object per line in
// <out_dir>/metrics.jsonl (rank 0 writes; other ranks only compute). Stable keys: step, loss,
// aux_loss, z_loss, lr, grad_norm, tokens_per_s, max_vio, max_vio_micro, and per MoE layer
// `moe_layers`: [{layer, expert_load: [...], max_vio, max_vio_micro, router_entropy,
// dropped_frac, null_frac, bias_abs_max, bias_abs_mean}].
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

struct MoeLayerMetrics {
  int64_t layer = 0;                 // block index
  std::vector<int64_t> expert_load;  // routed slots per global expert, whole global batch
  double max_vio = 0.0;              // MaxVio of the global batch's load
  double max_vio_micro = 0.0;        // MaxVio of each rank's micro-batch load, averaged
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
  bool skipped = false;          // gradients were not finite: no update this step
  bool stop_requested = false;   // a rank received a stop signal (agreed by every rank)
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
  void log(const StepMetrics& metrics);
  void log(const EvalMetrics& metrics);

  static std::string console_line(const StepMetrics& metrics);

 private:
  void write_row(const std::string& json);
  std::string path_;
  std::ofstream file_;
  bool console_;
};

}  // namespace moeforge
