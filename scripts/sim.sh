#!/usr/bin/env bash
# The main job: 1,000,000 messages through 4 real `app` copies on a private local Redis, the
# generator SIGKILLed 3 times at seeded points, an exactly-once verdict, and a report under
# reports/. Extra arguments go to `sim` (e.g. --seed 1, --messages 5000000; see `sim --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-redis.sh
cargo build --release --bins --features testkit
exec target/release/sim --messages 1000000 --kill-leader --kills 3 "$@"
