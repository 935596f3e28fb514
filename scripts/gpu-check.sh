#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no Rust toolchain: takes a prebuilt
# target/release/headroom, finds the CUDA libraries, runs `doctor`, tunes every example with
# --json, confirms each answer with fresh probes, checks that memory comes back, and measures
# training-step throughput against batch size. Everything goes under $OUT (default ./gpu-check-out);
# a short table is printed last. Exit status: non-zero if any step failed.
set -u
cd "$(dirname "$0")/.."
BIN=${HEADROOM_BIN:-target/release/headroom}
# The device under test; `host` dry-runs this script on a machine without a GPU.
DEVICE=${HEADROOM_DEVICE:-cuda}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
failures=0
summary=()
note() { echo "== $*" >&2; }
failed() { failures=$((failures + 1)); summary+=("FAIL  $*"); }

# The loader path: CUDA toolkits, then Python wheels (nvidia/*/lib), then what is already there.
for dir in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib \
           $(python3 -c 'import glob, site; print(" ".join(d for s in site.getsitepackages() for d in glob.glob(s + "/nvidia/*/lib")))' 2>/dev/null); do
  [ -d "$dir" ] && LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}

gpu_used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | tr -d ' '; }
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null)
# f32 (non-tensor-core) peak by model, TFLOP/s.
case "$gpu_name" in
  *H200*|*H100*SXM*|*"H100 80GB HBM3"*) peak=67 ;;
  *H100*NVL*) peak=60 ;;
  *H100*) peak=51 ;;
  *A100*) peak=19.5 ;;
  *) peak="" ;;
esac
peak_arg=${peak:+--peak-tflops $peak}
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  echo "gpu $gpu_name (f32 peak ${peak:-unknown} TFLOP/s)"
  nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader -i 0
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
} | tee "$OUT/machine.txt"

note "doctor"
if timeout 120 "$BIN" doctor > "$OUT/doctor.txt" 2>&1; then
  summary+=("pass  doctor ($(grep -c '^pass' "$OUT/doctor.txt") checks passed)")
else
  failed "doctor (see doctor.txt)"; grep -E '^FAIL' "$OUT/doctor.txt" | head -20 >&2
fi

field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

for job in examples/*.json; do
  name=$(basename "$job" .json)
  case "$name" in
    wide-*)
      # Its largest batch on a big card takes tens of seconds a step on the CUDA-core GEMM, so the
      # check caps it at 2^18 samples (limited_by "max") to fit its time.
      python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['search']['max']=262144; print(json.dumps(d))" \
        "$job" > "$OUT/$name.json"
      job="$OUT/$name.json" ;;
  esac
  note "tune $name"
  before=$(gpu_used_mib)
  start=$(date +%s.%N)
  if ! timeout 150 "$BIN" tune "$job" --device "$DEVICE" --json > "$OUT/tune-$name.json" 2> "$OUT/tune-$name.log"; then
    failed "tune $name (see tune-$name.log)"; continue
  fi
  wall=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
  after=$(gpu_used_mib)
  max=$(field "$OUT/tune-$name.json" 'd["max_batch_size"]')
  rec=$(field "$OUT/tune-$name.json" 'd["recommended_batch_size"]')
  limited=$(field "$OUT/tune-$name.json" 'd["limited_by"]')
  predicted=$(field "$OUT/tune-$name.json" 'd["predicted_max_batch_size"]')
  probes=$(field "$OUT/tune-$name.json" 'len(d["probes"])')
  first_oom=$(field "$OUT/tune-$name.json" 'min([p["batch_size"] for p in d["probes"] if p["outcome"]=="oom"] or [0])')
  multiple=$(python3 -c "import json; print(json.load(open('$job')).get('search', {}).get('multiple_of', 8))")
  summary+=("tune  $name: max $max recommended $rec ($limited), predicted $predicted (ratio $(python3 -c "print(f'{$max/$predicted:.3f}')")), $probes probes, ${wall}s, GPU used ${before}->${after} MiB")
  [ $(( ${after:-0} - ${before:-0} )) -gt 64 ] && failed "$name: GPU memory grew by $(( after - before )) MiB across the tune"
  # Proof: a fresh probe at max fits; one multiple_of above the first OOM does not.
  sizes="$max"
  [ "$first_oom" != 0 ] && sizes="$max,$((first_oom + multiple))"
  if timeout 120 "$BIN" probe "$job" --device "$DEVICE" --batch-size "$sizes" --json > "$OUT/confirm-$name.json" 2> "$OUT/confirm-$name.log"; then
    outcomes=$(field "$OUT/confirm-$name.json" '" ".join("%d:%s" % (m["batch_size"], m["outcome"]) for m in d)')
    summary+=("proof $name: $outcomes")
    case "$outcomes" in "$max:fit"|"$max:fit $((first_oom + multiple)):oom") ;; *) failed "$name: confirmation $outcomes" ;; esac
  else
    failed "confirm $name (see confirm-$name.log)"
  fi
done

note "throughput"
cat > "$OUT/wide-mlp.json" <<'JOB'
{"model": {"input_shape": [3, 32, 32], "hidden_layers": [4096, 4096, 4096], "num_classes": 10},
 "optimizer": {"name": "sgd"}, "search": {"steps_per_probe": 4}}
JOB
cat > "$OUT/cifar-mlp.json" <<'JOB'
{"model": {"input_shape": [3, 32, 32], "hidden_layers": [128], "num_classes": 10},
 "optimizer": {"name": "adam"}, "search": {"steps_per_probe": 4}}
JOB
timeout 150 "$BIN" probe "$OUT/cifar-mlp.json" --device "$DEVICE" $peak_arg \
  --batch-size 256,4096,65536,1048576,8388608 > "$OUT/throughput-cifar.txt" 2>&1 || failed "cifar throughput"
timeout 150 "$BIN" probe "$OUT/wide-mlp.json" --device "$DEVICE" $peak_arg \
  --batch-size 256,1024,4096,16384,65536 > "$OUT/throughput-wide.txt" 2>&1 || failed "wide throughput"

echo
echo "headroom GPU check on $gpu_name"
printf '%s\n' "${summary[@]}"
echo "-- CIFAR MLP 3072-128-10 (Adam)"; cat "$OUT/throughput-cifar.txt"
echo "-- wide MLP 3072-4096-4096-4096-10 (SGD)"; cat "$OUT/throughput-wide.txt"
echo "failures: $failures"
[ "$failures" -eq 0 ]
