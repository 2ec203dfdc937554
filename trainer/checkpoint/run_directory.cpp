#include "trainer/checkpoint/run_directory.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <utility>

#include "trainer/common/file_io.hpp"
#include "trainer/common/user_error.hpp"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

std::string host_name() {
  char name[256] = {};
  return ::gethostname(name, sizeof(name) - 1) == 0 ? std::string(name) : "unknown-host";
}

std::string now_text() {
  const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char text[64] = {};
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%S%z", std::localtime(&now));
  return text;
}

std::string new_run_id() {
  std::random_device entropy;
  return fmt::format("{:08x}{:08x}", entropy(), entropy());
}

}  // namespace

RunLock RunLock::acquire(const std::string& out_dir) {
  fs::create_directories(out_dir);
  const auto path = (fs::path(out_dir) / ".lock").string();
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0)
    throw UserError(fmt::format("{}: cannot open the run lock: {}", path, std::strerror(errno)));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    std::string holder = read_file(path);
    holder.erase(holder.find_last_not_of(" \n") + 1);
    throw UserError(fmt::format(
        "{}: the run directory is in use by another run ({}); wait for it, or choose another "
        "train.out_dir",
        out_dir, holder.empty() ? "holder unknown" : holder));
  }
  const auto holder =
      fmt::format("host {}, pid {}, since {}\n", host_name(), ::getpid(), now_text());
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, holder.data(), holder.size(), 0) < 0) {
    ::close(fd);
    throw UserError(fmt::format("{}: cannot write the run lock: {}", path, std::strerror(errno)));
  }
  return RunLock(fd);
}

RunLock::RunLock(RunLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

RunLock::~RunLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

void check_fresh_run_directory(const std::string& out_dir, bool overwrite) {
  if (overwrite) return;
  const fs::path dir(out_dir);
  // A training run leaves run.json and metrics.jsonl; checkpoints alone are a conversion's
  // (import / upcycle), which a new run may start next to: pruning never touches them.
  for (const char* entry : {"run.json", "metrics.jsonl"}) {
    if (fs::exists(dir / entry))
      throw UserError(fmt::format(
          "{}: already holds a run ({} exists); continue it with --resume, start over with "
          "--overwrite (deletes its checkpoints and metrics), or choose another train.out_dir",
          out_dir, entry));
  }
}

std::string start_fresh_run(const std::string& out_dir, bool overwrite) {
  const fs::path dir(out_dir);
  if (overwrite)
    for (const char* entry : {"checkpoints", "metrics.jsonl", "trace", "run.json"})
      fs::remove_all(dir / entry);
  fs::create_directories(dir);
  const std::string id = new_run_id();
  const nlohmann::json run = {{"run_id", id}, {"started", now_text()}, {"host", host_name()}};
  write_file_atomically((dir / "run.json").string(), run.dump(2) + "\n");
  return id;
}

std::optional<std::string> read_run_id(const std::string& out_dir) {
  const auto path = fs::path(out_dir) / "run.json";
  if (!fs::exists(path)) return std::nullopt;
  const auto run = nlohmann::json::parse(read_file(path.string()), nullptr, false);
  if (!run.is_object() || !run.contains("run_id") || !run["run_id"].is_string())
    throw UserError(fmt::format("{}: not a run identity file (no run_id)", path.string()));
  return run["run_id"].get<std::string>();
}

}  // namespace moeforge
