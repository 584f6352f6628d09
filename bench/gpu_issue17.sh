#!/usr/bin/env bash
# The prepared device check of issue 17 (accuracy under the paper's protocol), at most 8
# minutes on one H100/H200: every Table 2/3 config (CIFAR-100 AlexNet, VGG-16, ResNet-20,
# ResNet-56; BP, DFA + calibration T=1, GrAPE + calibration T=1; augmentation on, the shipped
# calibration form) trained for 3 epochs on CIFAR-10 standing in for CIFAR-100 (10,000
# training images), printing the test loss after each epoch: it must fall. Results go to
# OUTDIR, one folder per run and falling_loss.txt.
#
# Setup here, once; the wheels (the device has no `datasets`) and CIFAR-10 travel with carry:
#   printf '/.whl/\n/.gpu_data/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   mkdir -p .gpu_data && cp -r ../shared/data/cifar10 .gpu_data/
# Then on the device (carry [".whl", ".gpu_data"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; bash bench/gpu_issue17.sh $OUT
set -uo pipefail
out=${1:?usage: bash bench/gpu_issue17.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GRAPE_DATA_DIR=${GRAPE_DATA_DIR:-$PWD/.gpu_data}
common=(data.name=cifar10 data.train_subset=10000 train.epochs=3 train.device=cuda
        train.progress=false train.checkpoint=false)
for model in alexnet vgg16 resnet20 resnet56; do
    for rule in bp dfa grape; do
        extra=()
        [[ $rule != bp ]] && extra=(calibration.every_epochs=1)
        name=${model}_${rule}
        echo "== $name"
        timeout 100 "$py" -m grape_dist.train --config "configs/cifar100_${model}_${rule}.yaml" \
            --out "$out/$name" --quiet "${common[@]}" "${extra[@]}" >"$out/$name.log" 2>&1
        echo "   exit $?"
    done
done
"$py" - "$out" <<'PY' | tee "$out/falling_loss.txt"
import json
import sys
from pathlib import Path

for run in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    rows = [json.loads(line) for line in run.read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    losses = [r["loss"] for r in test]
    falling = len(losses) == 3 and all(b < a for a, b in zip(losses, losses[1:]))
    print(f"{run.parent.name:16s} test loss {' '.join(f'{v:.3f}' for v in losses):24s} "
          f"accuracy {' '.join(f'{100 * r['accuracy']:.2f}' for r in test):20s} "
          f"{'falling' if falling else 'NOT FALLING'}")
PY
