#pragma once
// Preemption: SIGTERM, SIGINT and SIGUSR1 ask the run to stop at the next step boundary, where
// every rank agrees (inside the step's one all-reduce), writes a checkpoint when
// checkpoint.on_signal, and exits with 128 + the signal. A second SIGINT / SIGTERM falls back to
// the default action (the handler is one-shot), so Ctrl-C twice still kills.
namespace moeforge {

void install_stop_signal_handlers();

// The signal received (0 = none).
int requested_stop_signal();

}  // namespace moeforge
