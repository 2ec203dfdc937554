// GoogleTest main for tests that use MPI (single- or multi-rank). Only rank 0 prints results;
// a failure on any rank makes every rank exit non-zero.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>

#include "trainer/common/host_allocator.hpp"

int main(int argc, char** argv) {
  moeforge::tune_host_allocator();  // as the trainer's main does, before any thread starts
  moeforge::bound_onednn_primitive_cache();
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // MOEFORGE_TEST_ALL_RANKS=1 keeps every rank's report (for debugging a rank-specific failure).
  if (rank != 0 && std::getenv("MOEFORGE_TEST_ALL_RANKS") == nullptr) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS();
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any_failed;
}
