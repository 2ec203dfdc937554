#include "trainer/model/model_weights.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <set>

#include "parallel/process_groups.hpp"
#include "trainer/common/user_error.hpp"

namespace moeforge {
std::string global_expert_name(const std::string& stacked_name, int64_t global_expert) {
  const auto dot = stacked_name.rfind('.');
  return fmt::format("{}.{}.{}", stacked_name.substr(0, dot), global_expert,
                     stacked_name.substr(dot + 1));
}

std::vector<std::pair<std::string, at::Tensor>> checkpoint_views(const std::string& name,
                                                                 const at::Tensor& tensor,
                                                                 int64_t first_local_expert) {
  if (!is_expert_parameter(name)) return {{name, tensor}};
  std::vector<std::pair<std::string, at::Tensor>> views;
  for (int64_t e = 0; e < tensor.size(0); ++e)
    views.emplace_back(global_expert_name(name, first_local_expert + e), tensor[e]);
  return views;
}

namespace {

// Every tensor of the model by checkpoint name, as views into the model's storage.
WeightMap named_views(DecoderLMImpl& model) {
  WeightMap views;
  const int64_t first = model.first_local_expert();
  for (const auto& item : model.named_parameters())
    for (auto& [name, view] : checkpoint_views(item.key(), item.value(), first)) views[name] = view;
  for (const auto& item : model.named_buffers()) views[item.key()] = item.value();
  return views;
}

}  // namespace

WeightMap model_weights(DecoderLMImpl& model) {
  WeightMap weights;
  for (const auto& [name, view] : named_views(model)) weights[name] = view.detach().cpu().clone();
  return weights;
}

void load_model_weights(DecoderLMImpl& model, const WeightMap& weights, const std::string& source,
                        const std::map<std::string, std::string>& origin) {
  at::NoGradGuard no_grad;
  const auto views = named_views(model);
  const auto layers = model.moe_layers();
  const bool sharded =
      !layers.empty() && layers.front()->num_local_experts() < layers.front()->num_experts();
  for (const auto& [name, view] : views) {
    const auto it = weights.find(name);
    if (it == weights.end())
      throw UserError(fmt::format("{}: tensor '{}' is missing (the model needs it, shape {})",
                                  source, name, fmt::join(view.sizes(), ", ")));
    if (it->second.sizes() != view.sizes()) {
      const auto from = origin.find(name);
      throw UserError(fmt::format(
          "{}: tensor {} has shape [{}], the model its config describes needs [{}]", source,
          from != origin.end() ? from->second + fmt::format(" (moeforge '{}')", name)
                               : "'" + name + "'",
          fmt::join(it->second.sizes(), ", "), fmt::join(view.sizes(), ", ")));
    }
    view.copy_(it->second);
  }
  // Tensors the model has no place for: a config that does not describe these weights. Global
  // expert names of other EP ranks are expected when the model is sharded.
  std::set<std::string> unexpected;
  for (const auto& [name, tensor] : weights)
    if (!views.count(name) && !(sharded && is_expert_parameter(name))) unexpected.insert(name);
  if (!unexpected.empty())
    throw UserError(fmt::format("{}: {} tensor(s) have no place in the model, e.g. '{}'", source,
                                unexpected.size(), *unexpected.begin()));
}

DecoderLM model_from_weights(const Config& config, const WeightMap& weights,
                             const std::string& source,
                             const std::map<std::string, std::string>& origin) {
  static const auto groups = parallel::make_single_process_groups();
  auto single = config;
  single.parallel.ep_size = 1;
  DecoderLM model(single, *groups.ep);
  load_model_weights(*model, weights, source, origin);
  return model;
}

}  // namespace moeforge
