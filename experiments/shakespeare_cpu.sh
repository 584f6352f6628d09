#!/usr/bin/env bash
# The CPU-sized Table 4 runs (issue 7): a 4-layer, d_model 128, context 128 character-level
# Transformer on 4096 windows of the Shakespeare corpus for 4 epochs, tested on Macbeth and
# Twelfth Night. One run after another, 2 threads each.
#
#     GRAPE_DATA_DIR=../shared/data bash experiments/shakespeare_cpu.sh runs/shakespeare
set -euo pipefail
out=${1:-runs/shakespeare}
cd "$(dirname "$0")/.."
common=(data.train_subset=4096 train.epochs=4 train.threads=2)
# shellcheck source=experiments/common.sh
source experiments/common.sh
run_config bp shakespeare_transformer_bp
run_config dfa_cal1 shakespeare_transformer_dfa calibration.every_epochs=1
run_config grape_cal1 shakespeare_transformer_grape calibration.every_epochs=1
run_config dfa shakespeare_transformer_dfa
run_config grape shakespeare_transformer_grape
run_config grape_micro_cal1 shakespeare_transformer_grape model.feedback=micro \
    calibration.every_epochs=1
run_config dfa_micro_cal1 shakespeare_transformer_dfa model.feedback=micro calibration.every_epochs=1
# Per-block tangent routing (one tangent stream per block: a lower-variance J_hat for each B,
# 5 streams instead of 1), the B learning rate, and micro feedback without calibration.
run_config grape_cal1_perblock shakespeare_transformer_grape calibration.every_epochs=1 \
    grape.routing=per_block
run_config grape_cal1_blr10 shakespeare_transformer_grape calibration.every_epochs=1 \
    grape.b_optim.lr=10
run_config grape_micro_cal1_perblock shakespeare_transformer_grape model.feedback=micro \
    calibration.every_epochs=1 grape.routing=per_block
run_config grape_micro shakespeare_transformer_grape model.feedback=micro
run_config dfa_micro shakespeare_transformer_dfa model.feedback=micro
