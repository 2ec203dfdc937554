#include "trainer/cli.hpp"
#include "trainer/common/host_allocator.hpp"

int main(int argc, char** argv) {
  moeforge::tune_host_allocator();
  return moeforge::run_cli(argc, argv);
}
