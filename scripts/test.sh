#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests against real redis-server and app
# processes, CI-sized sim runs, and each criterion bench run once as a smoke test. Release mode,
# because the tests run real workloads. Ends with one line totalling every test binary's result.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-redis.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --all-targets "$@" 2>&1 | tee "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
