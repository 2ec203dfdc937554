// Config parsing and validation: every bad input gets one message with file, line, key and what
// is allowed; good input round-trips.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "trainer/common/user_error.hpp"
#include "trainer/config/config.hpp"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    load_config_from_string(yaml, "bad.yaml", overrides);
  } catch (const UserError& e) {
    return e.what();
  }
  return "(no error)";
}

struct BadConfig {
  const char* name;
  const char* yaml;
  std::vector<std::string> overrides;
  std::vector<const char*> expected;  // substrings of the message
};

class BadConfigs : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigs, ClearMessage) {
  const auto& c = GetParam();
  const auto message = error_of(c.yaml, c.overrides);
  for (const char* piece : c.expected)
    EXPECT_NE(message.find(piece), std::string::npos)
        << c.name << ": expected '" << piece << "' in: " << message;
}

INSTANTIATE_TEST_SUITE_P(
    Config, BadConfigs,
    ::testing::Values(
        BadConfig{"unknown_key",
                  "moe:\n  num_experts: 8\n  topk: 2\n",
                  {},
                  {"bad.yaml:3", "unknown key 'moe.topk'", "did you mean 'moe.top_k'"}},
        BadConfig{"unknown_recompute_module",
                  "train:\n  recompute: [moe_act, mlp]\n",
                  {},
                  {"bad.yaml:2", "train.recompute",
                   "must be any of none | moe_act | moe | attention | block", "'mlp'"}},
        BadConfig{"recompute_none_combined",
                  "train:\n  recompute: none, block\n",
                  {},
                  {"bad.yaml:2", "train.recompute", "'none' combined with other names"}},
        BadConfig{"recompute_map",
                  "train:\n  recompute: {block: true}\n",
                  {},
                  {"bad.yaml:2", "train.recompute", "got a map"}},
        BadConfig{"recompute_override",
                  "",
                  {"train.recompute=moe,atention"},
                  {"--set train.recompute=moe,atention", "'atention'"}},
        BadConfig{"unknown_section",
                  "modle:\n  hidden_size: 64\n",
                  {},
                  {"bad.yaml:1", "unknown key 'modle'", "did you mean 'model'"}},
        BadConfig{"misplaced_key", "top_k: 2\n", {}, {"bad.yaml:1", "did you mean 'moe.top_k'"}},
        BadConfig{"string_for_int",
                  "moe:\n  top_k: two\n",
                  {},
                  {"bad.yaml:2", "moe.top_k", "must be an integer in [1, 64]", "'two'"}},
        BadConfig{"float_for_int",
                  "model:\n  num_layers: 2.5\n",
                  {},
                  {"bad.yaml:2", "model.num_layers", "an integer", "'2.5'"}},
        BadConfig{"list_for_scalar",
                  "train:\n  lr: [1, 2]\n",
                  {},
                  {"bad.yaml:2", "train.lr", "a number", "got a list"}},
        BadConfig{"scalar_for_section", "moe: 3\n", {}, {"bad.yaml:1", "moe", "must be a section"}},
        BadConfig{"map_for_scalar",
                  "train:\n  steps: {a: 1}\n",
                  {},
                  {"bad.yaml:2", "train.steps", "got a map"}},
        BadConfig{"bad_bool",
                  "model:\n  qkv_bias: maybe\n",
                  {},
                  {"bad.yaml:2", "model.qkv_bias", "true or false"}},
        BadConfig{"out_of_range_int",
                  "moe:\n  top_k: 0\n",
                  {},
                  {"bad.yaml:2", "moe.top_k", "[1, 64]", "got 0"}},
        BadConfig{"out_of_range_float",
                  "data:\n  val_fraction: 0.9\n",
                  {},
                  {"bad.yaml:2", "data.val_fraction", "[0.0001, 0.5]", "0.9"}},
        BadConfig{"negative_lr", "train:\n  lr: -1\n", {}, {"bad.yaml:2", "train.lr", "[0, 10]"}},
        BadConfig{"bad_enum",
                  "moe:\n  router:\n    score: relu\n",
                  {},
                  {"bad.yaml:3", "moe.router.score", "one of softmax | sigmoid", "'relu'"}},
        BadConfig{"bad_scope",
                  "moe:\n  balancing:\n    aux_loss:\n      scope: batch\n",
                  {},
                  {"bad.yaml:4", "moe.balancing.aux_loss.scope", "micro_batch | sequence"}},
        BadConfig{"missing_value",
                  "train:\n  steps:\n",
                  {},
                  {"bad.yaml:2", "train.steps", "has no value"}},
        BadConfig{"top_k_over_experts",
                  "moe:\n  num_experts: 4\n  top_k: 6\n",
                  {},
                  {"bad.yaml:3", "moe.top_k", "more than moe.num_experts = 4"}},
        BadConfig{"hidden_not_divisible",
                  "model:\n  hidden_size: 100\n  num_heads: 8\n",
                  {},
                  {"bad.yaml:2", "model.hidden_size", "not divisible by model.num_heads = 8"}},
        BadConfig{"kv_heads_not_dividing",
                  "model:\n  num_heads: 4\n  num_kv_heads: 3\n",
                  {},
                  {"bad.yaml:3", "model.num_kv_heads", "does not divide model.num_heads = 4"}},
        BadConfig{"odd_head_dim",
                  "model:\n  hidden_size: 12\n  num_heads: 4\n  num_kv_heads: 1\n",
                  {},
                  {"bad.yaml:2", "head size", "must be even"}},
        BadConfig{"seq_len_too_long",
                  "model:\n  max_seq_len: 64\ntrain:\n  seq_len: 128\n",
                  {},
                  {"bad.yaml:4", "train.seq_len", "longer than model.max_seq_len = 64"}},
        BadConfig{"min_lr_above_lr",
                  "train:\n  lr: 0.001\n  min_lr: 0.01\n",
                  {},
                  {"bad.yaml:3", "train.min_lr", "above train.lr"}},
        BadConfig{"text_without_path",
                  "data:\n  source: text\n",
                  {},
                  {"bad.yaml:2", "data.source", "needs data.path"}},
        BadConfig{"first_k_dense_too_many",
                  "model:\n  num_layers: 2\nmoe:\n  first_k_dense: 3\n",
                  {},
                  {"bad.yaml:4", "moe.first_k_dense", "more than model.num_layers = 2"}},
        BadConfig{"ep_not_dividing_experts",
                  "moe:\n  num_experts: 6\nparallel:\n  ep_size: 4\n",
                  {},
                  {"bad.yaml:4", "parallel.ep_size", "does not divide moe.num_experts = 6"}},
        BadConfig{"vocab_too_small_for_bytes",
                  "model:\n  vocab_size: 100\n",
                  {},
                  {"bad.yaml:2", "model.vocab_size", "needs ≥ 256"}},
        BadConfig{"syntax_error",
                  "model:\n  hidden_size: [1, 2\n",
                  {},
                  {"bad.yaml:", "YAML syntax error"}},
        BadConfig{"top_level_list", "- a\n- b\n", {}, {"bad.yaml:1", "top level must be a map"}},
        BadConfig{"tensorboard_not_bool",
                  "logging:\n  tensorboard: maybe\n",
                  {},
                  {"bad.yaml:2", "logging.tensorboard", "true or false", "'maybe'"}},
        BadConfig{"negative_peak_tflops",
                  "logging:\n  peak_tflops: -989\n",
                  {},
                  {"bad.yaml:2", "logging.peak_tflops", "a number in [0, ", "got -989"}},
        BadConfig{"peak_tflops_not_number",
                  "logging:\n  peak_tflops: h100\n",
                  {},
                  {"bad.yaml:2", "logging.peak_tflops", "a number", "'h100'"}},
        BadConfig{"negative_expert_load_every",
                  "logging:\n  expert_load_every: -1\n",
                  {},
                  {"bad.yaml:2", "logging.expert_load_every", "an integer in [0,", "got -1"}},
        BadConfig{"fractional_expert_load_every",
                  "logging:\n  expert_load_every: 2.5\n",
                  {},
                  {"bad.yaml:2", "logging.expert_load_every", "an integer", "'2.5'"}},
        BadConfig{"bad_override_value",
                  "",
                  {"moe.top_k=lots"},
                  {"--set moe.top_k=lots", "moe.top_k", "an integer"}},
        BadConfig{"override_unknown_key",
                  "",
                  {"moe.topk=2"},
                  {"--set moe.topk=2", "unknown key 'moe.topk'", "did you mean 'moe.top_k'"}},
        BadConfig{"override_without_equals",
                  "",
                  {"moe.top_k"},
                  {"--set moe.top_k", "expected key.path=value"}},
        BadConfig{"override_breaks_rule",
                  "moe:\n  num_experts: 4\n",
                  {"moe.top_k=8"},
                  {"--set moe.top_k=8", "more than moe.num_experts = 4"}}),
    [](const ::testing::TestParamInfo<BadConfig>& info) { return info.param.name; });

TEST(Config, EmptyFileOrSectionKeepsDefaults) {
  EXPECT_EQ(load_config_from_string("model:\n", "x.yaml").model.hidden_size,
            ModelConfig{}.hidden_size);
  EXPECT_EQ(load_config_from_string("# only a comment\n", "x.yaml").moe.top_k, MoeConfig{}.top_k);
}

TEST(Config, ShippedConfigsLoad) {
  const std::string root = MOEFORGE_SOURCE_DIR;
  const auto tiny = load_config(root + "/configs/tiny.yaml");
  EXPECT_EQ(tiny.moe.num_experts, 8);
  EXPECT_EQ(tiny.moe.num_shared_experts, 1);
  EXPECT_EQ(tiny.train.out_dir, "runs/tiny");
  const auto small = load_config(root + "/configs/small.yaml");
  EXPECT_EQ(small.moe.first_k_dense, 1);
}

// The balancing experiment set: four runs of the same model, data and seed; only
// moe.balancing differs.
TEST(Config, BalancingExperimentsDifferOnlyInBalancing) {
  const std::string dir = std::string(MOEFORGE_SOURCE_DIR) + "/configs/experiments/balancing/";
  std::vector<Config> runs;
  for (const char* name : {"no_balancing", "aux_loss", "aux_free", "aux_free_seq_aux"}) {
    runs.push_back(load_config(dir + name + ".yaml"));
    runs.back().moe.balancing = BalancingConfig{};
    runs.back().train.out_dir.clear();
    runs.back().source_file.clear();
  }
  for (const auto& run : runs) EXPECT_EQ(to_yaml(run), to_yaml(runs.front()));
  const auto recipe = load_config(dir + "aux_free_seq_aux.yaml");
  EXPECT_EQ(recipe.moe.balancing.aux_loss.scope, moe::AuxLossScope::kSequence);
  EXPECT_GT(recipe.moe.balancing.expert_bias.rate, 0.0);
}

// Routing-variant rules name the key and say why.
TEST(Config, RoutingVariantRules) {
  const auto error_of = [](const std::vector<std::string>& overrides) -> std::string {
    try {
      load_config_from_string("moe:\n  num_experts: 8\n  top_k: 2\n", "r.yaml", overrides);
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error_of({"moe.router.num_groups=3", "moe.router.topk_groups=1"})
                .find("moe.router.num_groups: 3 does not divide moe.num_experts = 8"),
            std::string::npos);
  EXPECT_NE(error_of({"moe.router.num_groups=4", "moe.router.topk_groups=5"})
                .find("moe.router.topk_groups"),
            std::string::npos);
  EXPECT_NE(error_of({"moe.router.num_groups=4", "moe.router.topk_groups=1", "moe.top_k=3"})
                .find("moe.top_k: 3 is more than the experts of the topk_groups chosen groups"),
            std::string::npos);
  EXPECT_NE(error_of({"moe.router.routing=expert_choice", "moe.router.num_null_experts=2"})
                .find("moe.router.routing: expert_choice cannot be combined with "
                      "moe.router.num_null_experts"),
            std::string::npos);
  EXPECT_NE(error_of({"moe.capacity.pad=true"}).find("moe.capacity.pad: padding needs a capacity"),
            std::string::npos);
  EXPECT_NE(error_of({"moe.balancing.aux_loss.scope=global"})
                .find("micro_batch | sequence | global_batch"),
            std::string::npos);
  EXPECT_EQ(error_of({"moe.router.num_groups=4", "moe.router.topk_groups=2",
                      "moe.router.num_null_experts=1", "moe.router.jitter_eps=0.01",
                      "moe.balancing.aux_loss.scope=global_batch", "moe.capacity.factor=1.25",
                      "moe.capacity.pad=true", "moe.balancing.expert_bias.final_phase=0.1"}),
            "");
}

TEST(Config, MissingFile) {
  try {
    load_config("/nonexistent/config.yaml");
    FAIL();
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("config file: cannot open '/nonexistent/config.yaml'"),
              std::string::npos);
  }
}

TEST(Config, OverridesApplyWithYamlTypes) {
  const auto c = load_config_from_string("moe:\n  top_k: 2\n", "x.yaml",
                                         {"moe.top_k=4", "train.lr=0.01", "model.qkv_bias=true",
                                          "moe.router.score=sigmoid", "train.out_dir=/tmp/run 1"});
  EXPECT_EQ(c.moe.top_k, 4);
  EXPECT_DOUBLE_EQ(c.train.lr, 0.01);
  EXPECT_TRUE(c.model.qkv_bias);
  EXPECT_EQ(c.moe.router.score, moe::ScoreFunction::kSigmoid);
  EXPECT_EQ(c.train.out_dir, "/tmp/run 1");
}

TEST(Config, ResolvedYamlRoundTrips) {
  const auto c = load_config_from_string(
      "model:\n  rope_theta: 500000\n  rms_norm_eps: 1.0e-5\nmoe:\n  router: {score: sigmoid}\n"
      "train:\n  lr: 0.0007\n  out_dir: 'runs/x y'\ndata: {source: text, path: '123'}\n",
      "x.yaml");
  const auto text = to_yaml(c);
  const auto again = load_config_from_string(text, "resolved.yaml");
  EXPECT_EQ(to_yaml(again), text);
  EXPECT_DOUBLE_EQ(again.model.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(again.train.lr, 0.0007);
  EXPECT_EQ(again.data.path, "123");
  EXPECT_EQ(again.train.out_dir, "runs/x y");
  EXPECT_NE(text.find("moe:"), std::string::npos);
  EXPECT_NE(text.find("expert_ffn_size:"), std::string::npos);  // defaults are written out
}

// train.recompute: a YAML list or one string of names (spaces or commas), any combination.
TEST(Config, RecomputeModulesCombine) {
  const auto none = load_config_from_string("train:\n  seed: 1\n", "x.yaml");
  EXPECT_FALSE(none.train.recompute.any());
  const auto list =
      load_config_from_string("train:\n  recompute: [moe_act, attention]\n", "x.yaml");
  EXPECT_TRUE(list.train.recompute.moe_act && list.train.recompute.attention);
  EXPECT_FALSE(list.train.recompute.moe || list.train.recompute.block);
  const auto text = load_config_from_string("train:\n  recompute: block, moe\n", "x.yaml");
  EXPECT_TRUE(text.train.recompute.block && text.train.recompute.moe);
  EXPECT_FALSE(text.train.recompute.moe_act || text.train.recompute.attention);
  const auto spaced = load_config_from_string("", "x.yaml", {"train.recompute=moe_act block"});
  EXPECT_TRUE(spaced.train.recompute.moe_act && spaced.train.recompute.block);
  const auto listed = load_config_from_string("", "x.yaml", {"train.recompute=[moe]"});
  EXPECT_TRUE(listed.train.recompute.moe);
  EXPECT_FALSE(load_config_from_string("train: {recompute: none}", "x.yaml").train.recompute.any());
  EXPECT_FALSE(load_config_from_string("train: {recompute: []}", "x.yaml").train.recompute.any());
  const auto resolved = to_yaml(list);
  EXPECT_NE(resolved.find("recompute: \"moe_act attention\""), std::string::npos) << resolved;
  EXPECT_EQ(to_yaml(load_config_from_string(resolved, "resolved.yaml")), resolved);
  EXPECT_NE(to_yaml(none).find("recompute: \"none\""), std::string::npos);
}

// parallel.micro_batch_overlap runs micro-batches in pairs, with the MoE layer's exchanges
// outside any recomputed region.
TEST(Config, MicroBatchOverlapRules) {
  const auto error_of = [](const std::string& yaml) -> std::string {
    try {
      load_config_from_string(yaml, "m.yaml");
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  };
  const std::string on = "parallel: {micro_batch_overlap: true}\n";
  EXPECT_NE(error_of(on + "train: {grad_accum: 3}\n")
                .find("m.yaml:1: parallel.micro_batch_overlap: runs micro-batches two at a "
                      "time: train.grad_accum must be even, got 3"),
            std::string::npos)
      << error_of(on + "train: {grad_accum: 3}\n");
  EXPECT_NE(error_of(on + "train: {grad_accum: 1}\n").find("must be even, got 1"),
            std::string::npos);
  for (const char* region : {"block", "moe", "[attention, moe]"}) {
    const auto message =
        error_of(on + "train: {grad_accum: 2, recompute: " + std::string(region) + "}\n");
    EXPECT_NE(message.find("train.recompute may name attention and moe_act with it, not block "
                           "or moe"),
              std::string::npos)
        << region << ": " << message;
  }
  EXPECT_EQ(error_of(on + "train: {grad_accum: 4, recompute: [attention, moe_act]}\n"), "");
  EXPECT_EQ(error_of("train: {grad_accum: 3, recompute: block}\n"), "");
}

TEST(Config, WorldSizeRules) {
  auto c = load_config_from_string("parallel:\n  ep_size: 4\n", "x.yaml");
  EXPECT_NO_THROW(validate_for_world(c, 4));
  EXPECT_NO_THROW(validate_for_world(c, 8));
  try {
    validate_for_world(c, 2);
    FAIL();
  } catch (const UserError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("parallel.ep_size = 4 does not divide the world size 2"), std::string::npos)
        << m;
    EXPECT_NE(m.find("use one of 1, 2"), std::string::npos) << m;
  }
}

TEST(Config, ReadmeDocumentsEveryKey) {
  std::ifstream in(std::string(MOEFORGE_SOURCE_DIR) + "/configs/README.md");
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_NE(text.str().find(config_reference_markdown()), std::string::npos)
      << "configs/README.md is out of date: regenerate its reference with `moeforge config-doc`";
}

// Every row of the reference is a table row of exactly four cells on GitHub: no bare '|' (it
// would end a cell) and no bare '<' (an HTML tag, which GitHub hides).
TEST(Config, ReferenceRendersAsAValidMarkdownTable) {
  std::istringstream lines(config_reference_markdown());
  int rows = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("| `", 0) != 0) continue;
    ++rows;
    int cells = 0;
    for (size_t i = 0; i < line.size(); ++i)
      if (line[i] == '|' && (i == 0 || line[i - 1] != '\\')) ++cells;
    EXPECT_EQ(cells, 5) << "a row that is not 4 cells: " << line;
    bool in_code = false;
    for (const char c : line) {
      if (c == '`') in_code = !in_code;
      if (c == '<' && !in_code) ADD_FAILURE() << "bare '<' (HTML to GitHub): " << line;
    }
  }
  EXPECT_GT(rows, 80);
}

TEST(Config, TokenChoiceGetsASmallAuxLossUnlessBalancingIsChosen) {
  const auto plain = load_config_from_string("moe:\n  num_experts: 4\n", "x.yaml");
  EXPECT_DOUBLE_EQ(plain.moe.balancing.aux_loss.coeff, 0.01);
  ASSERT_EQ(plain.notes.size(), 1u);
  EXPECT_NE(plain.notes[0].find("aux_loss.coeff = 0.01"), std::string::npos);
  const auto off = load_config_from_string("moe:\n  balancing: {aux_loss: {coeff: 0}}\n", "x.yaml");
  EXPECT_DOUBLE_EQ(off.moe.balancing.aux_loss.coeff, 0.0);
  EXPECT_TRUE(off.notes.empty());
  const auto aux_free =
      load_config_from_string("", "x.yaml", {"moe.balancing.expert_bias.rate=0.001"});
  EXPECT_DOUBLE_EQ(aux_free.moe.balancing.aux_loss.coeff, 0.0);
  const auto expert_choice =
      load_config_from_string("moe:\n  router: {routing: expert_choice}\n", "x.yaml");
  EXPECT_DOUBLE_EQ(expert_choice.moe.balancing.aux_loss.coeff, 0.0);
  const auto dense =
      load_config_from_string("moe:\n  first_k_dense: 2\nmodel: {num_layers: 2}\n", "x.yaml");
  EXPECT_DOUBLE_EQ(dense.moe.balancing.aux_loss.coeff, 0.0) << "no MoE block, no aux loss";
  // The resolved YAML states the value: reloading it keeps it and notes nothing.
  const auto again = load_config_from_string(to_yaml(plain), "resolved.yaml");
  EXPECT_DOUBLE_EQ(again.moe.balancing.aux_loss.coeff, 0.01);
  EXPECT_TRUE(again.notes.empty());
}

TEST(Config, WarmupLongerThanTheRunIsShortenedWithANote) {
  const auto c = load_config_from_string("train:\n  steps: 10\n  warmup_steps: 20\n", "w.yaml");
  EXPECT_EQ(c.train.warmup_steps, 1);
  bool noted = false;
  for (const auto& note : c.notes)
    noted |= note.find("train.warmup_steps = 20 (w.yaml:3) is more than train.steps = 10") !=
             std::string::npos;
  EXPECT_TRUE(noted);
}

TEST(Config, OutDirDefaultsToTheConfigFileNameAndDataPathToItsDirectory) {
  const auto dir =
      fs::temp_directory_path() / ("moeforge-config-paths-" + std::to_string(getpid()));
  fs::create_directories(dir / "sub");
  std::ofstream(dir / "sub" / "corpus.txt") << "hello";
  std::ofstream(dir / "sub" / "my_experiment.yaml")
      << "data:\n  source: text\n  path: corpus.txt\n";
  const auto c = load_config((dir / "sub" / "my_experiment.yaml").string());
  EXPECT_EQ(c.train.out_dir, "runs/my_experiment");
  EXPECT_EQ(fs::path(c.data.path), (dir / "sub" / "corpus.txt").lexically_normal());
  EXPECT_EQ(c.data.path_origin, (dir / "sub" / "my_experiment.yaml").string() + ":3");
  // Not beside the config: the working directory's path stays (configs written for the repo root).
  std::ofstream(dir / "sub" / "other.yaml") << "data:\n  source: text\n  path: elsewhere.txt\n";
  EXPECT_EQ(load_config((dir / "sub" / "other.yaml").string()).data.path, "elsewhere.txt");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moeforge
