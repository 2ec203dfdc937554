// Why trainer/stop_signal routes the stop signals to one thread (docs/reliability.md): oneDNN's
// generated f32 GEMM kernels (oneDNN <= 3.11.1, oneDNN issue #4845) point rsp into a heap
// workspace while they run, so a signal handler that runs on the computing thread writes its
// frame onto the heap. This program sends a stream of signals to itself while one thread runs
// CPU fp32 products through moe::gemm_into, once with the handler free to run on that thread and
// once with the signal blocked there and taken by a thread of its own (sigwait), as moeforge
// does, and says how each run ended. Each run is a forked child. Not a timing: an outcome.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "moe/cpu_gemm.hpp"

namespace {

struct Case {
  int64_t m, k, n;
  bool a_transposed;
  bool accumulate;
  std::string label() const {
    return std::to_string(m) + "x" + std::to_string(k) + "x" + std::to_string(n) +
           (a_transposed ? " aᵀ" : "") + (accumulate ? " +=" : "");
  }
};

std::atomic<long> g_handled{0};
extern "C" void count_signal(int) {
  g_handled.fetch_add(1, std::memory_order_relaxed);
}

// The signal blocked on this thread and on threads made later; one thread takes it.
void route_to_one_thread(int signal) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, signal);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread([set] {
    for (int received = 0;;)
      if (sigwait(&set, &received) == 0) count_signal(received);
  }).detach();
}

// In a child: products of `c` while another thread sends SIGUSR2 every 10 µs. Exits 0.
[[noreturn]] void products_under_signals(const Case& c, bool routed, int products) {
  struct sigaction action {};
  action.sa_handler = count_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGUSR2, &action, nullptr);
  if (routed) route_to_one_thread(SIGUSR2);
  at::set_num_threads(1);
  std::atomic<bool> done{false};
  std::thread sender([&] {
    while (!done) {
      kill(getpid(), SIGUSR2);
      std::this_thread::sleep_for(std::chrono::microseconds(10));
    }
  });
  const auto a = c.a_transposed ? at::randn({c.k, c.m}).t() : at::randn({c.m, c.k});
  const auto b = at::randn({c.k, c.n});
  const auto out = at::zeros({c.m, c.n});
  for (int i = 0; i < products; ++i) {
    const auto heap_traffic = at::empty({1000 + i % 700});  // blocks beside the workspace
    moeforge::moe::gemm_into(out, a, b, c.accumulate);
  }
  done = true;
  sender.join();
  std::printf("    %ld signals handled\n", g_handled.load());
  std::fflush(stdout);
  std::_Exit(0);
}

std::string outcome(const Case& c, bool routed, int products) {
  std::fflush(nullptr);
  const pid_t child = fork();
  if (child == 0) products_under_signals(c, routed, products);
  int status = 0;
  waitpid(child, &status, 0);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "completed";
  if (WIFSIGNALED(status)) return std::string("died: ") + strsignal(WTERMSIG(status));
  return "exit " + std::to_string(WEXITSTATUS(status));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Signals during oneDNN GEMMs: a handler on the computing thread vs one thread"};
  int products = 60000;
  app.add_option("--products", products, "products per run")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  std::printf("kernel for CPU fp32 products: %s\n",
              moeforge::moe::cpu_gemm() == moeforge::moe::CpuGemm::kOneDnn ? "oneDNN" : "ATen");
  // Shapes that oneDNN 3.10.2 runs with gemm:jit:f32 (ONEDNN_VERBOSE=1), as the experts do.
  const Case cases[] = {
      {128, 256, 128, false, false}, {256, 128, 128, true, true}, {128, 256, 128, true, true}};
  for (const auto& c : cases)
    for (const bool routed : {false, true}) {
      std::printf("%-20s %-30s\n", c.label().c_str(),
                  routed ? "blocked, taken by one thread" : "handler on the computing thread");
      std::printf("    %s\n", outcome(c, routed, products).c_str());
    }
}
