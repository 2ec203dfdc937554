#include "trainer/cli.hpp"
#include "trainer/common/host_allocator.hpp"

int main(int argc, char** argv) {
  moeforge::tune_host_allocator();
  moeforge::bound_onednn_primitive_cache();
  return moeforge::run_cli(argc, argv);
}
