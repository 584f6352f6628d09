#!/usr/bin/env bash
# ResNet-20 on CIFAR-10 sized for a 2-core CPU (issue 7): 10,000 training images, 5 epochs,
# tested on the 10,000 test images; BP, DFA + calibration T=1, GrAPE + calibration T=1, and
# GrAPE without calibration. One run after another, 2 threads each.
#
#     GRAPE_DATA_DIR=../shared/data bash experiments/cifar10_resnet20_cpu.sh runs/cifar10_resnet20
set -euo pipefail
out=${1:-runs/cifar10_resnet20}
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
run() {  # run NAME RULE OVERRIDES...
    local name=$1 rule=$2
    shift 2
    echo "== $name"
    "$py" -m grape_dist.train --config "configs/cifar10_resnet20_$rule.yaml" --out "$out/$name" \
        --quiet "$@"
    "$py" -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], \
'test acc %.4f (best %.4f), %.0fs' % (s['final_test_accuracy'], s['best_test_accuracy'], \
s['wall_seconds']))" "$out/$name/summary.json" "$name"
}
run bp bp
run dfa_cal1 dfa calibration.every_epochs=1
run grape_cal1 grape calibration.every_epochs=1
run grape grape
