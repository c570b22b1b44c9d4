#!/usr/bin/env bash
# Make the environment if it is missing: Java for TorchServe's frontend, and .venv with
# the pinned dependencies (torch 2.14.1 + torchvision 0.29.1 come from the local disk).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v java >/dev/null 2>&1; then
    echo "setup: installing a Java runtime for TorchServe" >&2
    if [ "$(id -u)" = 0 ]; then sudo_=""; else sudo_="sudo"; fi
    $sudo_ apt-get update -qq
    $sudo_ apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.samserve-installed
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
    echo "setup: installing dependencies into .venv (about a minute)" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    cp pyproject.toml "$stamp"
fi
