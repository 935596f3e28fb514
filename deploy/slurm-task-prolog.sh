#!/usr/bin/env bash
# Slurm TaskProlog example: asks the node's headroom service for the batch size of the job's model
# and exports it to the job as HEADROOM_BATCH_SIZE (Slurm reads "export NAME=value" lines from a
# TaskProlog's stdout). The job points HEADROOM_JOB at its job description (JSON).
#
#   slurm.conf:  TaskProlog=/etc/slurm/headroom-task-prolog.sh
#   sbatch:      sbatch --export=ALL,HEADROOM_JOB=$PWD/job.json train.sh
set -u
server=${HEADROOM_URL:-http://127.0.0.1:8080}
[ -n "${HEADROOM_JOB:-}" ] && [ -r "$HEADROOM_JOB" ] || exit 0
device="cuda:${CUDA_VISIBLE_DEVICES%%,*}"
[ "$device" = "cuda:" ] && device=auto
answer=$(curl -fsS --max-time 600 -H 'Content-Type: application/json' \
  ${HEADROOM_TOKEN:+-H "Authorization: Bearer $HEADROOM_TOKEN"} \
  --data "$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); j["device"]=sys.argv[2]; print(json.dumps(j))' "$HEADROOM_JOB" "$device")" \
  "$server/tune") || { echo "print headroom: no answer from $server; keeping the job's own batch size" ; exit 0; }
batch=$(printf '%s' "$answer" | python3 -c 'import json,sys; print(json.load(sys.stdin)["recommended_batch_size"])')
echo "export HEADROOM_BATCH_SIZE=$batch"
