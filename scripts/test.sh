#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests against real redis-server and app
# processes, and a CI-sized sim run. Release mode, because the tests run real workloads.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-redis.sh
cargo test --release --all-targets "$@"
