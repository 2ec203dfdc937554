#pragma once
// Process topology (docs/architecture.md, "Process topology"):
//   world: all W ranks;
//   ep:    expert-parallel group k = ranks [k*ep_size, (k+1)*ep_size) — together they hold all
//          experts, E/ep_size each; global expert g lives on EP-rank g / (E/ep_size);
//   edp:   expert-data-parallel group = ranks with the same EP-rank in every EP group; expert
//          gradients are reduced over it, non-expert gradients over world.
// Creating groups is collective over the world communicator.
#include <c10/core/Device.h>

#include <memory>

#include "parallel/communicator.hpp"

namespace moeforge::parallel {

class MpiCommunicator;

struct ProcessGroups {
  std::shared_ptr<Communicator> world;
  std::shared_ptr<Communicator> ep;
  std::shared_ptr<Communicator> edp;
  int ep_size = 1;
  int ep_ranks_per_node = 0;  // the EP group's ranks per node (node_layout.hpp); 0 = unknown

  int ep_rank() const { return ep->rank(); }
  int dp_rank() const { return edp->rank(); }  // which EP group this rank is in
};

// Splits `world` into EP and EDP groups. Throws std::invalid_argument when ep_size does not
// divide W (the trainer's config check reports that to the user first).
ProcessGroups make_process_groups(const MpiCommunicator& world, int ep_size);

// One-rank groups (world = ep = edp = this process, no MPI needed) for tests and tools.
ProcessGroups make_single_process_groups();

enum class Backend { kMpi, kNccl };

// The same groups on `backend`, taking tensors of any device. kNccl: one NCCL communicator per
// distinct group, bootstrapped over that group (its unique id broadcast), on CUDA `device`;
// needs a CUDA build (throws otherwise). Either backend stages tensors that are not in its
// native memory (MPI: host; NCCL: `device`) through a copy (parallel/staging_communicator.hpp).
// Collective over the world when kNccl.
ProcessGroups with_backend(const ProcessGroups& groups, Backend backend, c10::Device device);

struct LinkModel;

// The same groups with every collective slowed to `link` (when its bandwidth is > 0) and run on
// the communication worker (when `worker`; parallel/comm_worker.hpp). Single-process groups are
// returned unchanged: they have nothing to overlap.
ProcessGroups with_communication_options(const ProcessGroups& groups, bool worker,
                                         const LinkModel& link);

}  // namespace moeforge::parallel
