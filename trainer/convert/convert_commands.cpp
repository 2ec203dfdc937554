#include "trainer/convert/convert_commands.hpp"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "parallel/process_groups.hpp"
#include "trainer/checkpoint/checkpoint.hpp"
#include "trainer/checkpoint/safetensors.hpp"
#include "trainer/common/file_io.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/convert/hf_checkpoint.hpp"
#include "trainer/convert/model_source.hpp"
#include "trainer/convert/tokenizer_files.hpp"
#include "trainer/inference/text_codec.hpp"
#include "trainer/model/model_weights.hpp"
#include "trainer/optim/optimizer.hpp"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

const parallel::ProcessGroups& single_process() {
  static const auto groups = parallel::make_single_process_groups();
  return groups;
}

// RUN_DIR/config.yaml + RUN_DIR/checkpoints/step-00000000 (fresh optimizer state).
void write_run(const std::string& out_dir, Config config, const WeightMap& weights,
               const std::map<std::string, std::string>& origin = {}) {
  config.train.out_dir = out_dir;
  // Through the loader once more: every rule of a hand-written config applies.
  config = load_config_from_string(to_yaml(config), out_dir + "/config.yaml");
  fs::create_directories(out_dir);
  auto model = model_from_weights(config, weights, "converted weights", origin);
  AdamW optimizer(named_parameter_list(*model), config.train);
  CheckpointManager manager((fs::path(out_dir) / "checkpoints").string(), single_process());
  const std::string yaml = to_yaml(config);
  const auto checkpoint = manager.save(*model, optimizer, TrainingState{}, yaml, 0);
  write_file_atomically((fs::path(out_dir) / "config.yaml").string(), yaml);
  std::cout << fmt::format(
                   "wrote {} (config {}/config.yaml)\ncontinue training with:\n  {} train "
                   "--config {}/config.yaml --init-from {}\n",
                   checkpoint, out_dir, invoked_binary(), out_dir, out_dir)
            << std::flush;
}

// The --config YAML (optional) and --set overrides around a model section from a source.
Config config_around(const ConvertArgs& args, const FixedModel& model) {
  return args.config_path.empty() ? load_config_from_string("{}", "--set", args.overrides, model)
                                  : load_config(args.config_path, args.overrides, model);
}

void require_arg(const std::string& value, const char* flag, const char* command) {
  if (value.empty()) throw UserError(fmt::format("moeforge {}: {} is required", command, flag));
}

}  // namespace

int import_command(const ConvertArgs& args) {
  require(hf::is_hf_directory(args.from),
          fmt::format("moeforge import: {} is not a Hugging Face model directory (no config.json)",
                      args.from));
  const auto source = load_model_source(args.from, Config{});
  // The YAML / --set supply the other sections; a model key there must agree with the source.
  auto config = config_around(args, FixedModel{source.config.model, source.description});
  config.moe = source.config.moe;  // the HF model's MoE layout (every block dense for dense)
  validate_for_world(config, 1);
  write_run(args.out, config, source.weights, source.origin);
  copy_tokenizer(args.from, args.out, config.model.vocab_size);
  return 0;
}

int upcycle_command(const ConvertArgs& args) {
  const auto dense = load_model_source(args.from, Config{});
  // The whole model section comes from the source; the YAML (optional) and --set supply the
  // MoE, training and data sections.
  const auto moe_config = config_around(args, FixedModel{dense.config.model, dense.description});
  std::cout << "upcycling " << dense.description << " (" << args.upcycle.method << ")\n";
  const auto weights = upcycle(dense.config, dense.weights, moe_config, args.upcycle);
  write_run(args.out, moe_config, weights);
  copy_tokenizer(tokenizer_dir_of(args.from), args.out, moe_config.model.vocab_size);
  return 0;
}

int export_command(const ConvertArgs& args) {
  require_arg(args.format, "--format", "export");
  const auto model = load_model_source(args.from, Config{});
  hf::ExportOptions options;
  options.format = args.format;
  options.dtype = args.dtype.empty() ? "float32" : args.dtype;
  options.max_shard_bytes = static_cast<uint64_t>(args.shard_mb * 1024 * 1024);
  options.drop_expert_bias = args.drop_expert_bias;
  hf::export_directory(model.config, model.weights, options, args.out);
  copy_tokenizer(tokenizer_dir_of(args.from), args.out, model.config.model.vocab_size);
  std::cout << fmt::format("exported {} as {} to {}\n", model.description, args.format, args.out);
  return 0;
}

namespace {

// [B, S] int64 from --tokens (safetensors), or [1, S] from --text / --prompt.
at::Tensor forward_input(const ConvertArgs& args, int64_t vocab_size) {
  const int given = !args.tokens.empty() + !args.text.empty() + !args.prompt.empty();
  require(given == 1,
          "moeforge forward: give exactly one of --tokens FILE, --text FILE or "
          "--prompt TEXT");
  if (args.tokens.empty()) {
    const auto codec = make_text_codec(args.from, args.tokenizer, vocab_size);
    const auto ids =
        codec->encode(args.text.empty() ? args.prompt : read_file(args.text, "--text"));
    require(!ids.empty(), "moeforge forward: the text is empty");
    return at::tensor(ids, at::kLong).unsqueeze(0);
  }
  const auto file = safetensors::File::open(args.tokens);
  require(file.contains("tokens"),
          fmt::format("{}: no tensor 'tokens' (expected I64 [batch, seq])", args.tokens));
  const auto tokens = file.load("tokens");
  require(tokens.scalar_type() == at::kLong && tokens.dim() == 2,
          fmt::format("{}: 'tokens' must be I64 [batch, seq]", args.tokens));
  return tokens;
}

}  // namespace

int forward_command(const ConvertArgs& args) {
  const auto loaded = load_model_source(args.from, Config{});
  const auto tokens = forward_input(args, loaded.config.model.vocab_size);
  require(
      tokens.min().item<int64_t>() >= 0 &&
          tokens.max().item<int64_t>() < loaded.config.model.vocab_size,
      fmt::format("{}: token ids must be in [0, {})", args.tokens, loaded.config.model.vocab_size));
  require(tokens.size(1) <= loaded.config.model.max_seq_len,
          fmt::format("{}: {} tokens per sequence exceed model.max_seq_len {}",
                      args.tokens.empty() ? "the text" : args.tokens, tokens.size(1),
                      loaded.config.model.max_seq_len));
  auto model = model_from_weights(loaded.config, loaded.weights, loaded.description);
  const std::string dtype = args.dtype.empty() ? "float32" : args.dtype;
  require(dtype == "float32" || dtype == "float64",
          fmt::format("moeforge forward: --dtype '{}': allowed float32 | float64", dtype));
  if (dtype == "float64") model->to(at::kDouble);
  model->eval();
  at::NoGradGuard no_grad;
  const auto logits = model->forward(tokens).logits;
  safetensors::save(args.out, {{"logits", logits}});
  std::cout << fmt::format("logits [{}, {}, {}] ({}) -> {}\n", logits.size(0), logits.size(1),
                           logits.size(2), dtype, args.out);
  return 0;
}

}  // namespace moeforge
