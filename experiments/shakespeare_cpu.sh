#!/usr/bin/env bash
# The CPU-sized Table 4 runs (issue 7): a 4-layer, d_model 128, context 128 character-level
# Transformer on 4096 windows of the Shakespeare corpus for 4 epochs, tested on Macbeth and
# Twelfth Night. One run after another, 2 threads each.
#
#     GRAPE_DATA_DIR=../shared/data bash experiments/shakespeare_cpu.sh runs/shakespeare
set -euo pipefail
out=${1:-runs/shakespeare}
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
common=(data.train_subset=4096 train.epochs=4 train.threads=2 --quiet)
run() {  # run NAME CONFIG OVERRIDES...
    local name=$1 config=$2
    shift 2
    echo "== $name"
    "$py" -m grape_dist.train --config "configs/$config.yaml" --out "$out/$name" \
        "${common[@]}" "$@"
    "$py" -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], \
'test ppl %.3f (best %.3f), %.0fs' % (s['final_test_perplexity'], s['best_test_perplexity'], \
s['wall_seconds']))" "$out/$name/summary.json" "$name"
}
run bp shakespeare_transformer_bp
run dfa_cal1 shakespeare_transformer_dfa calibration.every_epochs=1
run grape_cal1 shakespeare_transformer_grape calibration.every_epochs=1
run dfa shakespeare_transformer_dfa
run grape shakespeare_transformer_grape
run grape_micro_cal1 shakespeare_transformer_grape model.feedback=micro calibration.every_epochs=1
run dfa_micro_cal1 shakespeare_transformer_dfa model.feedback=micro calibration.every_epochs=1
