#!/usr/bin/env bash
# Installs what is missing (Debian packages, the pinned LibTorch wheel in a project-local venv),
# then configures and builds incrementally. Idempotent: a second run with nothing changed only
# asks Ninja, which finds nothing to do.
#
#   launch/setup.sh            # default build dir: build/
#   BUILD_DIR=build-debug CMAKE_BUILD_TYPE=Debug launch/setup.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
VENV="${MOEFORGE_VENV:-$ROOT/.venv}"
TORCH_VERSION="2.11.0"   # pinned: matches the GPU machines' torch 2.11
say() { echo "[setup] $*"; }

# ---- Debian packages ------------------------------------------------------------------------
APT_PACKAGES=(build-essential cmake ninja-build ccache pkg-config git python3 python3-venv
  libopenmpi-dev openmpi-bin libyaml-cpp-dev libgtest-dev libgmock-dev nlohmann-json3-dev
  libcli11-dev libfmt-dev libbenchmark-dev zlib1g-dev libprotobuf-dev protobuf-compiler
  libboost-dev)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- LibTorch from PyPI's torch wheel, in a project-local venv --------------------------------
PYTHON="${PYTHON:-python3}"
MARKER="$VENV/.moeforge-torch-$TORCH_VERSION"
if [[ ! -f "$MARKER" ]]; then
  say "creating $VENV with torch==$TORCH_VERSION (first run only; a few GB)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
  touch "$MARKER"
fi
# Tooling packages (plots, HF interop tests): reinstalled whenever requirements.txt changes.
REQ_MARKER="$VENV/.moeforge-requirements-$(sha1sum "$ROOT/launch/requirements.txt" | cut -c1-12)"
if [[ ! -f "$REQ_MARKER" ]]; then
  say "installing launch/requirements.txt into $VENV"
  "$VENV/bin/pip" install -q -r "$ROOT/launch/requirements.txt"
  touch "$REQ_MARKER"
fi
TORCH_CMAKE="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)"

# ---- configure + build -----------------------------------------------------------------------
if [[ ! -f "$BUILD_DIR/build.ninja" ]]; then
  say "configuring $BUILD_DIR"
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja \
    -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" \
    -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" \
    -DMOEFORGE_PYTHON="$VENV/bin/python" \
    -DMOEFORGE_WITH_CUDA="${MOEFORGE_WITH_CUDA:-AUTO}" >"$BUILD_DIR.configure.log" 2>&1 ||
    { cat "$BUILD_DIR.configure.log"; exit 1; }
fi
say "building ($BUILD_DIR)"
cmake --build "$BUILD_DIR" -- -j"${MOEFORGE_BUILD_JOBS:-$(nproc)}"
say "ready: $BUILD_DIR/moeforge"
