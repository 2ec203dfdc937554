#pragma once
// Any model a user can start from, as weights by checkpoint name: a Hugging Face directory
// (imported), or a moeforge run / checkpoints / checkpoint directory. What `import`, `upcycle`,
// `export`, `forward` and `train --init-from` read; the caller needs no format knowledge.
#include <map>
#include <string>

#include "trainer/config/config.hpp"
#include "trainer/model/model_weights.hpp"

namespace moeforge {

struct LoadedModel {
  Config config;            // the model's own config (non-model sections from `base`)
  WeightMap weights;        // global checkpoint names, CPU
  std::string description;  // for messages: "Hugging Face llama model DIR", "moeforge checkpoint"
  std::map<std::string, std::string> origin;  // HF imports: where each tensor came from
};

// `purpose` names the action in "no checkpoint to <purpose> at ..." (UserError when `path` is
// neither kind of model).
LoadedModel load_model_source(const std::string& path, const Config& base,
                              const std::string& purpose = "read a model from");

}  // namespace moeforge
