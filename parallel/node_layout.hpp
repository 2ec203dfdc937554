#pragma once
// Which node each rank runs on, and how the run's groups lie on the nodes. Multi-node training
// wants expert-parallel groups inside a node (the dispatch/combine all-to-all stays on shared
// memory or NVLink) and data parallelism across nodes (one gradient all-reduce per step crosses
// the network); ranks [k·ep, (k+1)·ep) form EP group k, so with mpirun's default by-slot mapping
// that holds when ep_size divides the ranks per node. When an EP group must span nodes,
// group-limited routing with num_groups = nodes per EP group keeps each expert group on one node,
// so topk_groups bounds how many nodes a token's experts are on.
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge::parallel {

struct NodeLayout {
  std::vector<int> node_of_rank;  // by world rank; nodes numbered in order of their lowest rank
  int nodes = 1;
};

// Collective over `world`: ranks that can share memory (MPI_COMM_TYPE_SHARED) are one node.
NodeLayout discover_node_layout(MPI_Comm world);

// Nodes an EP group of `ep_size` ranks starting at world rank `first` spans.
int nodes_spanned(const NodeLayout& layout, int first, int ep_size);

// Ranks per node of that EP group when it is cut into equal runs of consecutive ranks, one run
// per node (what the two-hop dispatch needs); 0 when it is not.
int ep_ranks_per_node(const NodeLayout& layout, int first, int ep_size);

// One line for the start banner: nodes × ranks, where EP and data parallelism run, and whether
// group-limited routing (num_groups > 1) is aligned to nodes.
std::string describe_node_layout(const NodeLayout& layout, int ep_size, int64_t num_experts,
                                 int64_t num_groups);

}  // namespace moeforge::parallel
