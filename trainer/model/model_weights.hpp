#pragma once
// A model's weights by checkpoint name, independent of ep_size: non-expert parameters and
// buffers (router expert_bias) under their module names, routed experts under global names
// (`layers.3.mlp.experts.17.w_gate`). Import, upcycling, export and `moeforge forward` speak it.
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "trainer/model/model.hpp"

namespace moeforge {

using WeightMap = std::map<std::string, at::Tensor>;

// "layers.3.mlp.experts.w_gate", expert 17 -> "layers.3.mlp.experts.17.w_gate".
std::string global_expert_name(const std::string& stacked_name, int64_t global_expert);

// A tensor of the model under its checkpoint name(s): `name` itself, or for a stacked expert
// tensor (parameter, or optimizer state of one, e.g. "exp_avg.layers.3.mlp.experts.w_gate")
// each local expert's slice under its global name. Slices are views.
std::vector<std::pair<std::string, at::Tensor>> checkpoint_views(const std::string& name,
                                                                 const at::Tensor& tensor,
                                                                 int64_t first_local_expert);

// This rank's weights (its expert slice under global names), detached CPU tensors.
WeightMap model_weights(DecoderLMImpl& model);

// Copies `weights` into `model` (this rank's expert slice). Every model tensor must be present
// with its exact shape and nothing else may be: UserError naming `source` and the tensor
// otherwise (a missing name, an unexpected one, or both shapes). `origin` (optional) names
// where a tensor came from (e.g. the Hugging Face tensor and file) in those messages.
void load_model_weights(DecoderLMImpl& model, const WeightMap& weights, const std::string& source,
                        const std::map<std::string, std::string>& origin = {});

// Builds the ep_size-1 model of `config` (single process) holding `weights`.
DecoderLM model_from_weights(const Config& config, const WeightMap& weights,
                             const std::string& source,
                             const std::map<std::string, std::string>& origin = {});

}  // namespace moeforge
