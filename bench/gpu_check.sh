#!/usr/bin/env bash
# The prepared device check (issue 10): everything this project runs on a GPU, in one go, in
# well under 8 minutes on one H100/H200. Results go to OUTDIR as text (one file per step) and
# OUTDIR/summary.json (each step's exit code and milliseconds); table5.json holds the Table 5 numbers.
#
#     bash bench/gpu_check.sh OUTDIR
#
# Steps (each with its own time limit; a failing step does not stop the others):
#   env       the GPU, the driver and torch as seen from Python
#   pytest    pytest -m gpu: fused tangents vs torch.func.jvp on CUDA, one step of every rule on
#             CUDA vs the CPU, stages on CUDA streams vs sequential (2-GPU nccl test skips on 1)
#   torchrun  a 1-rank torchrun with nccl on CUDA tensors: MNIST MLP GrAPE, 1 epoch
#   step_time bench/step_time.py --device cuda on the MLP, LeNet, ResNet-20 and the Transformer
#   table5    bench/table5.py --device cuda: depth 2/4/8, sequential BP, fair BP (eager fused,
#             CUDA graph), layer-parallel GrAPE on CUDA streams, with a profile at depth 8
#   table5_graph  the same with GrAPE's whole step captured in a CUDA graph
#
# Needs: python3 with torch (CUDA), pyyaml, pytest; `datasets` for the torchrun step only (on a
# machine without it, put its wheels in .whl/ and they are installed to a temporary folder).
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GRAPE_CACHE_DIR="${GRAPE_CACHE_DIR:-$(mktemp -d)}"
if ! "$py" -c "import datasets" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$site"
fi

steps=()
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, output to OUTDIR/NAME.txt
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    t0=$(date +%s%N)
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    rc=$?
    local ms=$((($(date +%s%N) - t0) / 1000000))
    echo "   exit $rc after ${ms} ms; last lines:"
    tail -n 4 "$out/$name.txt" | sed 's/^/   | /'
    steps+=("{\"step\": \"$name\", \"exit\": $rc, \"ms\": $ms}")
}

step env 60 bash -c "nvidia-smi; $py -c 'import torch, sys; print(sys.version); \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), \
torch.cuda.device_count(), torch.distributed.is_nccl_available())'"
step pytest 200 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
run_dir=$(mktemp -d)/mnist_mlp_grape
step torchrun 150 bash -c "$py -m torch.distributed.run --standalone --nproc_per_node=1 \
-m grape_dist.train --config configs/mnist_mlp_grape.yaml --quiet --out $run_dir \
train.epochs=1 train.device=cuda && cat $run_dir/summary.json"
step step_time 150 "$py" bench/step_time.py --device cuda --batch 256 --steps 20 \
    --models mlp,cnn,resnet20,transformer
step table5 240 "$py" bench/table5.py --device cuda --profile --json "$out/table5.json"
# The whole GrAPE step in one CUDA graph, in a process of its own (a failed capture can leave
# the CUDA context unusable).
step table5_graph 150 "$py" bench/table5.py --device cuda --grape-graph \
    --methods bp-seq,bp-graph,grape-streams,grape-graph,grape-graph-seq,grape-graph-m32

(IFS=,; echo "[${steps[*]}]") >"$out/summary.json"
echo "== results in $out"
