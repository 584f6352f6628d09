#!/usr/bin/env bash
# Table 3 on a GPU (issue 17, item 5): ResNet-20 on the full CIFAR-10 with augmentation (random
# crop, pad 4, and flip), BP, DFA + calibration T=1 and GrAPE + calibration T=1 (the shipped
# CPU-size configs, configs/cifar10_resnet20_*.yaml, at full size), one after another, EPOCHS
# epochs each with the cosine schedule over them. Each run writes its folder under OUTDIR
# (metrics.jsonl, timing.jsonl, summary.json), then `grape_dist.report` draws the curves and the
# table over them (OUTDIR/report/report.md). Sized for about 8 minutes on one H100: EPOCHS
# defaults to 8 (lower it if the first run's epochs take longer than 20 s; each run logs its
# epoch times).
#
#     bash bench/gpu_accuracy.sh OUTDIR                        # on the GPU machine
#     DEVICE=cpu SUBSET=256 EPOCHS=1 bash bench/gpu_accuracy.sh /tmp/acc   # its CPU check
#
# The GPU machine has no `datasets` and no network: carry the wheels and CIFAR-10 as in the
# header of bench/gpu_issue17.sh (.whl/ and .gpu_data/), install the wheels to a folder on
# PYTHONPATH there, and run this script.
set -uo pipefail
out=${1:?usage: bash bench/gpu_accuracy.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -z ${GRAPE_DATA_DIR:-} ]]; then
    GRAPE_DATA_DIR=$PWD/.gpu_data
    [[ -d $GRAPE_DATA_DIR ]] || GRAPE_DATA_DIR=$PWD/../shared/data
fi
export GRAPE_DATA_DIR
epochs=${EPOCHS:-8}
subset=${SUBSET:-0}
device=${DEVICE:-cuda}
echo "# $(date -u +%FT%TZ) $(hostname): ResNet-20, CIFAR-10 (train_subset=$subset, 0 = all" \
    "50,000), augmented, $epochs epochs, device $device, data from $GRAPE_DATA_DIR"
status=0
for rule in bp dfa grape; do
    extra=()
    [[ $rule != bp ]] && extra=(calibration.every_epochs=1)
    start=$SECONDS
    "$py" -m grape_dist.train --config "configs/cifar10_resnet20_$rule.yaml" \
        --out "$out/resnet20_$rule" --overwrite \
        data.train_subset="$subset" data.augment=true train.epochs="$epochs" \
        train.device="$device" train.progress=false train.checkpoint=false \
        "${extra[@]}" 2>&1 | tee "$out/resnet20_$rule.log" | grep -E "epoch [0-9]+/|error"
    rc=${PIPESTATUS[0]}
    echo "== $rule: exit $rc, $((SECONDS - start)) s"
    [[ $rc -ne 0 ]] && status=$rc
done
"$py" -m grape_dist.report "$out" --out "$out/report" >/dev/null &&
    sed -n '/^| run group/,/^$/p' "$out/report/report.md"
exit "$status"
