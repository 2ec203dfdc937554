#pragma once
// Who owns a run directory (train.out_dir) and who may write into it.
//
//   <out_dir>/.lock     exclusive advisory lock (flock) held by rank 0 for the whole run; the
//                       file names the holder (host, pid, start time). The kernel drops a
//                       flock when its process dies, so a stale file never blocks a new run.
//                       On NFS, Linux maps flock onto NFS byte-range locks (NFSv4, or v3 with
//                       lockd): it protects as far as the server's lock manager does; on
//                       filesystems without locking it protects nothing (docs/reliability.md).
//   <out_dir>/run.json  the run's identity (run_id, start time); every checkpoint records the
//                       run_id, and pruning only ever deletes checkpoints of the current run.
#include <optional>
#include <string>

namespace moeforge {

class RunLock {
 public:
  // Takes the lock or throws UserError naming the holder.
  static RunLock acquire(const std::string& out_dir);
  RunLock(RunLock&& other) noexcept;
  RunLock& operator=(RunLock&&) = delete;
  RunLock(const RunLock&) = delete;
  ~RunLock();

 private:
  explicit RunLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

// UserError when a fresh (not resumed) run would start in a directory that already holds a
// training run (run.json or metrics.jsonl), unless `overwrite`. A conversion's checkpoints
// (import / upcycle) do not count: the README's upcycle-then-train flow trains next to them.
void check_fresh_run_directory(const std::string& out_dir, bool overwrite);

// Starts a fresh run in `out_dir`: with `overwrite`, removes the previous run's checkpoints,
// metrics and trace; writes run.json with a new run id and returns it.
std::string start_fresh_run(const std::string& out_dir, bool overwrite);

// The run id of `out_dir/run.json`, if there is one.
std::optional<std::string> read_run_id(const std::string& out_dir);

}  // namespace moeforge
