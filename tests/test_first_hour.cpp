// A newcomer's first hour, end to end with the real binary and scripts: train, generate, eval,
// runs that explain themselves, defaults that do not bite, quiet failures, README commands that
// parse.
#include <gtest/gtest.h>

#include <regex>
#include <set>
#include <sstream>

#include "cli_support.hpp"

namespace {

using namespace cli_testing;  // NOLINT: the helpers are this file's vocabulary

const std::string kBinary = MOEFORGE_BINARY;
const std::string kSource = MOEFORGE_SOURCE_DIR;

// One small tiny.yaml run on 2 ranks shared by the tests below (trained once).
const std::string& trained_run() {
  static const std::string out = [] {
    const auto dir = scratch("first-hour");
    const auto r = train_tiny(2, dir, "--set train.steps=24 --set train.eval_every=12");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return dir;
  }();
  return out;
}

nlohmann::json eval_json(const std::string& launcher, const std::string& args,
                         const std::string& tag) {
  const auto json = scratch("eval-" + tag) + ".json";
  const auto r = run_shell(launcher + " eval --from " + trained_run() + " --json " + json + args);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  std::ifstream in(json);
  return nlohmann::json::parse(in, nullptr, false);
}

TEST(FirstHour, EvalReproducesTheTrainersValidationLossAtAnyRanksAndEpSize) {
  // The trainer validated 4 batches × 2 ranks × 8 sequences (tiny.yaml) at step 24.
  double trainer_val = 0;
  for (const auto& row : read_jsonl(fs::path(trained_run()) / "metrics.jsonl"))
    if (row.contains("val_loss") && row["step"] == 24) trainer_val = row["val_loss"];
  ASSERT_GT(trainer_val, 0);
  const auto one = eval_json(kBinary, " --windows 64", "one");
  const auto two = eval_json(mpirun(2), " --windows 64 --ep-size 2", "two");
  EXPECT_NEAR(one["loss"].get<double>(), trainer_val, 1e-5 * trainer_val);
  EXPECT_NEAR(two["loss"].get<double>(), one["loss"].get<double>(), 1e-5 * trainer_val);
  EXPECT_EQ(one["tokens"], 64 * 128);
  EXPECT_NEAR(one["perplexity"].get<double>(), std::exp(one["loss"].get<double>()), 1e-9);
  ASSERT_EQ(one["moe_layers"].size(), 4u);
  EXPECT_EQ(one["moe_layers"][0]["expert_load"], two["moe_layers"][0]["expert_load"]);
}

TEST(FirstHour, EvalOnATextFileAndForwardOfText) {
  const auto text = scratch("text") + ".txt";
  std::ofstream(text) << "The cat sat on the mat. The dog sat on the log. "
                      << std::string(400, 'a');
  const auto r = run_shell(kBinary + " eval --from " + trained_run() + " --text " + text);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("whole dataset"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("perplexity"), std::string::npos) << r.output;
  const auto logits = scratch("logits") + ".safetensors";
  const auto f = run_shell(kBinary + " forward --from " + trained_run() +
                           " --prompt 'The cat' --out " + logits);
  EXPECT_EQ(f.exit_code, 0) << f.output;
  EXPECT_NE(f.output.find("logits [1, 7, 256]"), std::string::npos) << f.output;
  const auto both = run_shell(kBinary + " forward --from " + trained_run() + " --prompt x --text " +
                              text + " --out " + logits);
  EXPECT_NE(both.exit_code, 0) << "one input only";
}

TEST(FirstHour, GenerateContinuesThePromptTheSameWithAndWithoutCache) {
  const std::string base =
      kBinary + " generate --from " + trained_run() + " --prompt 'The cat ' --max-tokens 30 --ids";
  const auto cached = run_shell(base);
  ASSERT_EQ(cached.exit_code, 0) << cached.output;
  EXPECT_EQ(cached.output.rfind("The cat ", 0), 0u) << "echoes the prompt first: " << cached.output;
  EXPECT_NE(cached.output.find("30 new tokens"), std::string::npos) << cached.output;
  EXPECT_NE(cached.output.find("KV cache"), std::string::npos) << cached.output;
  const auto uncached = run_shell(base + " --no-cache");
  const std::regex ids_line("ids: [0-9 ]+");
  std::smatch a, b;
  ASSERT_TRUE(std::regex_search(cached.output, a, ids_line));
  ASSERT_TRUE(std::regex_search(uncached.output, b, ids_line));
  EXPECT_EQ(a.str(), b.str());
  const auto sampled = run_shell(base + " --temperature 0.9 --top-p 0.9 --seed 3");
  EXPECT_EQ(sampled.exit_code, 0) << sampled.output;
  const auto bad = run_shell(base + " --top-p 1.5");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.output.find("--top-p must be in (0, 1]"), std::string::npos) << bad.output;
}

TEST(FirstHour, BannerStepLineAndSummaryExplainTheRun) {
  const auto out = scratch("banner");
  const auto r = train_tiny(1, out, "--set train.steps=4");  // below tiny.yaml's warmup
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* expected :
       {"3.81 M parameters, 1.41 M active per token", "top-2 of 8 routed experts + 1 shared",
        "1.90 M training tokens", "epochs", "1024 tokens/step",
        "note: train.warmup_steps = 15 (" /* tiny.yaml:line */, "warmup shortened to 0 steps",
        "elapsed, ETA", "trained            steps 1–4 in", "(mean of the last 4 steps)",
        "nats/token", "perplexity"})
    EXPECT_NE(r.output.find(expected), std::string::npos) << expected << "\n" << r.output;
  // Finished: one clear message, not a summary of zeros.
  const auto again = train_tiny(1, out, "--set train.steps=4 --resume");
  EXPECT_EQ(again.exit_code, 2) << again.output;
  EXPECT_NE(again.output.find("run already complete at step 4 (train.steps = 4)"),
            std::string::npos)
      << again.output;
  // Extended: the schedule change is stated before the first step.
  const auto extended = train_tiny(1, out, "--set train.steps=6 --resume");
  EXPECT_EQ(extended.exit_code, 0) << extended.output;
  EXPECT_NE(extended.output.find("train.steps is 6 here but 4 in the checkpoint"),
            std::string::npos)
      << extended.output;
  fs::remove_all(out);
}

TEST(FirstHour, CollapsingRouterIsWarnedAbout) {
  const auto out = scratch("collapse");
  const auto r = train_tiny(1, out,
                            "--set train.steps=25 --set moe.balancing.aux_loss.coeff=0 "
                            "--set moe.num_experts=4 --set moe.top_k=1 "
                            "--set logging.max_vio_warning=0.05 --set train.eval_every=0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count(r.output, "warning: step "), 1u) << "once: " << r.output;
  EXPECT_NE(r.output.find("raise moe.balancing.aux_loss.coeff"), std::string::npos) << r.output;
  fs::remove_all(out);
}

TEST(FirstHour, MissingDataFileNamesTheConfigLine) {
  const auto dir = scratch("data-line");
  fs::create_directories(dir);
  std::ofstream(dir + "/exp.yaml") << "data:\n  source: text\n  path: missing.txt\n";
  const auto r = run_shell(mpirun(1) + " train --config " + dir + "/exp.yaml");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find(dir + "/exp.yaml:3: data.path: cannot open 'missing.txt'"),
            std::string::npos)
      << r.output;
  fs::remove_all(dir);
}

TEST(FirstHour, CommandNamesAndVersion) {
  auto r = run_shell(kBinary + " trian");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("unknown command 'trian' (did you mean 'train'?)"), std::string::npos)
      << r.output;
  r = run_shell(kBinary + " --version");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("moeforge 0."), std::string::npos) << r.output;
  r = run_shell(kBinary + " upcycle --help");
  EXPECT_NE(r.output.find("optional: without it the defaults and --set"), std::string::npos)
      << r.output;
  r = run_shell(kBinary + " export --from " + trained_run() + " --format hf-mixtral --out " +
                scratch("mixtral"));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("Mixtral has no shared experts; use --format hf-qwen2-moe"),
            std::string::npos)
      << r.output;
}

// Every `moeforge SUBCOMMAND --flag ...` line in the README's code blocks names a subcommand
// whose --help lists each of those flags.
TEST(FirstHour, ReadmeCommandLinesParse) {
  std::ifstream in(kSource + "/README.md");
  std::stringstream text;
  text << in.rdbuf();
  const std::regex command(
      R"(moeforge (train|generate|eval|import|upcycle|export|forward|data-info|config-doc)\b([^\n`]*))");
  std::map<std::string, std::set<std::string>> flags;
  const auto s = text.str();
  for (std::sregex_iterator it(s.begin(), s.end(), command), end; it != end; ++it) {
    auto& mine = flags[(*it)[1]];
    const std::string rest = (*it)[2];
    const std::regex flag(R"(--[a-z][a-z-]*)");
    for (std::sregex_iterator f(rest.begin(), rest.end(), flag), fe; f != fe; ++f)
      mine.insert(f->str());
  }
  EXPECT_GE(flags.size(), 7u) << "the README shows most subcommands";
  for (const auto& [name, used] : flags) {
    const auto help = run_shell(kBinary + " " + name + " --help");
    EXPECT_EQ(help.exit_code, 0) << name << ": " << help.output;
    for (const auto& flag : used)
      EXPECT_NE(help.output.find(flag), std::string::npos)
          << "README uses `moeforge " << name << " " << flag << "`, which --help does not list";
  }
}

TEST(FirstHour, TrainScriptShowsMoeforgesErrorLastWithoutLauncherNoise) {
  const auto r = run_shell("SKIP_SETUP=1 NP=2 " + kSource + "/launch/train.sh " + kTiny +
                           " --set moe.top_k=99 --set train.out_dir=" + scratch("noise"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  for (const char* noise : {"MPI_ABORT", "Primary job", "non-zero status", "Process name"})
    EXPECT_EQ(r.output.find(noise), std::string::npos) << noise << "\n" << r.output;
  const auto error = r.output.find("moeforge: error:");
  ASSERT_NE(error, std::string::npos) << r.output;
  EXPECT_NE(r.output.find("moe.top_k", error), std::string::npos) << r.output;
  EXPECT_EQ(count(r.output, "moeforge: error:"), 1u) << r.output;
  const auto help = run_shell(kSource + "/launch/train.sh --help");
  EXPECT_EQ(help.exit_code, 0) << help.output;
  EXPECT_NE(help.output.find("launch/train.sh CONFIG"), std::string::npos) << help.output;
  EXPECT_EQ(help.output.find("[setup]"), std::string::npos) << "--help runs no setup";
}

}  // namespace
