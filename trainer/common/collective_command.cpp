#include "trainer/common/collective_command.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <iostream>
#include <limits>
#include <string>

#include "trainer/common/user_error.hpp"

namespace moeforge {
namespace {

struct LocalCheck {
  int exit_code = 0;  // 0 = fine
  std::string message;
};

// Agrees across the world on whether any rank failed locally; returns the exit code (0 = go on).
int agree_on_local_failures(const LocalCheck& check, int rank) {
  int failing_rank = check.exit_code != 0 ? rank : std::numeric_limits<int>::max();
  int lowest = 0;
  MPI_Allreduce(&failing_rank, &lowest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (lowest == std::numeric_limits<int>::max()) return 0;
  int code = check.exit_code;
  MPI_Bcast(&code, 1, MPI_INT, lowest, MPI_COMM_WORLD);
  if (rank == lowest && !check.message.empty()) std::cerr << check.message << std::endl;
  return code;
}

}  // namespace

int run_collective_command(const std::function<void()>& prepare, const std::function<int()>& run,
                           int rank, int world_size) {
  LocalCheck check;
  try {
    prepare();
  } catch (const UserError& e) {
    check = {2, fmt::format("moeforge: error: {}", e.what())};
  } catch (const std::exception& e) {
    check = {1, fmt::format("moeforge: error on rank {}: {}", rank, e.what())};
  }
  if (const int code = agree_on_local_failures(check, rank); code != 0) return code;
  try {
    return run();
  } catch (const CollectiveError& e) {
    if (rank == 0) std::cerr << "moeforge: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    const bool user_error = dynamic_cast<const UserError*>(&e) != nullptr;
    std::cerr << fmt::format("moeforge: error on rank {}: {}", rank, e.what()) << std::endl;
    if (world_size > 1) MPI_Abort(MPI_COMM_WORLD, user_error ? 2 : 1);
    return user_error ? 2 : 1;
  }
}

}  // namespace moeforge
