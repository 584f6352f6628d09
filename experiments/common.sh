# shellcheck shell=bash disable=SC2154  # sourced: the caller sets out and common
# Shared by the experiment scripts (sourced): run one config into $out/NAME, print its summary.
# The caller sets `out` and the array `common` (overrides for every run).
py=${PYTHON:-.venv/bin/python}

run_config() {  # run_config NAME CONFIG [key=value ...]
    local name=$1 config=$2
    shift 2
    echo "== $name"
    "$py" -m grape_dist.train --config "configs/$config.yaml" --out "$out/$name" --quiet \
        "${common[@]}" "$@"
    "$py" - "$out/$name/summary.json" "$name" <<'PY'
import json
import sys

s = json.load(open(sys.argv[1]))
metric = "perplexity" if "final_test_perplexity" in s else "accuracy"
print(sys.argv[2], f"test {metric} {s['final_test_' + metric]:.4f} "
      f"(best {s['best_test_' + metric]:.4f}), {s['calibration_steps']} calibrations, "
      f"{s['wall_seconds']:.0f}s")
PY
}
