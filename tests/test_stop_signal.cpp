// Stop signals (trainer/stop_signal.hpp): never delivered on a compute thread, a request once a
// run listens, the default action otherwise and the second time; children start unblocked.
// Each case runs in a fresh process (death tests): the routing is process-wide and one-way.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "trainer/common/shell_command.hpp"
#include "trainer/stop_signal.hpp"

namespace moeforge {
namespace {

bool blocks_stop_signals() {
  sigset_t mask;
  pthread_sigmask(SIG_BLOCK, nullptr, &mask);
  return sigismember(&mask, SIGTERM) && sigismember(&mask, SIGINT) && sigismember(&mask, SIGUSR1);
}

// requested_stop_signal() after the process sent itself `signal`, within 5 s.
int request_after(int signal) {
  kill(getpid(), signal);
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (requested_stop_signal() == 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return requested_stop_signal();
}

// Sends `signal` to this process and exits with 2 if still alive 5 s later.
[[noreturn]] void send_and_outlive(int signal) {
  kill(getpid(), signal);
  std::this_thread::sleep_for(std::chrono::seconds(5));
  std::_Exit(2);
}

class StopSignal : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST_F(StopSignal, ComputeThreadsBlockThemAndTheFirstIsARequest) {
  EXPECT_EXIT(
      {
        route_stop_signals();
        bool worker_blocks = false;
        std::thread([&] { worker_blocks = blocks_stop_signals(); }).join();
        listen_for_stop_signals();
        const int received = request_after(SIGTERM);
        std::fprintf(stderr, "main blocks %d, later thread blocks %d, request %d\n",
                     blocks_stop_signals(), worker_blocks, received);
        std::_Exit(blocks_stop_signals() && worker_blocks && received == SIGTERM ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "main blocks 1, later thread blocks 1, request 15");
}

TEST_F(StopSignal, TheSecondSignalEndsTheProcess) {
  EXPECT_EXIT(
      {
        route_stop_signals();
        listen_for_stop_signals();
        if (request_after(SIGUSR1) != SIGUSR1) std::_Exit(1);
        send_and_outlive(SIGINT);
      },
      ::testing::KilledBySignal(SIGINT), "");
}

TEST_F(StopSignal, WithoutARunListeningTheDefaultActionStays) {
  EXPECT_EXIT(
      {
        route_stop_signals();
        send_and_outlive(SIGTERM);
      },
      ::testing::KilledBySignal(SIGTERM), "");
}

// /proc's SigBlk line of a child started by run_shell_command, and its exit status.
TEST_F(StopSignal, ShellCommandsStartWithNothingBlockedAndReportTheirStatus) {
  EXPECT_EXIT(
      {
        route_stop_signals();
        const std::string out =
            ::testing::TempDir() + "/moeforge-sigblk-" + std::to_string(getpid());
        const int status = run_shell_command("grep SigBlk /proc/self/status > " + out + "; exit 3");
        std::ifstream in(out);
        std::string line;
        std::getline(in, line);
        std::remove(out.c_str());
        std::fprintf(stderr, "[%s] exit %d\n", line.c_str(),
                     WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        std::_Exit(0);
      },
      ::testing::ExitedWithCode(0), "\\[SigBlk:\t0000000000000000\\] exit 3");
}

}  // namespace
}  // namespace moeforge
