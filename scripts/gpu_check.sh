#!/usr/bin/env bash
# The GPU serving check, prepared to run in one short call on a lent GPU machine (the
# device tool), where only this repository travels and nothing can be downloaded:
#
#   bash scripts/gpu_check.sh fetch   # here: wheels the GPU machine may lack -> .whl/
#   bash scripts/gpu_check.sh run     # there, through the device tool, carrying .whl:
#                                     # test log, gpu-<name>.json and .md -> $OUT
#
# `run` installs into /tmp/site only the carried wheels whose module the machine's
# python3 (3.12, with its own torch) lacks, then runs the CUDA tests (tests/test_gpu.py
# and tests/test_device_masks.py, -k cuda) and the in-process benchmark through
# SegmentService (scripts/gpu_bench.py: vit_h and vit_b with random weights, their timings
# and their bf16 masks against float32's). Each step has its own time limit, so the whole
# fits in 8 minutes; a step that fails or runs out does not stop the next.
# DEVICE=cpu runs the same on a CPU as a smoke test (with --quick counts), e.g. here:
#   OUT=/tmp/gpu-check DEVICE=cpu PYTHON=.venv/bin/python bash scripts/gpu_check.sh run
# All the wheels come to about 63 MiB of the 64 a call can carry, llvmlite most of it:
# LEAN=1 fetch leaves out numba and llvmlite, for a machine that has them.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true

# module:wheel-name-prefixes, installed from .whl only when the module is missing
WHEELS=(
    "segment_anything:segment_anything"
    "pycocotools:pycocotools"
    "orjson:orjson"
    "numba:numba llvmlite"
    "pytest:pytest pluggy iniconfig"
    "packaging:packaging"
    "pygments:pygments"
)

case "$mode" in
fetch)
    set -e
    mkdir -p .whl
    packages=(pycocotools segment-anything==1.0 orjson pytest pluggy iniconfig packaging pygments)
    [ "${LEAN:-0}" = 1 ] || packages+=(numba==0.68.1 llvmlite==0.50.0)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
    ls .whl
    du -sh .whl
    ;;
run)
    PYTHON=${PYTHON:-python3}
    DEVICE=${DEVICE:-cuda}
    OUT=${OUT:?set OUT to the folder for the results}
    mkdir -p "$OUT"
    # A bare checkout, the project not installed: its packages are found in the checkout.
    export PYTHONPATH=$PWD:$PWD/handler:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1
    site=/tmp/site
    mkdir -p "$site"
    for entry in "${WHEELS[@]}"; do
        module=${entry%%:*}
        if ! "$PYTHON" -c "import $module" 2>/dev/null; then
            for prefix in ${entry#*:}; do
                for wheel in .whl/"$prefix"-*.whl; do
                    [ -f "$wheel" ] || { echo "missing $module and no .whl/$prefix-*.whl" >&2; continue; }
                    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
                done
            done
        fi
    done
    # samserve.images imports OpenCV for 16-bit colour images only, which this check never
    # sends; where the machine lacks it (its wheel is too large to carry), a stand-in
    # that fails on use.
    if ! "$PYTHON" -c "import cv2" 2>/dev/null; then
        printf '%s\n' '"""Stand-in: OpenCV is not installed (scripts/gpu_check.sh)."""' '' \
            'def __getattr__(name):' '    raise ImportError("OpenCV is not installed here")' \
            >"$site/cv2.py"
    fi
    export PYTHONPATH=$site:$PYTHONPATH
    "$PYTHON" -c "import torch, numpy, numba; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), 'numpy', numpy.__version__, 'numba', numba.__version__)" \
        | tee "$OUT/versions.txt"
    command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$OUT/versions.txt"
    status=0
    # The CUDA tests (they skip without a GPU); tests/conftest.py is left out: it needs
    # the TorchServe client stack, and these tests use none of its fixtures.
    timeout "${TEST_SECONDS:-200}" "$PYTHON" -m pytest -q -s -rs -p no:cacheprovider --noconftest \
        tests/test_gpu.py tests/test_device_masks.py -k cuda 2>&1 | tee "$OUT/pytest.log" || status=1
    quick=()
    [ "$DEVICE" = cpu ] && quick=(--quick)
    timeout "${BENCH_SECONDS:-330}" "$PYTHON" scripts/gpu_bench.py --device "$DEVICE" \
        --out "$OUT" "${quick[@]}" "$@" 2>&1 | tee "$OUT/bench.log" || status=1
    exit $status
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh fetch|run [gpu_bench.py arguments]" >&2
    exit 2
    ;;
esac
