#pragma once
// Preemption: SIGTERM, SIGINT and SIGUSR1 ask the run to stop at the next step boundary, where
// every rank agrees (inside the step's one all-reduce), writes a checkpoint when
// checkpoint.on_signal, and exits with 128 + the signal. A second stop signal, or any stop signal
// while no training run is listening (other commands, start-up), has the default action: the
// process ends, so Ctrl-C twice still kills.
//
// The signals never interrupt a compute thread: every thread blocks them and one thread waits
// for them (sigwait). A handler running on a compute thread pushes its frame at that thread's
// stack pointer, and oneDNN's generated f32 GEMM kernels (oneDNN ≤ 3.11.1; LibTorch 2.11 ships
// 3.10.2) point rsp into a heap workspace while they run: a preemption signal arriving then
// corrupted the heap (glibc abort "corrupted size vs. prev_size" in a later free). Children are
// spawned with nothing blocked (trainer/common/shell_command.hpp).
namespace moeforge {

// First thing in main, before any other thread exists (threads inherit the signal mask):
// blocks the stop signals in this thread and starts the one thread that receives them.
void route_stop_signals();

// From here on the first stop signal is a request (requested_stop_signal) instead of the end.
void listen_for_stop_signals();

// The signal received (0 = none).
int requested_stop_signal();

}  // namespace moeforge
