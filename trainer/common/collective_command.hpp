#pragma once
// How a command that runs on every rank of an MPI job fails: one clear message and the same
// non-zero exit code on every rank, never a hang.
//   1. `prepare` does everything that can be checked on each rank alone (config, data,
//      checkpoint paths) — no collectives. The ranks then agree whether any failed; if one did,
//      the lowest failing rank prints its message and all return its code (2 for bad input).
//   2. `run` does the collective work. An error raised identically on every rank
//      (CollectiveError) is printed once and returns 1; any other error aborts the job
//      (MPI_Abort: 2 for bad input found only now, 1 otherwise) so no rank waits forever.
#include <functional>

namespace moeforge {

int run_collective_command(const std::function<void()>& prepare, const std::function<int()>& run,
                           int rank, int world_size);

}  // namespace moeforge
