#!/usr/bin/env bash
# An emulated cluster on one Linux machine: every "node" is a network namespace with its own
# address and hostname (a UTS namespace), joined to a bridge by a veth pair, each link shaped
# with the tbf qdisc; OpenMPI runs across the nodes over TCP (shared memory inside a node).
#
#   launch/cluster.sh run [--nodes 2] [--slots 2] [--rate 5gbit] -- COMMAND...
#       brings a cluster up, runs COMMAND on the host with MOEFORGE_CLUSTER set, tears the
#       cluster down afterwards (also after a failure or a signal); exits with COMMAND's status
#   launch/cluster.sh mpirun [MPIRUN ARGS...]     (inside `run`, or with MOEFORGE_CLUSTER=NAME)
#       mpirun started on node 0 with the cluster's hostfile and the settings it needs
#   launch/cluster.sh up [--name NAME] [--nodes N] [--slots S] [--rate R] [--burst B]
#   launch/cluster.sh down NAME | down --stale    (--stale: clusters whose owner process died)
#   launch/cluster.sh shape NAME RATE|off         change every link's bandwidth at once
#   launch/cluster.sh link NAME NODE up|down      cut or restore one node's link
#   launch/cluster.sh kill NAME NODE [--all]      SIGKILL one node's ranks (--all: and its daemon)
#   launch/cluster.sh traffic NAME                bytes each node sent / received on its link
#   launch/cluster.sh check                       exit 0 if clusters can be made here, else 77
#
# Environment: CLUSTER_TCP_LINKS (TCP connections per rank pair, default 2), CLUSTER_KEEPALIVE_S
# (mpirun's out-of-band keepalive idle time, default 1; 0 turns keepalives off), CLUSTER_QUIET.
#
# Must run as root. Nothing outside the cluster's own namespaces is touched: the bridge lives in
# a "switch" namespace of its own, and every name carries the cluster's unique name.
# Latency is not shaped: the tbf qdisc shapes bandwidth only, and the netem and fq qdiscs
# (the usual ways to add delay) are not in this kernel. Links are otherwise veth: ~10-20 us.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_ROOT=/run/moeforge-cluster
SUBNET=10.218.0             # the same in every cluster: each one is sealed in its namespaces
IFACE=mfc0                  # a node's interface (the only one besides lo)

die() { echo "cluster.sh: $*" >&2; exit 2; }
say() { [[ -n "${CLUSTER_QUIET:-}" ]] || echo "[cluster] $*" >&2; }

# Namespaces need root and a kernel that allows them; say which one is missing.
capability_problem() {
  [[ $(id -u) -eq 0 ]] || { echo "needs root (network namespaces, veth, tc)"; return; }
  local missing=()
  for tool in ip tc nsenter unshare mpirun; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  ((${#missing[@]} == 0)) || { echo "missing tools: ${missing[*]}"; return; }
  local probe="mfcprobe$$"
  if ! ip netns add "$probe" 2>/dev/null; then
    echo "network namespaces are not permitted here (ip netns add failed)"; return
  fi
  local problem=""
  ip -n "$probe" link add va type veth peer name vb 2>/dev/null || problem="veth pairs are not available"
  [[ -n $problem ]] || ip -n "$probe" link add vbr type bridge 2>/dev/null || problem="bridges are not available"
  [[ -n $problem ]] || tc -n "$probe" qdisc add dev va root tbf rate 1gbit burst 64kb latency 50ms \
    2>/dev/null || problem="the tbf qdisc is not available"
  ip netns del "$probe"
  echo "$problem"
}

require_capable() {
  local problem
  problem="$(capability_problem)"
  [[ -z $problem ]] || die "cannot build an emulated cluster: $problem"
}

state_dir() { echo "$STATE_ROOT/$1"; }
node_ns() { echo "$1-n$2"; }
switch_ns() { echo "$1-sw"; }
node_count() { cat "$(state_dir "$1")/nodes"; }

# tbf needs a burst of at least one rate-period of the kernel timer (rate x 1 ms) and more than
# one GSO packet (64 KiB + headers): tbf cuts larger packets into MTU segments, and with a
# 64 KiB burst it cut every one, which put the kernel at 21% of this machine's 2 cores during a
# 250 Mbit/s run (6.7% with 256 KiB; docs/benchmarks.md). Hence rate x 1 ms, at least 256 KiB.
default_burst() {
  local rate="$1" bits
  bits="$(rate_bits "$rate")"
  local bytes=$((bits / 8 / 1000))
  ((bytes >= 262144)) || bytes=262144
  echo "$bytes"
}

rate_bits() {
  local r="${1,,}"
  case "$r" in
    *gbit) echo $((${r%gbit} * 1000000000)) ;;
    *mbit) echo $((${r%mbit} * 1000000)) ;;
    *kbit) echo $((${r%kbit} * 1000)) ;;
    *) die "rate '$1': give it as <integer>gbit, mbit or kbit (e.g. 5gbit)" ;;
  esac
}

# Both ends of node i's link get the same tbf, so each direction is shaped once at the sender.
shape_node() {
  local name="$1" i="$2" rate="$3" burst="$4"
  local ends=("$(node_ns "$name" "$i") $IFACE" "$(switch_ns "$name") p$i")
  for end in "${ends[@]}"; do
    read -r ns dev <<<"$end"
    tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
    [[ $rate == off ]] || tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" \
      latency 200ms
  done
}

cmd_up() {
  local name="mfc$$" nodes=2 slots=2 rate=off burst=""
  while (($#)); do
    case "$1" in
      --name) name="$2"; shift 2 ;;
      --nodes) nodes="$2"; shift 2 ;;
      --slots) slots="$2"; shift 2 ;;
      --rate) rate="$2"; shift 2 ;;
      --burst) burst="$2"; shift 2 ;;
      *) die "up: unknown option '$1'" ;;
    esac
  done
  [[ $nodes =~ ^[0-9]+$ ]] && ((nodes >= 1 && nodes <= 200)) || die "--nodes must be 1..200"
  [[ $slots =~ ^[0-9]+$ ]] && ((slots >= 1)) || die "--slots must be a positive integer"
  [[ $name =~ ^[a-z0-9]{1,10}$ ]] || die "--name: 1-10 lowercase letters or digits (interface names are short)"
  [[ $rate == off ]] || rate_bits "$rate" >/dev/null
  [[ -n $burst || $rate == off ]] || burst="$(default_burst "$rate")"
  require_capable
  local dir
  dir="$(state_dir "$name")"
  [[ ! -e $dir ]] || die "a cluster named $name exists already (launch/cluster.sh down $name)"
  mkdir -p "$dir"
  # Half a cluster is removed again: a failing step (errtrace: also inside shape_node) tears down.
  set -E
  trap 'trap - ERR; cmd_down "$name" >/dev/null 2>&1; die "bringing up $name failed (see above); removed what was made"' ERR
  echo "$nodes" >"$dir/nodes"
  echo "${CLUSTER_OWNER:-$PPID}" >"$dir/owner"
  local sw
  sw="$(switch_ns "$name")"
  ip netns add "$sw"
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
  : >"$dir/hostfile"
  for ((i = 0; i < nodes; i++)); do
    local ns addr
    ns="$(node_ns "$name" "$i")"
    addr="$SUBNET.$((i + 1))"
    ip netns add "$ns"
    ip -n "$sw" link add "p$i" type veth peer name "$IFACE" netns "$ns"
    ip -n "$sw" link set "p$i" master br0 up
    ip -n "$ns" addr add "$addr/24" dev "$IFACE"
    ip -n "$ns" link set "$IFACE" up
    ip -n "$ns" link set lo up
    # A UTS namespace kept alive by a bind mount: the node's own hostname.
    touch "$dir/uts$i"
    unshare --uts="$dir/uts$i" hostname "$name-node$i"
    echo "$addr $i" >>"$dir/addresses"
    echo "$addr slots=$slots" >>"$dir/hostfile"
    shape_node "$name" "$i" "$rate" "$burst"
  done
  echo "$rate $burst" >"$dir/rate"
  trap - ERR
  say "cluster $name up: $nodes node(s) x $slots slot(s), link rate $rate${burst:+ (burst $burst B)}; hostfile $dir/hostfile"
  echo "$name"
}

# Kills every process inside the cluster's namespaces (only ours live there), then removes them.
cmd_down() {
  local name="$1" dir
  dir="$(state_dir "$name")"
  [[ -d $dir ]] || { say "no cluster $name"; return 0; }
  local nodes
  nodes="$(node_count "$name" 2>/dev/null || echo 0)"
  for ((i = 0; i < nodes; i++)); do
    local ns
    ns="$(node_ns "$name" "$i")"
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
    [[ ! -e $dir/uts$i ]] || umount "$dir/uts$i" 2>/dev/null || true
  done
  ip netns del "$(switch_ns "$name")" 2>/dev/null || true
  rm -rf "$dir"
  say "cluster $name down"
}

cmd_down_stale() {
  [[ -d $STATE_ROOT ]] || return 0
  for dir in "$STATE_ROOT"/*/; do
    [[ -d $dir ]] || continue
    local name owner
    name="$(basename "$dir")"
    owner="$(cat "$dir/owner" 2>/dev/null || echo 0)"
    kill -0 "$owner" 2>/dev/null || cmd_down "$name"
  done
}

require_cluster() {
  [[ -n ${1:-} && -d $(state_dir "$1") ]] || die "no emulated cluster '${1:-}' (launch/cluster.sh up, or run inside launch/cluster.sh run)"
}

node_exec() {
  local name="$1" i="$2"
  shift 2
  nsenter --net="/run/netns/$(node_ns "$name" "$i")" --uts="$(state_dir "$name")/uts$i" -- "$@"
}

# mpirun on node 0. OpenMPI reaches the other nodes through launch/cluster_agent.sh (its "ssh",
# entering that node's namespaces); TCP between nodes on the cluster interface only, shared memory
# inside a node. Two TCP connections per pair of ranks: with one, OpenMPI's TCP transport carried
# a simultaneous exchange (both ranks sending, as in every all-to-all) at half the link's rate in
# each direction (85 of 200 Mbit/s; 180 with two; docs/benchmarks.md). Short out-of-band
# keepalives let mpirun notice a node whose link went down in seconds rather than after TCP's
# default of minutes.
cmd_mpirun() {
  local name="${MOEFORGE_CLUSTER:-}"
  require_cluster "$name"
  local dir
  dir="$(state_dir "$name")"
  MOEFORGE_CLUSTER_STATE="$dir" node_exec "$name" 0 mpirun --allow-run-as-root --oversubscribe \
    --hostfile "$dir/hostfile" \
    --mca plm_rsh_agent "$ROOT/launch/cluster_agent.sh" \
    --mca btl self,vader,tcp --mca btl_tcp_if_include "$IFACE" --mca btl_tcp_links "${CLUSTER_TCP_LINKS:-2}" \
    --mca oob_tcp_if_include "$IFACE" \
    --mca oob_tcp_keepalive_time "${CLUSTER_KEEPALIVE_S:-1}" --mca oob_tcp_keepalive_intvl 1 \
    --mca oob_tcp_keepalive_probes 3 \
    -x MOEFORGE_CLUSTER_STATE="$dir" "$@"
}

cmd_run() {
  local up_args=()
  while (($#)) && [[ $1 != -- ]]; do up_args+=("$1"); shift; done
  [[ ${1:-} == -- ]] || die "run: give the command after --"
  shift
  (($#)) || die "run: no command after --"
  RUN_CLUSTER="$(CLUSTER_OWNER=$$ cmd_up "${up_args[@]}")"
  trap 'cmd_down "$RUN_CLUSTER"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local status=0
  MOEFORGE_CLUSTER="$RUN_CLUSTER" "$@" || status=$?
  return "$status"
}

cmd_shape() {
  local name="$1" rate="$2" burst="${3:-}"
  require_cluster "$name"
  [[ $rate == off ]] || rate_bits "$rate" >/dev/null
  [[ -n $burst || $rate == off ]] || burst="$(default_burst "$rate")"
  for ((i = 0; i < $(node_count "$name"); i++)); do shape_node "$name" "$i" "$rate" "$burst"; done
  echo "$rate $burst" >"$(state_dir "$name")/rate"
}

cmd_link() {
  local name="$1" i="$2" state="$3"
  require_cluster "$name"
  [[ $state == up || $state == down ]] || die "link: up or down, not '$state'"
  ip -n "$(switch_ns "$name")" link set "p$i" "$state"
}

# SIGKILL to the node's application processes (everything but OpenMPI's daemon and the shell
# that started it), or with --all to every process of the node, as a power cut would.
cmd_kill() {
  local name="$1" i="$2" all="${3:-}"
  require_cluster "$name"
  for pid in $(ip netns pids "$(node_ns "$name" "$i")"); do
    if [[ $all != --all ]]; then
      case "$(cat "/proc/$pid/comm" 2>/dev/null)" in orted | sh | nsenter) continue ;; esac
    fi
    kill -9 "$pid" 2>/dev/null || true
  done
}

# Bytes that crossed each node's link (switch-side counters: what the node sent is rx there).
cmd_traffic() {
  local name="$1"
  require_cluster "$name"
  for ((i = 0; i < $(node_count "$name"); i++)); do
    local rx tx
    rx="$(ip netns exec "$(switch_ns "$name")" cat "/sys/class/net/p$i/statistics/rx_bytes")"
    tx="$(ip netns exec "$(switch_ns "$name")" cat "/sys/class/net/p$i/statistics/tx_bytes")"
    echo "node$i sent $rx received $tx"
  done
}

main() {
  local verb="${1:-}"
  (($#)) && shift
  case "$verb" in
    up) cmd_up "$@" ;;
    down) if [[ ${1:-} == --stale ]]; then cmd_down_stale; else require_cluster "${1:-}"; cmd_down "$1"; fi ;;
    run) cmd_run "$@" ;;
    mpirun) cmd_mpirun "$@" ;;
    shape) cmd_shape "$@" ;;
    link) cmd_link "$@" ;;
    kill) cmd_kill "$@" ;;
    traffic) cmd_traffic "$@" ;;
    exec) local name="${MOEFORGE_CLUSTER:-}"; require_cluster "$name"; node_exec "$name" "$@" ;;
    check)
      local problem
      problem="$(capability_problem)"
      [[ -z $problem ]] || { echo "emulated cluster unavailable: $problem" >&2; exit 77; }
      echo "emulated clusters available" ;;
    *) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; [[ -z $verb ]] || exit 2 ;;
  esac
}

main "$@"
