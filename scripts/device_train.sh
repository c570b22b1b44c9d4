#!/usr/bin/env bash
# Train the small SAM on a lent GPU machine (the device tool), where only this repository
# travels and nothing can be downloaded, then evaluate it on the held-out set.
#
#   bash scripts/device_train.sh fetch   # here: wheels the GPU machine lacks -> .whl/
#   bash scripts/device_train.sh run     # there, through the device tool, carrying .whl:
#                                        # checkpoint, training log and metrics -> $OUT
#
# The GPU machine's python3 has torch, torchvision, numpy and Pillow, not segment_anything
# or pycocotools (its Python is 3.12); `run` installs the carried wheels into /tmp/site
# when they are missing. MINUTES (default 7) bounds training; the rest of one device call
# goes to start-up and evaluation (EVAL_COUNT held-out images, default all). Extra
# arguments go to scripts/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true

case "$mode" in
fetch)
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl pycocotools segment-anything==1.0
    ls .whl
    ;;
run)
    PYTHON=${PYTHON:-python3}
    OUT=${OUT:?set OUT to the folder for the results}
    if ! "$PYTHON" -c "import segment_anything, pycocotools" 2>/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    workers=$(($(nproc) > 2 ? $(nproc) - 2 : 1))
    "$PYTHON" scripts/train.py --init models/sam_small_shapes.pth --minutes "${MINUTES:-7}" \
        --workers "$workers" --images-per-step 32 --prompts-per-image 16 --lr 2e-4 \
        --warmup-steps 20 --out "$OUT/sam_small_gpu.pth" "$@" 2>&1 | tee "$OUT/train.log"
    "$PYTHON" scripts/evaluate.py --checkpoint "$OUT/sam_small_gpu.pth" ${EVAL_COUNT:+--count "$EVAL_COUNT"} \
        --json "$OUT/metrics.json" 2>&1 | tee "$OUT/evaluate.log"
    ;;
*)
    echo "usage: bash scripts/device_train.sh fetch|run [train.py arguments]" >&2
    exit 2
    ;;
esac
