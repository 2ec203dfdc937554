#pragma once
#include <string>

namespace moeforge {

// std::system for a child the user may interrupt: `sh -c command`, started with no signal
// blocked. The process blocks its stop signals on every thread (trainer/stop_signal.hpp) and a
// child would inherit that mask; std::system keeps it. Returns the wait status (0 = success).
int run_shell_command(const std::string& command);

}  // namespace moeforge
