#!/usr/bin/env bash
# The whole test suite: unit tests of the core, and integration tests that start a real
# TorchServe, register the real archive and call it over REST and gRPC, and drive the web
# demo in Debian's chromium (installed here if missing, with Java and .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
exec .venv/bin/python -m pytest "$@"
