#!/usr/bin/env bash
# Several nodes: run this on every node, with the same NNODES, MASTER_ADDR, MASTER_PORT and
# RDZV_ID; torchrun's c10d rendezvous (a TCP store on MASTER_ADDR:MASTER_PORT) assigns the ranks.
#
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=4 \
#         launch/torchrun_multinode.sh CONFIG [OUT] [key=value ...]      # on node0
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=4 \
#         launch/torchrun_multinode.sh CONFIG [OUT] [key=value ...]      # on node1
#
# CONFIG, OUT, key=value: as for launch/torchrun_single.sh. OUT must be on storage every node
# sees (rank 0 writes the metrics; every stage's rank writes its checkpoints).
#
# Environment:
#   NNODES          nodes (required); MIN:MAX for an elastic job
#   MASTER_ADDR     host (name or IP) of the rendezvous store, reachable from every node (required)
#   MASTER_PORT     its port (default 29500)
#   NODE_RANK       optional: 0 on the MASTER_ADDR node, anything else elsewhere; sets which node
#                   hosts the store (otherwise torchrun decides by matching MASTER_ADDR against
#                   this machine's names and addresses). Ranks still come from the rendezvous.
#   NPROC_PER_NODE  ranks per node (default: the number of GPUs torch sees, or 1)
#   RDZV_ID         job id shared by all nodes, unique per job: with MAX_RESTARTS a restart
#                   continues only a run its own job started (default grape_dist-MASTER_ADDR-MASTER_PORT)
#   MAX_RESTARTS    torchrun --max-restarts (default 0)
#   PYTHON          the interpreter with grape_dist installed (default python3)
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME: set them when the nodes have several networks.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}
[[ $# -ge 1 ]] || usage
[[ $1 == -h || $1 == --help ]] && usage 0
: "${NNODES:?set NNODES (see --help)}" "${MASTER_ADDR:?set MASTER_ADDR (see --help)}"

config=$1
shift
args=(--config "$config")
if [[ $# -gt 0 && $1 != *=* && $1 != -* ]]; then
    args+=(--out "$1")
    shift
fi
py=${PYTHON:-python3}
port=${MASTER_PORT:-29500}
nproc=${NPROC_PER_NODE:-$("$py" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
run=(--nnodes="$NNODES" --nproc_per_node="$nproc" --rdzv-backend=c10d
     --rdzv-endpoint="$MASTER_ADDR:$port" --rdzv-id="${RDZV_ID:-grape_dist-$MASTER_ADDR-$port}"
     --max-restarts="${MAX_RESTARTS:-0}")
if [[ -n ${NODE_RANK:-} ]]; then
    if [[ $NODE_RANK == 0 ]]; then
        run+=(--rdzv-conf=is_host=true)
    else
        run+=(--rdzv-conf=is_host=false)
    fi
fi

set -x
exec "$py" -m torch.distributed.run "${run[@]}" -m grape_dist.train "${args[@]}" "$@"
