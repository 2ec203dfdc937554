#include "trainer/metrics.hpp"

#include <fmt/format.h>

#include <iostream>
#include <nlohmann/json.hpp>

#include "trainer/common/user_error.hpp"

namespace moeforge {

MetricsLog::MetricsLog(const std::string& path, bool append, bool console) : console_(console) {
  if (path.empty()) return;
  file_.open(path, append ? std::ios::app : std::ios::trunc);
  require(file_.is_open(), fmt::format("cannot write metrics file {}", path));
}

std::string MetricsLog::console_line(const StepMetrics& m) {
  return fmt::format(
      "step {:>5}/{} | loss {:.4f} | aux {:.4f} | z {:.3f} | lr {:.2e} | gnorm {:.3f} | "
      "{:>8.0f} tok/s | maxvio {:.3f}",
      m.step, m.total_steps, m.loss, m.aux_loss, m.z_loss, m.lr, m.grad_norm, m.tokens_per_s,
      m.max_vio);
}

void MetricsLog::log(const StepMetrics& m) {
  if (console_) std::cout << console_line(m) << std::endl;
  if (!file_.is_open()) return;
  nlohmann::json j = {{"step", m.step},
                      {"loss", m.loss},
                      {"aux_loss", m.aux_loss},
                      {"z_loss", m.z_loss},
                      {"lr", m.lr},
                      {"grad_norm", m.grad_norm},
                      {"tokens_per_s", m.tokens_per_s},
                      {"step_seconds", m.step_seconds},
                      {"max_vio", m.max_vio},
                      {"max_vio_micro", m.max_vio_micro}};
  auto layers = nlohmann::json::array();
  for (const auto& layer : m.layers) {
    layers.push_back({{"layer", layer.layer},
                      {"expert_load", layer.expert_load},
                      {"max_vio", layer.max_vio},
                      {"max_vio_micro", layer.max_vio_micro},
                      {"router_entropy", layer.router_entropy},
                      {"dropped_frac", layer.dropped_frac},
                      {"null_frac", layer.null_frac},
                      {"bias_abs_max", layer.bias_abs_max},
                      {"bias_abs_mean", layer.bias_abs_mean}});
  }
  j["moe_layers"] = layers;
  file_ << j.dump() << '\n';
  file_.flush();
}

void MetricsLog::log(const EvalMetrics& m) {
  if (console_)
    std::cout << fmt::format("eval  step {:>5} | val loss {:.4f}", m.step, m.val_loss) << std::endl;
  if (!file_.is_open()) return;
  file_ << nlohmann::json{{"step", m.step}, {"val_loss", m.val_loss}}.dump() << '\n';
  file_.flush();
}

}  // namespace moeforge
