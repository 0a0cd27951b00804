#!/usr/bin/env bash
# The side-by-side benchmark on a GPU machine, from a bare checkout, in one go.
#   WHEELS=/path/to/wheels bash benchmarks/gpu.sh     # offline: install only from the given wheels
#   bash benchmarks/gpu.sh                            # with a package index
# Needs ../shared/data/pets-sample/images beside the checkout (or IMAGES=...).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${IMAGES:-../shared/data/pets-sample/images}
python3 -m venv .venv-gpu
PIP=(.venv-gpu/bin/pip install --quiet)
if [[ -n "${WHEELS:-}" ]]; then PIP+=(--no-index --find-links "$WHEELS"); fi
"${PIP[@]}" -e '.[benchmark]'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# 224 px, the tutorial's 4 head + 2 finetune epochs (with lr-find), three seeds: fastai's recipe, petpipe's
# default, petpipe with the fastai override and the same with torch.compile; minutes on one modern GPU.
timeout 420 .venv-gpu/bin/python benchmarks/compare_fastai.py --images "$IMAGES" --device cuda \
    --seeds 1 2 3 --frameworks fastai petpipe petpipe-fastai petpipe-fastai-compiled --out benchmarks/results-gpu.json
