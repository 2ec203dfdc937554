#include "trainer/inference/inference_commands.hpp"

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <mpi.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "parallel/mpi_communicator.hpp"
#include "trainer/checkpoint/checkpoint.hpp"
#include "trainer/common/collective_command.hpp"
#include "trainer/common/file_io.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/convert/hf_checkpoint.hpp"
#include "trainer/convert/model_source.hpp"
#include "trainer/inference/evaluation.hpp"
#include "trainer/inference/text_codec.hpp"
#include "trainer/model/model_weights.hpp"
#include "trainer/runtime/device.hpp"

namespace moeforge {
namespace {

using Clock = std::chrono::steady_clock;

std::string prompt_text(const GenerateArgs& args) {
  require(args.prompt.empty() != args.prompt_file.empty(),
          "moeforge generate: give the prompt with exactly one of --prompt TEXT or "
          "--prompt-file FILE");
  return args.prompt_file.empty() ? args.prompt : read_file(args.prompt_file, "--prompt-file");
}

void check_sampling(const SamplingOptions& s) {
  require(s.max_new_tokens >= 1, "moeforge generate: --max-tokens must be at least 1");
  require(s.temperature >= 0.0, "moeforge generate: --temperature must be >= 0 (0 = greedy)");
  require(s.top_k >= 0, "moeforge generate: --top-k must be >= 0 (0 = no limit)");
  require(s.top_p > 0.0 && s.top_p <= 1.0, "moeforge generate: --top-p must be in (0, 1]");
}

}  // namespace

int generate_command(const GenerateArgs& args) {
  check_sampling(args.sampling);
  const auto text = prompt_text(args);
  const auto loaded = load_model_source(args.from, Config{});
  require(loaded.config.moe.router.routing != moe::Routing::kExpertChoice,
          fmt::format("{}: expert-choice routing picks tokens by comparing the whole batch, so "
                      "its output for a token depends on later tokens: it cannot generate one "
                      "token at a time",
                      loaded.description));
  const auto codec = make_text_codec(args.from, args.tokenizer, loaded.config.model.vocab_size);
  const auto prompt = codec->encode(text);
  auto model = model_from_weights(loaded.config, loaded.weights, loaded.description);
  model->eval();
  auto options = args.sampling;
  options.use_cache = !args.no_cache;
  if (loaded.config.data.eod_token_id >= 0) options.stop_token = loaded.config.data.eod_token_id;

  std::cout << text << std::flush;
  const auto start = Clock::now();
  const auto stream = [&codec](int64_t id) {
    if (codec->streams()) std::cout << codec->decode({id}) << std::flush;
  };
  const auto produced = generate(*model, prompt, options, loaded.config.model.max_seq_len, stream);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!codec->streams()) std::cout << codec->decode(produced);
  std::cout << std::endl;
  if (args.print_ids) {
    std::string ids;
    for (const auto id : produced) {
      if (!ids.empty()) ids += ' ';
      ids += std::to_string(id);
    }
    std::cout << "ids: " << ids << std::endl;
  }
  std::cerr << fmt::format(
                   "[{}: {} prompt + {} new tokens in {:.2f} s, {:.1f} tokens/s, {}; {}, {}]",
                   loaded.description, prompt.size(), produced.size(), seconds,
                   static_cast<double>(produced.size()) / std::max(seconds, 1e-9),
                   options.temperature > 0 ? fmt::format("temperature {} top-k {} top-p {} seed {}",
                                                         options.temperature, options.top_k,
                                                         options.top_p, options.seed)
                                           : std::string("greedy"),
                   options.use_cache ? "KV cache" : "no cache", codec->describe())
            << std::endl;
  return 0;
}

namespace {

// Everything eval needs, checked on each rank alone.
struct PreparedEval {
  Config config;
  LoadedModel source;
  std::optional<TokenDataset> data;
  EvalOptions options;
  std::string data_description;
};

EvalSplit parse_split(const EvalArgs& args) {
  const bool own_data = args.text.empty() && args.data.empty();
  const std::string split = !args.split.empty() ? args.split : own_data ? "val" : "all";
  if (split == "val") return EvalSplit::kValidation;
  if (split == "train") return EvalSplit::kTrain;
  if (split == "all") return EvalSplit::kAll;
  throw UserError(fmt::format("moeforge eval: --split '{}': allowed val | train | all", split));
}

PreparedEval prepare_eval(const EvalArgs& args, int world_size) {
  PreparedEval run{eval_config(args), {}, std::nullopt, {}, ""};
  auto& config = run.config;
  validate_for_world(config, world_size);
  run.options.split = parse_split(args);
  run.options.seq_len = config.train.seq_len;
  run.options.micro_batch_size = args.micro_batch_size.value_or(config.train.micro_batch_size);
  run.options.max_windows = args.windows.value_or(0);
  require(run.options.micro_batch_size >= 1 && run.options.max_windows >= 0,
          "moeforge eval: --micro-batch must be >= 1 and --windows >= 0");
  run.data = TokenDataset::open(config.data, config.model.vocab_size, config.train.seq_len);
  run.data_description =
      config.data.path.empty()
          ? enum_text(config.data.source)
          : fmt::format("{} {}", enum_text(config.data.source), config.data.path);
  run.source = load_model_source(args.from, config, "evaluate");
  return run;
}

void print_eval(const EvalResult& result, const PreparedEval& run, const EvalArgs& args) {
  static const char* split_names[] = {"validation split", "training split", "whole dataset"};
  std::cout << fmt::format(
      "eval of {} on the {} of data ({}): {} windows × {} tokens\n"
      "loss {:.4f} nats/token | perplexity {:.3f} | {} tokens predicted\n",
      run.source.description, split_names[static_cast<int>(run.options.split)],
      run.data_description, result.windows, run.options.seq_len, result.loss, result.perplexity,
      result.tokens);
  if (!result.layers.empty())
    std::cout << "routing per MoE block (MaxVio 0 = every expert equally loaded):\n";
  for (const auto& layer : result.layers)
    std::cout << fmt::format(
        "  block {:>2}: MaxVio {:.3f} | router entropy {:.3f} nats | dropped {:.2f}% | tokens "
        "per expert {}\n",
        layer.block, layer.max_vio, layer.router_entropy, 100.0 * layer.dropped_frac,
        nlohmann::json(layer.load).dump());
  std::cout << std::flush;
  if (args.json_out.empty()) return;
  nlohmann::json json = {{"loss", result.loss},
                         {"perplexity", result.perplexity},
                         {"tokens", result.tokens},
                         {"windows", result.windows},
                         {"model", run.source.description},
                         {"data", run.data_description}};
  for (const auto& layer : result.layers)
    json["moe_layers"].push_back({{"layer", layer.block},
                                  {"expert_load", layer.load},
                                  {"max_vio", layer.max_vio},
                                  {"router_entropy", layer.router_entropy},
                                  {"dropped_frac", layer.dropped_frac}});
  write_file_atomically(args.json_out, json.dump(2) + "\n");
}

int run_eval(PreparedEval& run, const EvalArgs& args, int rank) {
  const auto& config = run.config;
  if (config.train.threads_per_rank > 0) at::set_num_threads(config.train.threads_per_rank);
  parallel::MpiCommunicator world(MPI_COMM_WORLD);
  world.set_timeout(config.parallel.timeout_s);
  const auto device = resolve_device(config);
  const auto groups = communication_groups(
      config, parallel::make_process_groups(world, config.parallel.ep_size), device);
  DecoderLM model(config, *groups.ep);
  load_model_weights(*model, run.source.weights, run.source.description, run.source.origin);
  run.source.weights.clear();  // the model holds this rank's part now
  model->to(device);
  const auto result = evaluate_model(*model, config, *run.data, run.options, *groups.world, device);
  if (rank == 0) print_eval(result, run, args);
  return 0;
}

}  // namespace

Config eval_config(const EvalArgs& args) {
  std::vector<std::string> overrides;  // derived from the flags first: --set wins
  if (!args.text.empty()) {
    overrides.push_back("data.source=text");
    overrides.push_back("data.path=" + args.text);
  }
  if (!args.data.empty()) {
    overrides.push_back("data.source=megatron");
    overrides.push_back("data.path=" + args.data);
  }
  // A file given here is usually read whole (--split all): halves keep short files usable.
  if (!args.text.empty() || !args.data.empty()) overrides.push_back("data.val_fraction=0.5");
  overrides.insert(overrides.end(), args.overrides.begin(), args.overrides.end());
  overrides.push_back(fmt::format("parallel.ep_size={}", args.ep_size));
  if (hf::is_hf_directory(args.from)) {
    std::string type;
    const auto source = hf::read_config(args.from, Config{}, &type);
    return load_config_from_string(
        "{}", "--set", overrides,
        FixedModel{source.model, fmt::format("Hugging Face {} model {}", type, args.from)});
  }
  const auto dir = resolve_checkpoint(args.from, args.from, "evaluate");
  return load_config_from_string(checkpoint_config_yaml(dir), dir + "/checkpoint.json:config",
                                 overrides);
}

int eval_command(const EvalArgs& args, int rank, int world_size) {
  std::optional<PreparedEval> run;
  return run_collective_command([&] { run.emplace(prepare_eval(args, world_size)); },
                                [&] { return run_eval(*run, args, rank); }, rank, world_size);
}

}  // namespace moeforge
