#include "parallel/process_groups.hpp"

#include <fmt/format.h>

#include "parallel/mpi_communicator.hpp"
#include "parallel/queued_communicator.hpp"
#include "parallel/simulated_link.hpp"
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

ProcessGroups with_communication_options(const ProcessGroups& groups, bool worker,
                                         const LinkModel& link) {
  if (groups.world->size() <= 1) return groups;
  const auto wrap =
      [&](const std::shared_ptr<Communicator>& comm) -> std::shared_ptr<Communicator> {
    std::shared_ptr<Communicator> result = comm;
    if (link.bandwidth_gbps > 0) result = std::make_shared<SimulatedLinkCommunicator>(result, link);
    if (worker) result = std::make_shared<QueuedCommunicator>(result);
    return result;
  };
  ProcessGroups wrapped = groups;
  wrapped.world = wrap(groups.world);
  // EP/EDP may be the world communicator itself (ep = 1 or ep = W): keep that sharing.
  wrapped.ep = groups.ep == groups.world ? wrapped.world : wrap(groups.ep);
  wrapped.edp = groups.edp == groups.world ? wrapped.world
                : groups.edp == groups.ep  ? wrapped.ep
                                           : wrap(groups.edp);
  return wrapped;
}

}  // namespace moeforge::parallel
