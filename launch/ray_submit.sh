#!/usr/bin/env bash
# Submit a training run to a Ray cluster as a Ray job: the current folder (the repository, less
# what .gitignore and the excludes below leave out) is uploaded as the job's working directory
# and `python -m grape_dist.ray_job` runs there on the cluster, with NUM_WORKERS training workers.
#
#     RAY_ADDRESS=http://HEAD:8265 launch/ray_submit.sh CONFIG OUT [key=value ...]
#     RAY_ADDRESS=http://HEAD:8265 NUM_WORKERS=8 USE_GPU=1 \
#         launch/ray_submit.sh configs/cifar10_resnet20_grape.yaml /shared/runs/r20 pipeline.dp=4
#
# CONFIG   a YAML config, relative to the repository root (the job's working directory)
# OUT      run folder, on the cluster's shared storage (--out)
# key=value  dotted overrides, passed on
#
# Environment:
#   RAY_ADDRESS    the cluster's dashboard / job server (required), e.g. http://head:8265
#   NUM_WORKERS    training workers (default 1)
#   USE_GPU        1: one GPU per worker (--use-gpu); default 0
#   RAY_NO_WAIT    1: return once submitted (ray job submit --no-wait); follow it with
#                  `ray job logs --follow JOB_ID`
#   RAY_SUBMISSION_ID  a job id of your own (default: Ray picks one)
#   RAY            the ray CLI (default: ray)
# The cluster's nodes need grape_dist's dependencies (the images in docker/ have them; or give a
# runtime environment of your own with pip); GRAPE_DATA_DIR must be set on the cluster's nodes.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}
[[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && usage 0
[[ $# -ge 2 ]] || usage
: "${RAY_ADDRESS:?set RAY_ADDRESS, e.g. http://head:8265 (see --help)}"

config=$1
out=$2
shift 2
job=(--config "$config" --num-workers "${NUM_WORKERS:-1}")
if [[ ${USE_GPU:-0} == 1 ]]; then
    job+=(--use-gpu)
fi
job+=(--out "$out")

submit=(--address "$RAY_ADDRESS" --working-dir .
        --runtime-env-json '{"excludes": [".git", ".venv", "venv", ".whl", "runs", "bench/results"]}')
if [[ ${RAY_NO_WAIT:-0} == 1 ]]; then
    submit+=(--no-wait)
fi
if [[ -n ${RAY_SUBMISSION_ID:-} ]]; then
    submit+=(--submission-id "$RAY_SUBMISSION_ID")
fi

set -x
exec "${RAY:-ray}" job submit "${submit[@]}" -- python -m grape_dist.ray_job "${job[@]}" "$@"
