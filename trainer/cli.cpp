#include "trainer/cli.hpp"

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <functional>
#include <iostream>
#include <optional>

#include "parallel/mpi_communicator.hpp"
#include "parallel/node_layout.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/checkpoint/checkpoint.hpp"
#include "trainer/checkpoint/run_directory.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/config/config.hpp"
#include "trainer/convert/convert_commands.hpp"
#include "trainer/convert/hf_checkpoint.hpp"
#include "trainer/data/data.hpp"
#include "trainer/data/data_info.hpp"
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

// Everything checked before any collective: on failure, a message and an exit code.
struct LocalCheck {
  int exit_code = 0;  // 0 = fine
  std::string message;
};

void print_summary(const RunSummary& s) {
  std::cout
      << "\n== summary ==\n"
      << fmt::format("final train loss   {:.4f}  (mean of the last steps)\n", s.final_train_loss)
      << fmt::format("final val loss     {:.4f}\n", s.final_val_loss)
      << fmt::format("unigram entropy    {:.4f}  (loss of a model that ignores context)\n",
                     s.unigram_entropy)
      << fmt::format("throughput         {:.0f} tokens/s\n", s.tokens_per_s)
      << fmt::format("outputs            {}/ (config.resolved.yaml, metrics.jsonl)\n", s.out_dir)
      << fmt::format("last checkpoint    {}\n", s.last_checkpoint.empty() ? "-" : s.last_checkpoint)
      << std::flush;
}

// Agrees across the world on whether any rank failed locally; returns the exit code (0 = go on).
int agree_on_local_failures(const LocalCheck& check, int rank) {
  int failing_rank = check.exit_code != 0 ? rank : std::numeric_limits<int>::max();
  int lowest = 0;
  MPI_Allreduce(&failing_rank, &lowest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (lowest == std::numeric_limits<int>::max()) return 0;
  int code = check.exit_code;
  MPI_Bcast(&code, 1, MPI_INT, lowest, MPI_COMM_WORLD);
  if (rank == lowest && !check.message.empty()) std::cerr << check.message << std::endl;
  return code;
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

void prepare_start_point(const TrainArgs& args, PreparedRun& run) {
  const auto& config = run.config;
  const auto checkpoints = (std::filesystem::path(config.train.out_dir) / "checkpoints").string();
  if (args.resume) {
    run.options.resume = resolve_checkpoint(checkpoints, *args.resume, "resume from");
    check_checkpoint_matches(*run.options.resume, config, "resume from");
    const auto step = checkpoint_info(*run.options.resume).step;
    if (step >= config.train.steps)
      throw UserError(fmt::format(
          "{}: the checkpoint is at step {} and train.steps is {}: nothing left to train; "
          "raise train.steps to continue the run",
          *run.options.resume, step, config.train.steps));
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
  install_stop_signal_handlers();
  parallel::MpiCommunicator world(MPI_COMM_WORLD);
  world.set_timeout(config.parallel.timeout_s);  // the groups split from it inherit it
  const auto groups = parallel::make_process_groups(world, config.parallel.ep_size);
  const auto layout = parallel::discover_node_layout(MPI_COMM_WORLD);
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
  LocalCheck check;
  std::optional<PreparedRun> run;
  try {
    run.emplace(prepare_run(args, rank, world_size));
  } catch (const UserError& e) {
    check = {2, fmt::format("moeforge: error: {}", e.what())};
  } catch (const std::exception& e) {
    check = {1, fmt::format("moeforge: error on rank {}: {}", rank, e.what())};
  }
  if (const int code = agree_on_local_failures(check, rank); code != 0) return code;

  // From here on ranks meet in collectives. An error raised identically on every rank stops the
  // job cleanly (printed once); any other aborts it (exit 2 for bad input found only now, e.g.
  // a checkpoint tensor of the wrong shape; 1 otherwise).
  try {
    return run_training(*run, args, rank);
  } catch (const CollectiveError& e) {
    if (rank == 0) std::cerr << "moeforge: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    const bool user_error = dynamic_cast<const UserError*>(&e) != nullptr;
    std::cerr << fmt::format("moeforge: error on rank {}: {}", rank, e.what()) << std::endl;
    if (world_size > 1) MPI_Abort(MPI_COMM_WORLD, user_error ? 2 : 1);
    return user_error ? 2 : 1;
  }
}

// Conversions are single-process: rank 0 works, a wider launch is refused.
int run_single_process(const std::function<int(const ConvertArgs&)>& command,
                       const ConvertArgs& args, int rank, int world_size) {
  if (world_size > 1) {
    if (rank == 0)
      std::cerr << "moeforge: error: import / upcycle / export / forward / data-info run as one "
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
  for (auto* cmd : {cmds.import_cmd, cmds.upcycle_cmd, cmds.export_cmd, cmds.forward_cmd}) {
    cmd->add_option("--from", convert.from, "Source directory")->required();
    cmd->add_option("--out", convert.out, "Output directory (forward: output file)")->required();
  }
  for (auto* cmd : {cmds.import_cmd, cmds.upcycle_cmd}) {
    cmd->add_option("--config", convert.config_path,
                    cmd == cmds.upcycle_cmd ? "The MoE model's YAML config"
                                            : "YAML for the non-model sections (train, data, ...)");
    cmd->add_option("--set", convert.overrides, "Override a config key (repeatable)")
        ->type_name("KEY=VALUE");
  }
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
  cmds.forward_cmd
      ->add_option("--tokens", convert.tokens, "safetensors file with I64 'tokens' [B, S]")
      ->required();
  cmds.forward_cmd->add_option("--dtype", convert.dtype, "float32 | float64 (default float32)");
}

// The parsed subcommand, run; every rank returns the same exit code.
int dispatch(const CLI::App* doc, const TrainCommand& train, TrainArgs& train_args,
             const ConvertCommands& cmds, ConvertArgs& convert, int rank, int world_size) {
  if (doc->parsed()) {
    if (rank == 0) std::cout << config_reference_markdown();
    return 0;
  }
  if (train.command->parsed()) {
    if (train.resume->count() > 0) train_args.resume = train.resume_path;
    if (train.init_from->count() > 0) train_args.init_from = train.init_path;
    return train_command(train_args, rank, world_size);
  }
  if (cmds.data_info_cmd->parsed()) {
    const auto info = [&cmds](const ConvertArgs&) { return data_info_command(cmds.data_info); };
    return run_single_process(info, convert, rank, world_size);
  }
  convert.upcycle.shared_from_dense = !cmds.no_shared_from_dense;
  return run_single_process(cmds.import_cmd->parsed()    ? import_command
                            : cmds.upcycle_cmd->parsed() ? upcycle_command
                            : cmds.export_cmd->parsed()  ? export_command
                                                         : forward_command,
                            convert, rank, world_size);
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
  app.require_subcommand(1);
  TrainArgs train_args;
  TrainCommand train;
  add_train_command(app, train_args, train);
  auto* doc =
      app.add_subcommand("config-doc", "Print the reference of every config key (Markdown)");
  ConvertArgs convert;
  ConvertCommands cmds;
  add_convert_commands(app, convert, cmds);

  if (argc > 1 && argv[1][0] != '-') {  // a command that does not exist: say so, list them
    std::vector<std::string> commands;
    for (const auto* command : app.get_subcommands({})) commands.push_back(command->get_name());
    if (std::find(commands.begin(), commands.end(), argv[1]) == commands.end()) {
      if (rank == 0)
        std::cerr << fmt::format(
                         "moeforge: error: unknown command '{}'; the commands are {} "
                         "(moeforge --help)",
                         argv[1], fmt::join(commands, ", "))
                  << std::endl;
      MPI_Finalize();
      return 2;
    }
  }
  int code = 0;
  try {
    app.parse(argc, argv);
    code = dispatch(doc, train, train_args, cmds, convert, rank, world_size);
  } catch (const CLI::ParseError& e) {
    // Every rank parses the same arguments; rank 0 speaks for all.
    code = rank == 0 ? app.exit(e) : e.get_exit_code();
  }
  MPI_Finalize();
  return code;
}

}  // namespace moeforge
