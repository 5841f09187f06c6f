#!/usr/bin/env bash
# The mutation catalogue (mutants/*.mutant, see mutants/README.md): applies each planted bug to a
# scratch copy of the tree, builds it, and runs `sim --profile small` with the mutant's
# configurations (seeds 1..5 each) until the sim's verdict catches it. Prints one line per mutant
# and a table; exits 0 only if every mutant is caught by sim.
#
#   scripts/mutants.sh [NAME...]     NAME = a file name in mutants/ without .mutant (default: all)
#   MUTANTS_SEEDS=N                  seeds per configuration (default 5)
#   MUTANTS_MD=FILE                  also write the table as Markdown to FILE
#   MUTANTS_TESTS=1                  also run the test suite on each mutant (slow) and name the
#                                    first test that fails
#
# Builds go to target/mutants (seeded from target/release's dependencies, then only this crate per
# mutant). A sim exit code 1 (violation), 3 (liveness) or 4 (crash) counts as caught; 0 and 5 do
# not.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-redis.sh

seeds=${MUTANTS_SEEDS:-5}
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for m in mutants/*.mutant; do names+=("$(basename "$m" .mutant)"); done
fi
for n in "${names[@]}"; do
  [ -f "mutants/$n.mutant" ] || { echo "mutants: no mutants/$n.mutant" >&2; exit 2; }
done

root=$PWD
target=$root/target/mutants
scratch=$(mktemp -d)
work=$(mktemp -d)
trap 'rm -rf "$scratch" "$work"' EXIT
# The working tree as it is (uncommitted and new files included, deleted ones skipped).
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$scratch"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

# Seed the mutants' target dir with the dependencies the main release build already compiled
# (`scripts/soak.sh` builds the same `--bins --features testkit` set): only this crate is then
# built per mutant, instead of every dependency once more (about 4 min on a 2-core machine).
# Copies, not hard links: rustc rewrites outputs in place.
if [ ! -d "$target/release/.fingerprint" ] && [ -d "$root/target/release/.fingerprint" ]; then
  mkdir -p "$target/release/deps"
  cp -a "$root/target/release/build" "$root/target/release/.fingerprint" "$target/release/"
  find "$root/target/release/deps" -maxdepth 1 -type f \( -name '*.rlib' -o -name '*.rmeta' \
    -o -name '*.so' -o -name '*.a' -o -name '*.d' \) ! -name 'libleaderq*' -print0 \
    | xargs -0 -r cp -a -t "$target/release/deps"
fi

build() {
  (cd "$scratch" && CARGO_TARGET_DIR=$target cargo build --release --bins --features testkit --quiet 2>"$work/build.log")
}

# Control: the unmutated tree passes the plainest configuration, or nothing below means anything.
echo "mutants: ${#names[@]} mutants, seeds 1..$seeds per configuration, commit $commit"
echo "mutants: building the unmutated tree (control)"
build || { cat "$work/build.log" >&2; exit 4; }
if ! "$target/release/sim" --profile small --seed 1 --quiet --timeout-s 120 \
    --report-dir "$work/control" --app-bin "$target/release/app" >"$work/control.out" 2>&1; then
  echo "mutants: the unmutated tree fails its control run:" >&2
  cat "$work/control.out" >&2
  exit 4
fi

declare -a rows
missed=0
for n in "${names[@]}"; do
  m="mutants/$n.mutant"
  file=$(sed -n 's/^file:[[:space:]]*//p' "$m" | head -n 1)
  mapfile -t configs < <(sed -n 's/^sim:[[:space:]]*//p' "$m")
  cp "$root/$file" "$work/original"
  if ! perl mutants/apply.pl "$m" "$scratch" 2>"$work/apply.log"; then
    cat "$work/apply.log" >&2
    rows+=("| $n | \`$file\` | **does not apply** (re-target it) | | | |")
    missed=$((missed + 1))
    continue
  fi
  caught="" ; code="" ; why="" ; t0=$SECONDS ; runs=0
  if ! build; then
    caught="**does not build**"
    tail -n 5 "$work/build.log" >&2
  else
    for cfg in "${configs[@]}"; do
      for seed in $(seq 1 "$seeds"); do
        set +e
        # shellcheck disable=SC2086 # the configuration's flags are words
        "$target/release/sim" --profile small $cfg --seed "$seed" --quiet --timeout-s 90 \
          --report-dir "$work/run" --app-bin "$target/release/app" >"$work/run.out" 2>&1
        rc=$?
        set -e
        runs=$((runs + 1))
        rm -rf "$work/run"
        case $rc in
          1 | 3 | 4)
            caught="sim \`--profile small${cfg:+ $cfg} --seed $seed\`"
            code=$rc
            why=$(grep -m 1 '^violation:' "$work/run.out" || grep -m 1 'LIVENESS\|FAULT PLAN' "$work/run.out" || tail -n 1 "$work/run.out")
            why=$(cut -c1-200 <<<"$why")
            break 2
            ;;
          0 | 5) ;;
          *)
            echo "mutants: sim exited $rc (bad configuration?) for $n: $cfg" >&2
            cat "$work/run.out" >&2
            exit 2
            ;;
        esac
      done
    done
  fi
  took=$((SECONDS - t0))
  tests=""
  if [ "${MUTANTS_TESTS:-0}" = 1 ] && [ -n "$code" ]; then
    # The mutated suite fails (that is the point): its exit status is not ours.
    (cd "$scratch" && CARGO_TARGET_DIR=$target cargo test --release --all-targets --no-fail-fast \
      >"$work/tests.log" 2>&1) || true
    failing=$(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$work/tests.log" | head -n 3 | paste -sd, -)
    tests=${failing:-none}
  fi
  cp "$work/original" "$scratch/$file"
  if [ -z "$code" ]; then
    [ -n "$caught" ] || caught="**MISSED**"
    missed=$((missed + 1))
    echo "$n: $caught (${took} s)"
  else
    echo "$n: caught by $caught, exit $code, ${took} s (build and $runs runs)${why:+: $why}"
  fi
  why=${why:-}
  rows+=("| $n | \`$file\` | $caught | ${code:-} | ${took} s, $runs run(s) | ${why//|/\\|} |${MUTANTS_TESTS:+ ${tests} |}")
  why=""
done

header="| mutant | file | caught by | sim exit | time to detection (build + runs) | what the verdict said |"
rule="|---|---|---|---|---|---|"
if [ "${MUTANTS_TESTS:-0}" = 1 ]; then
  header+=" tests that also fail |"; rule+="---|"
fi
table=$(printf '%s\n%s\n' "$header" "$rule"; printf '%s\n' "${rows[@]}")
echo
echo "$table"
echo
caught_count=$(( ${#names[@]} - missed ))
echo "mutants: $caught_count of ${#names[@]} caught by sim (commit $commit)"
if [ -n "${MUTANTS_MD:-}" ]; then
  {
    echo "Made by \`MUTANTS_MD=$MUTANTS_MD scripts/mutants.sh${*:+ $*}\` at commit \`$commit\`, $(date -u +%Y-%m-%dT%H:%MZ):"
    echo "each mutant (\`mutants/*.mutant\`) applied to a scratch copy, built, and run under"
    echo "\`sim --profile small\` with its configurations, seeds 1..$seeds, until the verdict caught it."
    echo
    echo "$table"
    echo
    echo "**$caught_count of ${#names[@]} mutants caught by sim.**"
  } >"$MUTANTS_MD"
fi
[ "$missed" = 0 ]
