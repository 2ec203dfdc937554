// Raw MPI throughput between two ranks, one direction vs both at once (what every all-to-all
// does), in interleaved rounds; used to see what a (shaped) network link gives MPI:
//
//   launch/cluster.sh run --nodes 2 --slots 1 --rate 200mbit --
//     launch/cluster.sh mpirun -n 2 build/bench/bench_mpi_exchange [MiB] [rounds]
//
// Prints the median [min, max] Mbit/s per direction over the rounds. No LibTorch.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

// Seconds for one transfer of `bytes`: rank 0 → rank 1 only, or both ways at once.
double transfer(std::vector<char>& out, std::vector<char>& in, bool both_ways) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const int peer = 1 - rank, n = static_cast<int>(out.size());
  MPI_Barrier(MPI_COMM_WORLD);
  const double start = MPI_Wtime();
  MPI_Request requests[2];
  int count = 0;
  if (both_ways || rank == 1)
    MPI_Irecv(in.data(), n, MPI_CHAR, peer, 0, MPI_COMM_WORLD, &requests[count++]);
  if (both_ways || rank == 0)
    MPI_Isend(out.data(), n, MPI_CHAR, peer, 0, MPI_COMM_WORLD, &requests[count++]);
  MPI_Waitall(count, requests, MPI_STATUSES_IGNORE);
  MPI_Barrier(MPI_COMM_WORLD);  // the one-way time ends when the receiver has it
  return MPI_Wtime() - start;
}

void report(const char* label, std::vector<double> mbits) {
  std::sort(mbits.begin(), mbits.end());
  std::printf("  %-28s %7.1f Mbit/s per direction [%.1f, %.1f]\n", label, mbits[mbits.size() / 2],
              mbits.front(), mbits.back());
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size != 2) {
    if (rank == 0) std::fprintf(stderr, "bench_mpi_exchange: run it with exactly 2 ranks\n");
    MPI_Finalize();
    return 2;
  }
  const double mib = argc > 1 ? std::atof(argv[1]) : 8.0;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 5;
  std::vector<char> out(static_cast<size_t>(mib * (1 << 20)), 1), in(out.size());
  std::vector<double> one_way, both_ways;
  transfer(out, in, true);  // warm-up: connections opened
  for (int r = 0; r < rounds; ++r) {
    one_way.push_back(out.size() * 8 / transfer(out, in, false) / 1e6);
    both_ways.push_back(out.size() * 8 / transfer(out, in, true) / 1e6);
  }
  if (rank == 0) {
    std::printf("%.2f MiB messages, %d interleaved rounds, median [min, max]\n", mib, rounds);
    report("one direction", one_way);
    report("both directions at once", both_ways);
  }
  MPI_Finalize();
  return 0;
}
