#!/usr/bin/env bash
# Wall time of uncached host tunes through `headroom serve`, per example: what a job costs end
# to end (HTTP, queue, the device's worker, the answer). BEFORE=path and AFTER=path compare two
# release builds, run alternately (ROUNDS rounds, median per example); by default AFTER is
# ./target/release/headroom alone. Build first: cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-3}
examples=(mnist-mlp-sgd cifar10-mlp-adam deep-mlp-adamw)
builds=()
[ -n "${BEFORE:-}" ] && builds+=("before=$BEFORE")
builds+=("after=${AFTER:-./target/release/headroom}")
scratch=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"' EXIT

start() { # name binary port
  HEADROOM_STORE="sqlite://$scratch/$1.db" "$2" serve --bind "127.0.0.1:$3" --device host \
    2>"$scratch/$1.log" &
  until curl -fs "http://127.0.0.1:$3/readyz" >/dev/null; do sleep 0.1; done
}

port=18190
declare -A ports
for build in "${builds[@]}"; do
  name=${build%%=*}; start "$name" "${build#*=}" "$port"; ports[$name]=$port; port=$((port + 1))
done
for example in "${examples[@]}"; do
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); j["no_cache"]=True; print(json.dumps(j))' \
    "examples/$example.json" > "$scratch/$example.json"
done
for round in $(seq "$rounds"); do
  for example in "${examples[@]}"; do
    for build in "${builds[@]}"; do
      name=${build%%=*}
      seconds=$(curl -fs -o /dev/null -w '%{time_total}' -H 'Content-Type: application/json' \
        --data @"$scratch/$example.json" "http://127.0.0.1:${ports[$name]}/tune")
      echo "$name $example $seconds" | tee -a "$scratch/times"
    done
  done
done
echo "== median wall time of a tune, seconds ($rounds rounds)"
python3 - "$scratch/times" <<'PY'
import collections, statistics, sys
times = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, example, seconds = line.split()
    times[(example, name)].append(float(seconds))
for (example, name), values in sorted(times.items()):
    print(f"{example:18} {name:7} {statistics.median(values):7.2f}  ({', '.join(f'{v:.2f}' for v in values)})")
PY
