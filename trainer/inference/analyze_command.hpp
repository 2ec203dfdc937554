#pragma once
// `moeforge analyze`: routing analysis of a trained model on a fixed probe set — the first
// --windows validation windows of the run's data (or of --text / --data) — written to
// --out as report.json (every number), report.md (summary) and PNG plots
// (launch/plot_analysis.py). docs/routing_analysis.md explains each metric.
//
// Single process, ep_size 1, on the CPU (like generate): the probe set is small, and one process
// sees every expert's routing without gathering it. Batches of --micro-batch windows go through the
// model in evaluation mode; with --capacity-factor F each batch's capacity is F·T·k/E per expert.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

struct AnalyzeArgs {
  std::string from, compare, text, data, out;
  std::vector<std::string> overrides;
  int64_t windows = 16;                   // probe set: the first N validation windows
  std::optional<int64_t> micro_batch;     // default train.micro_batch_size
  std::optional<double> capacity_factor;  // default the run's moe.capacity.eval_factor
  double outlier_mads = 3.0;              // super expert: mean norm > median + this · σ̂ (MAD)
  bool no_plots = false;
};

// Returns the exit code; UserError for bad input (caller prints it).
int analyze_command(const AnalyzeArgs& args);

}  // namespace moeforge
