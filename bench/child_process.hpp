#pragma once
// Benchmark plumbing: run a measurement in a forked child so cases do not share a high-water
// mark (peak RSS) or warmed allocator state, and read the resident set of this process.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <functional>
#include <type_traits>

namespace moeforge::bench {

// Resident set size of this process now, in KiB (not the peak).
inline long current_rss_kb() {
  FILE* f = fopen("/proc/self/statm", "r");
  long pages = 0, resident = 0;
  if (f) {
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    fclose(f);
  }
  return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

// `measure()` run in a forked child; its result comes back through a pipe ({} if the child
// failed). All ATen work must happen in the child, so no OpenMP thread pool is ever forked.
template <class Result>
Result run_in_child(const std::function<Result()>& measure) {
  static_assert(std::is_trivially_copyable_v<Result>);
  std::fflush(nullptr);  // or the child inherits unwritten output and writes it a second time
  int fds[2];
  if (pipe(fds) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    const Result result = measure();
    if (write(fds[1], &result, sizeof(result)) != sizeof(result)) _exit(1);
    _exit(0);
  }
  close(fds[1]);
  Result result;
  if (read(fds[0], &result, sizeof(result)) != sizeof(result)) result = {};
  close(fds[0]);
  waitpid(pid, nullptr, 0);
  return result;
}

}  // namespace moeforge::bench
