#include "trainer/inference/analyze_command.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "moe/routing_recorder.hpp"
#include "trainer/common/file_io.hpp"
#include "trainer/common/shell_command.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/convert/model_source.hpp"
#include "trainer/data/data.hpp"
#include "trainer/inference/inference_commands.hpp"
#include "trainer/inference/routing_analysis.hpp"
#include "trainer/inference/text_codec.hpp"
#include "trainer/model/model_weights.hpp"

namespace moeforge {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The probe set: fixed, deterministic token windows [windows, seq_len].
struct Probe {
  at::Tensor tokens;     // [W, S] int64
  at::Tensor flat;       // [W·S] token ids in the order the MoE layers see them
  at::Tensor positions;  // [W·S] position of each token in its sequence
};

// One model's routing of the probe: one capture per MoE block, in block order.
struct ModelRouting {
  std::string description;
  std::vector<RoutingCapture> layers;
  std::vector<at::Tensor> sets;  // [N, P] bool per layer
};

// Collects a layer's records, on the host, in forward order.
class ProbeRecorder : public moe::RoutingRecorder {
 public:
  void record(const moe::RoutingRecord& r) override {
    ids_.push_back(r.expert_ids.cpu());
    selected_.push_back(r.selected.cpu());
    kept_.push_back(r.kept.cpu());
    norms_.push_back(r.output_norm.cpu());
  }
  RoutingCapture capture() const {
    return {at::cat(ids_), at::cat(selected_), at::cat(kept_), at::cat(norms_)};
  }

 private:
  std::vector<at::Tensor> ids_, selected_, kept_, norms_;
};

void check_args(const AnalyzeArgs& args) {
  require(args.windows >= 1,
          "moeforge analyze: --windows must be at least 1 (sequences in the probe set)");
  require(!args.micro_batch || *args.micro_batch >= 1,
          "moeforge analyze: --micro-batch must be at least 1 (sequences per forward)");
  require(!args.capacity_factor || (*args.capacity_factor >= 0 && *args.capacity_factor <= 64),
          "moeforge analyze: --capacity-factor must be in [0, 64] (0 = dropless; default the "
          "run's moe.capacity.eval_factor)");
  require(args.outlier_mads > 0,
          "moeforge analyze: --outlier-mads must be > 0 (super expert: mean output norm above "
          "median + this many robust standard deviations)");
  require(args.compare.empty() || fs::exists(args.compare),
          fmt::format("moeforge analyze: --compare {}: no such checkpoint or run", args.compare));
}

Config analyze_config(const AnalyzeArgs& args) {
  EvalArgs eval;
  eval.from = args.from;
  eval.text = args.text;
  eval.data = args.data;
  eval.overrides = args.overrides;
  if (args.capacity_factor)
    eval.overrides.push_back(fmt::format("moe.capacity.eval_factor={}", *args.capacity_factor));
  return eval_config(eval);
}

Probe probe_set(const TokenDataset& data, int64_t windows, int64_t seq_len) {
  const int64_t count = std::min(windows, data.val_windows());
  require(count > 0, fmt::format("moeforge analyze: the data's validation split has no window of "
                                 "{} tokens to probe with (give --text/--data with more text, or "
                                 "a larger data.val_fraction with --set)",
                                 seq_len + 1));
  Probe probe;
  probe.tokens = data.val_samples(0, count).narrow(1, 0, seq_len).contiguous();
  probe.flat = probe.tokens.reshape({-1});
  probe.positions = at::arange(seq_len, at::kLong).repeat({count});
  return probe;
}

ModelRouting route_probe(const std::string& path, const Config& config, const Probe& probe,
                         int64_t micro_batch) {
  auto source = load_model_source(path, config, "analyze");
  auto model = model_from_weights(config, source.weights, source.description, source.origin);
  source.weights.clear();
  model->eval();
  auto layers = model->moe_layers();
  std::vector<ProbeRecorder> recorders(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) layers[l]->set_recorder(&recorders[l]);
  at::NoGradGuard no_grad;
  for (int64_t first = 0; first < probe.tokens.size(0); first += micro_batch) {
    const int64_t n = std::min(micro_batch, probe.tokens.size(0) - first);
    model->forward(probe.tokens.narrow(0, first, n));
  }
  ModelRouting routing{source.description, {}, {}};
  for (size_t l = 0; l < layers.size(); ++l) {
    layers[l]->set_recorder(nullptr);
    routing.layers.push_back(recorders[l].capture());
    routing.sets.push_back(chosen_sets(routing.layers.back(), layers[l]->pool_size()));
  }
  return routing;
}

std::vector<int64_t> moe_blocks(const Config& config) {
  std::vector<int64_t> blocks;
  for (int64_t b = 0; b < config.model.num_layers; ++b)
    if (is_moe_block(config.moe, b)) blocks.push_back(b);
  return blocks;
}

json information_json(const TokenExpertInformation& info) {
  return {{"mi_bits", info.mi_bits},
          {"token_entropy_bits", info.token_entropy_bits},
          {"expert_entropy_bits", info.expert_entropy_bits},
          {"bias_bits", info.bias_bits},
          {"pairs", info.pairs},
          {"distinct_tokens", info.distinct_tokens},
          {"fraction_of_expert_entropy",
           info.expert_entropy_bits > 0 ? info.mi_bits / info.expert_entropy_bits : 0.0}};
}

json magnitude_json(const ExpertMagnitudes& m) {
  json supers = json::array();
  for (const auto e : m.super_experts)
    supers.push_back({{"expert", e}, {"ratio_to_median", m.mean_norm[e] / m.median}});
  return {{"mean_norm", m.mean_norm}, {"max_norm", m.max_norm}, {"rows", m.rows},
          {"median", m.median},       {"mad", m.mad},           {"threshold", m.threshold},
          {"super_experts", supers}};
}

json drops_json(const DropPositions& d) {
  int64_t routed = 0, dropped = 0;
  for (size_t p = 0; p < d.routed.size(); ++p) routed += d.routed[p], dropped += d.dropped[p];
  return {{"routed", d.routed},
          {"dropped", d.dropped},
          {"dropped_frac", routed > 0 ? static_cast<double>(dropped) / routed : 0.0}};
}

std::vector<std::vector<double>> matrix(const at::Tensor& t) {
  std::vector<std::vector<double>> rows;
  const auto d = t.to(at::kDouble).contiguous();
  for (int64_t i = 0; i < d.size(0); ++i)
    rows.emplace_back(d[i].data_ptr<double>(), d[i].data_ptr<double>() + d.size(1));
  return rows;
}

// The pairs that carry the most of I(l; l+1): joint · log2(lift), largest first.
json top_pairs(const CoRouting& co, int64_t count) {
  const auto contribution =
      at::where(co.lift > 0, co.joint * co.lift.clamp_min(1e-300).log2(), at::zeros_like(co.joint))
          .reshape({-1});
  const auto order = std::get<1>(contribution.sort(0, true));
  const int64_t pool = co.joint.size(0);
  json pairs = json::array();
  for (int64_t i = 0; i < std::min<int64_t>(count, order.numel()); ++i) {
    const int64_t flat = order[i].item<int64_t>();
    if (contribution[flat].item<double>() <= 0) break;
    pairs.push_back({{"first", flat / pool},
                     {"next", flat % pool},
                     {"joint", co.joint.reshape({-1})[flat].item<double>()},
                     {"lift", co.lift.reshape({-1})[flat].item<double>()}});
  }
  return pairs;
}

json layer_json(int64_t block, const RoutingCapture& capture, const at::Tensor& sets,
                const Probe& probe, const Config& config, double mads) {
  const int64_t experts = config.moe.num_experts;
  const auto load = sets.narrow(1, 0, experts).sum(0);
  return {{"block", block},
          {"expert_load",
           std::vector<int64_t>(load.data_ptr<int64_t>(), load.data_ptr<int64_t>() + experts)},
          {"token_expert_mi", information_json(token_expert_information(probe.flat, sets))},
          {"expert_magnitude", magnitude_json(expert_magnitudes(capture, experts, mads))},
          {"drops",
           drops_json(drop_positions(capture, probe.positions, config.train.seq_len, experts))}};
}

json build_report(const Config& config, const Probe& probe, const ModelRouting& main,
                  const ModelRouting* other, const AnalyzeArgs& args) {
  const auto blocks = moe_blocks(config);
  json report = {
      {"model", main.description},
      {"compare", other ? json(other->description) : json(nullptr)},
      {"data", config.data.path.empty() ? enum_text(config.data.source) : config.data.path},
      {"probe",
       {{"split", "validation"},
        {"windows", probe.tokens.size(0)},
        {"seq_len", probe.tokens.size(1)},
        {"tokens", probe.flat.numel()}}},
      {"num_experts", config.moe.num_experts},
      {"pool_size", config.moe.num_experts + config.moe.router.num_null_experts},
      {"top_k", config.moe.top_k},
      {"routing", enum_text(config.moe.router.routing)},
      {"capacity_factor", config.moe.capacity.eval_factor},
      {"micro_batch_size", args.micro_batch.value_or(config.train.micro_batch_size)},
      {"outlier_mads", args.outlier_mads},
      {"layers", json::array()},
      {"co_routing", json::array()},
      {"stability", nullptr}};
  for (size_t l = 0; l < main.layers.size(); ++l)
    report["layers"].push_back(
        layer_json(blocks[l], main.layers[l], main.sets[l], probe, config, args.outlier_mads));
  for (size_t l = 0; l + 1 < main.layers.size(); ++l) {
    const auto co = co_routing(main.sets[l], main.sets[l + 1]);
    report["co_routing"].push_back({{"first_block", blocks[l]},
                                    {"next_block", blocks[l + 1]},
                                    {"mi_bits", co.mi_bits},
                                    {"top_pairs", top_pairs(co, 5)},
                                    {"joint", matrix(co.joint)},
                                    {"lift", matrix(co.lift)}});
  }
  if (other) {
    std::vector<double> per_layer;
    for (size_t l = 0; l < main.sets.size(); ++l) {
      per_layer.push_back(routing_stability(main.sets[l], other->sets[l]));
      report["layers"][l]["stability"] = per_layer.back();
    }
    report["stability"] = {{"all_layers", all_layer_stability(main.sets, other->sets)},
                           {"per_layer", per_layer}};
  }
  return report;
}

std::string markdown(const json& r) {
  std::string md = fmt::format(
      "# Routing analysis\n\nModel: {}\n\nProbe: the first {} validation windows × {} tokens "
      "of {} ({} tokens); {} experts, top-{}, {} routing, capacity factor {} ({}).\n\n",
      r["model"].get<std::string>(), r["probe"]["windows"].get<int64_t>(),
      r["probe"]["seq_len"].get<int64_t>(), r["data"].get<std::string>(),
      r["probe"]["tokens"].get<int64_t>(), r["num_experts"].get<int64_t>(),
      r["top_k"].get<int64_t>(), r["routing"].get<std::string>(),
      r["capacity_factor"].get<double>(),
      r["capacity_factor"].get<double>() > 0 ? "drops possible" : "dropless");
  if (!r["stability"].is_null())
    md += fmt::format(
        "Stability against {}: {:.1f}% of tokens keep their expert set in every "
        "layer.\n\n",
        r["compare"].get<std::string>(), 100 * r["stability"]["all_layers"].get<double>());
  md +=
      "| block | I(token; expert) bits | H(token) | H(expert) | plug-in bias | super experts "
      "(× median norm) | dropped | stability |\n|---|---|---|---|---|---|---|---|\n";
  for (const auto& layer : r["layers"]) {
    const auto& mi = layer["token_expert_mi"];
    std::string supers;
    for (const auto& s : layer["expert_magnitude"]["super_experts"])
      supers += fmt::format("{}{} ({:.2f}×)", supers.empty() ? "" : ", ", s["expert"].get<int>(),
                            s["ratio_to_median"].get<double>());
    md += fmt::format(
        "| {} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {} | {:.2f}% | {} |\n",
        layer["block"].get<int>(), mi["mi_bits"].get<double>(),
        mi["token_entropy_bits"].get<double>(), mi["expert_entropy_bits"].get<double>(),
        mi["bias_bits"].get<double>(), supers.empty() ? "none" : supers,
        100 * layer["drops"]["dropped_frac"].get<double>(),
        layer.contains("stability") ? fmt::format("{:.3f}", layer["stability"].get<double>())
                                    : "–");
  }
  md +=
      "\n| blocks | I(expert; next expert) bits | strongest pairs (first→next: lift) |\n"
      "|---|---|---|\n";
  for (const auto& co : r["co_routing"]) {
    std::string pairs;
    for (const auto& p : co["top_pairs"])
      pairs += fmt::format("{}{}→{}: {:.2f}", pairs.empty() ? "" : ", ", p["first"].get<int>(),
                           p["next"].get<int>(), p["lift"].get<double>());
    md += fmt::format("| {}→{} | {:.3f} | {} |\n", co["first_block"].get<int>(),
                      co["next_block"].get<int>(), co["mi_bits"].get<double>(), pairs);
  }
  md += "\nPlots: token_expert_mi.png, co_routing.png, expert_magnitude.png, drop_positions.png" +
        std::string(r["stability"].is_null() ? "" : ", stability.png") +
        ". What each number means: docs/routing_analysis.md.\n";
  return md;
}

// launch/plot_analysis.py beside the build directory holding this binary, else in the source
// tree this binary was built from.
std::string plot_script() {
  std::error_code error;
  const auto exe = fs::read_symlink("/proc/self/exe", error);
  const fs::path beside = exe.parent_path().parent_path() / "launch" / "plot_analysis.py";
  if (!error && fs::exists(beside)) return beside.string();
  return std::string(MOEFORGE_SOURCE_DIR) + "/launch/plot_analysis.py";
}

void plot(const std::string& out, bool skip) {
  const auto command =
      fmt::format("'{}' '{}' '{}'", project_python(), plot_script(), (fs::path(out)).string());
  if (skip) {
    std::cout << "plots: run " << command << "\n";
    return;
  }
  if (run_shell_command(command) != 0)
    std::cerr << "moeforge analyze: the plots could not be made (matplotlib in " << project_python()
              << "?); report.json is written; to plot later run:\n  " << command << std::endl;
}

}  // namespace

int analyze_command(const AnalyzeArgs& args) {
  check_args(args);
  const auto config = analyze_config(args);
  const auto data = TokenDataset::open(config.data, config.model.vocab_size, config.train.seq_len);
  const auto probe = probe_set(data, args.windows, config.train.seq_len);
  const int64_t micro_batch = args.micro_batch.value_or(config.train.micro_batch_size);
  const auto main = route_probe(args.from, config, probe, micro_batch);
  require(!main.layers.empty(),
          fmt::format("moeforge analyze: {} has no MoE block to analyse", main.description));
  std::optional<ModelRouting> other;
  if (!args.compare.empty()) other = route_probe(args.compare, config, probe, micro_batch);
  const auto report = build_report(config, probe, main, other ? &*other : nullptr, args);
  fs::create_directories(args.out);
  write_file_atomically((fs::path(args.out) / "report.json").string(), report.dump(1) + "\n");
  const auto md = markdown(report);
  write_file_atomically((fs::path(args.out) / "report.md").string(), md);
  std::cout << md << std::flush;
  plot(args.out, args.no_plots);
  return 0;
}

}  // namespace moeforge
