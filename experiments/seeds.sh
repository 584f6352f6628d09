#!/usr/bin/env bash
# Configs x seeds, JOBS runs at a time with THREADS threads each, one run folder per
# (config, seed) under OUT; then the report's table (mean ± std over distinct seeds).
#
#     GRAPE_DATA_DIR=../shared/data JOBS=2 THREADS=1 bash experiments/seeds.sh OUT \
#         "mnist_mlp_bp mnist_mlp_dfa mnist_mlp_grape" "0 1 2" [key=value ...]
#
# A config may carry its own overrides after a colon, joined by commas:
# "cifar10_resnet20_grape:calibration.every_epochs=1". A finished run (summary.json present)
# is skipped, so an interrupted sweep is continued by running the same command again.
set -euo pipefail
out=${1:?usage: seeds.sh OUT "CONFIG[:k=v,...] ..." "SEED ..." [key=value ...]}
configs=${2:?configs}
seeds=${3:?seeds}
shift 3
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
jobs=${JOBS:-2}
threads=${THREADS:-1}
mkdir -p "$out"
list=$(mktemp)
trap 'rm -f "$list"' EXIT
for entry in $configs; do
    config=${entry%%:*}
    extra=""
    name=$config
    if [[ $entry == *:* ]]; then
        extra=${entry#*:}
        # The run's name says its overrides: cifar10_resnet20_grape_calibration.every_epochs-1.
        name="${config}_$(tr ',=' '_-' <<<"$extra")"
    fi
    for seed in $seeds; do
        echo "$config|$extra|$name/seed$seed|$seed" >>"$list"
    done
done
run_one() {  # CONFIG|EXTRA|NAME|SEED, then the common overrides
    IFS='|' read -r config extra name seed <<<"$1"
    shift
    local dir="$out/$name"
    if [[ -f $dir/summary.json ]]; then
        echo "== $name: done before, skipped"
        return
    fi
    local over=()
    [[ -n $extra ]] && IFS=',' read -r -a over <<<"$extra"
    echo "== $name"
    "$py" -m grape_dist.train --config "configs/$config.yaml" --out "$dir" --quiet --overwrite \
        "seed=$seed" "train.threads=$threads" "${over[@]}" "$@" >"$dir.log" 2>&1 ||
        { echo "!! $name failed: see $dir.log"; return 1; }
}
export -f run_one
export out py threads
mkdir -p "$out"
while read -r line; do mkdir -p "$out/$(cut -d'|' -f3 <<<"$line" | xargs dirname)"; done <"$list"
xargs -a "$list" -d '\n' -P "$jobs" -I{} bash -c 'run_one "$@"' _ {} "$@"
"$py" -m grape_dist.report "$out" --out "$out/report"
cat "$out/report/report.md"
