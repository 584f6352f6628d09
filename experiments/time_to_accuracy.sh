#!/usr/bin/env bash
# Time to accuracy on 2 ranks (issue 16): the CPU-size ResNet-20 (CIFAR-10, 10,000 images, 5
# epochs) and the Shakespeare transformer (4,096 windows, 4 epochs), GrAPE + calibration T=1
# in the shipped form against BP on its fastest torch schedule at P = 2 (1F1B,
# bench/pipeline.py), the same micro-batches. BP on ResNet-20 uses the same optimiser as GrAPE
# (Adam 1e-3): its config's SGD lr 0.1 stalls at 31-34 % with BatchNorm over 16-row
# micro-batches. Each rank 1 thread. Then the time each run needs to reach GrAPE's final test
# metric, from timing.jsonl (training seconds: steps and calibrations, no evaluation).
#
#     GRAPE_DATA_DIR=../shared/data bash experiments/time_to_accuracy.sh runs/time_to_accuracy
#     python -m grape_dist.report runs/time_to_accuracy --out runs/time_to_accuracy/report
set -euo pipefail
out=${1:-runs/time_to_accuracy}
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
torchrun=${TORCHRUN:-.venv/bin/torchrun}

run2() {  # run2 NAME CONFIG [key=value ...]: one run on 2 ranks of 1 thread each
    local name=$1 config=$2
    shift 2
    echo "== $name ($(uptime))"
    OMP_NUM_THREADS=1 "$torchrun" --standalone --nproc_per_node=2 -m grape_dist.train \
        --config "configs/$config.yaml" --out "$out/$name" --quiet train.threads=1 "$@"
}

resnet=(pipeline.micro_batches=8)
run2 resnet20_grape_cal1 cifar10_resnet20_grape "${resnet[@]}" calibration.every_epochs=1
run2 resnet20_bp_1f1b cifar10_resnet20_bp "${resnet[@]}" pipeline.schedule=1f1b data.drop_last=true \
    optim.name=adam optim.lr=1e-3 optim.weight_decay=1e-4
lm=(data.train_subset=4096 train.epochs=4 pipeline.micro_batches=4)
run2 shakespeare_grape_cal1 shakespeare_transformer_grape "${lm[@]}" calibration.every_epochs=1
run2 shakespeare_bp_1f1b shakespeare_transformer_bp "${lm[@]}" pipeline.schedule=1f1b data.drop_last=true

"$py" - "$out" <<'PY'
import sys
from pathlib import Path

from grape_dist.report import discover, metric_over_time, time_to_reach

runs = {r.path.name: r for r in discover([Path(sys.argv[1])])}
for model in ("resnet20", "shakespeare"):
    grape, bp = runs.get(f"{model}_grape_cal1"), runs.get(f"{model}_bp_1f1b")
    if grape is None or bp is None:
        continue
    target = metric_over_time(grape)[-1][1]
    unit = "perplexity" if grape.is_lm else "accuracy %"
    print(f"{model}: GrAPE's final test {unit} {target:.2f}")
    for name, run in (("GrAPE + cal", grape), ("BP 1F1B", bp)):
        pts = " ".join(f"{v:.2f}@{t:.0f}s" for t, v in metric_over_time(run))
        t = time_to_reach(run, target)
        print(f"  {name:12s} reaches it after {'never' if t is None else f'{t:.0f} s'}"
              f" (test {unit} after each epoch @ training seconds: {pts})")
PY
