#!/usr/bin/env bash
# The GPU check: one prepared call on a machine with an NVIDIA GPU and no Rust toolchain, taking
# a prebuilt target/release/headroom (HEADROOM_BIN). It writes $OUT/check.json (every figure,
# one section each) and $OUT/summary.md (what to read first), with each command's raw output
# beside them, and exits non-zero if a section failed.
#
#   OUT=/tmp/gpu-check bash scripts/gpu-check.sh           # about 8 minutes on an H100/H200
#   OUT=/tmp/gpu-check bash scripts/gpu-check.sh --quick   # about 3: the small examples only
#
# Sections: machine; doctor (driver and NVRTC versions, CUBIN or PTX, every kernel on the GPU,
# the context's reservation, the memory pool around a probe: reserved and live bytes before and
# after a trim); a tune of each example with measured/predicted limits and a confirming probe at
# the limit and above it, with the device's bytes against the memory model's (band 0.90-1.10);
# two tunes in one running `headroom serve` with the GPU's memory before, between and after (a
# leak across tunes), /devices and /metrics with NVML's fields; the 409 rule against a second
# process holding the GPU (a standalone worker); a deliberate fault in a throwaway worker
# (`headroom worker --fault-drill`) and a probe in a new process after it; unless --quick, step
# throughput against the card's f32 peak; and which of the stand-in's assumptions the run
# confirmed or refuted. On the CUDA stand-in (tests/standin) it runs the same and says that it
# is the stand-in.
set -u
cd "$(dirname "$0")/.."
BIN=${HEADROOM_BIN:-target/release/headroom}
OUT=${OUT:-gpu-check-out}
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
mkdir -p "$OUT"
REPORT="$OUT/check.json"
echo '{"sections": {}, "failures": []}' > "$REPORT"
note() { echo "== $*" >&2; }

# record SECTION JSON: merges JSON into the report's section; fail WHAT: counts a failure.
record() {
  python3 - "$REPORT" "$1" "$2" <<'PY'
import json, sys
path, section, value = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
report = json.load(open(path))
report["sections"].setdefault(section, {}).update(value)
json.dump(report, open(path, "w"), indent=2)
PY
}
fail() {
  echo "FAIL: $*" >&2
  python3 - "$REPORT" "$*" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
report["failures"].append(sys.argv[2])
json.dump(report, open(sys.argv[1], "w"), indent=2)
PY
}
py() { python3 -c "$@"; }

# The loader path: CUDA toolkits, then Python wheels (nvidia/*/lib), then what is already there.
for dir in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib \
           $(py 'import glob, site; print(" ".join(d for s in site.getsitepackages() for d in glob.glob(s + "/nvidia/*/lib")))' 2>/dev/null); do
  [ -d "$dir" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$dir"
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}

# GPU memory used now, MiB (nvidia-smi), or null without it.
gpu_used_mib() {
  local used
  used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | tr -d ' ')
  echo "${used:-null}"
}

note "machine"
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null || true)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i 0 2>/dev/null || true)
case "$gpu_name" in  # f32 (non-tensor-core) peak, TFLOP/s
  *H200*|*H100*SXM*|*"H100 80GB HBM3"*) peak=67 ;;
  *H100*NVL*) peak=60 ;;
  *H100*) peak=51 ;;
  *A100*) peak=19.5 ;;
  *) peak="" ;;
esac
record machine "$(py 'import json,sys; print(json.dumps({"date": sys.argv[1], "nvidia_smi_gpu": sys.argv[2] or None, "nvidia_smi_driver": sys.argv[3] or None, "f32_peak_tflops": float(sys.argv[4]) if sys.argv[4] else None, "commit": sys.argv[5], "quick": sys.argv[6] == "1"}))' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$gpu_name" "$driver" "$peak" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$QUICK")"

note "doctor"
timeout 300 "$BIN" doctor --json --require-gpu > "$OUT/doctor.json" 2> "$OUT/doctor.log"
doctor_exit=$?
if ! py 'import json,sys; json.load(open(sys.argv[1]))' "$OUT/doctor.json" 2>/dev/null; then
  fail "doctor wrote no report (exit $doctor_exit, see doctor.log)"
  echo '{"rows": []}' > "$OUT/doctor.json"
fi
record doctor "$(py '
import json, sys
d = json.load(open(sys.argv[1]))
rows = {r["check"]: r for r in d.get("rows", [])}
def detail(prefix):
    return next((r["detail"] for c, r in rows.items() if c.startswith(prefix)), None)
gpus = [r["check"] for r in d.get("rows", []) if r["check"].startswith("GPU ")]
print(json.dumps({
    "exit_code": int(sys.argv[2]),
    "passed": d.get("passed"),
    "gpu_checked": d.get("gpu_checked"),
    "driver": detail("CUDA driver library"),
    "nvrtc": detail("NVRTC library"),
    "kernels": detail("cuda:0 kernels"),
    "failed_rows": [r["check"] for r in d.get("rows", []) if r["status"] == "fail"],
    "context": next((r.get("figures") for c, r in rows.items() if c == "cuda:0 context"), None),
    "pool_last_probe": next((r.get("figures") for c, r in rows.items() if c == "cuda:0 memory pool"), None),
    "standin": any("stand-in" in g for g in gpus),
}))' "$OUT/doctor.json" "$doctor_exit")"
[ "$doctor_exit" -eq 0 ] || fail "doctor exited $doctor_exit (see doctor.json)"
standin=$(py 'import json,sys; print(int(json.load(open(sys.argv[1]))["sections"]["doctor"]["standin"]))' "$REPORT")

examples=(examples/*.json)
[ "$QUICK" = 1 ] && examples=(examples/mnist-mlp-sgd.json examples/cifar10-mlp-adam.json)
for job in "${examples[@]}"; do
  name=$(basename "$job" .json)
  case "$name" in
    wide-*)
      # Its largest batch on a big card takes tens of seconds a step on the CUDA-core GEMM, so the
      # check caps it at 2^18 samples (limited_by "max") to fit its time.
      py 'import json,sys; d=json.load(open(sys.argv[1])); d.setdefault("search", {})["max"]=262144; print(json.dumps(d))' \
        "$job" > "$OUT/$name.json"
      job="$OUT/$name.json" ;;
  esac
  note "tune $name"
  before=$(gpu_used_mib)
  start=$(date +%s.%N)
  if ! timeout 180 "$BIN" tune "$job" --device cuda --json > "$OUT/tune-$name.json" 2> "$OUT/tune-$name.log"; then
    fail "tune $name (see tune-$name.log)"; continue
  fi
  wall=$(py "import time; print(round(time.time() - $start, 2))")
  after=$(gpu_used_mib)
  above=$(py '
import json, sys
d = json.load(open(sys.argv[1]))
ooms = [p["batch_size"] for p in d["probes"] if p["outcome"] == "oom"]
multiple = json.load(open(sys.argv[2])).get("search", {}).get("multiple_of", 8)
print(min(ooms) + multiple if ooms else "")' "$OUT/tune-$name.json" "$job")
  sizes=$(py 'import json,sys; print(json.load(open(sys.argv[1]))["max_batch_size"])' "$OUT/tune-$name.json")
  [ -n "$above" ] && sizes="$sizes,$above"
  timeout 120 "$BIN" probe "$job" --device cuda --batch-size "$sizes" --json > "$OUT/confirm-$name.json" 2> "$OUT/confirm-$name.log" \
    || fail "confirming probes of $name (see confirm-$name.log)"
  record "tune $name" "$(py '
import json, sys
tune = json.load(open(sys.argv[1]))
try:
    confirm = json.load(open(sys.argv[2]))
except Exception:
    confirm = []
fits = [m for m in confirm if m["outcome"] == "fit"]
print(json.dumps({
    "max_batch_size": tune["max_batch_size"],
    "recommended_batch_size": tune["recommended_batch_size"],
    "predicted_max_batch_size": tune["predicted_max_batch_size"],
    "measured_over_predicted": round(tune["max_batch_size"] / tune["predicted_max_batch_size"], 4),
    "limited_by": tune["limited_by"],
    "framework": tune.get("framework"),
    "throughput_knee": tune.get("throughput_knee"),
    "throughput_fit": tune.get("throughput_fit"),
    "probes": len(tune["probes"]),
    "elapsed_seconds": tune["elapsed_seconds"],
    "wall_seconds": float(sys.argv[3]),
    "gpu_used_mib_before": json.loads(sys.argv[4]),
    "gpu_used_mib_after": json.loads(sys.argv[5]),
    "confirmations": {str(m["batch_size"]): m["outcome"] for m in confirm},
    "device_over_model": [round(m["device_bytes"] / m["modelled_bytes"], 4) for m in fits if m.get("modelled_bytes")],
}))' "$OUT/tune-$name.json" "$OUT/confirm-$name.json" "$wall" "$before" "$after")"
  verdict=$(py '
import json, sys
s = json.load(open(sys.argv[1]))["sections"]["tune " + sys.argv[2]]
bad = []
max_, c = str(s["max_batch_size"]), s["confirmations"]
if c.get(max_) != "fit": bad.append("the max did not fit again")
if any(v == "fit" for k, v in c.items() if k != max_): bad.append("above the first OOM fitted")
if any(not 0.90 <= r <= 1.10 for r in s["device_over_model"]): bad.append("device bytes outside 0.90-1.10 of the model")
b, a = s["gpu_used_mib_before"], s["gpu_used_mib_after"]
if b is not None and a is not None and a - b > 64: bad.append(f"GPU memory grew {a - b} MiB")
print("; ".join(bad))' "$REPORT" "$name")
  [ -n "$verdict" ] && fail "$name: $verdict"
done

note "serve: two tunes, telemetry, the 409 rule"
port=${PORT:-18299}
state=$(mktemp -d)
HEADROOM_STORE="sqlite://$state/headroom.db" HEADROOM_WAIT_SECONDS=300 \
  "$BIN" serve --bind "127.0.0.1:$port" --device cuda:0 > "$OUT/serve.log" 2>&1 &
server=$!
trap 'kill $server $other 2>/dev/null; rm -rf "$state"' EXIT
other=""
for _ in $(seq 600); do curl -fs "http://127.0.0.1:$port/readyz" > /dev/null 2>&1 && break; sleep 0.5; done
request=$(py 'import json; j=json.load(open("examples/mnist-mlp-sgd.json")); j["no_cache"]=True; j["device"]="cuda:0"; print(json.dumps(j))')
used=()
used+=("$(gpu_used_mib)")
for round in 1 2; do
  curl -s -o "$OUT/serve-tune-$round.json" -w '%{http_code}' -H 'Content-Type: application/json' \
    --data "$request" "http://127.0.0.1:$port/tune" > "$OUT/serve-tune-$round.status"
  used+=("$(gpu_used_mib)")
done
curl -s "http://127.0.0.1:$port/devices" > "$OUT/devices.json"
curl -s "http://127.0.0.1:$port/metrics" > "$OUT/metrics.txt"
# A second process holding a context on the GPU: a standalone worker, kept open on a pipe.
mkfifo "$state/hold"
"$BIN" worker --device cuda:0 < "$state/hold" > /dev/null 2>&1 &
other=$!
exec 7> "$state/hold"
sleep 3
curl -s -o "$OUT/serve-shared.json" -w '%{http_code}' -H 'Content-Type: application/json' \
  --data "$request" "http://127.0.0.1:$port/tune" > "$OUT/serve-shared.status"
exec 7>&-
kill "$server" 2>/dev/null; wait "$server" 2>/dev/null
record serve "$(py '
import json, sys
out = sys.argv[1]
status = lambda f: int(open(f"{out}/{f}").read() or 0)
devices = json.load(open(f"{out}/devices.json"))
gpu = next((d for d in devices if d.get("device") == "cuda:0"), {})
metrics = open(f"{out}/metrics.txt").read()
answers = [json.load(open(f"{out}/serve-tune-{r}.json")) for r in (1, 2)]
print(json.dumps({
    "tune_status": [status("serve-tune-1.status"), status("serve-tune-2.status")],
    "max_batch_size": [a.get("max_batch_size") for a in answers],
    "gpu_used_mib_before_between_after": [json.loads(u) for u in sys.argv[2:5]],
    "devices_nvml": {k: gpu.get(k) for k in ("uuid", "utilization_percent", "temperature_celsius", "other_compute_processes", "worker_pid")},
    "metrics_with_gpu_labels": sum(1 for l in metrics.splitlines() if "device=\"cuda:0\"" in l and "UUID=\"GPU-" in l),
    "shared_gpu_status": status("serve-shared.status"),
}))' "$OUT" "${used[0]}" "${used[1]}" "${used[2]}")"
verdict=$(python3 - "$REPORT" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["sections"]["serve"]
bad = []
if s["tune_status"] != [200, 200]:
    bad.append(f"tunes answered {s['tune_status']}")
if len(set(s["max_batch_size"])) != 1:
    bad.append(f"two tunes disagree: {s['max_batch_size']}")
u = s["gpu_used_mib_before_between_after"]
if None not in u and u[2] - u[1] > 64:
    bad.append(f"GPU memory grew {u[2] - u[1]} MiB between tunes")
if not (s["devices_nvml"].get("uuid") or "").startswith("GPU-"):
    bad.append("/devices has no NVML UUID")
if s["metrics_with_gpu_labels"] == 0:
    bad.append("/metrics has no series with GPU labels")
if s["shared_gpu_status"] != 409:
    bad.append(f"a GPU another process holds answered {s['shared_gpu_status']}, not 409")
print("; ".join(bad))
PY
)
[ -n "$verdict" ] && fail "serve: $verdict"

note "fault drill: a deliberate illegal address in a throwaway worker, then a new process"
timeout 120 "$BIN" worker --fault-drill > "$OUT/fault-drill.json" 2> "$OUT/fault-drill.log"
drill_exit=$?
after_drill=$(gpu_used_mib)
timeout 120 "$BIN" probe examples/mnist-mlp-sgd.json --device cuda --batch-size 1024 --json \
  > "$OUT/after-drill.json" 2> "$OUT/after-drill.log"
record "fault drill" "$(py '
import json, sys
def load(path):
    try:
        return json.loads(open(path).read() or "null")
    except Exception:
        return None
drill = load(sys.argv[1]) or {}
after = load(sys.argv[2]) or []
print(json.dumps({
    "exit_code": int(sys.argv[3]),
    "drill": drill.get("drill"),
    "open_failed": drill.get("open_failed"),
    "gpu_used_mib_after_drill": json.loads(sys.argv[4]),
    "new_process_probe": [m.get("outcome") for m in after],
}))' "$OUT/fault-drill.json" "$OUT/after-drill.json" "$drill_exit" "$after_drill")"
verdict=$(python3 - "$REPORT" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["sections"]["fault drill"]
bad = []
d = s["drill"] or {}
if s["exit_code"] != 3 or not d.get("classified_as_fault"):
    bad.append(f"the fault was not told apart from out-of-memory (exit {s['exit_code']}, {s['open_failed'] or d.get('synchronize')})")
if s["new_process_probe"] != ["fit"]:
    bad.append(f"a new process after the fault probed {s['new_process_probe']}, not a fit")
print("; ".join(bad))
PY
)
[ -n "$verdict" ] && fail "fault drill: $verdict"

if [ "$QUICK" = 0 ]; then
  note "throughput"
  peak_arg=${peak:+--peak-tflops $peak}
  cat > "$OUT/wide-mlp.json" <<'JOB'
{"model": {"input_shape": [3, 32, 32], "hidden_layers": [4096, 4096, 4096], "num_classes": 10},
 "optimizer": {"name": "sgd"}, "search": {"steps_per_probe": 4}}
JOB
  # shellcheck disable=SC2086
  timeout 200 "$BIN" probe "$OUT/wide-mlp.json" --device cuda $peak_arg --json \
    --batch-size 256,1024,4096,16384,65536 > "$OUT/throughput-wide.json" 2> "$OUT/throughput-wide.log" \
    || fail "wide-MLP throughput (see throughput-wide.log)"
  record throughput "$(py '
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except Exception:
    rows = []
print(json.dumps({"wide_mlp_sgd": [{k: m.get(k) for k in ("batch_size", "outcome", "samples_per_second", "tflops", "peak_share")} for m in rows]}))' "$OUT/throughput-wide.json")"
fi

# The CUDA stand-in's assumptions (tests/standin/driver.cpp), as this run found them: true
# (confirmed), false (refuted), null (not measured). On the stand-in they hold by construction.
python3 - "$REPORT" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
s = report["sections"]
d = s["doctor"]
pool, context = d.get("pool_last_probe"), d.get("context")
drill = (s.get("fault drill") or {}).get("drill") or {}
ratios = [r for n, t in s.items() if n.startswith("tune ") for r in t["device_over_model"]]
report["assumptions"] = {
    "kernels load as CUBIN for the device's architecture": d.get("kernels", "").startswith("CUBIN") if d.get("kernels") else None,
    "a fault is sticky: every later call of the process fails": drill.get("sticky"),
    "a pool trimmed to zero reserves nothing": None if pool is None else pool["reserved_after_trim"] == 0,
    "no allocation outlives its probe": None if pool is None else pool["used_after"] <= pool["used_before"],
    "the context takes no more than the catalogue's reserve": None if context is None else context["context_over_reserve"] <= 1.0,
    "the driver rounds allocations as the memory model does": None if not ratios else all(r == 1.0 for r in ratios),
}
json.dump(report, open(sys.argv[1], "w"), indent=2)
PY

python3 - "$REPORT" "$OUT/summary.md" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
s = report["sections"]
lines = ["# headroom GPU check", ""]
if s["doctor"].get("standin"):
    lines += ["**This ran on the CUDA stand-in, not a GPU: no figure below is a GPU result.**", ""]
m = s["machine"]
quick = " (quick)" if m["quick"] else ""
lines.append(f"- date {m['date']}, commit {m['commit']}, GPU {m['nvidia_smi_gpu']}, driver {m['nvidia_smi_driver']}{quick}")
d = s["doctor"]
lines.append(f"- doctor: passed {d['passed']}, GPU checked {d['gpu_checked']}; {d['driver']}; {d['nvrtc']}; kernels {d['kernels']}")
lines += ["", "| example | max | predicted | measured/predicted | confirmations | device/model | GPU MiB before, after | seconds |", "|---|---|---|---|---|---|---|---|"]
for name, t in sorted(s.items()):
    if name.startswith("tune "):
        lines.append(f"| {name[5:]} | {t['max_batch_size']} | {t['predicted_max_batch_size']} | {t['measured_over_predicted']} | {t['confirmations']} | {t['device_over_model']} | {t['gpu_used_mib_before']}, {t['gpu_used_mib_after']} | {t['wall_seconds']} |")
if "serve" in s:
    v = s["serve"]
    lines += ["", f"- serve: tunes {v['tune_status']} max {v['max_batch_size']}, GPU MiB before/between/after {v['gpu_used_mib_before_between_after']}, 409 rule: {v['shared_gpu_status']}, NVML {v['devices_nvml']}"]
for row in s.get("throughput", {}).get("wide_mlp_sgd", []):
    lines.append(f"- wide MLP batch {row['batch_size']}: {row['outcome']}, {row['samples_per_second']} samples/s, {row['tflops']} TFLOP/s, peak share {row['peak_share']}")
pool, context = d.get("pool_last_probe"), d.get("context")
if pool:
    lines.append(f"- memory pool, last probe (bytes): reserved {pool['reserved_before']} before, {pool['reserved_peak']} at peak, {pool['reserved_before_trim']} freed, {pool['reserved_after_trim']} after a trim to zero; live {pool['used_before']} before, {pool['used_after']} after")
if context:
    lines.append(f"- context and kernels: {context['context_bytes']} bytes, {context['context_over_reserve']:.3f} of the catalogue's reserve")
f = s.get("fault drill")
if f:
    dr = f["drill"] or {}
    lines.append(f"- fault drill: exit {f['exit_code']}, synchronise: {dr.get('synchronize')}; sticky {dr.get('sticky')}; a new process then probed {f['new_process_probe']}")
lines += ["", "| the stand-in assumed | this run |", "|---|---|"]
for claim, held in report.get("assumptions", {}).items():
    lines.append(f"| {claim} | {'confirmed' if held else 'not measured' if held is None else 'REFUTED'} |")
lines += ["", f"failures: {len(report['failures'])}"] + [f"- {f}" for f in report["failures"]]
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
PY
cat "$OUT/summary.md"
[ "$(py 'import json,sys; print(len(json.load(open(sys.argv[1]))["failures"]))' "$REPORT")" = 0 ]
