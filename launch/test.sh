#!/usr/bin/env bash
# Sets up (first run only), builds incrementally and runs the whole test suite through ctest.
#   launch/test.sh [ctest options...]     e.g. launch/test.sh -R distributed
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup.sh"
cd "$ROOT/build"
exec ctest --output-on-failure "$@"
