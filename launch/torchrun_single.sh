#!/usr/bin/env bash
# One node, NPROC ranks, torchrun's standalone rendezvous (a local store on a free port).
#
#     launch/torchrun_single.sh CONFIG [OUT] [key=value ...]
#     NPROC=4 launch/torchrun_single.sh configs/mnist_mlp_grape.yaml runs/mlp pipeline.dp=2
#
# CONFIG   a YAML config (configs/...), relative to the current folder
# OUT      run folder (--out); optional, recognised by having no `=` in it
# key=value  dotted overrides, passed on to grape_dist.train (and so are --quiet, --overwrite)
#
# Environment:
#   NPROC    ranks on this node (default: the number of GPUs torch sees, or 1 without any)
#   PYTHON   the interpreter with grape_dist installed (default: python3; in the images: python)
#   GRAPE_DATA_DIR, OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES, ... are passed through.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}
[[ $# -ge 1 ]] || usage
[[ $1 == -h || $1 == --help ]] && usage 0

config=$1
shift
args=(--config "$config")
if [[ $# -gt 0 && $1 != *=* && $1 != -* ]]; then
    args+=(--out "$1")
    shift
fi
py=${PYTHON:-python3}
nproc=${NPROC:-$("$py" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}

set -x
exec "$py" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$nproc" \
    -m grape_dist.train "${args[@]}" "$@"
