#pragma once
// UserError: a failure caused by the user's input (config, CLI, checkpoint, data) rather than
// by a bug. main() prints its message without a stack dump and exits non-zero; every
// user-facing message says what went wrong, where (file, line, key / tensor) and what is allowed.
#include <stdexcept>
#include <string>

namespace moeforge {

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& message) : std::runtime_error(message) {}
};

// A failure every rank of the job raises at the same point with the same message (decided on
// values all ranks agreed on, e.g. a world-reduced gradient norm): the job can stop without
// MPI_Abort, printed once by rank 0.
class CollectiveError : public std::runtime_error {
 public:
  explicit CollectiveError(const std::string& message) : std::runtime_error(message) {}
};

// Throws UserError(message) when `condition` is false.
void require(bool condition, const std::string& message);

}  // namespace moeforge
