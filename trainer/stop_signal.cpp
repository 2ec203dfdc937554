#include "trainer/stop_signal.hpp"

#include <pthread.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <thread>

namespace moeforge {
namespace {

std::atomic<int> g_stop_signal{0};
std::atomic<bool> g_listening{false};

sigset_t stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  for (const int signal : {SIGTERM, SIGINT, SIGUSR1}) sigaddset(&set, signal);
  return set;
}

// The default action of `signal` (each stop signal's ends the process), taken on this thread.
[[noreturn]] void end_by(int signal) {
  std::signal(signal, SIG_DFL);  // moeforge installs no handler; a library might have
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, signal);
  pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
  raise(signal);  // directed at this thread, the only one not blocking it: delivered here
  std::_Exit(128 + signal);
}

void receive_stop_signals() {
  const sigset_t set = stop_signals();
  for (;;) {
    int signal = 0;
    if (sigwait(&set, &signal) != 0) continue;
    int none = 0;
    if (!g_listening || !g_stop_signal.compare_exchange_strong(none, signal)) end_by(signal);
  }
}

}  // namespace

void route_stop_signals() {
  const sigset_t set = stop_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread(receive_stop_signals).detach();
}

void listen_for_stop_signals() {
  g_listening = true;
}

int requested_stop_signal() {
  return g_stop_signal;
}

}  // namespace moeforge
