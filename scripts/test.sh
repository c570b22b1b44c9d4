#!/usr/bin/env bash
# The whole test suite: unit tests of the core, and integration tests that start a real
# TorchServe, register the real archive and call it over REST and gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
