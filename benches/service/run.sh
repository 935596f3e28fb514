#!/usr/bin/env bash
# Service load benchmark on loopback: requests/s and latency of a cached POST /tune and of
# GET /metrics under 64 connections, and the server's resident memory at rest and under load.
# Needs wrk (Debian package) and a release build: cargo build --release; bash benches/service/run.sh
# The store is a fresh SQLite file unless HEADROOM_STORE names one (e.g. postgres://...);
# BIN=path runs another build (e.g. one from before a change, for comparison).
set -euo pipefail
cd "$(dirname "$0")/../.."
port=${PORT:-18090}
duration=${DURATION:-10s}
scratch=$(mktemp -d)
export HEADROOM_STORE=${HEADROOM_STORE:-sqlite://$scratch/headroom.db}
echo "store: ${HEADROOM_STORE%%@*}"
"${BIN:-./target/release/headroom}" serve --bind "127.0.0.1:$port" --device host 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$scratch"' EXIT
until curl -fs "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done
rss() { awk '/VmRSS/ {print $2 " kB"}' "/proc/$server/status"; }
echo "memory at rest: $(rss)"
curl -fs -H 'Content-Type: application/json' --data @examples/cifar10-mlp-adam.json "http://127.0.0.1:$port/tune" >/dev/null
echo "memory after one tune: $(rss)"
echo "== cached POST /tune, 64 connections"
wrk -t2 -c64 -d"$duration" --latency -s benches/service/tune.lua "http://127.0.0.1:$port/tune" &
load=$!
sleep 5; echo "memory under load: $(rss)"
wait $load
echo "== GET /metrics, 64 connections"
wrk -t2 -c64 -d"$duration" --latency "http://127.0.0.1:$port/metrics"
echo "memory after load: $(rss)"
