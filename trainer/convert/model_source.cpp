#include "trainer/convert/model_source.hpp"

#include <fmt/format.h>

#include "parallel/process_groups.hpp"
#include "trainer/checkpoint/checkpoint.hpp"
#include "trainer/convert/hf_checkpoint.hpp"
#include "trainer/optim/optimizer.hpp"

namespace moeforge {

LoadedModel load_model_source(const std::string& path, const Config& base,
                              const std::string& purpose) {
  if (hf::is_hf_directory(path)) {
    auto imported = hf::import_directory(path, base);
    return {imported.config, std::move(imported.weights),
            fmt::format("Hugging Face {} model {}", imported.model_type, path),
            std::move(imported.origin)};
  }
  static const auto single = parallel::make_single_process_groups();
  const auto dir = resolve_checkpoint(path, path, purpose);
  auto config =
      load_config_from_string(checkpoint_config_yaml(dir), dir + "/checkpoint.json:config");
  config.parallel.ep_size = 1;
  DecoderLM model(config, *single.ep);
  AdamW optimizer(named_parameter_list(*model), config.train);
  CheckpointManager(dir, single).load(dir, *model, optimizer);
  return {config, model_weights(*model), "moeforge checkpoint " + dir, {}};
}

}  // namespace moeforge
