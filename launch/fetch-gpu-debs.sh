#!/usr/bin/env bash
# Downloads the Debian packages the GPU machine lacks (it has no apt and no network) into
# .deps/gpu-debs/ (git-ignored), for launch/gpu-check.sh to unpack there with `dpkg -x`:
# yaml-cpp, fmt, CLI11, nlohmann-json, GoogleTest, Google Benchmark, zlib headers, protobuf
# (protoc and the lite runtime, for the TensorBoard event files), Boost headers (CRC32C) and
# OpenMPI with the libraries it loads. Run here, before the device call that carries .deps/:
#
#   launch/fetch-gpu-debs.sh        # then: device run with carry [".deps"]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.deps/gpu-debs"
PACKAGES=(
  libyaml-cpp-dev libyaml-cpp0.7 libfmt-dev libfmt9 libcli11-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev libbenchmark1debian zlib1g-dev
  libprotobuf-dev libprotobuf32 libprotobuf-lite32 protobuf-compiler libprotoc32 libboost1.74-dev
  libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common libhwloc15 libevent-core-2.1-7
  libevent-pthreads-2.1-7 libevent-2.1-7 libpmix2 libfabric1 libucx0 libibverbs1 librdmacm1
  libnl-3-200 libnl-route-3-200 libpsm2-2 libpsm-infinipath1 libnuma1 libmunge2 libltdl7
  libpciaccess0 libudev1 libxnvctrl0)
mkdir -p "$OUT"
cd "$OUT"
missing=()
for pkg in "${PACKAGES[@]}"; do
  compgen -G "${pkg}_*.deb" >/dev/null || missing+=("$pkg")
done
if ((${#missing[@]})); then
  [[ -n "$(find /var/lib/apt/lists -name '*Packages*' -print -quit 2>/dev/null)" ]] || apt-get update -qq
  apt-get download -qq "${missing[@]}"
fi
echo "[fetch-gpu-debs] $(ls "$OUT"/*.deb | wc -l) packages, $(du -sh "$OUT" | cut -f1) in $OUT"
