#pragma once
// Decoder-only language model in the Llama / Qwen2 family, so dense Hugging Face checkpoints
// map onto it one to one:
//   embed → N × [RMSNorm → causal GQA attention with RoPE (+ optional qkv bias) → residual,
//                RMSNorm → FFN (dense SwiGLU or MoE) → residual] → RMSNorm → LM head (tied or not)
// Parameter names (named_parameters) are the checkpoint names, e.g. `layers.3.attn.q_proj.weight`;
// expert parameters are stored stacked per rank (`layers.3.mlp.experts.w_gate`, [E/ep, F, H])
// and appear in checkpoints per global expert (`layers.3.mlp.experts.17.w_gate`).
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <array>
#include <vector>

#include "moe/moe_layer.hpp"
#include "trainer/config/config.hpp"
#include "trainer/model/rotary.hpp"

namespace moeforge {

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t size, double eps);
  at::Tensor forward(const at::Tensor& x);  // normalised in fp32, cast back
  at::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

// RoPE inverse frequencies [D/2] (float64, host) for head size D: θ^(-2i/D), scaled as
// model.rope_scaling says (linear, or Llama 3.1's piecewise rule; exactly Hugging Face's).
at::Tensor rope_inverse_frequencies(const ModelConfig& config);

// Rotary embedding (Hugging Face rotate_half convention): q·cos + rotate_half(q)·sin.
// x: [B, heads, S, D]; positions first_position .. first_position+S-1; inv_freq [D/2].
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& inv_freq, int64_t first_position = 0);
// The same with unscaled frequencies of base `theta`.
at::Tensor apply_rope(const at::Tensor& x, double theta);

// One attention layer's keys and values of the positions seen so far (generation): each new
// token attends to them instead of recomputing the whole prefix.
struct AttentionCache {
  at::Tensor keys, values;  // [B, kv_heads, positions, D] after RoPE; undefined when empty
  int64_t positions() const { return keys.defined() ? keys.size(2) : 0; }
};

// The caches of every block, in block order (DecoderLM::forward with a cache fills it).
struct KvCache {
  std::vector<AttentionCache> layers;
  int64_t positions() const { return layers.empty() ? 0 : layers.front().positions(); }
};

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const ModelConfig& config);
  // [B, S, H] -> [B, S, H], causal. With `cache`, x holds the positions after the cached ones:
  // they attend to the cache and themselves, and are appended to it.
  at::Tensor forward(const at::Tensor& x, AttentionCache* cache = nullptr);

  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  RMSNorm q_norm{nullptr}, k_norm{nullptr};  // per head, when model.qk_norm (Qwen3)

 private:
  std::array<at::Tensor, 3> project(const at::Tensor& x) const;  // q, k, v [B, S, heads, D]
  // RoPE's cos/sin for these positions, kept while they stay the same (every training step).
  const RotaryTable& rotary(int64_t first_position, int64_t count, const at::Tensor& like);

  int64_t num_heads_, num_kv_heads_, head_dim_;
  at::Tensor inv_freq_;  // [D/2] float64 on the host
  RotaryTable rotary_;
};
TORCH_MODULE(Attention);

struct LmOutput;

class DecoderBlockImpl : public torch::nn::Module {
 public:
  DecoderBlockImpl(const Config& config, int64_t index, parallel::Communicator& ep);
  // x [B, S, H]; a MoE block routes with `routing` and adds its aux/z losses and routing
  // counters to `out`. `cache`: attention's KV cache (inference; no recompute then).
  at::Tensor forward(const at::Tensor& x, const moe::RoutingInputs& routing, LmOutput& out,
                     AttentionCache* cache = nullptr);

  // The same forward in the MoE layer's three steps (moe::MoeLayerImpl::begin), for two
  // micro-batches interleaved (DecoderLMImpl::forward_pair): `begin` runs attention and starts
  // the MoE dispatch, `advance` runs the experts, `end` adds the combined output. A dense block
  // and a recomputed block finish inside `begin`.
  struct InFlight {
    at::Tensor h;  // the output once finished; else the residual stream after attention
    std::shared_ptr<moe::MoeLayerImpl::InFlight> moe;  // null: finished
    int64_t batch = 0, seq = 0;
  };
  InFlight begin(const at::Tensor& x, const moe::RoutingInputs& routing, LmOutput& out);
  void advance(InFlight& flight);
  at::Tensor end(InFlight& flight, LmOutput& out);

  RMSNorm attn_norm{nullptr}, mlp_norm{nullptr};
  Attention attn{nullptr};
  moe::FeedForward dense_mlp{nullptr};  // registered as "mlp" when the block is dense
  moe::MoeLayer moe_mlp{nullptr};       // registered as "mlp" when the block is MoE

 private:
  struct Result {
    at::Tensor h;                   // [B, S, H]
    at::Tensor aux_loss, z_loss;    // MoE blocks only
    moe::RoutingCounters counters;  // MoE blocks only
    static Result dense(at::Tensor h) { return {std::move(h), {}, {}, {}}; }
  };
  Result forward_stored(const at::Tensor& x, const moe::RoutingInputs& routing,
                        AttentionCache* cache = nullptr);
  at::Tensor with_attention(const at::Tensor& x, AttentionCache* cache);
  InFlight begin_moe(const at::Tensor& x, const moe::RoutingInputs& routing,
                     AttentionCache* cache = nullptr);
  Result end_moe(InFlight& flight);
  void add_to(Result result, LmOutput& out) const;
  // train.recompute: block — only x is kept; the whole block runs again in backward.
  Result forward_recomputed(const at::Tensor& x, const moe::RoutingInputs& routing);
  at::Tensor attention(const at::Tensor& normed);  // recomputed when train.recompute: attention
  RecomputeConfig recompute_;
};
TORCH_MODULE(DecoderBlock);

struct LmOutput {
  at::Tensor logits;                          // [B, S, V] fp32
  at::Tensor aux_loss;                        // Σ over MoE blocks (un-weighted)
  at::Tensor z_loss;                          // Σ over MoE blocks (un-weighted)
  std::vector<moe::RoutingCounters> routing;  // one per MoE block, in block order
};

class DecoderLMImpl : public torch::nn::Module {
 public:
  // `ep`: expert-parallel group; experts are sharded over it. Not owned; must outlive the model.
  DecoderLMImpl(const Config& config, parallel::Communicator& ep);
  // tokens [B, S] int64; `routing`: one entry per MoE block (empty = defaults for all).
  // `cache` (inference): tokens continue the cached positions, and are appended to the cache.
  LmOutput forward(const at::Tensor& tokens, const std::vector<moe::RoutingInputs>& routing = {},
                   KvCache* cache = nullptr);
  // Two micro-batches at once (parallel.micro_batch_overlap), block by block: while one's MoE
  // dispatch or combine crosses the network, the other runs attention or its experts. Each
  // output equals forward() of that micro-batch alone (the same operations on the same
  // inputs); one backward of both losses mirrors the interleaving.
  std::array<LmOutput, 2> forward_pair(
      const std::array<at::Tensor, 2>& tokens,
      const std::array<std::vector<moe::RoutingInputs>, 2>& routing);

  std::vector<moe::MoeLayer> moe_layers() const;
  // Global id of this rank's first expert (every MoE layer holds the same range); 0 if none.
  int64_t first_local_expert() const;

  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  torch::nn::Linear lm_head{nullptr};  // null when tied to embed

 private:
  at::Tensor embed_tokens(const at::Tensor& tokens);
  void head(const at::Tensor& h, LmOutput& out);  // final norm and LM head → out.logits
};
TORCH_MODULE(DecoderLM);

// (name, parameter) pairs in registration order: what AdamW and checkpoints take.
std::vector<std::pair<std::string, at::Tensor>> named_parameter_list(DecoderLMImpl& model);

// What a parameter is, from its name: initialisation (norms 1, biases 0) and weight decay
// (matrices only) follow it.
enum class ParameterRole { kNorm, kBias, kEmbedding, kMatrix };
ParameterRole parameter_role(const std::string& name);

// True for parameters sharded over the EP group (their gradients sync over EDP, not world).
bool is_expert_parameter(const std::string& name);

// Deterministic initialisation independent of ep_size and construction order: every tensor
// (and every global expert's slice) is drawn from a generator seeded by (seed, global name).
// Norm weights = 1, biases = 0, output projections (o_proj, w_down) scaled by 1/sqrt(2·layers).
void initialize_parameters(DecoderLMImpl& model, const Config& config, uint64_t seed);

// Cross-entropy of next-token prediction: logits [B, S, V], targets [B, S].
at::Tensor language_model_loss(const at::Tensor& logits, const at::Tensor& targets);

}  // namespace moeforge
