#!/usr/bin/env bash
# Submit a kdcache command to a running Ray cluster as a Ray job.
#
#   export RAY_ADDRESS=http://HEAD:8265          # the head's dashboard (job API) address
#   deploy/submit.sh cache --teacher ./bert-base --corpus 's3://b/corpus/*.jsonl.zst' --out s3://b/caches/bert
#   deploy/submit.sh train --cache s3://b/caches/bert --student ./students/d6 --out runs/d6 \
#       --storage-path s3://b/ray --workers 8 --use-gpu student_url=s3://b/students/d6
#
# Run it from the repository root: the working directory is uploaded with the job (files that
# .gitignore lists are left out), so local configs and student folders travel with it. Inside the
# job RAY_ADDRESS is set, so `kdcache` joins this cluster and never starts one of its own.
#
# Environment:
#   RAY_ADDRESS          required: http://HEAD:8265
#   KDCACHE_RUNTIME_ENV  runtime env YAML (default deploy/runtime_env.yaml)
#   KDCACHE_JOB_ID       submission id (default kdcache-<command>-<time>); `ray job logs/status/stop ID`
#   KDCACHE_NO_WAIT=1    return once submitted instead of following the logs
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the head, e.g. http://127.0.0.1:8265}"
command="$1"
shift
case "$command" in
  cache|train|plan|verify|inspect|init-student) ;;
  *) echo "deploy/submit.sh: unknown kdcache command '$command' (cache, train, plan, verify, inspect, init-student)" >&2
     exit 2 ;;
esac

runtime_env="${KDCACHE_RUNTIME_ENV:-deploy/runtime_env.yaml}"
job_id="${KDCACHE_JOB_ID:-kdcache-${command}-$(date +%Y%m%d-%H%M%S)}"
wait_flag=()
[[ "${KDCACHE_NO_WAIT:-0}" == 1 ]] && wait_flag=(--no-wait)

exec ray job submit \
  --address "$RAY_ADDRESS" \
  --submission-id "$job_id" \
  --working-dir . \
  --runtime-env "$runtime_env" \
  "${wait_flag[@]}" \
  -- kdcache "$command" "$@"
