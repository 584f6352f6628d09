#!/usr/bin/env bash
# The prepared device check of issue 16 (speed with feedback at every weight layer), at most 8
# minutes on one H100/H200 machine (16 CPU cores). Results go to OUTDIR, one file per step.
#
#     bash bench/gpu_issue16.sh OUTDIR
#
#   pipeline_resnet56    bench/pipeline.py --nproc 8 --threads 2 on the CPU cores, ResNet-56,
#                        GrAPE / DFA (shipped form) vs torch's BP schedules, M=8
#   pipeline_transformer the same on the transformer preset (8 layers)
#   table5               bench/table5.py --device cuda at depth 8: the paper's form and the
#                        layer form against the CUDA-graphed BP (target: >= 1.5x)
#   step_time            bench/step_time.py --device cuda on ResNet-20 and the transformer
set -uo pipefail
out=${1:?usage: bash bench/gpu_issue16.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "   exit $?"; tail -n 6 "$out/$name.txt" | sed 's/^/   | /'
}
step pipeline_resnet56 150 "$py" bench/pipeline.py --device cpu --nproc 8 --threads 2 \
    --preset resnet20 --depth 56 --micro 8 --methods grape,dfa,bp-gpipe,bp-1f1b \
    --steps 4 --warmup 2 --cost_reps 2 --json "$out/pipeline_resnet56.json"
step pipeline_transformer 150 "$py" bench/pipeline.py --device cpu --nproc 8 --threads 2 \
    --preset transformer --depth 8 --micro 8 --methods grape,dfa,bp-gpipe,bp-1f1b \
    --steps 4 --warmup 2 --cost_reps 2 --json "$out/pipeline_transformer.json"
step table5 120 "$py" bench/table5.py --device cuda --depths 8 --grape-graph \
    --methods bp-seq,bp-graph,grape-streams,grape-graph,grape-layer-streams,grape-layer-graph,dfa-layer-streams \
    --json "$out/table5.json"
step step_time 60 "$py" bench/step_time.py --device cuda --batch 256 --steps 20 \
    --models resnet20,transformer --skip-forward --json "$out/step_time.json"
echo "== results in $out"
