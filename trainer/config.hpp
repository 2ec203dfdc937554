#pragma once
// Typed experiment configuration. One YAML file (plus `--set key.path=value` overrides) becomes
// a Config; load_config() validates everything that can be checked without knowing the world
// size and throws UserError naming file, line, key and what is allowed. The schema (every key,
// its default, range and doc line) lives in config_schema.cpp and is the single source for
// parsing, validation, the resolved-config dump and configs/README.md.
#include <cstdint>
#include <string>
#include <vector>

namespace moeforge {

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t hidden_size = 128;
  int64_t num_layers = 4;
  int64_t num_heads = 4;
  int64_t num_kv_heads = 2;
  int64_t ffn_size = 512;  // dense SwiGLU intermediate size (dense layers)
  int64_t max_seq_len = 128;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  bool qkv_bias = false;
  bool tie_embeddings = false;
  double init_std = 0.02;
};

struct RouterConfig {
  std::string score = "softmax";         // softmax | sigmoid
  std::string routing = "token_choice";  // token_choice | expert_choice
  bool normalize_gates = true;           // renormalise the k selected gates to sum to 1
  double scaling_factor = 1.0;           // multiplies the gates
  int64_t num_groups = 0;                // group-limited routing: expert groups (0/1 = off)
  int64_t topk_groups = 0;               // groups a token may use (group-limited routing)
  int64_t num_null_experts = 0;          // AdaMoE zero-compute experts in the top-k pool
  double jitter_eps = 0.0;               // router input × U(1-eps, 1+eps) in training
};

struct AuxLossConfig {
  double coeff = 0.0;
  std::string scope = "micro_batch";  // micro_batch | sequence | global_batch
};

struct ZLossConfig {
  double coeff = 0.0;
};

struct ExpertBiasConfig {
  double rate = 0.0;  // 0 = auxiliary-loss-free balancing off
  bool mean_center = false;
  double final_rate = 0.0;   // rate in the final phase (DeepSeek-V3: 0)
  double final_phase = 0.0;  // fraction of train.steps at the end that use final_rate; 0 = none
};

struct BalancingConfig {
  AuxLossConfig aux_loss;
  ZLossConfig z_loss;
  ExpertBiasConfig expert_bias;
};

struct CapacityConfig {
  double factor = 0.0;                // training; 0 = dropless
  double eval_factor = 0.0;           // evaluation; 0 = dropless
  std::string drop_policy = "probs";  // probs | position
  bool pad = false;                   // pad every expert's rows to its capacity
};

struct MoeConfig {
  int64_t num_experts = 8;
  int64_t top_k = 2;
  int64_t expert_ffn_size = 256;
  int64_t num_shared_experts = 0;
  int64_t shared_expert_ffn_size = 0;  // 0 = same as expert_ffn_size
  int64_t first_k_dense = 0;           // the first k blocks use a dense FFN
  int64_t layer_freq = 1;              // after those, every layer_freq-th block is MoE
  RouterConfig router;
  BalancingConfig balancing;
  CapacityConfig capacity;
};

struct SimulatedLinkConfig {
  double bandwidth_gbps = 0.0;  // GB/s per rank; 0 = off
  double latency_us = 0.0;
};

struct ParallelConfig {
  int64_t ep_size = 1;
  double bucket_mb = 25.0;        // gradient all-reduce bucket size
  bool comm_worker = true;        // run collectives on the communication worker thread
  int64_t overlap_degree = 1;     // MoE dispatch/experts/combine pipeline chunks
  bool overlap_grad_sync = true;  // all-reduce gradient buckets during backward
  std::string backend = "auto";   // auto | mpi | nccl (auto: nccl when train.device is cuda)
  SimulatedLinkConfig simulated_link;
};

struct TrainConfig {
  int64_t steps = 200;
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
  int64_t threads_per_rank = 0;  // 0 = leave torch's default (OMP_NUM_THREADS)
  std::string device = "cpu";    // cpu | cuda (one GPU per rank, by node-local rank)
  std::string precision = "fp32";  // fp32 | bf16 (fp32 parameters and optimizer, bf16 compute)
  std::string out_dir = "runs/tiny";
};

struct DataConfig {
  std::string source = "builtin";  // builtin | text | bin
  std::string path;                // file for text / bin
  std::string dtype = "uint16";    // bin token width: uint16 | uint32
  double val_fraction = 0.05;
  int64_t builtin_bytes = 2000000;  // size of the generated built-in corpus
};

struct CheckpointConfig {
  int64_t every = 100;  // 0 = only at the end
  int64_t keep = 3;     // newest checkpoints kept; 0 = keep all
};

struct LoggingConfig {
  int64_t every = 1;
  bool trace = false;       // Chrome trace-event JSON of compute and communication per rank
  int64_t trace_steps = 3;  // steps traced (after the first, warm-up step)
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
};

// Loads `path`, applies `overrides` ("a.b.c=value", YAML scalar syntax for the value), validates.
// Throws UserError with file:line, the key, and what is allowed.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// Same, from YAML text (tests); `source_name` stands in for the file name in messages.
Config load_config_from_string(const std::string& yaml_text, const std::string& source_name,
                               const std::vector<std::string>& overrides = {});

// The fully resolved config (every key, defaults filled in) as YAML; loading it gives back an
// equal Config.
std::string to_yaml(const Config& config);

// Markdown reference of every key (default, allowed values, meaning): configs/README.md's table.
std::string config_reference_markdown();

// Checks that need the world size (ep_size divides world and num_experts). Throws UserError.
void validate_for_world(const Config& config, int world_size);

}  // namespace moeforge
