#include "parallel/process_groups.hpp"

#include <fmt/format.h>

#include "parallel/mpi_communicator.hpp"
#include "trainer/user_error.hpp"

namespace moeforge::parallel {

ProcessGroups make_process_groups(const MpiCommunicator& world, int ep_size) {
  const int world_size = world.size();
  require(
      ep_size >= 1 && world_size % ep_size == 0,
      fmt::format("parallel.ep_size = {} does not divide the world size {}", ep_size, world_size));
  const int rank = world.rank();
  ProcessGroups groups;
  groups.ep_size = ep_size;
  groups.world = world.split(/*color=*/0, /*key=*/rank);
  groups.ep = world.split(/*color=*/rank / ep_size, /*key=*/rank);
  groups.edp = world.split(/*color=*/rank % ep_size, /*key=*/rank);
  return groups;
}

ProcessGroups make_single_process_groups() {
  ProcessGroups groups;
  groups.world = std::make_shared<SelfCommunicator>();
  groups.ep = groups.world;
  groups.edp = groups.world;
  return groups;
}

}  // namespace moeforge::parallel
