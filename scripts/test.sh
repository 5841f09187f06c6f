#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests against real redis-server and app
# processes, CI-sized sim runs, each criterion bench run once as a smoke test; then the proof's
# own checks, small: a short soak (every fault mode, TEST_SOAK_SEEDS seeds, default 1) and two
# mutants of the catalogue, one on each side (the generator's fencing, the handler's fetch
# recovery), which the sim must catch (the full soak and catalogue are `scripts/soak.sh` and
# `scripts/mutants.sh`; CI must stay under ~20 minutes, and the catalogue's slowest mutant to
# catch, commit-without-ownership at 100-170 s, is left to it). Release mode, because the tests
# run real workloads. Arguments go to `cargo test` (and then the soak and the mutants are
# skipped, as for a filtered run). Ends with one line totalling every test binary's result.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-redis.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The examples' binaries, which tests/library.rs runs as a user would (`cargo test` alone builds
# them in test mode only, under another name).
cargo build --release --examples
cargo test --release --all-targets "$@" 2>&1 | tee "$log"
if [ $# -eq 0 ]; then
  # The crate root's example (the README's), and the library's docs without a warning.
  cargo test --release --doc 2>&1 | tee -a "$log"
  RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --lib --features testkit
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
if [ $# -eq 0 ]; then
  scripts/soak.sh "${TEST_SOAK_SEEDS:-1}" | tail -n 20
  scripts/mutants.sh fencing-removed lost-fetch-recovery-disabled | tail -n 10
fi
