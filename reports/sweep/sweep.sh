#!/usr/bin/env bash
# Performance sweep: each line one 1M sim run (seed 7, 3 generator kills unless noted).
cd /work/main
S=target/release/sim
run(){ name=$1; shift; $S --seed 7 --quiet --report-dir /tmp/perf/$name "$@" > /tmp/perf/$name.out 2>&1; echo "$name $* rc=$?" >> /tmp/perf/index.txt; }
for mif in 10000 20000 30000 50000 80000; do run mif$mif --messages 1000000 --kill-leader --max-in-flight $mif; done
for b in 100 300 1000 3000; do run batch$b --messages 1000000 --kill-leader --batch $b; done
for k in 2 3 4 6 8; do run k$k --messages 1000000 --kill-leader --processes $k; done
run delay0 --messages 1000000 --kill-leader --handler-delay-max-ms 0
run delay0_k3 --messages 1000000 --kill-leader --handler-delay-max-ms 0 --processes 3
for n in 100000 1000000 5000000; do run scale$n --messages $n --kill-leader; done
run interval500 --messages 120 --interval-ms 500
echo done >> /tmp/perf/index.txt
