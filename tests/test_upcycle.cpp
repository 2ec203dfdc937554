// Upcycling methods and Hugging Face import/export against independent references: the dense
// model's function (copy), the dense weights' slices and Megatron's scale rule (granular),
// channel counts and statistics (drop, noise), exact round trips and clear errors.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "parallel/process_groups.hpp"
#include "test_support.hpp"
#include "trainer/common/user_error.hpp"
#include "trainer/convert/hf_checkpoint.hpp"
#include "trainer/convert/upcycle.hpp"
#include "trainer/model/model_weights.hpp"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

using testing::relative_error;

Config dense_config() {
  auto c = testing::small_test_config();
  c.moe.first_k_dense = c.model.num_layers;  // every block dense
  c.moe.num_shared_experts = 0;
  return c;
}

Config moe_config(int64_t experts, int64_t expert_ffn) {
  auto c = testing::small_test_config();
  c.moe.num_experts = experts;
  c.moe.top_k = 2;
  c.moe.expert_ffn_size = expert_ffn;
  c.moe.num_shared_experts = 0;
  return c;
}

WeightMap random_weights(const Config& config, uint64_t seed) {
  const auto groups = parallel::make_single_process_groups();
  auto single = config;
  single.parallel.ep_size = 1;
  DecoderLM model(single, *groups.ep);
  initialize_parameters(*model, single, seed);
  return model_weights(*model);
}

at::Tensor logits(const Config& config, const WeightMap& weights, const at::Tensor& tokens) {
  auto model = model_from_weights(config, weights, "test");
  model->eval();
  at::NoGradGuard no_grad;
  return model->forward(tokens).logits;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

const at::Tensor kTokens = at::randint(0, 256, {2, 12}, at::kLong);

TEST(Upcycle, CopyComputesTheDenseFunction) {
  const auto dense_cfg = dense_config();
  const auto dense = random_weights(dense_cfg, 1);
  const auto reference = logits(dense_cfg, dense, kTokens);
  for (const int64_t shared : {0, 1}) {
    auto target = moe_config(4, dense_cfg.model.ffn_size);
    target.moe.num_shared_experts = shared;
    target.moe.shared_expert_ffn_size = dense_cfg.model.ffn_size;
    const auto moe = upcycle(dense_cfg, dense, target, {});
    EXPECT_LT(relative_error(logits(target, moe, kTokens), reference), 1e-5) << "shared " << shared;
    EXPECT_TRUE(
        at::equal(moe.at("layers.1.mlp.experts.3.w_gate"), dense.at("layers.1.mlp.w_gate")));
    EXPECT_TRUE(
        at::equal(moe.at("layers.0.attn.q_proj.weight"), dense.at("layers.0.attn.q_proj.weight")));
    EXPECT_EQ(moe.at("layers.0.mlp.router.expert_bias").abs().max().item<double>(), 0.0);
  }
}

TEST(Upcycle, NoiseIsRelativeToEachMatrixAndDiffersPerExpert) {
  const auto dense_cfg = dense_config();
  const auto dense = random_weights(dense_cfg, 2);
  UpcycleOptions options;
  options.method = "noise";
  options.noise_std = 0.1;
  const auto moe = upcycle(dense_cfg, dense, moe_config(4, dense_cfg.model.ffn_size), options);
  const auto& base = dense.at("layers.0.mlp.w_up");
  const auto a = moe.at("layers.0.mlp.experts.0.w_up") - base;
  const auto b = moe.at("layers.0.mlp.experts.1.w_up") - base;
  const double ratio = a.std().item<double>() / base.std().item<double>();
  EXPECT_NEAR(ratio, 0.1, 0.02);
  EXPECT_FALSE(at::allclose(a, b));
}

TEST(Upcycle, DropReinitialisesADifferentShareOfChannelsPerExpert) {
  const auto dense_cfg = dense_config();
  const auto dense = random_weights(dense_cfg, 3);
  UpcycleOptions options;
  options.method = "drop";
  options.drop_ratio = 0.25;
  const auto moe = upcycle(dense_cfg, dense, moe_config(4, dense_cfg.model.ffn_size), options);
  const int64_t F = dense_cfg.model.ffn_size;
  const auto& gate = dense.at("layers.0.mlp.w_gate");
  const auto& down = dense.at("layers.0.mlp.w_down");
  std::set<std::vector<int64_t>> channel_sets;
  for (int64_t e = 0; e < 4; ++e) {
    const auto prefix = "layers.0.mlp.experts." + std::to_string(e) + ".";
    const auto changed_rows = (moe.at(prefix + "w_gate") != gate).any(1);
    const auto changed_cols = (moe.at(prefix + "w_down") != down).any(0);
    EXPECT_EQ(changed_rows.sum().item<int64_t>(), F / 4) << "expert " << e;
    EXPECT_TRUE(at::equal(changed_rows, changed_cols)) << "gate rows and down columns agree";
    EXPECT_TRUE(
        at::equal(changed_rows, (moe.at(prefix + "w_up") != dense.at("layers.0.mlp.w_up")).any(1)));
    const auto idx = changed_rows.nonzero().view(-1);
    channel_sets.insert(
        std::vector<int64_t>(idx.data_ptr<int64_t>(), idx.data_ptr<int64_t>() + idx.numel()));
    // Re-initialised from the dense matrix's statistics.
    const auto fresh = moe.at(prefix + "w_gate").index_select(0, idx);
    EXPECT_NEAR(fresh.std().item<double>(), gate.std().item<double>(),
                0.25 * gate.std().item<double>());
  }
  EXPECT_EQ(channel_sets.size(), 4u) << "each expert re-initialises different channels";
}

TEST(Upcycle, GranularSplitsTheDenseFfnAndScalesLikeMegatron) {
  const auto dense_cfg = dense_config();
  const auto dense = random_weights(dense_cfg, 4);
  const int64_t F = dense_cfg.model.ffn_size, g = 4, Fe = F / g, E = 8;
  for (const bool normalize : {true, false}) {
    auto target = moe_config(E, Fe);
    target.moe.router.normalize_gates = normalize;
    UpcycleOptions options;
    options.method = "granular";
    const auto moe = upcycle(dense_cfg, dense, target, options);
    // Megatron-Core: s = g with renormalised top-k, (E/g)·g²/k = E·g/k otherwise; s^(1/3) each.
    const double scale = std::cbrt(normalize ? double(g) : double(E * g) / target.moe.top_k);
    for (int64_t e = 0; e < E; ++e) {
      const auto prefix = "layers.1.mlp.experts." + std::to_string(e) + ".";
      const int64_t chunk = e % g;
      EXPECT_LT(relative_error(moe.at(prefix + "w_gate"),
                               dense.at("layers.1.mlp.w_gate").narrow(0, chunk * Fe, Fe) * scale),
                1e-7);
      EXPECT_LT(relative_error(moe.at(prefix + "w_up"),
                               dense.at("layers.1.mlp.w_up").narrow(0, chunk * Fe, Fe) * scale),
                1e-7);
      EXPECT_LT(relative_error(moe.at(prefix + "w_down"),
                               dense.at("layers.1.mlp.w_down").narrow(1, chunk * Fe, Fe) * scale),
                1e-7);
    }
    const auto& router = moe.at("layers.1.mlp.router.weight");
    for (int64_t e = 0; e < E; ++e)
      EXPECT_TRUE(at::equal(router[e], router[(e / g) * g]))
          << "expert " << e << " shares its group's row";
    EXPECT_FALSE(at::equal(router[0], router[g]));
  }
}

TEST(Upcycle, BadInputsAreClearErrors) {
  const auto dense_cfg = dense_config();
  const auto dense = random_weights(dense_cfg, 5);
  auto wider = moe_config(4, dense_cfg.model.ffn_size);
  wider.model.hidden_size = 64;
  EXPECT_NE(error_of([&] {
              upcycle(dense_cfg, dense, wider, {});
            }).find("model.hidden_size = 64 but the dense model has 32"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              upcycle(dense_cfg, dense, moe_config(4, 16), {});
            }).find("use --method granular"),
            std::string::npos);
  UpcycleOptions granular;
  granular.method = "granular";
  EXPECT_NE(error_of([&] {
              upcycle(dense_cfg, dense, moe_config(6, 16), granular);
            }).find("must divide moe.num_experts 6"),
            std::string::npos);
  UpcycleOptions unknown;
  unknown.method = "magic";
  EXPECT_NE(error_of([&] {
              upcycle(dense_cfg, dense, moe_config(4, 64), unknown);
            }).find("allowed copy | noise | drop | granular"),
            std::string::npos);
}

std::string scratch_dir(const std::string& tag) {
  const auto dir =
      fs::temp_directory_path() / ("moeforge-hf-unit-" + tag + "-" + std::to_string(getpid()));
  fs::remove_all(dir);
  return dir.string();
}

TEST(HfCheckpoint, ExportImportRoundTripsExactly) {
  struct Case {
    std::string format;
    Config config;
  };
  auto qwen = moe_config(4, 16);
  qwen.moe.num_shared_experts = 1;
  qwen.moe.first_k_dense = 1;
  qwen.model.qkv_bias = true;
  qwen.model.tie_embeddings = true;
  for (const auto& [format, config] : std::vector<Case>{{"hf-mixtral", moe_config(4, 16)},
                                                        {"hf-qwen2-moe", qwen},
                                                        {"hf-llama", dense_config()}}) {
    const auto weights = random_weights(config, 6);
    const auto dir = scratch_dir(format);
    hf::ExportOptions options;
    options.format = format;
    options.max_shard_bytes = 20000;  // several shards + index
    hf::export_directory(config, weights, options, dir);
    EXPECT_TRUE(fs::exists(fs::path(dir) / "model.safetensors.index.json")) << format;
    const auto imported = hf::import_directory(dir, Config{});
    ASSERT_EQ(imported.weights.size(), weights.size()) << format;
    for (const auto& [name, tensor] : weights)
      EXPECT_TRUE(at::equal(imported.weights.at(name), tensor)) << format << " " << name;
    EXPECT_TRUE(at::equal(logits(imported.config, imported.weights, kTokens),
                          logits(config, weights, kTokens)))
        << format;
    fs::remove_all(dir);
  }
}

TEST(HfCheckpoint, BrokenDirectoriesAndUnrepresentableModelsAreClearErrors) {
  const auto config = moe_config(4, 16);
  auto weights = random_weights(config, 7);
  const auto dir = scratch_dir("broken");
  hf::ExportOptions options;
  options.format = "hf-mixtral";
  hf::export_directory(config, weights, options, dir);
  const auto config_json = (fs::path(dir) / "config.json").string();
  std::stringstream original;
  original << std::ifstream(config_json).rdbuf();
  const auto with_config = [&](const std::string& text) {
    std::ofstream(config_json) << text;
    return error_of([&] { hf::import_directory(dir, Config{}); });
  };
  EXPECT_NE(with_config("{not json").find(config_json + ": not valid JSON"), std::string::npos);
  auto j = original.str();
  const auto replace = [&](const std::string& from, const std::string& to) {
    auto copy = j;
    copy.replace(copy.find(from), from.size(), to);
    return copy;
  };
  EXPECT_NE(with_config(replace("\"num_local_experts\"", "\"num_experts_x\""))
                .find("required key 'num_local_experts' is missing"),
            std::string::npos);
  EXPECT_NE(with_config(replace("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\""))
                .find("hidden_act 'gelu' is not supported"),
            std::string::npos);
  EXPECT_NE(with_config(replace("\"num_local_experts\": 4", "\"num_local_experts\": 5"))
                .find("'model.layers.0.block_sparse_moe.experts.4.w1.weight' is missing"),
            std::string::npos);
  EXPECT_NE(with_config(replace("\"num_local_experts\": 4", "\"num_local_experts\": 3"))
                .find("are not part of a mixtral model"),
            std::string::npos);
  std::ofstream(config_json) << original.str();

  weights.at("layers.0.mlp.router.expert_bias")[1] = 0.5f;
  const auto out = scratch_dir("bias");
  EXPECT_NE(error_of([&] {
              hf::export_directory(config, weights, options, out);
            }).find("non-zero aux-loss-free expert bias"),
            std::string::npos);
  options.drop_expert_bias = true;
  EXPECT_EQ(error_of([&] { hf::export_directory(config, weights, options, out); }), "");
  auto sigmoid = config;
  sigmoid.moe.router.score = moe::ScoreFunction::kSigmoid;
  EXPECT_NE(error_of([&] {
              hf::export_directory(sigmoid, weights, options, out);
            }).find("router score must be softmax"),
            std::string::npos);
  fs::remove_all(dir);
  fs::remove_all(out);
}

}  // namespace
}  // namespace moeforge
