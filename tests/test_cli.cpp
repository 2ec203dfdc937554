// End-to-end: the real `moeforge` binary under mpiexec, as a user runs it.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

struct Result {
  int exit_code = -1;
  std::string output;  // stdout + stderr
  double seconds = 0;
};

Result run_shell(const std::string& command) {
  const auto start = std::chrono::steady_clock::now();
  Result result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer{};
  while (fgets(buffer.data(), buffer.size(), pipe) != nullptr) result.output += buffer.data();
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

std::string mpirun(int ranks) {
  return std::string("OMP_NUM_THREADS=1 ") + MOEFORGE_MPIEXEC +
         " --allow-run-as-root --oversubscribe --bind-to none -n " + std::to_string(ranks) + " " +
         MOEFORGE_BINARY;
}

std::string scratch(const std::string& tag) {
  const auto dir =
      fs::temp_directory_path() / ("moeforge-cli-" + tag + "-" + std::to_string(getpid()));
  fs::remove_all(dir);
  return dir.string();
}

size_t count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + 1))
    ++n;
  return n;
}

std::vector<nlohmann::json> read_jsonl(const fs::path& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

const std::string kTiny = std::string(MOEFORGE_SOURCE_DIR) + "/configs/tiny.yaml";

// The README's demo: the tiny config on 2 data-parallel ranks. The loss must fall from about
// ln(256) = 5.5 by at least 2.5 nats, and the run directory must hold what users script against.
TEST(Cli, TinyConfigTrainsOnTwoRanksAndLossFalls) {
  const auto out = scratch("tiny");
  const auto r = run_shell(mpirun(2) + " train --config " + kTiny + " --set train.out_dir=" + out +
                           " --set train.steps=100 --set train.eval_every=50");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("== summary =="), std::string::npos) << r.output;
  EXPECT_EQ(count(r.output, "step    10/100"), 1u) << "progress lines printed once, by rank 0";
  const auto rows = read_jsonl(fs::path(out) / "metrics.jsonl");
  std::vector<nlohmann::json> steps;
  for (const auto& row : rows)
    if (row.contains("loss")) steps.push_back(row);
  ASSERT_EQ(steps.size(), 100u);
  for (const char* key : {"step", "loss", "lr", "grad_norm", "tokens_per_s", "max_vio",
                          "max_vio_micro", "moe_layers"})
    EXPECT_TRUE(steps.back().contains(key)) << key;
  for (const char* key : {"layer", "expert_load", "max_vio", "max_vio_micro", "router_entropy",
                          "dropped_frac", "null_frac", "bias_abs_max", "bias_abs_mean"})
    EXPECT_TRUE(steps.back()["moe_layers"][0].contains(key)) << key;
  EXPECT_EQ(steps.back()["moe_layers"][0]["expert_load"].size(), 8u);
  const double first = steps.front()["loss"], last = steps.back()["loss"];
  EXPECT_GT(first, 5.0);
  EXPECT_LT(last, first - 2.5) << "loss fell only from " << first << " to " << last;
  EXPECT_TRUE(fs::exists(fs::path(out) / "config.resolved.yaml"));
  EXPECT_TRUE(fs::exists(fs::path(out) / "checkpoints" / "latest"));

  // The plot script turns the run's metrics into PNGs and a summary table.
  const std::string plot =
      std::string(MOEFORGE_PYTHON) + " " + MOEFORGE_SOURCE_DIR + "/launch/plot_metrics.py ";
  const auto plots = fs::path(out) / "plots";
  const auto plotted = run_shell(plot + out + " --names demo --out " + plots.string());
  ASSERT_EQ(plotted.exit_code, 0) << plotted.output;
  for (const char* png :
       {"loss.png", "max_vio.png", "load_demo_layer0.png", "load_demo_layer3.png"})
    EXPECT_GT(fs::file_size(plots / png), 1000u) << png;
  EXPECT_NE(plotted.output.find("| demo | "), std::string::npos) << plotted.output;
  const auto missing = run_shell(plot + out + "/nonexistent --out " + plots.string());
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("nonexistent/metrics.jsonl"), std::string::npos) << missing.output;

  // --resume picks up the latest checkpoint and appends to the metrics.
  const auto resumed = run_shell(mpirun(2) + " train --config " + kTiny +
                                 " --set train.out_dir=" + out + " --set train.steps=104 --resume");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resumed from"), std::string::npos);
  EXPECT_NE(resumed.output.find("step   104/104"), std::string::npos) << resumed.output;
  fs::remove_all(out);
}

// logging.trace writes one Chrome trace per rank with compute phases and collectives, and the
// simulated link announces itself once.
TEST(Cli, TraceAndSimulatedLink) {
  const auto out = scratch("trace");
  const auto r = run_shell(
      mpirun(2) + " train --config " + kTiny + " --set train.out_dir=" + out +
      " --set train.steps=4 --set train.warmup_steps=1 --set parallel.ep_size=2" +
      " --set parallel.overlap_degree=2 --set logging.trace=true --set logging.trace_steps=2" +
      " --set parallel.simulated_link.bandwidth_gbps=1 --set "
      "parallel.simulated_link.latency_us=20");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count(r.output, "SIMULATED LINK ON"), 1u) << r.output;
  for (const char* file : {"rank-0.json", "rank-1.json"}) {
    std::ifstream in(fs::path(out) / "trace" / file);
    ASSERT_TRUE(in.good()) << file;
    const auto trace = nlohmann::json::parse(in);
    std::map<std::string, int> names;
    for (const auto& e : trace["traceEvents"])
      if (e["ph"] == "X") {
        EXPECT_GE(e["dur"].get<double>(), 0.0);
        names[e["cat"].get<std::string>() + ":" + e["name"].get<std::string>().substr(0, 10)]++;
      }
    EXPECT_GT(names["compute:experts"], 0) << file;
    EXPECT_GT(names["compute:backward"], 0) << file;
    EXPECT_GT(names["comm:all_to_all"], 0) << file;
    EXPECT_GT(names["comm:all_reduce"], 0) << file;
  }
  fs::remove_all(out);
}

TEST(Cli, BadConfigFailsOnceWithFileLineAndKey) {
  const auto out = scratch("bad");
  fs::create_directories(out);
  const auto config = fs::path(out) / "bad.yaml";
  std::ofstream(config) << "model:\n  hidden_size: 64\nmoe:\n  num_experts: 4\n  topk: 2\n";
  const auto r = run_shell(mpirun(2) + " train --config " + config.string());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(count(r.output, "unknown key"), 1u) << r.output;
  EXPECT_NE(r.output.find("bad.yaml:5"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("top_k"), std::string::npos) << r.output;
  fs::remove_all(out);
}

TEST(Cli, BadOverrideAndMissingFileAreClearErrors) {
  auto r = run_shell(mpirun(1) + " train --config " + kTiny + " --set moe.top_k=64");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("moe.top_k"), std::string::npos) << r.output;
  r = run_shell(mpirun(1) + " train --config /nonexistent/x.yaml");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("/nonexistent/x.yaml"), std::string::npos) << r.output;
  r = run_shell(mpirun(1) + " train --config " + kTiny +
                " --set data.source=text --set data.path=/nonexistent/corpus.txt");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("/nonexistent/corpus.txt"), std::string::npos) << r.output;
  r = run_shell(mpirun(1) + " train");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--config"), std::string::npos) << r.output;
}

// One rank fails mid-run: every rank stops promptly, the message appears once, exit non-zero.
TEST(Cli, OneFailingRankStopsTheWholeJob) {
  const auto out = scratch("fail");
  const auto r = run_shell("MOEFORGE_FAIL_AT=1:3 " + mpirun(2) + " train --config " + kTiny +
                           " --set train.out_dir=" + out + " --set train.steps=50");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(count(r.output, "injected failure on rank 1 at step 3"), 1u) << r.output;
  EXPECT_LT(r.seconds, 120.0);
  EXPECT_EQ(r.output.find("step    10/"), std::string::npos)
      << "training went on after the failure";
  fs::remove_all(out);
}

// A bad start point is found before any rank works: one message naming the path and what was
// asked, exit code 2 (bad input), no MPI_ABORT banner — for --resume and --init-from, with a
// missing path and with a truncated checkpoint.
TEST(Cli, BadResumeOrInitPathIsOneMessageBeforeWork) {
  const auto out = scratch("start");
  const auto tiny = " train --config " + kTiny + " --set train.out_dir=" + out +
                    " --set train.steps=2 --set train.warmup_steps=1";
  const auto expect_one_error = [](const Result& r, const std::string& needle) {
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_EQ(count(r.output, needle), 1u) << r.output;
    EXPECT_EQ(count(r.output, "moeforge: error"), 1u) << r.output;
    EXPECT_EQ(r.output.find("MPI_ABORT"), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("step     1/"), std::string::npos) << "trained anyway";
  };
  expect_one_error(run_shell(mpirun(2) + tiny + " --resume /nonexistent/run"),
                   "no checkpoint to resume from at '/nonexistent/run'");
  expect_one_error(run_shell(mpirun(2) + tiny + " --init-from /nonexistent/run"),
                   "no checkpoint to initialise from at '/nonexistent/run'");
  // A real checkpoint, then one of its files cut short.
  ASSERT_EQ(run_shell(mpirun(2) + tiny).exit_code, 0);
  const auto checkpoint = fs::path(out) / "checkpoints" / "step-00000002";
  const auto model_file = checkpoint / "model.safetensors";
  fs::resize_file(model_file, fs::file_size(model_file) / 2);
  expect_one_error(run_shell(mpirun(2) + tiny + " --resume"), "is truncated or was changed");
  const auto elsewhere = " train --config " + kTiny + " --set train.out_dir=" + out + "-b";
  expect_one_error(run_shell(mpirun(2) + elsewhere + " --init-from " + checkpoint.string()),
                   "is truncated or was changed");
  fs::remove_all(out);
  fs::remove_all(out + "-b");
}

TEST(Cli, EpSizeMustDivideWorld) {
  const auto r = run_shell(mpirun(2) + " train --config " + kTiny + " --set parallel.ep_size=4");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("ep_size"), std::string::npos) << r.output;
}

}  // namespace
