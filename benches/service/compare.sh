#!/usr/bin/env bash
# Two builds of headroom side by side through the same wrk scenarios, alternating, and the
# ratios new / old:
#
#   bash benches/service/compare.sh OLD [NEW]
#
# OLD and NEW are each a binary or a git commit; a commit is built once (release) in a worktree
# under $COMPARE_DIR (/tmp/headroom-compare). NEW defaults to ./target/release/headroom (build
# it first). Each build serves the host device at its default log level over a fresh SQLite
# store and is fed its own examples/cifar10-mlp-adam.json (the job format may differ between
# commits); the scenarios are a cached POST /tune and GET /metrics, wrk -t2 -c64 for DURATION
# (8s), ROUNDS (2) rounds with the builds alternating. Needs wrk and curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
duration=${DURATION:-8s}
rounds=${ROUNDS:-2}
port=${PORT:-18091}
scratch=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$scratch"' EXIT

# A build's binary and job file: "$scratch/<name>.bin" and "$scratch/<name>.json".
prepare() {
  local name=$1 build=$2
  if [ -x "$build" ]; then
    ln -s "$(realpath "$build")" "$scratch/$name.bin"
    cp examples/cifar10-mlp-adam.json "$scratch/$name.json"
    return
  fi
  local commit
  commit=$(git rev-parse --short=12 "$build^{commit}")
  local tree="${COMPARE_DIR:-${TMPDIR:-/tmp}/headroom-compare}/$commit"
  if [ ! -x "$tree/target/release/headroom" ]; then
    [ -d "$tree" ] || git worktree add --detach "$tree" "$commit" >/dev/null
    (cd "$tree" && cargo build --release --quiet)
  fi
  ln -s "$tree/target/release/headroom" "$scratch/$name.bin"
  git show "$commit:examples/cifar10-mlp-adam.json" > "$scratch/$name.json"
}

# Runs one scenario against one build; prints "requests/s p99_ms".
measure() {
  local name=$1 scenario=$2
  local store="$scratch/$name-$RANDOM.db"
  HEADROOM_STORE="sqlite://$store" "$scratch/$name.bin" serve --bind "127.0.0.1:$port" \
    --device host >/dev/null 2>&1 &
  server=$!
  until curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do sleep 0.1; done
  curl -fs -H 'Content-Type: application/json' --data @"$scratch/$name.json" \
    "http://127.0.0.1:$port/tune" >/dev/null
  local out
  if [ "$scenario" = tune ]; then
    out=$(JOB="$scratch/$name.json" wrk -t2 -c64 -d"$duration" --latency \
      -s benches/service/tune.lua "http://127.0.0.1:$port/tune")
  else
    out=$(wrk -t2 -c64 -d"$duration" --latency "http://127.0.0.1:$port/metrics")
  fi
  kill "$server"; wait "$server" 2>/dev/null || true; server=
  local rps p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {v = $2; if (v ~ /us$/) {sub(/us/, "", v); v /= 1000}
         else if (v ~ /ms$/) sub(/ms/, "", v); else if (v ~ /s$/) {sub(/s/, "", v); v *= 1000}
         print v}' <<<"$out")
  echo "$rps $p99"
}

prepare old "$1"
prepare new "${2:-./target/release/headroom}"
declare -A results
for round in $(seq "$rounds"); do
  for scenario in tune metrics; do
    for name in old new; do
      results[$scenario-$name]+="$(measure "$name" "$scenario") "
    done
  done
done

# Means over the rounds, and the ratios.
printf '%-30s %12s %12s %10s\n' "" "old" "new" "new/old"
for scenario in tune metrics; do
  label=$([ "$scenario" = tune ] && echo "cached POST /tune" || echo "GET /metrics")
  read -r old_rps old_p99 < <(awk '{for (i = 1; i <= NF; i += 2) {r += $i; p += $(i+1); n++}
    printf "%.0f %.2f\n", r / n, p / n}' <<<"${results[$scenario-old]}")
  read -r new_rps new_p99 < <(awk '{for (i = 1; i <= NF; i += 2) {r += $i; p += $(i+1); n++}
    printf "%.0f %.2f\n", r / n, p / n}' <<<"${results[$scenario-new]}")
  printf '%-30s %12s %12s %10.2f\n' "$label requests/s" "$old_rps" "$new_rps" \
    "$(awk -v a="$new_rps" -v b="$old_rps" 'BEGIN {print a / b}')"
  printf '%-30s %9s ms %9s ms %10.2f\n' "$label p99" "$old_p99" "$new_p99" \
    "$(awk -v a="$new_p99" -v b="$old_p99" 'BEGIN {print a / b}')"
  echo "  rounds (requests/s p99_ms): old ${results[$scenario-old]}| new ${results[$scenario-new]}"
done
