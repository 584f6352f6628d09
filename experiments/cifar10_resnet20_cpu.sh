#!/usr/bin/env bash
# ResNet-20 on CIFAR-10 sized for a 2-core CPU (issue 7): 10,000 training images, 5 epochs,
# tested on the 10,000 test images; BP, DFA + calibration T=1, GrAPE + calibration T=1, and
# GrAPE without calibration. One run after another, 2 threads each.
#
#     GRAPE_DATA_DIR=../shared/data bash experiments/cifar10_resnet20_cpu.sh runs/cifar10_resnet20
set -euo pipefail
out=${1:-runs/cifar10_resnet20}
cd "$(dirname "$0")/.."
common=()
# shellcheck source=experiments/common.sh
source experiments/common.sh
run_config bp cifar10_resnet20_bp
run_config dfa_cal1 cifar10_resnet20_dfa calibration.every_epochs=1
run_config grape_cal1 cifar10_resnet20_grape calibration.every_epochs=1
run_config grape cifar10_resnet20_grape
# Channel-shared conv feedback (one B column per channel, docs/resnet.md): the same runs.
run_config dfa_cal1_channel cifar10_resnet20_dfa calibration.every_epochs=1 feedback.conv=channel
run_config grape_cal1_channel cifar10_resnet20_grape calibration.every_epochs=1 \
    feedback.conv=channel
run_config grape_channel cifar10_resnet20_grape feedback.conv=channel
# Calibration triggered by alignment (mean grad_cos over blocks below 0.4, at most 3 of the 5
# epochs), channel-shared feedback.
run_config grape_trigger_channel cifar10_resnet20_grape feedback.conv=channel \
    calibration.every_epochs=1 calibration.trigger=alignment calibration.threshold=0.4 \
    calibration.budget=3
