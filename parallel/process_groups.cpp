#include "parallel/process_groups.hpp"

#include <fmt/format.h>

#include <functional>
#include <stdexcept>

#include "parallel/mpi_communicator.hpp"
#include "parallel/queued_communicator.hpp"
#include "parallel/simulated_link.hpp"
#include "parallel/staging_communicator.hpp"
#ifdef MOEFORGE_CUDA
#include "parallel/nccl_communicator.hpp"
#endif

namespace moeforge::parallel {

ProcessGroups make_process_groups(const MpiCommunicator& world, int ep_size) {
  const int world_size = world.size();
  if (ep_size < 1 || world_size % ep_size != 0)
    throw std::invalid_argument(fmt::format(
        "parallel.ep_size = {} does not divide the world size {}", ep_size, world_size));
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

namespace {

// Applies `make` to each distinct communicator of `groups`, keeping the sharing between world,
// EP and EDP (one of them may be another: ep = 1 or ep = W).
ProcessGroups map_groups(
    const ProcessGroups& groups,
    const std::function<std::shared_ptr<Communicator>(const std::shared_ptr<Communicator>&)>&
        make) {
  ProcessGroups mapped = groups;
  mapped.world = make(groups.world);
  mapped.ep = groups.ep == groups.world ? mapped.world : make(groups.ep);
  mapped.edp = groups.edp == groups.world ? mapped.world
               : groups.edp == groups.ep  ? mapped.ep
                                          : make(groups.edp);
  return mapped;
}

}  // namespace

ProcessGroups with_backend(const ProcessGroups& groups, Backend backend, c10::Device device) {
  if (backend == Backend::kMpi)
    return map_groups(groups, [](const std::shared_ptr<Communicator>& comm) {
      return std::make_shared<StagingCommunicator>(comm, c10::Device(c10::kCPU));
    });
#ifdef MOEFORGE_CUDA
  return map_groups(groups, [device](const std::shared_ptr<Communicator>& comm) {
    auto nccl = std::make_shared<NcclCommunicator>(*comm, device.index());
    return std::make_shared<StagingCommunicator>(std::move(nccl), device);
  });
#else
  (void)device;
  throw std::runtime_error("the NCCL backend needs a CUDA build of moeforge");
#endif
}

ProcessGroups with_communication_options(const ProcessGroups& groups, bool worker,
                                         const LinkModel& link) {
  if (groups.world->size() <= 1) return groups;
  return map_groups(groups, [&](const std::shared_ptr<Communicator>& comm) {
    std::shared_ptr<Communicator> result = comm;
    if (link.bandwidth_gbps > 0) result = std::make_shared<SimulatedLinkCommunicator>(result, link);
    if (worker) result = std::make_shared<QueuedCommunicator>(result);
    return result;
  });
}

}  // namespace moeforge::parallel
