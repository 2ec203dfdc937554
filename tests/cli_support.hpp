#pragma once
// Helpers for the tests that drive the real `moeforge` binary (and launch scripts) as a user
// does: run a shell command and capture its output and exit code, mpirun prefixes, scratch
// directories.
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace cli_testing {

namespace fs = std::filesystem;

struct Result {
  int exit_code = -1;
  std::string output;  // stdout + stderr
  double seconds = 0;
};

inline Result run_shell(const std::string& command) {
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

inline std::string mpirun(int ranks) {
  return std::string("OMP_NUM_THREADS=1 ") + MOEFORGE_MPIEXEC +
         " --allow-run-as-root --oversubscribe --bind-to none -n " + std::to_string(ranks) + " " +
         MOEFORGE_BINARY;
}

inline std::string scratch(const std::string& tag) {
  const auto dir =
      fs::temp_directory_path() / ("moeforge-cli-" + tag + "-" + std::to_string(getpid()));
  fs::remove_all(dir);
  return dir.string();
}

inline size_t count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + 1))
    ++n;
  return n;
}

inline std::vector<nlohmann::json> read_jsonl(const fs::path& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

inline const std::string kTiny = std::string(MOEFORGE_SOURCE_DIR) + "/configs/tiny.yaml";

// `moeforge train` of configs/tiny.yaml on `ranks` ranks into `out_dir`, plus `options`.
inline Result train_tiny(int ranks, const std::string& out_dir, const std::string& options) {
  return run_shell(mpirun(ranks) + " train --config " + kTiny + " --set train.out_dir=" + out_dir +
                   " " + options);
}

}  // namespace cli_testing
