#!/usr/bin/env bash
# The CPU image's install steps, run here in a throwaway venv (no container engine needed), then
# the image's default job: what CI can check of docker/Dockerfile.cpu without building it.
#
#     bash docker/check_install.sh            # from anywhere; works in a temporary folder
#
# 1. docker/build_in_venv.py runs the RUN steps of Dockerfile.cpu's `build` stage as written
#    (its ARG/ENV/WORKDIR/COPY interpreted the same way), with the venv at a temporary path
#    (build-arg VENV) and pip's cache allowed (--no-cache-dir dropped). Where
#    download.pytorch.org cannot be reached, TORCH_INDEX_URL becomes pip's own index and the
#    CPU wheel torch==2.13.0+cpu must come from pip's find-links (this machine's local wheel).
# 2. From a folder holding only configs/ (the final stage's WORKDIR), with the image's cache
#    variables: grape_dist must import from the venv, not from the checkout; then the default
#    job (MNIST MLP GrAPE on the embedded MNIST, 1 epoch on 512 images) as the image runs it,
#    and the same under launch/torchrun_single.sh with 2 ranks.
#
# Environment: PYTHON (default python3) makes the venv; KEEP=1 keeps the temporary folder;
# TORCH_INDEX_URL forces the torch index.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-python3}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/grape_install_check.XXXXXX")
if [[ ${KEEP:-0} == 1 ]]; then
    echo "keeping $tmp"
else
    trap 'rm -rf "$tmp"' EXIT
fi

if [[ -z ${TORCH_INDEX_URL:-} ]]; then
    if "$py" -c 'import socket; socket.create_connection(("download.pytorch.org", 443), 5)' \
        2>/dev/null; then
        TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
    else
        TORCH_INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple}
        echo "download.pytorch.org unreachable: torch from $TORCH_INDEX_URL + pip's find-links"
    fi
fi

t0=$SECONDS
"$py" docker/build_in_venv.py docker/Dockerfile.cpu --target build --root "$tmp/root" \
    --build-arg VENV="$tmp/venv" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL"
echo "== install steps done in $((SECONDS - t0)) s"

# The final stage: WORKDIR with configs/, the image's ENV.
mkdir -p "$tmp/app"
cp -R configs "$tmp/app/"
cd "$tmp/app"
export PATH="$tmp/venv/bin:$PATH" VIRTUAL_ENV="$tmp/venv" PYTHONUNBUFFERED=1 \
    GRAPE_CACHE_DIR="$tmp/cache/grape_dist" HF_HOME="$tmp/cache/huggingface" \
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_DATASETS_DISABLE_PROGRESS_BARS=1
unset PYTHONPATH GRAPE_DATA_DIR
python - "$tmp/venv" "$repo" <<'PY'
import importlib.metadata as md
import sys

import grape_dist
import torch

venv, repo = sys.argv[1:]
assert grape_dist.__file__.startswith(venv), f"grape_dist imported from {grape_dist.__file__}"
assert not grape_dist.__file__.startswith(repo + "/grape_dist"), grape_dist.__file__
for name in ("numpy", "PIL", "yaml", "datasets", "ray", "deepspeed"):
    __import__(name)
print("== imports ok: grape_dist", md.version("grape_dist"), "torch", torch.__version__,
      "ray", md.version("ray"), "deepspeed", md.version("deepspeed"),
      "datasets", md.version("datasets"))
PY
t0=$SECONDS
python -m grape_dist.train --config configs/mnist_mlp_grape.yaml --quiet --out "$tmp/run" \
    train.epochs=1 data.train_subset=512
python -c 'import json, sys; s = json.load(open(sys.argv[1])); print("== default job:", {k: s[k] for k in ("final_test_accuracy", "wall_seconds")})' "$tmp/run/summary.json"
NPROC=2 PYTHON=python bash "$repo/launch/torchrun_single.sh" configs/mnist_mlp_grape.yaml \
    "$tmp/run2" --quiet train.epochs=1 data.train_subset=512
python -c 'import json, sys; s = json.load(open(sys.argv[1])); print("== 2 ranks (launch/torchrun_single.sh):", {k: s[k] for k in ("final_test_accuracy", "wall_seconds")})' "$tmp/run2/summary.json"
echo "== runs done in $((SECONDS - t0)) s"
