#pragma once
// Typed experiment configuration. One YAML file (plus `--set key.path=value` overrides) becomes
// a Config; load_config() validates everything that can be checked without knowing the world
// size and throws UserError naming file, line, key and what is allowed. The schema (every key,
// its default, range and doc line) lives in config_schema.cpp and is the single source for
// parsing, validation, the resolved-config dump and configs/README.md.
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moe/moe_config.hpp"

namespace moeforge {

enum class RopeScalingType { kNone, kLinear, kLlama3 };

// RoPE frequency scaling for long contexts (Hugging Face's rope_scaling / rope_parameters).
//   linear  every inverse frequency ÷ factor (position interpolation);
//   llama3  Llama 3.1: wavelengths above original_max_position_embeddings / low_freq_factor
//           ÷ factor, below original / high_freq_factor unchanged, smooth in between.
struct RopeScalingConfig {
  RopeScalingType type = RopeScalingType::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 0;
};

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t hidden_size = 128;
  int64_t num_layers = 4;
  int64_t num_heads = 4;
  int64_t num_kv_heads = 2;
  int64_t ffn_size = 512;  // dense SwiGLU intermediate size (dense layers)
  int64_t max_seq_len = 128;
  double rope_theta = 10000.0;
  RopeScalingConfig rope_scaling;
  double rms_norm_eps = 1e-6;
  int64_t head_dim = 0;  // 0 = hidden_size / num_heads (Qwen3 sets it independently)
  bool qk_norm = false;  // RMSNorm on each head of q and k before RoPE (Qwen3)
  bool qkv_bias = false;
  bool tie_embeddings = false;
  double init_std = 0.02;
};

// The attention head size: model.head_dim, or hidden_size / num_heads when 0.
inline int64_t head_dim_of(const ModelConfig& m) {
  return m.head_dim > 0 ? m.head_dim : m.hidden_size / m.num_heads;
}

// Closed sets of options are enums in code; their YAML spellings live in EnumText below (the
// only place strings meet them).
enum class DataSource { kBuiltin, kText, kBin, kMegatron };
enum class TokenWidth { kUint16, kUint32 };
enum class DeviceKind { kCpu, kCuda };
enum class Precision { kFp32, kBf16 };
enum class BackendChoice { kAuto, kMpi, kNccl };

// The `moe:` section lives with the MoE code (torch-free); the names are used unqualified here.
using moe::AuxLossConfig;
using moe::BalancingConfig;
using moe::CapacityConfig;
using moe::ExpertBiasConfig;
using moe::MoeConfig;
using moe::RouterConfig;
using moe::ZLossConfig;

struct SimulatedLinkConfig {
  double bandwidth_gbps = 0.0;  // GB/s per rank; 0 = off
  double latency_us = 0.0;
};

struct ParallelConfig {
  int64_t ep_size = 1;
  double bucket_mb = 25.0;     // gradient all-reduce bucket size
  bool comm_worker = true;     // run collectives on the communication worker thread
  int64_t overlap_degree = 1;  // MoE dispatch/experts/combine pipeline chunks
  moe::DispatchDedup dedup_dispatch = moe::DispatchDedup::kNone;  // rows on the wire
  bool micro_batch_overlap = false;    // two micro-batches interleaved through the model
  bool overlap_grad_sync = true;       // all-reduce gradient buckets during backward
  bool distributed_optimizer = false;  // ZeRO-1: masters and AdamW state sharded over DP
  Precision grad_reduce_dtype = Precision::kFp32;  // dtype of the gradient collectives
  BackendChoice backend = BackendChoice::kAuto;    // auto: nccl when train.device is cuda
  double timeout_s = 600.0;  // a collective idle this long aborts the job (0 = never)
  SimulatedLinkConfig simulated_link;
};

// train.recompute: regions whose activations are recomputed in backward instead of stored
// (selective activation checkpointing, like Megatron-Core's --recompute-modules). Any
// combination; none by default. Results are bitwise the same as without.
struct RecomputeConfig {
  bool moe_act = false;    // routed experts' SwiGLU activation and second GEMM
  bool moe = false;        // the whole MoE layer: router, dispatch, experts, combine
  bool attention = false;  // the attention module: q/k/v projections to o_proj
  bool block = false;      // the whole decoder block
  bool any() const { return moe_act || moe || attention || block; }
};

struct TrainConfig {
  int64_t steps = 200;
  int64_t max_skipped_steps = 5;  // consecutive non-finite-gradient steps before stopping
  int64_t seed = 1234;
  int64_t micro_batch_size = 8;  // sequences per rank per micro-batch
  int64_t grad_accum = 1;
  int64_t seq_len = 128;
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup_steps = 20;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;   // 0 = no clipping
  int64_t eval_every = 50;  // 0 = only at the end
  int64_t eval_batches = 4;
  int64_t threads_per_rank = 0;            // 0 = leave torch's default (OMP_NUM_THREADS)
  DeviceKind device = DeviceKind::kCpu;    // one GPU per rank, by node-local rank
  Precision precision = Precision::kFp32;  // bf16: bf16 parameters, fp32 masters + optimizer
  RecomputeConfig recompute;
  std::string out_dir = "runs/run";  // loader: runs/<config file name> when not set
};

struct DataConfig {
  DataSource source = DataSource::kBuiltin;
  std::string path;           // file for text / bin; dataset prefix (PREFIX.bin/.idx) for megatron
  std::string blend;          // megatron: "0.7 prefix_a 0.3 prefix_b" (Megatron's --data-path)
  int64_t eod_token_id = -1;  // end-of-document token (-1 = none)
  bool mask_loss_after_eod = false;        // no loss on predicting the token after an EOD
  TokenWidth dtype = TokenWidth::kUint16;  // bin token width
  double val_fraction = 0.05;
  std::string tokenizer;            // tokenizer.json (or its directory) the data was tokenized with
  int64_t builtin_bytes = 2000000;  // size of the generated built-in corpus
  // Where data.path was set ("configs/x.yaml:33" or "--set data.path=..."), for messages; not
  // part of the YAML. A relative path is resolved against the config file's directory when the
  // file is there, else against the working directory (the loader rewrites `path`).
  std::string path_origin;
};

struct CheckpointConfig {
  int64_t every = 100;    // 0 = only at the end
  int64_t keep = 3;       // newest checkpoints kept; 0 = keep all
  bool on_signal = true;  // SIGTERM / SIGINT / SIGUSR1: checkpoint before stopping
};

struct LoggingConfig {
  int64_t every = 1;
  bool trace = false;               // Chrome trace-event JSON of compute and communication per rank
  int64_t trace_steps = 3;          // steps traced (after the first, warm-up step)
  bool tensorboard = true;          // TensorBoard event files in <out_dir>/tensorboard (rank 0)
  double peak_tflops = 0.0;         // one rank's peak for MFU; 0 = measured at start
  int64_t expert_load_every = 100;  // per-rank tokens per expert dump; 0 = never
  double max_vio_warning = 1.0;     // warn when MaxVio stays above this (0 = never)
};

struct Config {
  ModelConfig model;
  MoeConfig moe;
  ParallelConfig parallel;
  TrainConfig train;
  DataConfig data;
  CheckpointConfig checkpoint;
  LoggingConfig logging;

  std::string source_file;  // where it was loaded from (for messages)
  // What the loader decided for the user (a default derived from other keys, a value adjusted
  // to fit); printed in the run's banner. Not part of the YAML.
  std::vector<std::string> notes;
};

// YAML spelling of every enum value, for parsing, the resolved dump and messages.
template <class E>
struct EnumText;
#define MOEFORGE_ENUM_TEXT(E, ...)                     \
  template <>                                          \
  struct EnumText<E> {                                 \
    static constexpr std::array names = {__VA_ARGS__}; \
  }
MOEFORGE_ENUM_TEXT(moe::ScoreFunction, std::pair{moe::ScoreFunction::kSoftmax, "softmax"},
                   std::pair{moe::ScoreFunction::kSigmoid, "sigmoid"});
MOEFORGE_ENUM_TEXT(moe::Routing, std::pair{moe::Routing::kTokenChoice, "token_choice"},
                   std::pair{moe::Routing::kExpertChoice, "expert_choice"});
MOEFORGE_ENUM_TEXT(moe::AuxLossScope, std::pair{moe::AuxLossScope::kMicroBatch, "micro_batch"},
                   std::pair{moe::AuxLossScope::kSequence, "sequence"},
                   std::pair{moe::AuxLossScope::kGlobalBatch, "global_batch"});
MOEFORGE_ENUM_TEXT(moe::DispatchDedup, std::pair{moe::DispatchDedup::kNone, "none"},
                   std::pair{moe::DispatchDedup::kRank, "rank"},
                   std::pair{moe::DispatchDedup::kNode, "node"});
MOEFORGE_ENUM_TEXT(moe::DropPolicy, std::pair{moe::DropPolicy::kProbs, "probs"},
                   std::pair{moe::DropPolicy::kPosition, "position"});
MOEFORGE_ENUM_TEXT(RopeScalingType, std::pair{RopeScalingType::kNone, "none"},
                   std::pair{RopeScalingType::kLinear, "linear"},
                   std::pair{RopeScalingType::kLlama3, "llama3"});
MOEFORGE_ENUM_TEXT(DataSource, std::pair{DataSource::kBuiltin, "builtin"},
                   std::pair{DataSource::kText, "text"}, std::pair{DataSource::kBin, "bin"},
                   std::pair{DataSource::kMegatron, "megatron"});
MOEFORGE_ENUM_TEXT(TokenWidth, std::pair{TokenWidth::kUint16, "uint16"},
                   std::pair{TokenWidth::kUint32, "uint32"});
MOEFORGE_ENUM_TEXT(DeviceKind, std::pair{DeviceKind::kCpu, "cpu"},
                   std::pair{DeviceKind::kCuda, "cuda"});
MOEFORGE_ENUM_TEXT(Precision, std::pair{Precision::kFp32, "fp32"},
                   std::pair{Precision::kBf16, "bf16"});
MOEFORGE_ENUM_TEXT(BackendChoice, std::pair{BackendChoice::kAuto, "auto"},
                   std::pair{BackendChoice::kMpi, "mpi"}, std::pair{BackendChoice::kNccl, "nccl"});
#undef MOEFORGE_ENUM_TEXT

template <class E>
const char* enum_text(E value) {
  for (const auto& [v, text] : EnumText<E>::names)
    if (v == value) return text;
  return "?";
}

template <class E>
std::optional<E> enum_from_text(std::string_view text) {
  for (const auto& [value, name] : EnumText<E>::names)
    if (text == name) return value;
  return std::nullopt;
}

// A model section that comes from elsewhere (the model being upcycled, imported or
// initialised from): it replaces the file's, and a `model.*` key the file or an override sets
// to a different value is a UserError naming both values.
struct FixedModel {
  ModelConfig model;
  std::string source;  // for messages: "Hugging Face qwen3 model DIR"
};

// Loads `path`, applies `overrides` ("a.b.c=value", YAML scalar syntax for the value), adopts
// `fixed_model` when given, validates. Throws UserError with file:line, the key, and what is
// allowed.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {},
                   const std::optional<FixedModel>& fixed_model = std::nullopt);

// Same, from YAML text (tests); `source_name` stands in for the file name in messages.
Config load_config_from_string(const std::string& yaml_text, const std::string& source_name,
                               const std::vector<std::string>& overrides = {},
                               const std::optional<FixedModel>& fixed_model = std::nullopt);

// The fully resolved config (every key, defaults filled in) as YAML; loading it gives back an
// equal Config.
std::string to_yaml(const Config& config);

// Markdown reference of every key (default, allowed values, meaning): configs/README.md's table.
std::string config_reference_markdown();

// The keys that decide a model's parameters (their names and shapes), where `stored` (e.g. a
// checkpoint's config) and `run` differ: "model.num_layers: 2 in the checkpoint, 1 here".
// Empty when a checkpoint of `stored` loads into a model of `run` exactly.
std::vector<std::string> parameter_shape_differences(const Config& stored, const Config& run);

// Checks that need the world size (ep_size divides world and num_experts). Throws UserError.
void validate_for_world(const Config& config, int world_size);

}  // namespace moeforge
