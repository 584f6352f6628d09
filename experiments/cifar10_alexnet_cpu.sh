#!/usr/bin/env bash
# AlexNet on CIFAR-10 sized for a 2-core CPU (issue 7, docs/convnets.md): width 0.25, 10,000
# training images, 5 epochs; BP, DFA and GrAPE without and with calibration T=1.
#
#     GRAPE_DATA_DIR=../shared/data bash experiments/cifar10_alexnet_cpu.sh runs/cifar10_alexnet
set -euo pipefail
out=${1:-runs/cifar10_alexnet}
cd "$(dirname "$0")/.."
common=()
# shellcheck source=experiments/common.sh
source experiments/common.sh
run_config bp cifar10_alexnet_bp
run_config dfa cifar10_alexnet_dfa
run_config dfa_cal1 cifar10_alexnet_dfa calibration.every_epochs=1
run_config grape cifar10_alexnet_grape
run_config grape_cal1 cifar10_alexnet_grape calibration.every_epochs=1
