#include "trainer/config/config_schema.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <limits>
#include <sstream>

namespace moeforge {
namespace {

// KEY(model.hidden_size) expands to the key's path and its binding into Config.
#define KEY(member)                  \
#member, [](Config & c) -> auto& { \
    return c.member;                 \
  }

constexpr double kBig = 1e18;

KeySpec int_key(const char* path, std::function<int64_t&(Config&)> field, int64_t min, int64_t max,
                const char* doc) {
  KeySpec k;
  k.path = path;
  k.type = KeyType::kInt;
  k.doc = doc;
  k.int_field = std::move(field);
  k.min = static_cast<double>(min);
  k.max = static_cast<double>(max);
  return k;
}

KeySpec float_key(const char* path, std::function<double&(Config&)> field, double min, double max,
                  const char* doc) {
  KeySpec k;
  k.path = path;
  k.type = KeyType::kFloat;
  k.doc = doc;
  k.float_field = std::move(field);
  k.min = min;
  k.max = max;
  return k;
}

KeySpec bool_key(const char* path, std::function<bool&(Config&)> field, const char* doc) {
  KeySpec k;
  k.path = path;
  k.type = KeyType::kBool;
  k.doc = doc;
  k.bool_field = std::move(field);
  return k;
}

KeySpec string_key(const char* path, std::function<std::string&(Config&)> field, const char* doc) {
  KeySpec k;
  k.path = path;
  k.type = KeyType::kString;
  k.doc = doc;
  k.get_text = [field](const Config& c) { return field(const_cast<Config&>(c)); };
  k.set_text = [field](Config& c, const std::string& text) { field(c) = text; };
  return k;
}

// A closed set of options: the YAML spellings of EnumText<E> are the allowed values.
template <class E>
KeySpec enum_key(const char* path, std::function<E&(Config&)> field, const char* doc) {
  KeySpec k;
  k.path = path;
  k.type = KeyType::kString;
  k.doc = doc;
  for (const auto& [value, text] : EnumText<E>::names) k.choices.push_back(text);
  k.get_text = [field](const Config& c) {
    return std::string(enum_text(field(const_cast<Config&>(c))));
  };
  k.set_text = [field](Config& c, const std::string& text) {
    if (const auto value = enum_from_text<E>(text)) field(c) = *value;  // choices checked first
  };
  return k;
}

// train.recompute's names, in the order the resolved config lists them.
constexpr std::array<std::pair<const char*, bool RecomputeConfig::*>, 4> kRecomputeNames = {{
    {"moe_act", &RecomputeConfig::moe_act},
    {"moe", &RecomputeConfig::moe},
    {"attention", &RecomputeConfig::attention},
    {"block", &RecomputeConfig::block},
}};

KeySpec recompute_key(const char* path, std::function<RecomputeConfig&(Config&)> field,
                      const char* doc) {
  KeySpec k;
  k.path = path;
  k.type = KeyType::kString;
  k.doc = doc;
  k.combinable = true;
  k.choices.push_back("none");
  for (const auto& [name, member] : kRecomputeNames) k.choices.push_back(name);
  k.get_text = [field](const Config& c) {
    const auto& recompute = field(const_cast<Config&>(c));
    std::vector<std::string> names;
    for (const auto& [name, member] : kRecomputeNames)
      if (recompute.*member) names.push_back(name);
    return names.empty() ? std::string("none") : fmt::format("{}", fmt::join(names, " "));
  };
  k.set_text = [field](Config& c, const std::string& text) {  // names checked first
    auto& recompute = field(c);
    recompute = {};
    std::stringstream words(text);
    for (std::string word; words >> word;)
      for (const auto& [name, member] : kRecomputeNames)
        if (word == name) recompute.*member = true;
  };
  return k;
}

}  // namespace

std::string KeySpec::allowed_text() const {
  auto number = [](double v) {
    if (v >= kBig) return std::string("∞");
    return fmt::format("{}", v);
  };
  switch (type) {
    case KeyType::kInt:
      return fmt::format("an integer in [{}, {}]", number(min), number(max));
    case KeyType::kFloat:
      return fmt::format("a number in [{}, {}]", number(min), number(max));
    case KeyType::kBool:
      return "true or false";
    case KeyType::kString:
      if (choices.empty()) return "a string";
      if (combinable)
        return fmt::format("any of {} (a list, or names separated by spaces or commas)",
                           fmt::join(choices, " | "));
      return fmt::format("one of {}", fmt::join(choices, " | "));
  }
  return "";
}

const std::vector<KeySpec>& config_schema() {
  static const std::vector<KeySpec> schema = {
      // model
      int_key(KEY(model.vocab_size), 2, 1 << 24,
              "Vocabulary size; ≥ 256 for byte-level data (builtin, text)"),
      int_key(KEY(model.hidden_size), 8, 65536, "Model width H"),
      int_key(KEY(model.num_layers), 1, 1024, "Decoder blocks"),
      int_key(KEY(model.num_heads), 1, 1024, "Attention (query) heads; divides hidden_size"),
      int_key(KEY(model.num_kv_heads), 1, 1024,
              "Key/value heads (grouped-query attention); divides num_heads"),
      int_key(KEY(model.ffn_size), 1, 1 << 20, "Intermediate size of dense SwiGLU blocks"),
      int_key(KEY(model.max_seq_len), 1, 1 << 20, "Longest sequence the model is built for"),
      float_key(KEY(model.rope_theta), 1.0, kBig, "RoPE base θ"),
      enum_key<RopeScalingType>(KEY(model.rope_scaling.type),
                                "RoPE frequency scaling: none, linear (position interpolation) "
                                "or llama3 (Llama 3.1 long-context scaling)"),
      float_key(KEY(model.rope_scaling.factor), 1.0, 1e6,
                "linear / llama3: how much longer than the original context"),
      float_key(KEY(model.rope_scaling.low_freq_factor), 1e-6, 1e6,
                "llama3: wavelengths above original / this are scaled by 1 / factor"),
      float_key(KEY(model.rope_scaling.high_freq_factor), 1e-6, 1e6,
                "llama3: wavelengths below original / this are kept; smooth in between"),
      int_key(KEY(model.rope_scaling.original_max_position_embeddings), 0, 1LL << 40,
              "llama3: the context length the model was trained at before scaling"),
      int_key(KEY(model.head_dim), 0, 1 << 16,
              "Attention head size; 0 = hidden_size / num_heads (Qwen3 sets it separately)"),
      bool_key(KEY(model.qk_norm), "RMSNorm on every head of q and k before RoPE (Qwen3)"),
      float_key(KEY(model.rms_norm_eps), 1e-12, 1.0, "RMSNorm ε"),
      bool_key(KEY(model.qkv_bias), "Bias on the q/k/v projections (Qwen2 style)"),
      bool_key(KEY(model.tie_embeddings), "LM head shares the token embedding"),
      float_key(KEY(model.init_std), 1e-6, 1.0,
                "Std of the normal init (output projections: ÷√(2·layers))"),
      // moe
      int_key(KEY(moe.num_experts), 1, 4096, "Routed experts E per MoE layer"),
      int_key(KEY(moe.top_k), 1, 64, "Experts per token k; ≤ num_experts"),
      int_key(KEY(moe.expert_ffn_size), 1, 1 << 20,
              "Intermediate size of one routed expert (fine-grained experts: small)"),
      int_key(KEY(moe.num_shared_experts), 0, 64, "Shared experts applied to every token"),
      int_key(KEY(moe.shared_expert_ffn_size), 0, 1 << 20,
              "Intermediate size of one shared expert; 0 = expert_ffn_size"),
      int_key(KEY(moe.first_k_dense), 0, 1024,
              "The first k blocks use a dense FFN; ≤ model.num_layers"),
      int_key(KEY(moe.layer_freq), 1, 1024, "After those, every layer_freq-th block is MoE"),
      enum_key<moe::ScoreFunction>(KEY(moe.router.score), "Router score function"),
      enum_key<moe::Routing>(
          KEY(moe.router.routing),
          "token_choice: each token picks top_k experts; expert_choice: each expert takes "
          "its top ceil(capacity · T·top_k / E) tokens of the micro-batch"),
      bool_key(KEY(moe.router.normalize_gates),
               "Renormalise the k gates to sum to 1 (k > 1, token_choice)"),
      float_key(KEY(moe.router.scaling_factor), 1e-6, 1e6, "Multiplies the gates"),
      int_key(KEY(moe.router.num_groups), 0, 4096,
              "Group-limited routing: experts split into this many groups; 0 or 1 = off"),
      int_key(KEY(moe.router.topk_groups), 0, 4096,
              "Group-limited routing: a token picks experts only from its best topk_groups "
              "groups (group score = sum of its top top_k/topk_groups scores)"),
      int_key(KEY(moe.router.num_null_experts), 0, 4096,
              "AdaMoE null experts: zero-output, zero-compute experts in the top-k pool, never "
              "sent over the network; a token's effective k varies"),
      float_key(KEY(moe.router.jitter_eps), 0.0, 1.0,
                "Router input jitter: x · U(1-eps, 1+eps) in training; 0 = off"),
      float_key(KEY(moe.balancing.aux_loss.coeff), 0.0, 1e3,
                "Weight of the aux loss E·Σ f_i·P_i (summed over MoE layers); 0 = off. Default: "
                "0.01 for token-choice routing unless moe.balancing.expert_bias.rate is set, "
                "else 0"),
      enum_key<moe::AuxLossScope>(
          KEY(moe.balancing.aux_loss.scope),
          "Tokens f_i is counted over: the micro-batch, each sequence (averaged), or the "
          "whole global batch (all micro-batches of all data-parallel ranks)"),
      float_key(KEY(moe.balancing.z_loss.coeff), 0.0, 1e3,
                "Weight of the router z-loss mean(logsumexp(logits)²); 0 = off"),
      float_key(KEY(moe.balancing.expert_bias.rate), 0.0, 1.0,
                "Aux-loss-free balancing: bias update rate per optimizer step; 0 = off"),
      bool_key(KEY(moe.balancing.expert_bias.mean_center),
               "Subtract the mean from the bias after each update"),
      float_key(KEY(moe.balancing.expert_bias.final_rate), 0.0, 1.0,
                "Bias update rate during the final phase (DeepSeek-V3 uses 0)"),
      float_key(KEY(moe.balancing.expert_bias.final_phase), 0.0, 1.0,
                "Fraction of train.steps at the end that use final_rate; 0 = no final phase"),
      float_key(KEY(moe.capacity.factor), 0.0, 64.0,
                "Capacity factor in training: each expert takes ≤ ceil(factor · T·top_k / E) of "
                "a rank's slots; 0 = dropless (expert_choice: 0 means 1)"),
      float_key(KEY(moe.capacity.eval_factor), 0.0, 64.0,
                "Capacity factor in evaluation; 0 = dropless, so one sequence's routing never "
                "changes another's output"),
      enum_key<moe::DropPolicy>(
          KEY(moe.capacity.drop_policy),
          "Which slots an over-full expert drops: lowest gate first, or latest first"),
      bool_key(KEY(moe.capacity.pad),
               "Pad every expert's rows to its capacity (static shapes); needs capacity.factor"),
      // parallel
      int_key(KEY(parallel.ep_size), 1, 4096,
              "Expert-parallel group size; divides the world size and num_experts"),
      float_key(KEY(parallel.bucket_mb), 0.001, 4096.0, "Gradient all-reduce bucket size (MiB)"),
      bool_key(KEY(parallel.comm_worker),
               "Run collectives on a communication worker thread, so compute overlaps them; "
               "false = every collective blocks the compute thread (no overlap)"),
      int_key(KEY(parallel.overlap_degree), 1, 64,
              "MoE layer pipeline: split the routed rows into n chunks so chunk i+1's dispatch "
              "and chunk i−1's combine run while chunk i is in the experts (forward and "
              "backward); 1 = one chunk (shared experts still overlap the dispatch)"),
      enum_key<moe::DispatchDedup>(
          KEY(parallel.dedup_dispatch),
          "Rows the MoE all-to-all sends: none = one per kept (token, expert) pick; rank = one "
          "per (token, EP rank), the rank applying the gates and summing its experts' outputs "
          "(one small index exchange per layer); node = one per (token, node) to the rank of "
          "that node with this rank's local index, which fans it out inside the node "
          "(DeepSeek-V3's two-hop dispatch; for EP groups spanning nodes, with group-limited "
          "routing aligned to nodes; not with capacity.pad; falls back to rank when the EP "
          "group is on one node). Sums are split by rank/node: fp32 rounding"),
      bool_key(KEY(parallel.micro_batch_overlap),
               "Run the step's micro-batches two at a time, interleaved block by block, so one "
               "micro-batch's MoE dispatch and combine cross the network while the other runs "
               "attention and its experts (forward and backward; DeepSeek-V3-style two-batch "
               "overlap). Each micro-batch computes what it would alone; needs an even "
               "train.grad_accum; not with train.recompute block or moe"),
      bool_key(KEY(parallel.overlap_grad_sync),
               "All-reduce each gradient bucket as soon as backward has produced it"),
      bool_key(KEY(parallel.distributed_optimizer),
               "ZeRO-1: fp32 master weights and AdamW moments sharded over the data-parallel "
               "ranks (experts over their expert-data-parallel group); gradients "
               "reduce-scattered, updated weights all-gathered, both in buckets"),
      enum_key<Precision>(KEY(parallel.grad_reduce_dtype),
                          "Dtype of the gradient all-reduce / reduce-scatter: fp32, or bf16 "
                          "(half the bytes; sums rounded to bf16; accumulation stays fp32)"),
      float_key(KEY(parallel.timeout_s), 0.0, 1e7,
                "Watchdog: a collective that makes no progress for this long (a rank stopped, "
                "died or hangs) names the silent ranks and aborts the whole job with exit code "
                "3; must exceed the slowest checkpoint save; 0 = wait forever (MPI backend)"),
      enum_key<BackendChoice>(
          KEY(parallel.backend),
          "Collectives: auto = nccl when train.device is cuda, else mpi; mpi with cuda "
          "stages tensors through host memory; nccl needs train.device cuda"),
      float_key(KEY(parallel.simulated_link.bandwidth_gbps), 0.0, 1e6,
                "Simulated network: every collective takes at least its traffic / this many "
                "GB/s (10⁹ bytes/s) plus latency; 0 = off"),
      float_key(KEY(parallel.simulated_link.latency_us), 0.0, 1e7,
                "Simulated network: latency per message step (µs)"),
      // train
      int_key(KEY(train.steps), 1, 1LL << 40, "Optimizer steps"),
      int_key(KEY(train.max_skipped_steps), 0, 1 << 20,
              "A step whose gradient norm is not finite is skipped (no update, a warning); "
              "more than this many in a row stop the run; 0 = stop at the first"),
      int_key(KEY(train.seed), 0, std::numeric_limits<int64_t>::max(),
              "Seed for init and data order"),
      int_key(KEY(train.micro_batch_size), 1, 1 << 20, "Sequences per rank per micro-batch"),
      int_key(KEY(train.grad_accum), 1, 1 << 20, "Micro-batches per optimizer step"),
      int_key(KEY(train.seq_len), 1, 1 << 20, "Tokens per training sequence; ≤ model.max_seq_len"),
      float_key(KEY(train.lr), 0.0, 10.0, "Peak learning rate"),
      float_key(KEY(train.min_lr), 0.0, 10.0, "Final learning rate of the cosine decay; ≤ lr"),
      int_key(KEY(train.warmup_steps), 0, 1LL << 40, "Linear warmup steps; ≤ steps"),
      float_key(KEY(train.weight_decay), 0.0, 10.0,
                "AdamW decoupled weight decay (not on norms, biases, embeddings)"),
      float_key(KEY(train.beta1), 0.0, 0.999999, "AdamW β1"),
      float_key(KEY(train.beta2), 0.0, 0.999999, "AdamW β2"),
      float_key(KEY(train.eps), 1e-30, 1.0, "AdamW ε"),
      float_key(KEY(train.grad_clip), 0.0, 1e6, "Clip the global gradient norm to this; 0 = off"),
      int_key(KEY(train.eval_every), 0, 1LL << 40,
              "Evaluate every N steps (and at the end); 0 = only at the end"),
      int_key(KEY(train.eval_batches), 1, 1 << 20,
              "Validation micro-batches per rank per evaluation"),
      int_key(KEY(train.threads_per_rank), 0, 1024,
              "Torch intra-op threads per rank; 0 = OMP_NUM_THREADS / default"),
      enum_key<DeviceKind>(
          KEY(train.device),
          "Where the model computes: cpu, or cuda = one GPU per rank, chosen by the "
          "rank's index on its node (MPI shared-memory split) modulo the visible GPUs"),
      enum_key<Precision>(
          KEY(train.precision),
          "Compute precision: bf16 = bf16 parameters and activations (matmuls, attention, "
          "experts, the all-to-all), fp32 master weights, AdamW moments and gradient "
          "accumulation, router, norms' math and losses in fp32 (no loss scaling: bf16 has "
          "fp32's range). Checkpoints hold the fp32 masters either way"),
      recompute_key(
          KEY(train.recompute),
          "Activations recomputed in backward instead of stored (less memory, more compute; "
          "results unchanged): moe_act = the routed experts' SwiGLU activation, moe = the whole "
          "MoE layer (the forward's counts exchange is replayed, the row all-to-alls rerun), "
          "attention = the attention module, block = each whole decoder block; combinable"),
      string_key(KEY(train.out_dir),
                 "Run directory: config.resolved.yaml, metrics.jsonl, checkpoints/. Default: "
                 "runs/<config file name without .yaml>"),
      // data
      string_key(KEY(data.tokenizer),
                 "The tokenizer the data was tokenized with (tokenizer.json or its directory; "
                 "relative to the config file like data.path): copied into the run directory so "
                 "that generate, eval --text and export use it. Empty = bytes / none"),
      enum_key<DataSource>(KEY(data.source),
                           "Generated corpus, a text file (bytes), a flat token file, or "
                           "Megatron indexed datasets (launch/preprocess.py writes them)"),
      string_key(KEY(data.path),
                 "File for source text or bin; for megatron the dataset prefix (PREFIX.bin + "
                 "PREFIX.idx)"),
      string_key(KEY(data.blend),
                 "megatron: weighted blend 'w1 prefix1 w2 prefix2 ...' (Megatron's --data-path; "
                 "weights normalised); instead of data.path"),
      int_key(KEY(data.eod_token_id), -1, 1LL << 40,
              "End-of-document token id (launch/preprocess.py prints it); -1 = none"),
      bool_key(KEY(data.mask_loss_after_eod),
               "No loss on the token that follows an end-of-document token (samples are packed "
               "across documents; this keeps the loss from crossing them); needs eod_token_id"),
      enum_key<TokenWidth>(KEY(data.dtype), "Token width of a bin file"),
      float_key(KEY(data.val_fraction), 0.0001, 0.5,
                "Fraction of tokens (at the end) held out for validation"),
      int_key(KEY(data.builtin_bytes), 10000, 1LL << 32, "Size of the generated built-in corpus"),
      // checkpoint
      int_key(KEY(checkpoint.every), 0, 1LL << 40,
              "Checkpoint every N steps (and at the end); 0 = only at the end"),
      int_key(KEY(checkpoint.keep), 0, 1 << 20,
              "Newest checkpoints of this run kept (never another run's); 0 = all"),
      bool_key(KEY(checkpoint.on_signal),
               "On SIGTERM / SIGINT / SIGUSR1 (e.g. SLURM preemption) every rank stops at the "
               "next step boundary and a checkpoint is written first"),
      // logging
      bool_key(KEY(logging.trace),
               "Write a Chrome trace-event timeline of compute and communication per rank to "
               "<out_dir>/trace/rank-N.json (open in Perfetto or chrome://tracing)"),
      int_key(KEY(logging.trace_steps), 1, 1000, "Steps traced, after the first (warm-up) step"),
      int_key(KEY(logging.every), 1, 1LL << 40, "Print and record metrics every N steps"),
      float_key(KEY(logging.max_vio_warning), 0.0, 1e6,
                "Warn once when the global MaxVio stays above this for 20 steps in a row (the "
                "router collapsing onto few experts); 0 = never"),
      bool_key(KEY(logging.tensorboard),
               "Also write the metrics as TensorBoard scalars to <out_dir>/tensorboard/ (rank 0; "
               "`tensorboard --logdir <out_dir>`); docs/observability.md lists the tags"),
      float_key(KEY(logging.peak_tflops), 0.0, 1e6,
                "Peak TFLOP/s of one rank's device for MFU (e.g. 989 for an H100's dense bf16); "
                "0 = measured once at start by a GEMM of the model's shape in train.precision"),
      int_key(KEY(logging.expert_load_every), 0, 1LL << 40,
              "Every N steps write each rank's tokens per expert and MoE layer to "
              "<out_dir>/expert_load.jsonl; 0 = never"),
  };
  return schema;
}

const std::vector<std::string>& config_sections() {
  static const std::vector<std::string> sections = [] {
    std::vector<std::string> result;
    for (const auto& key : config_schema()) {
      for (size_t dot = key.path.find('.'); dot != std::string::npos;
           dot = key.path.find('.', dot + 1)) {
        const auto section = key.path.substr(0, dot);
        if (std::find(result.begin(), result.end(), section) == result.end())
          result.push_back(section);
      }
    }
    return result;
  }();
  return sections;
}

}  // namespace moeforge
