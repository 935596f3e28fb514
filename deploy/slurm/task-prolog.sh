#!/bin/sh
# Slurm TaskProlog: asks the node's headroom service (deploy/systemd/headroom.service) for the
# batch size of the job's model on the job's first GPU, and exports it to the job as
# HEADROOM_BATCH_SIZE (Slurm reads "export NAME=value" lines from a TaskProlog's stdout).
#
#   slurm.conf:  TaskProlog=/etc/slurm/headroom-task-prolog.sh
#   sbatch:      sbatch --gres=gpu:1 --export=ALL,HEADROOM_JOB=$PWD/job.json train.sh
#   train.sh:    python train.py --batch-size "${HEADROOM_BATCH_SIZE:-256}"
#
# It never fails the user's job: without a job file, a GPU, the server or an answer (a busy
# GPU, a model that does not fit, a timeout), it exports nothing and says why in one line on
# stderr. Slurm gives prologs no PATH, so every program is named by its absolute path.
PATH=/usr/bin:/bin
export PATH

HEADROOM=${HEADROOM_BIN:-/usr/local/bin/headroom}
SERVER=${HEADROOM_URL:-http://127.0.0.1:8080}
TIMEOUT=${HEADROOM_PROLOG_TIMEOUT:-600}

say() { /usr/bin/printf 'headroom: %s\n' "$*" >&2; }

[ -n "${HEADROOM_JOB:-}" ] || exit 0
if [ ! -r "$HEADROOM_JOB" ]; then
  say "cannot read HEADROOM_JOB=$HEADROOM_JOB; keeping the job's own batch size"
  exit 0
fi

# The job's first GPU: by its node-wide index (SLURM_*_GPUS), which is the service's cuda:N when
# it runs with CUDA_DEVICE_ORDER=PCI_BUS_ID, or by its UUID (GPU-...), as some sites set
# CUDA_VISIBLE_DEVICES; the service finds the GPU with that UUID. A bare index in
# CUDA_VISIBLE_DEVICES alone counts from the job's own GPUs under ConstrainDevices, not the
# node's, so it is only used when Slurm gives nothing else.
gpus=${SLURM_STEP_GPUS:-${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}}
gpu=${gpus%%,*}
case "$gpu" in
  GPU-*) target="--gpu-uuid $gpu" ;;
  '' | *[!0-9]*)
    say "this job has no GPU; not tuning"
    exit 0 ;;
  *) target="--device cuda:$gpu" ;;
esac

errors=$(/usr/bin/mktemp) || exit 0
# shellcheck disable=SC2086 # $target is two words by design
batch=$("$HEADROOM" tune "$HEADROOM_JOB" --server "$SERVER" $target \
          --timeout "$TIMEOUT" --batch-size-file /dev/fd/3 3>&1 >/dev/null 2>"$errors")
status=$?
reason=$(/usr/bin/sed -n 's/^error: //p' "$errors" | /usr/bin/tail -n 1)
/usr/bin/rm -f "$errors"
case "$status:$batch" in
  0:[0-9]*) echo "export HEADROOM_BATCH_SIZE=$batch" ;;
  *) say "no batch size for GPU $gpu (${reason:-exit status $status}); keeping the job's own" ;;
esac
exit 0
