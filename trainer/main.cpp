#include "trainer/cli.hpp"
#include "trainer/common/host_allocator.hpp"
#include "trainer/stop_signal.hpp"

int main(int argc, char** argv) {
  moeforge::tune_host_allocator();
  // Before MPI, OpenMP or LibTorch start threads: they inherit the blocked stop signals.
  moeforge::route_stop_signals();
  moeforge::bound_onednn_primitive_cache();
  return moeforge::run_cli(argc, argv);
}
