#include "trainer/cli.hpp"

int main(int argc, char** argv) { return moeforge::run_cli(argc, argv); }
