#!/usr/bin/env bash
# The main job, on a fresh machine: set up, build the archive of the project's trained
# small model (models/sam_small_shapes.pth, see docs/model_card.md), start TorchServe,
# register the model through the management API, segment the example image over REST
# and write the masks drawn over it to out/overlay.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

python scripts/build_mar.py --spec sam_small --checkpoint models/sam_small_shapes.pth
# The installed commands, run here: their defaults are this folder's config.properties,
# run/ (TorchServe's directory and key file), model_store/ and out/.
samserve-serve restart --register sam.mar
samserve-segment demo/example.jpg --point 160,175 --box 330,60,560,200 --out out/overlay.png
echo
echo "TorchServe keeps running (run/logs). Stop it with: .venv/bin/samserve-serve stop"
echo "Interactive web demo (click objects, segment everything): .venv/bin/samserve-demo"
echo "  then open the URL it prints in a browser."
