// End-to-end: the real `moeforge` binary under mpiexec, as a user runs it.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "cli_support.hpp"

namespace fs = std::filesystem;
using namespace cli_testing;  // NOLINT: the helpers are this file's vocabulary

namespace {

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
                          "max_vio_micro", "moe_layers", "tflops", "mfu", "hfu", "max_vio_p90",
                          "load_cv_p90", "load_cv_max", "dropped_frac", "bias_abs_max"})
    EXPECT_TRUE(steps.back().contains(key)) << key;
  for (const char* key :
       {"layer", "expert_load", "max_vio", "max_vio_micro", "router_entropy", "dropped_frac",
        "null_frac", "bias_abs_max", "bias_abs_mean", "load_min", "load_max", "load_cv"})
    EXPECT_TRUE(steps.back()["moe_layers"][0].contains(key)) << key;
  EXPECT_GT(steps.back()["mfu"].get<double>(), 0.0);
  EXPECT_NE(r.output.find("% MFU"), std::string::npos) << r.output;
  // On by default: TensorBoard events (tests/tensorboard_test.py reads them with TensorBoard)
  // and, every 100 steps, each rank's tokens per expert.
  EXPECT_FALSE(fs::is_empty(fs::path(out) / "tensorboard"));
  EXPECT_EQ(read_jsonl(fs::path(out) / "expert_load.jsonl").size(), 1u);
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

namespace {

std::string tiny_run(const std::string& out, int steps) {
  return " train --config " + kTiny + " --set train.out_dir=" + out +
         " --set train.steps=" + std::to_string(steps) + " --set train.warmup_steps=1" +
         " --set checkpoint.every=2 --set train.eval_every=0";
}

// Issue 20, item 1: resuming with a different model is refused with every difference named,
// and the good checkpoints stay; an edited step and a finished run are refused too.
TEST(Reliability, MismatchedResumeIsRefusedAndKeepsCheckpoints) {
  const auto out = scratch("mismatch");
  ASSERT_EQ(run_shell(mpirun(2) + tiny_run(out, 4)).exit_code, 0);
  const auto checkpoints = fs::path(out) / "checkpoints";
  for (const std::string change :
       {"model.num_layers=1", "moe.num_shared_experts=0", "model.tie_embeddings=true"}) {
    const auto r = run_shell(mpirun(2) + tiny_run(out, 8) + " --resume --set " + change);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    const auto key = change.substr(0, change.find('='));
    EXPECT_EQ(count(r.output, key + ":"), 1u) << r.output;
    EXPECT_TRUE(fs::exists(checkpoints / "step-00000004")) << "good checkpoint lost";
    EXPECT_TRUE(fs::exists(checkpoints / "step-00000002")) << "good checkpoint lost";
  }
  auto r = run_shell(mpirun(1) + tiny_run(out, 4) + " --resume");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("nothing left to train"), std::string::npos) << r.output;
  // An edited step (999 instead of 4) would skip training: refused.
  const auto meta_path = checkpoints / "step-00000004" / "checkpoint.json";
  auto meta = nlohmann::json::parse(std::ifstream(meta_path));
  meta["step"] = 999;
  std::ofstream(meta_path) << meta.dump();
  r = run_shell(mpirun(1) + tiny_run(out, 2000) + " --resume");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("records step 999"), std::string::npos) << r.output;
  fs::remove_all(out);
}

// Items 2 and 7: a fresh run into a directory holding a run is refused without --overwrite;
// with it the old run's checkpoints go and the new ones stay; a crash after the last checkpoint
// and a resume record every step exactly once.
TEST(Reliability, RunDirectoryOwnershipAndMetricsOnResume) {
  const auto out = scratch("owner");
  ASSERT_EQ(run_shell(mpirun(2) + tiny_run(out, 4)).exit_code, 0);
  auto r = run_shell(mpirun(2) + tiny_run(out, 4));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count(r.output, "already holds a run"), 1u) << r.output;
  r = run_shell(mpirun(2) + tiny_run(out, 6) + " --overwrite --set checkpoint.keep=1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto checkpoints = fs::path(out) / "checkpoints";
  EXPECT_TRUE(fs::exists(checkpoints / "step-00000006"));
  EXPECT_FALSE(fs::exists(checkpoints / "step-00000004")) << "pruning kept an old checkpoint";
  std::ifstream latest(checkpoints / "latest");
  std::string name;
  latest >> name;
  EXPECT_EQ(name, "step-00000006");
  // A crash at step 5 of 8 (checkpoints every 2): metrics hold steps 1-4 (and 5 if it was
  // logged), resume from step 4 continues to 8; afterwards each step is there exactly once.
  const auto crash = scratch("crash");
  r = run_shell("MOEFORGE_FAIL_AT=0:6 " + mpirun(2) + tiny_run(crash, 8));
  EXPECT_NE(r.exit_code, 0);
  r = run_shell(mpirun(2) + tiny_run(crash, 8) + " --resume");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::map<int64_t, int> seen;
  for (const auto& row : read_jsonl(fs::path(crash) / "metrics.jsonl"))
    if (row.contains("loss")) ++seen[row["step"].get<int64_t>()];
  ASSERT_EQ(seen.size(), 8u);
  for (const auto& [step, times] : seen) EXPECT_EQ(times, 1) << "step " << step;
  fs::remove_all(out);
  fs::remove_all(crash);
}

// Item 3: a second run on the same directory is refused, naming the holder; the first finishes.
TEST(Reliability, ConcurrentRunsOnOneDirectory) {
  const auto out = scratch("lock");
  const auto first_log = out + "-first.log";
  fs::create_directories(out);
  const std::string first =
      mpirun(2) + tiny_run(out, 30) + " > " + first_log + " 2>&1 & echo $! > " + out + "-pid";
  ASSERT_EQ(run_shell(first).exit_code, 0);
  for (int i = 0; i < 100 && !fs::exists(fs::path(out) / "run.json"); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const auto second = run_shell(mpirun(2) + tiny_run(out, 30) + " --overwrite");
  EXPECT_EQ(second.exit_code, 2) << second.output;
  EXPECT_EQ(count(second.output, "is in use by another run (host"), 1u) << second.output;
  run_shell("while kill -0 $(cat " + out + "-pid) 2>/dev/null; do sleep 0.2; done");
  std::ifstream log(first_log);
  const std::string first_output((std::istreambuf_iterator<char>(log)), {});
  EXPECT_NE(first_output.find("== summary =="), std::string::npos) << first_output;
  EXPECT_TRUE(fs::exists(fs::path(out) / "checkpoints" / "step-00000030"));
  fs::remove_all(out);
  fs::remove(first_log);
  fs::remove(out + "-pid");
}

// Item 7: a directory or an empty file as --config is refused (it trained defaults before).
TEST(Reliability, DirectoryOrEmptyConfigIsRefused) {
  const auto out = scratch("emptyconfig");
  fs::create_directories(out);
  auto r = run_shell(mpirun(1) + " train --config " + out);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("is a directory"), std::string::npos) << r.output;
  const auto empty = fs::path(out) / "empty.yaml";
  std::ofstream(empty) << "\n";
  r = run_shell(mpirun(1) + " train --config " + empty.string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("the config file is empty"), std::string::npos) << r.output;
  fs::remove_all(out);
}

}  // namespace

namespace {

// Runs `command` in the background; returns the launcher's pid (read from a file).
int start_background(const std::string& command, const std::string& log) {
  const auto pid_file = log + ".pid";
  run_shell(command + " > " + log + " 2>&1 & echo $! > " + pid_file);
  std::ifstream in(pid_file);
  int pid = 0;
  in >> pid;
  fs::remove(pid_file);
  return pid;
}

// Waits until `path` holds at least `rows` JSON lines (or ~60 s pass).
void wait_for_rows(const fs::path& path, size_t rows) {
  for (int i = 0; i < 600 && (!fs::exists(path) || read_jsonl(path).size() < rows); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

// The exit status of background job `pid` is not ours to wait for: poll until it is gone.
double wait_gone(int pid, double limit_s) {
  const auto start = std::chrono::steady_clock::now();
  while (kill(pid, 0) == 0 &&
         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < limit_s)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Processes still running with this out_dir ("[t]rain" matches "train" but not the shell that
// runs pgrep, whose command line holds the pattern itself).
int moeforge_processes(const std::string& out_dir) {
  return std::stoi(run_shell("pgrep -f '[t]rain.out_dir=" + out_dir + " ' | wc -l").output);
}

// Item 4: SIGTERM to mpirun mid-run: every rank stops at a step boundary, a checkpoint is
// written, no rank outlives mpirun, one message; the resumed run continues the loss curve of an
// uninterrupted run exactly.
TEST(Reliability, SigtermCheckpointsAndResumesExactly) {
  const auto whole = scratch("whole"), cut = scratch("cut");
  ASSERT_EQ(run_shell(mpirun(2) + tiny_run(whole, 60)).exit_code, 0);
  const auto log = cut + ".log";
  const int pid = start_background(mpirun(2) + tiny_run(cut, 60), log);
  wait_for_rows(fs::path(cut) / "metrics.jsonl", 5);
  kill(pid, SIGTERM);
  EXPECT_LT(wait_gone(pid, 60), 60.0);
  EXPECT_EQ(moeforge_processes(cut), 0) << "a rank outlived mpirun";
  const auto output = read_text(log);
  EXPECT_EQ(count(output, "stopped by signal 15"), 1u) << output;
  ASSERT_EQ(run_shell(mpirun(2) + tiny_run(cut, 60) + " --resume").exit_code, 0);
  std::map<int64_t, double> expected, resumed;
  for (const auto& row : read_jsonl(fs::path(whole) / "metrics.jsonl"))
    if (row.contains("loss")) expected[row["step"]] = row["loss"];
  for (const auto& row : read_jsonl(fs::path(cut) / "metrics.jsonl"))
    if (row.contains("loss")) resumed[row["step"]] = row["loss"];
  ASSERT_EQ(resumed.size(), expected.size());
  for (const auto& [step, loss] : expected)
    EXPECT_DOUBLE_EQ(resumed[step], loss) << "step " << step;
  fs::remove_all(whole);
  fs::remove_all(cut);
  fs::remove(log);
}

// Item 6: a stopped rank no longer hangs the job: the others' watchdog names the silent rank
// and the whole job exits non-zero within the timeout (worker on and off).
TEST(Reliability, StoppedRankAbortsTheJobWithinTheTimeout) {
  for (const char* worker : {"true", "false"}) {
    const auto out = scratch(std::string("stopped-") + worker);
    const auto log = out + ".log";
    const int pid =
        start_background(mpirun(2) + tiny_run(out, 100000) +
                             " --set parallel.timeout_s=5 --set parallel.comm_worker=" + worker,
                         log);
    wait_for_rows(fs::path(out) / "metrics.jsonl", 3);
    // The ranks are mpirun's children; stop the last one.
    run_shell("kill -STOP $(pgrep -P " + std::to_string(pid) + " | tail -1)");
    const double seconds = wait_gone(pid, 90);
    EXPECT_LT(seconds, 60.0) << "worker " << worker;
    run_shell("pkill -CONT -f '[t]rain.out_dir=" + out +
              " '; pkill -KILL -f '[t]rain.out_dir=" + out + " '");
    const auto output = read_text(log);
    EXPECT_NE(output.find("made no progress for 5 s (parallel.timeout_s)"), std::string::npos)
        << output;
    fs::remove_all(out);
    fs::remove(log);
  }
}

// Item 5: a step with non-finite gradients is skipped with a warning; too many in a row stop
// the run without checkpointing the broken state, and the last good checkpoint stays latest.
TEST(Reliability, NonFiniteGradientsAreSkippedOrStopTheRun) {
  const auto out = scratch("nan");
  auto r = run_shell("MOEFORGE_NAN_GRAD_AT=3 " + mpirun(2) + tiny_run(out, 6));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count(r.output, "step 3: gradient norm nan is not finite; update skipped"), 1u)
      << r.output;
  int skipped = 0;
  for (const auto& row : read_jsonl(fs::path(out) / "metrics.jsonl"))
    skipped += row.value("skipped", false) ? 1 : 0;
  EXPECT_EQ(skipped, 1);
  fs::remove_all(out);
  r = run_shell("MOEFORGE_NAN_GRAD_AT=3,4 " + mpirun(2) + tiny_run(out, 6) +
                " --set train.max_skipped_steps=1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_EQ(count(r.output, "more than train.max_skipped_steps = 1"), 1u) << r.output;
  std::ifstream latest(fs::path(out) / "checkpoints" / "latest");
  std::string name;
  latest >> name;
  EXPECT_EQ(name, "step-00000002");
  EXPECT_EQ(run_shell(mpirun(2) + tiny_run(out, 6) + " --resume").exit_code, 0);
  fs::remove_all(out);
}

}  // namespace

namespace {

// Item 7: each of the messages found wrong, now one clear line with the path or name and exit 2.
TEST(Reliability, ClearMessagesForBadCommandsAndPaths) {
  auto r = run_shell(mpirun(1) + " frobnicate");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("unknown command 'frobnicate'; the commands are train"),
            std::string::npos)
      << r.output;
  const auto out = scratch("messages");
  fs::create_directories(out);
  r = run_shell(std::string(MOEFORGE_BINARY) + " upcycle --from /nonexistent/dense --config " +
                kTiny + " --out " + out + "/up");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("no checkpoint to read a model from at '/nonexistent/dense'"),
            std::string::npos)
      << r.output;
  r = run_shell(mpirun(1) + " train --config " + kTiny + " --set data.source=text" +
                " --set data.path=" + out + " --set train.out_dir=" + out + "/run");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("data.path: '" + out + "': is a directory"), std::string::npos)
      << r.output;
  fs::remove_all(out);
}

}  // namespace
