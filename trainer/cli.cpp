#include "trainer/cli.hpp"

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>
#include <torch/version.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <filesystem>
#include <functional>
#include <iostream>
#include <optional>

#include "parallel/mpi_communicator.hpp"
#include "parallel/node_layout.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/checkpoint/checkpoint.hpp"
#include "trainer/checkpoint/run_directory.hpp"
#include "trainer/common/collective_command.hpp"
#include "trainer/common/spelling.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/config/config.hpp"
#include "trainer/convert/convert_commands.hpp"
#include "trainer/convert/hf_checkpoint.hpp"
#include "trainer/convert/tokenizer_files.hpp"
#include "trainer/data/data.hpp"
#include "trainer/data/data_info.hpp"
#include "trainer/inference/analyze_command.hpp"
#include "trainer/inference/inference_commands.hpp"
#include "trainer/optim/optimizer.hpp"
#include "trainer/stop_signal.hpp"
#include "trainer/trainer.hpp"

namespace moeforge {
namespace {

struct TrainArgs {
  std::string config_path;
  std::vector<std::string> overrides;
  std::optional<std::string> resume;
  std::optional<std::string> init_from;
  bool overwrite = false;
};

void print_summary(const RunSummary& s) {
  const int64_t last = s.steps.empty() ? s.first_step - 1 : s.steps.back().step;
  std::cout
      << "\n== summary ==\n"
      << fmt::format(
             "trained            steps {}–{} in {} (wall time of the training loop, "
             "evaluations and checkpoints included)\n",
             s.first_step, last, format_duration(s.wall_seconds))
      << fmt::format("final train loss   {:.4f} nats/token  (mean of the last {} steps)\n",
                     s.final_train_loss, s.loss_steps_averaged)
      << fmt::format("final val loss     {:.4f} nats/token  (perplexity {:.3f})\n",
                     s.final_val_loss, std::exp(s.final_val_loss))
      << fmt::format(
             "unigram entropy    {:.4f} nats/token  (loss of a model that ignores "
             "context)\n",
             s.unigram_entropy)
      << fmt::format("throughput         {:.0f} tokens/s  (mean over steps after the first)\n",
                     s.tokens_per_s)
      << fmt::format(
             "model FLOPs        {:.3g} TFLOP/s per rank, MFU {:.1f}% of {:.3g} TFLOP/s "
             "(mean over steps after the first)\n",
             s.tflops, 100.0 * s.mfu, s.peak_tflops)
      << fmt::format("outputs            {}/ (config.resolved.yaml, metrics.jsonl)\n", s.out_dir)
      << fmt::format("last checkpoint    {}\n", s.last_checkpoint.empty() ? "-" : s.last_checkpoint)
      << std::flush;
}

// Everything a run needs that can be checked on each rank alone: the config, the data, and
// the checkpoint or directory to start from (resolved here, so a bad path is one message).
struct PreparedRun {
  Config config;
  std::optional<TokenDataset> data;
  RunOptions options;
  std::optional<RunLock> lock;  // rank 0: the run directory's lock, held for the whole run
};

// A checkpoint to start from must hold exactly the run's parameters: UserError listing every
// difference of the keys that shape them.
void check_checkpoint_matches(const std::string& dir, const Config& config, const char* use) {
  check_checkpoint(dir);
  const auto stored =
      load_config_from_string(checkpoint_config_yaml(dir), dir + "/checkpoint.json");
  const auto differences = parameter_shape_differences(stored, config);
  if (!differences.empty())
    throw UserError(fmt::format(
        "{}: cannot {} this checkpoint: its model differs from the config's ({}). Use the "
        "checkpoint's values, or start a new run",
        dir, use, fmt::join(differences, "; ")));
}

// A resumed run whose train.steps differs from the checkpoint's: the LR schedule (warmup, then
// cosine to train.steps) follows the new length from here on, so the LR jumps. Said up front.
void note_schedule_change(const std::string& checkpoint, int64_t step, Config& config) {
  const auto stored =
      load_config_from_string(checkpoint_config_yaml(checkpoint), checkpoint + "/checkpoint.json");
  if (stored.train.steps == config.train.steps) return;
  config.notes.push_back(fmt::format(
      "train.steps is {} here but {} in the checkpoint: the learning-rate schedule now ends at "
      "step {}, so the LR at step {} is {:.3g} (the old schedule gave {:.3g}); to keep the LR "
      "continuous set train.lr / train.min_lr for the new tail, or start a new run with "
      "--init-from",
      config.train.steps, stored.train.steps, config.train.steps, step + 1,
      learning_rate(config.train, step), learning_rate(stored.train, step)));
}

void prepare_start_point(const TrainArgs& args, PreparedRun& run) {
  const auto& config = run.config;
  const auto checkpoints = (std::filesystem::path(config.train.out_dir) / "checkpoints").string();
  if (args.resume) {
    run.options.resume = resolve_checkpoint(checkpoints, *args.resume, "resume from");
    check_checkpoint_matches(*run.options.resume, config, "resume from");
    const auto step = checkpoint_info(*run.options.resume).step;
    if (step >= config.train.steps)
      throw UserError(fmt::format(
          "{}: run already complete at step {} (train.steps = {}): nothing left to train; raise "
          "train.steps (e.g. --set train.steps={}) to continue it",
          *run.options.resume, step, config.train.steps, 2 * step));
    note_schedule_change(*run.options.resume, step, run.config);
  } else {
    check_fresh_run_directory(config.train.out_dir, args.overwrite);
  }
  if (args.init_from) {
    run.options.init_from = *args.init_from;
    if (!hf::is_hf_directory(*args.init_from)) {
      run.options.init_from = resolve_checkpoint(checkpoints, *args.init_from, "initialise from");
      check_checkpoint_matches(*run.options.init_from, config, "initialise from");
    }
  }
}

// --init-from a Hugging Face directory: its model section is the run's.
std::optional<FixedModel> model_of_init_source(const TrainArgs& args) {
  if (!args.init_from || !hf::is_hf_directory(*args.init_from)) return std::nullopt;
  std::string type;
  const auto source = hf::read_config(*args.init_from, Config{}, &type);
  return FixedModel{source.model, fmt::format("Hugging Face {} model {}", type, *args.init_from)};
}

PreparedRun prepare_run(const TrainArgs& args, int rank, int world_size) {
  PreparedRun run{load_config(args.config_path, args.overrides, model_of_init_source(args)),
                  std::nullopt,
                  {},
                  std::nullopt};
  validate_for_world(run.config, world_size);
  run.data =
      TokenDataset::open(run.config.data, run.config.model.vocab_size, run.config.train.seq_len);
  if (const auto& tokenizer = run.config.data.tokenizer; !tokenizer.empty())
    check_tokenizer_fits(tokenizer_directory(tokenizer, "data.tokenizer"),
                         run.config.model.vocab_size);
  if (rank == 0) run.lock.emplace(RunLock::acquire(run.config.train.out_dir));
  prepare_start_point(args, run);
  return run;
}

// The run itself, once every rank has passed its local checks. Returns the exit code: 0, or
// 128 + the signal when a stop signal ended it early (after a checkpoint).
int run_training(PreparedRun& run, const TrainArgs& args, int rank) {
  const auto& config = run.config;
  if (config.train.threads_per_rank > 0) at::set_num_threads(config.train.threads_per_rank);
  if (rank == 0 && !run.options.resume)  // every rank agreed: now replace an old run
    run.options.run_id = start_fresh_run(config.train.out_dir, args.overwrite);
  listen_for_stop_signals();
  parallel::MpiCommunicator world(MPI_COMM_WORLD);
  world.set_timeout(config.parallel.timeout_s);  // the groups split from it inherit it
  auto groups = parallel::make_process_groups(world, config.parallel.ep_size);
  const auto layout = parallel::discover_node_layout(MPI_COMM_WORLD);
  const int ep_size = static_cast<int>(config.parallel.ep_size);
  groups.ep_ranks_per_node =
      parallel::ep_ranks_per_node(layout, world.rank() / ep_size * ep_size, ep_size);
  if (rank == 0 && run.options.print)
    std::cout << parallel::describe_node_layout(layout, config.parallel.ep_size,
                                                config.moe.num_experts,
                                                config.moe.router.num_groups)
              << std::endl;
  Trainer trainer(config, groups, std::move(*run.data), run.options);
  const auto summary = trainer.run();
  if (rank == 0) print_summary(summary);
  if (summary.stop_signal == 0) return 0;
  if (rank == 0)
    std::cerr << fmt::format(
                     "moeforge: stopped by signal {} after step {}; {}; continue with --resume",
                     summary.stop_signal, summary.steps.empty() ? 0 : summary.steps.back().step,
                     summary.last_checkpoint.empty()
                         ? "no checkpoint written (checkpoint.on_signal is false)"
                         : "checkpoint " + summary.last_checkpoint)
              << std::endl;
  return 128 + summary.stop_signal;
}

int train_command(const TrainArgs& args, int rank, int world_size) {
  std::optional<PreparedRun> run;
  return run_collective_command([&] { run.emplace(prepare_run(args, rank, world_size)); },
                                [&] { return run_training(*run, args, rank); }, rank, world_size);
}

// Conversions are single-process: rank 0 works, a wider launch is refused.
int run_single_process(const std::function<int(const ConvertArgs&)>& command,
                       const ConvertArgs& args, int rank, int world_size) {
  if (world_size > 1) {
    if (rank == 0)
      std::cerr << "moeforge: error: import / upcycle / export / forward / data-info / generate / "
                   "analyze run as one "
                   "process (launch without mpirun, or with -n 1)"
                << std::endl;
    return 2;
  }
  try {
    return command(args);
  } catch (const UserError& e) {
    std::cerr << "moeforge: error: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "moeforge: error: " << e.what() << std::endl;
    return 1;
  }
}

// The `train` subcommand and the options whose presence matters (--resume, --init-from).
struct TrainCommand {
  CLI::App* command;
  CLI::Option* resume;
  CLI::Option* init_from;
  std::string resume_path, init_path;
};

void add_train_command(CLI::App& app, TrainArgs& args, TrainCommand& train) {
  train.command = app.add_subcommand("train", "Train a model described by a YAML config");
  train.command->add_option("--config", args.config_path, "Experiment YAML file")->required();
  train.command
      ->add_option("--set", args.overrides, "Override a key: --set moe.top_k=4 (repeatable)")
      ->type_name("KEY=VALUE");
  train.resume =
      train.command
          ->add_option("--resume", train.resume_path,
                       "Resume from the latest checkpoint of train.out_dir, or from PATH")
          ->expected(0, 1)
          ->type_name("[PATH]");
  train.init_from = train.command->add_option(
      "--init-from", train.init_path,
      "Start from these weights (a moeforge run/checkpoint directory, e.g. one written by "
      "upcycle, or a Hugging Face directory) with a fresh optimizer at step 0");
  train.init_from->excludes(train.resume);
  train.command->add_flag("--overwrite", args.overwrite,
                          "Start a fresh run even if train.out_dir holds one (deletes its "
                          "checkpoints and metrics)");
}

struct ConvertCommands {
  CLI::App *import_cmd, *upcycle_cmd, *export_cmd, *forward_cmd, *data_info_cmd;
  bool no_shared_from_dense = false;
  DataInfoArgs data_info;
};

void add_upcycle_options(CLI::App* upcycle_cmd, ConvertArgs& convert, bool& no_shared) {
  upcycle_cmd->add_option("--method", convert.upcycle.method, "copy | noise | drop | granular")
      ->capture_default_str();
  upcycle_cmd
      ->add_option("--noise-std", convert.upcycle.noise_std,
                   "noise: std relative to each matrix's std")
      ->capture_default_str();
  upcycle_cmd
      ->add_option("--drop-ratio", convert.upcycle.drop_ratio,
                   "drop: fraction of intermediate channels re-initialised per expert")
      ->capture_default_str();
  upcycle_cmd->add_option("--router-std", convert.upcycle.router_std, "Router init std")
      ->capture_default_str();
  upcycle_cmd->add_option("--seed", convert.upcycle.seed, "Seed of noise / drop / router init")
      ->capture_default_str();
  upcycle_cmd->add_flag("--no-shared-from-dense", no_shared,
                        "Random shared expert instead of the dense FFN");
}

void add_convert_commands(CLI::App& app, ConvertArgs& convert, ConvertCommands& cmds) {
  cmds.data_info_cmd = app.add_subcommand(
      "data-info", "What a Megatron indexed dataset holds, after every check training makes");
  cmds.data_info_cmd->add_option("PREFIX", cmds.data_info.prefix, "Dataset prefix (PREFIX.idx)")
      ->required();
  cmds.data_info_cmd->add_option("--vocab-size", cmds.data_info.vocab_size,
                                 "Also check every token id is below this");
  cmds.data_info_cmd->add_option("--tokens-out", cmds.data_info.tokens_out,
                                 "Write every token (safetensors) for comparing readers");
  cmds.import_cmd = app.add_subcommand(
      "import", "Hugging Face Llama / Mistral / Qwen2 / Mixtral / Qwen2-MoE directory -> run dir");
  cmds.upcycle_cmd = app.add_subcommand(
      "upcycle", "Dense model (HF or moeforge) -> MoE run dir (sparse upcycling)");
  cmds.export_cmd = app.add_subcommand("export", "moeforge checkpoint -> Hugging Face directory");
  cmds.forward_cmd =
      app.add_subcommand("forward", "Logits of a model for the token ids in a safetensors file");
  const std::pair<CLI::App*, const char*> outputs[] = {
      {cmds.import_cmd, "Run directory to create (config.yaml + checkpoints/)"},
      {cmds.upcycle_cmd, "Run directory to create (config.yaml + checkpoints/)"},
      {cmds.export_cmd, "Hugging Face directory to write"},
      {cmds.forward_cmd, "safetensors file to write the logits to"}};
  for (const auto& [cmd, out_help] : outputs) {
    cmd->add_option("--from", convert.from, "Source directory")->required();
    cmd->add_option("--out", convert.out, out_help)->required();
  }
  cmds.upcycle_cmd->add_option(
      "--config", convert.config_path,
      "YAML with the MoE (and train, data) sections; optional: without it the defaults and --set "
      "give them (the model section always comes from --from)");
  cmds.import_cmd->add_option("--config", convert.config_path,
                              "YAML for the non-model sections (train, data, ...)");
  for (auto* cmd : {cmds.import_cmd, cmds.upcycle_cmd})
    cmd->add_option("--set", convert.overrides, "Override a config key (repeatable)")
        ->type_name("KEY=VALUE");
  add_upcycle_options(cmds.upcycle_cmd, convert, cmds.no_shared_from_dense);
  cmds.export_cmd
      ->add_option("--format", convert.format,
                   "hf-mixtral | hf-qwen2-moe | hf-qwen3-moe | hf-llama | hf-qwen3")
      ->required();
  cmds.export_cmd->add_option("--dtype", convert.dtype,
                              "float32 | bfloat16 | float16 (default float32)");
  cmds.export_cmd->add_option("--shard-mb", convert.shard_mb, "Largest shard (MiB)")
      ->capture_default_str();
  cmds.export_cmd->add_flag("--drop-expert-bias", convert.drop_expert_bias,
                            "Export even if a non-zero expert bias is lost (routing changes)");
  auto* tokens = cmds.forward_cmd->add_option("--tokens", convert.tokens,
                                              "safetensors file with I64 'tokens' [B, S]");
  auto* text = cmds.forward_cmd->add_option(
      "--text", convert.text,
      "Text file, tokenised like the model's data (bytes or its tokenizer)");
  auto* prompt = cmds.forward_cmd->add_option("--prompt", convert.prompt, "Text, as --text");
  tokens->excludes(text)->excludes(prompt);
  text->excludes(prompt);
  cmds.forward_cmd->add_option("--tokenizer", convert.tokenizer,
                               "Tokenizer directory for --text/--prompt (default: the model's)");
  cmds.forward_cmd->add_option("--dtype", convert.dtype, "float32 | float64 (default float32)");
}

struct InferenceCommands {
  CLI::App *generate_cmd, *eval_cmd, *analyze_cmd;
  GenerateArgs generate;
  EvalArgs eval;
  AnalyzeArgs analyze;
};

void add_generate_command(CLI::App& app, InferenceCommands& cmds) {
  auto* cmd = cmds.generate_cmd = app.add_subcommand(
      "generate", "Continue a prompt with a trained model (greedy or sampled; KV cache)");
  auto& args = cmds.generate;
  cmd->add_option("--from", args.from, "Run, checkpoint or Hugging Face directory")->required();
  cmd->add_option("--prompt", args.prompt, "Prompt text");
  cmd->add_option("--prompt-file", args.prompt_file, "File holding the prompt text");
  cmd->add_option("--max-tokens", args.sampling.max_new_tokens, "Tokens to generate")
      ->capture_default_str();
  cmd->add_option("--temperature", args.sampling.temperature, "0 = greedy (argmax)")
      ->capture_default_str();
  cmd->add_option("--top-k", args.sampling.top_k, "Sample among the k likeliest (0 = all)")
      ->capture_default_str();
  cmd->add_option("--top-p", args.sampling.top_p, "Sample within this probability mass")
      ->capture_default_str();
  cmd->add_option("--seed", args.sampling.seed, "Sampling seed")->capture_default_str();
  cmd->add_option("--tokenizer", args.tokenizer,
                  "Tokenizer directory (default: the model's own; bytes without one)");
  cmd->add_flag("--no-cache", args.no_cache, "Recompute the whole prefix for every token");
  cmd->add_flag("--ids", args.print_ids, "Also print the generated token ids");
}

void add_eval_command(CLI::App& app, InferenceCommands& cmds) {
  auto* cmd = cmds.eval_cmd = app.add_subcommand(
      "eval", "Loss, perplexity and routing statistics of a model on data (any ranks, ep_size)");
  auto& args = cmds.eval;
  cmd->add_option("--from", args.from, "Run, checkpoint or Hugging Face directory")->required();
  auto* text = cmd->add_option("--text", args.text, "Evaluate on this text file's bytes");
  auto* data =
      cmd->add_option("--data", args.data, "Evaluate on this Megatron dataset (PREFIX.bin/.idx)");
  text->excludes(data);
  cmd->add_option("--split", args.split,
                  "val | train | all (default: val of the run's data; all for --text/--data)");
  cmd->add_option("--windows", args.windows, "At most this many sequences per split (default all)");
  cmd->add_option("--micro-batch", args.micro_batch_size,
                  "Sequences per rank per forward (default: train.micro_batch_size)");
  cmd->add_option("--ep-size", args.ep_size, "Expert-parallel group size")->capture_default_str();
  cmd->add_option("--set", args.overrides, "Override a config key (repeatable)")
      ->type_name("KEY=VALUE");
  cmd->add_option("--json", args.json_out, "Also write the results as JSON to this file");
}

void add_analyze_command(CLI::App& app, InferenceCommands& cmds) {
  auto* cmd = cmds.analyze_cmd = app.add_subcommand(
      "analyze",
      "Routing analysis on a probe set: stability, token/expert MI, co-routing, super "
      "experts, drop positions (report + plots)");
  auto& args = cmds.analyze;
  cmd->add_option("--from", args.from, "Run, checkpoint or Hugging Face directory")->required();
  cmd->add_option("--compare", args.compare,
                  "A second checkpoint of the same model: routing stability against it");
  auto* text = cmd->add_option("--text", args.text, "Probe with this text file's bytes");
  auto* data =
      cmd->add_option("--data", args.data, "Probe with this Megatron dataset (PREFIX.bin/.idx)");
  text->excludes(data);
  cmd->add_option("--windows", args.windows,
                  "Probe set: the first N validation windows of the data")
      ->capture_default_str();
  cmd->add_option("--micro-batch", args.micro_batch,
                  "Sequences per forward (capacity applies per forward; default "
                  "train.micro_batch_size)");
  cmd->add_option("--capacity-factor", args.capacity_factor,
                  "Expert capacity factor for the probe (0 = dropless; default the run's "
                  "moe.capacity.eval_factor)");
  cmd->add_option("--outlier-mads", args.outlier_mads,
                  "Super expert: mean output norm above median + this many robust std devs")
      ->capture_default_str();
  cmd->add_option("--set", args.overrides, "Override a config key (repeatable)")
      ->type_name("KEY=VALUE");
  cmd->add_option("--out", args.out, "Report directory (report.json, report.md, PNGs)")->required();
  cmd->add_flag("--no-plots", args.no_plots, "Write the report only; print the plot command");
}

struct Commands {
  CLI::App* doc = nullptr;
  TrainArgs train_args;
  TrainCommand train;
  ConvertArgs convert;
  ConvertCommands convert_cmds;
  InferenceCommands inference;
};

void add_commands(CLI::App& app, Commands& cmds) {
  app.require_subcommand(1);
#ifdef MOEFORGE_CUDA
  constexpr const char* kBuild = "CUDA + NCCL";
#else
  constexpr const char* kBuild = "CPU only";
#endif
  app.set_version_flag("--version", fmt::format("moeforge {} (LibTorch {}, {} build)",
                                                MOEFORGE_VERSION, TORCH_VERSION, kBuild));
  add_train_command(app, cmds.train_args, cmds.train);
  add_generate_command(app, cmds.inference);
  add_eval_command(app, cmds.inference);
  add_analyze_command(app, cmds.inference);
  cmds.doc = app.add_subcommand("config-doc", "Print the reference of every config key (Markdown)");
  add_convert_commands(app, cmds.convert, cmds.convert_cmds);
}

// The parsed subcommand, run; every rank returns the same exit code.
int dispatch(Commands& cmds, int rank, int world_size) {
  if (cmds.doc->parsed()) {
    if (rank == 0) std::cout << config_reference_markdown();
    return 0;
  }
  auto& train = cmds.train;
  if (train.command->parsed()) {
    if (train.resume->count() > 0) cmds.train_args.resume = train.resume_path;
    if (train.init_from->count() > 0) cmds.train_args.init_from = train.init_path;
    return train_command(cmds.train_args, rank, world_size);
  }
  if (cmds.inference.eval_cmd->parsed()) return eval_command(cmds.inference.eval, rank, world_size);
  auto& convert = cmds.convert;
  const auto& convert_cmds = cmds.convert_cmds;
  if (cmds.inference.generate_cmd->parsed()) {
    const auto generate = [&cmds](const ConvertArgs&) {
      return generate_command(cmds.inference.generate);
    };
    return run_single_process(generate, convert, rank, world_size);
  }
  if (cmds.inference.analyze_cmd->parsed()) {
    const auto analyze = [&cmds](const ConvertArgs&) {
      return analyze_command(cmds.inference.analyze);
    };
    return run_single_process(analyze, convert, rank, world_size);
  }
  if (convert_cmds.data_info_cmd->parsed()) {
    const auto info = [&convert_cmds](const ConvertArgs&) {
      return data_info_command(convert_cmds.data_info);
    };
    return run_single_process(info, convert, rank, world_size);
  }
  convert.upcycle.shared_from_dense = !convert_cmds.no_shared_from_dense;
  return run_single_process(convert_cmds.import_cmd->parsed()    ? import_command
                            : convert_cmds.upcycle_cmd->parsed() ? upcycle_command
                            : convert_cmds.export_cmd->parsed()  ? export_command
                                                                 : forward_command,
                            convert, rank, world_size);
}

// A first argument that names no command: say so, suggest the closest, list them. Empty = fine.
std::string unknown_command_message(const CLI::App& app, const std::string& first) {
  if (first.empty() || first[0] == '-') return "";
  std::vector<std::string> commands;
  for (const auto* command : app.get_subcommands({})) commands.push_back(command->get_name());
  if (std::find(commands.begin(), commands.end(), first) != commands.end()) return "";
  const auto closest = closest_spelling(first, commands);
  return fmt::format(
      "moeforge: error: unknown command '{}'{}; the commands are {} (moeforge "
      "--help)",
      first, closest.empty() ? "" : fmt::format(" (did you mean '{}'?)", closest),
      fmt::join(commands, ", "));
}

}  // namespace

int run_cli(int argc, char** argv) {
  // SERIALIZED: collectives are issued by one thread at a time (docs/architecture.md).
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  int rank = 0, world_size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);

  CLI::App app{"moeforge: Mixture-of-Experts training on LibTorch"};
  Commands cmds;
  add_commands(app, cmds);
  if (const auto message = unknown_command_message(app, argc > 1 ? argv[1] : "");
      !message.empty()) {
    if (rank == 0) std::cerr << message << std::endl;
    MPI_Finalize();
    return 2;
  }
  int code = 0;
  try {
    app.parse(argc, argv);
    code = dispatch(cmds, rank, world_size);
  } catch (const CLI::ParseError& e) {
    // Every rank parses the same arguments; rank 0 speaks for all.
    code = rank == 0 ? app.exit(e) : e.get_exit_code();
  }
  MPI_Finalize();
  return code;
}

}  // namespace moeforge
