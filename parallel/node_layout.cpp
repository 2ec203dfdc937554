#include "parallel/node_layout.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <set>

namespace moeforge::parallel {

NodeLayout discover_node_layout(MPI_Comm world) {
  int rank = 0, size = 1;
  MPI_Comm_rank(world, &rank);
  MPI_Comm_size(world, &size);
  MPI_Comm node;
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
  int node_rank = 0;
  MPI_Comm_rank(node, &node_rank);
  // The node's lowest world rank names it (the node communicator keeps world order).
  int leader = rank;
  MPI_Bcast(&leader, 1, MPI_INT, 0, node);
  MPI_Comm_free(&node);
  std::vector<int> leaders(size);
  MPI_Allgather(&leader, 1, MPI_INT, leaders.data(), 1, MPI_INT, world);
  std::map<int, int> index;
  for (const int l : leaders) index.emplace(l, 0);
  int next = 0;
  for (auto& [l, i] : index) i = next++;
  NodeLayout layout;
  layout.nodes = next;
  for (const int l : leaders) layout.node_of_rank.push_back(index[l]);
  return layout;
}

int nodes_spanned(const NodeLayout& layout, int first, int ep_size) {
  std::set<int> nodes(layout.node_of_rank.begin() + first,
                      layout.node_of_rank.begin() + first + ep_size);
  return static_cast<int>(nodes.size());
}

int ep_ranks_per_node(const NodeLayout& layout, int first, int ep_size) {
  const int nodes = nodes_spanned(layout, first, ep_size);
  if (ep_size % nodes != 0) return 0;
  const int run = ep_size / nodes;
  for (int i = 0; i < ep_size; ++i)
    if (layout.node_of_rank[first + i] != layout.node_of_rank[first + i / run * run]) return 0;
  return run;
}

namespace {

std::string ranks_per_node(const NodeLayout& layout) {
  std::vector<int> counts(layout.nodes, 0);
  for (const int n : layout.node_of_rank) ++counts[n];
  if (std::all_of(counts.begin(), counts.end(), [&](int c) { return c == counts[0]; }))
    return fmt::format("{} node(s) × {} rank(s)", layout.nodes, counts[0]);
  return fmt::format("{} nodes with {} ranks", layout.nodes, fmt::join(counts, "/"));
}

// Every expert group (E / num_groups consecutive experts) of EP group 0 on one node?
bool groups_on_single_nodes(const NodeLayout& layout, int ep_size, int64_t num_experts,
                            int64_t num_groups) {
  const int64_t per_rank = num_experts / ep_size, per_group = num_experts / num_groups;
  for (int64_t g = 0; g < num_groups; ++g) {
    std::set<int> nodes;
    for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e)
      nodes.insert(layout.node_of_rank[static_cast<size_t>(e / per_rank)]);
    if (nodes.size() > 1) return false;
  }
  return true;
}

}  // namespace

std::string describe_node_layout(const NodeLayout& layout, int ep_size, int64_t num_experts,
                                 int64_t num_groups) {
  const int world = static_cast<int>(layout.node_of_rank.size());
  int span = 1;
  for (int first = 0; first < world; first += ep_size)
    span = std::max(span, nodes_spanned(layout, first, ep_size));
  std::string text = "topology: " + ranks_per_node(layout) + "; ";
  if (span == 1) {
    text += layout.nodes > 1 ? "expert parallelism inside nodes, data parallelism across nodes"
                             : "one node";
    return text;
  }
  text += fmt::format("expert-parallel groups span {} nodes (the expert all-to-all crosses nodes)",
                      span);
  if (num_groups <= 1)
    return text +
           fmt::format("; moe.router.num_groups: {} would align expert groups to nodes", span);
  return text + (groups_on_single_nodes(layout, ep_size, num_experts, num_groups)
                     ? "; group-limited routing aligned to nodes (each expert group on one node)"
                     : fmt::format("; moe.router.num_groups {} is not aligned to nodes ({} per EP "
                                   "group)",
                                   num_groups, span));
}

}  // namespace moeforge::parallel
