#!/usr/bin/env bash
# OpenMPI's remote-launch agent for launch/cluster.sh (`--mca plm_rsh_agent`): called like ssh,
#   cluster_agent.sh [ssh-style options] HOST COMMAND...
# it runs COMMAND (a shell command line, as ssh would) inside the network and UTS namespaces of
# the emulated node whose address is HOST. MOEFORGE_CLUSTER_STATE names the cluster's state
# directory (set by `launch/cluster.sh mpirun`).
set -euo pipefail
while [[ ${1:-} == -* ]]; do shift; done
host="${1:?cluster_agent.sh: no host}"
shift
state="${MOEFORGE_CLUSTER_STATE:?cluster_agent.sh: MOEFORGE_CLUSTER_STATE is not set}"
node="$(awk -v h="$host" '$1 == h { print $2 }' "$state/addresses")"
[[ -n $node ]] || { echo "cluster_agent.sh: $host is not a node of $state" >&2; exit 255; }
name="$(basename "$state")"
exec nsenter --net="/run/netns/$name-n$node" --uts="$state/uts$node" -- /bin/sh -c "$*"
