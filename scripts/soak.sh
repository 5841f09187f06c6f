#!/usr/bin/env bash
# Soak: N seeds (default 50) of `sim --profile small` (200,000 messages, batch 100, 2,000 in
# flight, queue 1,000, handler 0-199 ms: the configuration where rare fault windows are hit often)
# for every fault mode alone and all combined; every run also drains getErrors during the run (some
# drains SIGKILLed), which the verdict includes. One line per run, then a table per mode and a total.
# Exit 0 only if every run passes.
#
#   scripts/soak.sh [N] [MODE...]      modes: kill-leader pause-leader partition-leader
#                                      kill-workers pause-workers drop-connections lose-replies
#                                      inject-duplicates restart-redis all wipe-redis
#                                      rollback-redis rollback-lose-replies cluster-lose-replies
#                                      wait-replicas-drops (default: every one). wipe-redis and
#                                      the rollbacks pass when every copy halts (exit 5) with
#                                      nothing generated after and nothing that survived lost.
#   SOAK_FIRST_SEED=S                  seeds S..S+N-1 (default 1)
#   SOAK_MD=FILE                       also write the table as Markdown to FILE
#   SOAK_DIR=DIR                       keep failed runs' reports here (default: a temp dir)
#   SOAK_EXTRA='FLAGS'                 more sim flags for every run, e.g. '--shards 3' (a sharded
#                                      namespace; inject-duplicates does not take it)
#
# The binaries are copied before the first run, so rebuilding during a soak does not change what
# it tests. Each failed run prints the one command that replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-redis.sh

n=${1:-50}
shift || true
declare -A mode_flags=(
  [kill-leader]="--kill-leader --kills 3"
  [pause-leader]="--pause-leader 2"
  [partition-leader]="--partition-leader 2"
  [kill-workers]="--kill-workers 3"
  [pause-workers]="--pause-workers 2"
  [drop-connections]="--drop-connections 3"
  [lose-replies]="--lose-replies 3"
  [inject-duplicates]="--inject-duplicates 3"
  [restart-redis]="--restart-redis 2"
  [all]="--kill-leader --kills 2 --pause-leader 1 --partition-leader 1 --kill-workers 2 --pause-workers 1 --drop-connections 2 --lose-replies 2 --inject-duplicates 1 --restart-redis 1"
  [wipe-redis]="--wipe-redis"
  [rollback-redis]="--rollback-redis"
  # Issue 22's combinations: a rollback after lost replies (the write counts must not be blind),
  # lost replies on a cluster (a proxy per node: no call is re-sent), and --wait-replicas with a
  # master failover and dropped connections (WAIT must confirm only what a replica holds).
  [rollback-lose-replies]="--rollback-redis --lose-replies 40"
  [cluster-lose-replies]="--redis-cluster 3 --shards 2 --lose-replies 3 --kill-leader --kills 2"
  [wait-replicas-drops]="--redis-cluster 3 --kill-master 1 --wait-replicas 1 --drop-connections 3"
)
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(kill-leader pause-leader partition-leader kill-workers pause-workers drop-connections lose-replies inject-duplicates restart-redis all wipe-redis rollback-redis rollback-lose-replies cluster-lose-replies wait-replicas-drops)
for m in "${modes[@]}"; do
  [ -n "${mode_flags[$m]:-}" ] || { echo "soak: unknown mode $m (known: ${!mode_flags[*]})" >&2; exit 2; }
done
first=${SOAK_FIRST_SEED:-1}

cargo build --release --bins --features testkit --quiet
bin=$(mktemp -d)
dir=${SOAK_DIR:-$(mktemp -d)}
mkdir -p "$dir"
trap 'rm -rf "$bin"' EXIT
cp target/release/sim target/release/app "$bin/"

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
echo "soak: $n seeds ($first..$((first + n - 1))) x ${#modes[@]} modes${SOAK_EXTRA:+, with $SOAK_EXTRA}, commit $commit, failed reports in $dir"
declare -A runs passes failed secs
started=$SECONDS
for m in "${modes[@]}"; do
  runs[$m]=0; passes[$m]=0; failed[$m]=""; secs[$m]=0
  for seed in $(seq "$first" $((first + n - 1))); do
    report="$dir/$m-seed$seed"
    t0=$SECONDS
    # shellcheck disable=SC2086 # the mode's flags are words
    set +e
    out=$("$bin/sim" --profile small ${mode_flags[$m]} ${SOAK_EXTRA:-} --seed "$seed" --quiet --timeout-s 120 \
      --report-dir "$report" --app-bin "$bin/app" 2>&1)
    rc=$?
    set -e
    took=$((SECONDS - t0))
    runs[$m]=$((runs[$m] + 1)); secs[$m]=$((secs[$m] + took))
    line=$(grep -o 'verdict=[a-z]* .*missing=[0-9]* duplicates=[0-9]*\|verdict=[a-z]* redis_lost_data=.*' <<<"$out" || true)
    if [ "$rc" = 0 ]; then
      passes[$m]=$((passes[$m] + 1))
      rm -rf "$report"
      echo "$m seed=$seed rc=0 ${took}s $line"
    else
      failed[$m]="${failed[$m]} $seed"
      echo "$m seed=$seed rc=$rc ${took}s $line FAIL (report: $report)"
      grep '^replay:' <<<"$out" || true
    fi
  done
done

total_runs=0; total_passes=0
table="| mode | flags | runs | passes | failures (seeds) | duration |
|---|---|---|---|---|---|"
for m in "${modes[@]}"; do
  total_runs=$((total_runs + runs[$m])); total_passes=$((total_passes + passes[$m]))
  f=${failed[$m]:- none}
  table+="
| $m | \`${mode_flags[$m]}\` | ${runs[$m]} | ${passes[$m]} |${f} | ${secs[$m]} s |"
done
elapsed=$((SECONDS - started))
echo
echo "$table"
echo
echo "soak: $total_passes/$total_runs passed in ${elapsed} s (commit $commit)"
if [ -n "${SOAK_MD:-}" ]; then
  {
    echo "Seeds $first..$((first + n - 1)) of \`sim --profile small\` per mode, commit \`$commit\`, $(date -u +%Y-%m-%dT%H:%MZ),"
    echo "made by \`${SOAK_EXTRA:+SOAK_EXTRA='$SOAK_EXTRA' }SOAK_MD=$SOAK_MD scripts/soak.sh $n${*:+ $*}\`."
    echo
    echo "$table"
    echo
    echo "Total: **$total_passes of $total_runs runs passed**, $((total_runs - total_passes)) failed, ${elapsed} s."
  } >"$SOAK_MD"
fi
[ "$total_passes" = "$total_runs" ]
