#include "trainer/cli.hpp"

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <iostream>
#include <optional>

#include "parallel/mpi_communicator.hpp"
#include "parallel/process_groups.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/config/config.hpp"
#include "trainer/convert/convert_commands.hpp"
#include "trainer/data/data.hpp"
#include "trainer/trainer.hpp"

namespace moeforge {
namespace {

struct TrainArgs {
  std::string config_path;
  std::vector<std::string> overrides;
  std::optional<std::string> resume;
  std::optional<std::string> init_from;
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

int train_command(const TrainArgs& args, int rank, int world_size) {
  LocalCheck check;
  std::optional<Config> config;
  std::optional<TokenDataset> data;
  try {
    config = load_config(args.config_path, args.overrides);
    validate_for_world(*config, world_size);
    data = TokenDataset::open(config->data, config->model.vocab_size, config->train.seq_len);
  } catch (const UserError& e) {
    check = {2, fmt::format("moeforge: error: {}", e.what())};
  } catch (const std::exception& e) {
    check = {1, fmt::format("moeforge: error on rank {}: {}", rank, e.what())};
  }
  if (const int code = agree_on_local_failures(check, rank); code != 0) return code;

  // From here on ranks meet in collectives: a failure aborts the job.
  try {
    if (config->train.threads_per_rank > 0) at::set_num_threads(config->train.threads_per_rank);
    parallel::MpiCommunicator world(MPI_COMM_WORLD);
    const auto groups = parallel::make_process_groups(world, config->parallel.ep_size);
    RunOptions options;
    options.resume = args.resume;
    options.init_from = args.init_from;
    Trainer trainer(*config, groups, std::move(*data), options);
    const auto summary = trainer.run();
    if (rank == 0) print_summary(summary);
  } catch (const std::exception& e) {
    std::cerr << fmt::format("moeforge: error on rank {}: {}", rank, e.what()) << std::endl;
    if (world_size > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
  return 0;
}

// Conversions are single-process: rank 0 works, a wider launch is refused.
int run_convert_command(int (*command)(const ConvertArgs&), const ConvertArgs& args, int rank,
                        int world_size) {
  if (world_size > 1) {
    if (rank == 0)
      std::cerr << "moeforge: error: import / upcycle / export / forward run as one process "
                   "(launch without mpirun, or with -n 1)"
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
  auto* train = app.add_subcommand("train", "Train a model described by a YAML config");
  train->add_option("--config", train_args.config_path, "Experiment YAML file")->required();
  train->add_option("--set", train_args.overrides, "Override a key: --set moe.top_k=4 (repeatable)")
      ->type_name("KEY=VALUE");
  std::string resume_path;
  auto* resume =
      train
          ->add_option("--resume", resume_path,
                       "Resume from the latest checkpoint of train.out_dir, or from PATH")
          ->expected(0, 1)
          ->type_name("[PATH]");
  std::string init_from;
  auto* init = train->add_option(
      "--init-from", init_from,
      "Start from these weights (a moeforge run/checkpoint directory, e.g. one written by "
      "upcycle, or a Hugging Face directory) with a fresh optimizer at step 0");
  init->excludes(resume);
  auto* doc =
      app.add_subcommand("config-doc", "Print the reference of every config key (Markdown)");

  ConvertArgs convert;
  auto* import_cmd = app.add_subcommand(
      "import", "Hugging Face Llama / Mistral / Qwen2 / Mixtral / Qwen2-MoE directory -> run dir");
  auto* upcycle_cmd = app.add_subcommand(
      "upcycle", "Dense model (HF or moeforge) -> MoE run dir (sparse upcycling)");
  auto* export_cmd = app.add_subcommand("export", "moeforge checkpoint -> Hugging Face directory");
  auto* forward_cmd =
      app.add_subcommand("forward", "Logits of a model for the token ids in a safetensors file");
  for (auto* cmd : {import_cmd, upcycle_cmd, export_cmd, forward_cmd}) {
    cmd->add_option("--from", convert.from, "Source directory")->required();
    cmd->add_option("--out", convert.out, "Output directory (forward: output file)")->required();
  }
  for (auto* cmd : {import_cmd, upcycle_cmd}) {
    cmd->add_option("--config", convert.config_path,
                    cmd == upcycle_cmd ? "The MoE model's YAML config"
                                       : "YAML for the non-model sections (train, data, ...)");
    cmd->add_option("--set", convert.overrides, "Override a config key (repeatable)")
        ->type_name("KEY=VALUE");
  }
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
  bool no_shared_from_dense = false;
  upcycle_cmd->add_flag("--no-shared-from-dense", no_shared_from_dense,
                        "Random shared expert instead of the dense FFN");
  export_cmd->add_option("--format", convert.format, "hf-mixtral | hf-qwen2-moe | hf-llama")
      ->required();
  export_cmd->add_option("--dtype", convert.dtype,
                         "float32 | bfloat16 | float16 (default float32)");
  export_cmd->add_option("--shard-mb", convert.shard_mb, "Largest shard (MiB)")
      ->capture_default_str();
  export_cmd->add_flag("--drop-expert-bias", convert.drop_expert_bias,
                       "Export even if a non-zero expert bias is lost (routing changes)");
  forward_cmd->add_option("--tokens", convert.tokens, "safetensors file with I64 'tokens' [B, S]")
      ->required();
  forward_cmd->add_option("--dtype", convert.dtype, "float32 | float64 (default float32)");

  int code = 0;
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Every rank parses the same arguments; rank 0 speaks for all.
    if (rank == 0)
      code = app.exit(e);
    else
      code = e.get_exit_code();
    MPI_Finalize();
    return code;
  }
  if (doc->parsed()) {
    if (rank == 0) std::cout << config_reference_markdown();
  } else if (train->parsed()) {
    if (resume->count() > 0) train_args.resume = resume_path;
    if (init->count() > 0) train_args.init_from = init_from;
    code = train_command(train_args, rank, world_size);
  } else {
    convert.upcycle.shared_from_dense = !no_shared_from_dense;
    code = run_convert_command(import_cmd->parsed()    ? import_command
                               : upcycle_cmd->parsed() ? upcycle_command
                               : export_cmd->parsed()  ? export_command
                                                       : forward_command,
                               convert, rank, world_size);
  }
  MPI_Finalize();
  return code;
}

}  // namespace moeforge
