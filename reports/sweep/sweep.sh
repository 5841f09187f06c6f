#!/usr/bin/env bash
# The performance sweep behind reports/PERFORMANCE.md: one 1M sim run per line (seed 7, 3 generator
# kills unless noted), run one after another on an otherwise idle machine. Each run's report goes
# to $OUT/<name>/ (default /tmp/perf) and its command line to $OUT/index.txt; print a table with
# `python3 reports/sweep/table.py NAME…` after copying the summaries here as NAME.json.
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/perf}
mkdir -p "$OUT"
S=target/release/sim
run(){ name=$1; shift; $S --seed 7 --quiet --report-dir "$OUT/$name" "$@" > "$OUT/$name.out" 2>&1; echo "$name $* rc=$?" >> "$OUT/index.txt"; }
for mif in 10000 20000 30000 50000 80000; do run mif$mif --messages 1000000 --kill-leader --max-in-flight $mif; done
for b in 100 300 1000 3000; do run batch$b --messages 1000000 --kill-leader --batch $b; done
for k in 2 3 4 6 8; do run k$k --messages 1000000 --kill-leader --processes $k; done
run delay0 --messages 1000000 --kill-leader --handler-delay-max-ms 0
run delay0_k3 --messages 1000000 --kill-leader --handler-delay-max-ms 0 --processes 3
for n in 100000 1000000 5000000; do run scale$n --messages $n --kill-leader; done
run interval500 --messages 120 --interval-ms 500
echo done >> "$OUT/index.txt"
