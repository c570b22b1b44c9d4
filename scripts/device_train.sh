#!/usr/bin/env bash
# Train the small SAM on a lent GPU machine (the device tool), where only this repository
# travels and nothing can be downloaded, then evaluate it on the held-out set.
#
#   bash scripts/device_train.sh fetch   # here: wheels and fonts the GPU machine lacks -> .whl/
#   bash scripts/device_train.sh run     # there, through the device tool, carrying .whl:
#                                        # checkpoint, training log and metrics -> $OUT
#
# The GPU machine's python3 has torch, torchvision, numpy and Pillow, not segment_anything
# or pycocotools (its Python is 3.12); `run` installs the carried wheels into /tmp/site
# when they are missing. It renders the training dataset there, then continues the run
# RUN (default "gpu": training/runs/$RUN/checkpoint.pth) or starts it (TOTAL_STEPS, 32
# images a step), trains MINUTES (default 7) and evaluates the checkpoint on the held-out
# set (EVAL_COUNT images, default all) and OOF_COUNT out-of-family images; the run's folder
# comes back in $OUT, to commit. Extra arguments go to scripts/train.py.
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
    # The glyph families draw with Debian's DejaVu and Liberation fonts (training.shapes).
    mkdir -p .whl/fonts
    cp -r /usr/share/fonts/truetype/dejavu /usr/share/fonts/truetype/liberation .whl/fonts/
    ls .whl
    ;;
run)
    PYTHON=${PYTHON:-python3}
    # A bare checkout, the project not installed: its packages are found in the checkout.
    export PYTHONPATH=$PWD:$PWD/handler${PYTHONPATH:+:$PYTHONPATH}
    OUT=${OUT:?set OUT to the folder for the results}
    RUN=${RUN:-gpu}
    if ! "$PYTHON" -c "import segment_anything, pycocotools" 2>/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    mkdir -p /usr/share/fonts/truetype
    for family in dejavu liberation; do
        [ -d "/usr/share/fonts/truetype/$family" ] || cp -r ".whl/fonts/$family" /usr/share/fonts/truetype/
    done
    export PYTHONUNBUFFERED=1
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    # The dataset is rendered on the machine (it is not in git): all cores, about a minute.
    "$PYTHON" -m training.shards --image-size 512 --count 8192 --workers "$(nproc)"
    checkpoint=training/runs/$RUN/checkpoint.pth
    if [ -f "$checkpoint" ]; then
        "$PYTHON" scripts/train.py --resume "$checkpoint" --minutes "${MINUTES:-7}" \
            --device "${DEVICE:-cuda}" --compile false "$@" 2>&1 | tee "$OUT/train.log"
    else
        "$PYTHON" scripts/train.py --run "$RUN" --minutes "${MINUTES:-7}" --device "${DEVICE:-cuda}" \
            --images-per-step 32 --prompts-per-image 16 --total-steps "${TOTAL_STEPS:-6000}" \
            --autocast all "$@" 2>&1 | tee "$OUT/train.log"
    fi
    "$PYTHON" scripts/evaluate.py --checkpoint "$checkpoint" ${EVAL_COUNT:+--count "$EVAL_COUNT"} \
        --out-of-family "${OOF_COUNT:-50}" --json "$OUT/metrics.json" 2>&1 | tee "$OUT/evaluate.log"
    cp -r "training/runs/$RUN" "$OUT/"
    ;;
*)
    echo "usage: bash scripts/device_train.sh fetch|run [train.py arguments]" >&2
    exit 2
    ;;
esac
