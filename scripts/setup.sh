#!/usr/bin/env bash
# Make the environment if it is missing: Java for TorchServe's frontend, and .venv with
# the server, the client (samclient/) and the development tools, both projects
# editable (torch 2.14.1 + torchvision 0.29.1 come from the local disk).
#
#   bash scripts/setup.sh              # what serving needs (scripts/run.sh)
#   bash scripts/setup.sh --browser    # also Debian's chromium, for the web demo's test
#                                      # (scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

browser=0
for arg in "$@"; do
    case "$arg" in
        --browser) browser=1 ;;
        *) echo "setup: unknown option $arg (known: --browser)" >&2; exit 2 ;;
    esac
done

# Debian packages the named commands need, installed with apt as root or through sudo.
apt_packages=()
if ! command -v java >/dev/null 2>&1; then
    echo "setup: installing a Java runtime for TorchServe" >&2
    apt_packages+=(openjdk-17-jre-headless)
fi
# Debian's own build, not a browser download: tests/test_demo.py drives it with playwright.
if [ "$browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the web demo's browser test" >&2
    apt_packages+=(chromium)
fi
# training/ draws glyph shapes from these fonts (training/shapes.py FONT_DIRS); its
# tests and out-of-family evaluation need all three.
for font in fonts-dejavu-core fonts-dejavu-extra fonts-liberation; do
    if ! dpkg -s "$font" >/dev/null 2>&1; then apt_packages+=("$font"); fi
done
# The shared store's tests (tests/test_store.py) start their own redis-server.
redis_installed=0
if ! command -v redis-server >/dev/null 2>&1; then
    echo "setup: installing Debian's redis-server for the shared store's tests" >&2
    apt_packages+=(redis-server)
    redis_installed=1
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo_=""; else sudo_="sudo"; fi
    $sudo_ apt-get update -qq
    $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
    # The package starts a system-wide server where systemd runs; nothing here uses it.
    if [ "$redis_installed" = 1 ] && [ -d /run/systemd/system ]; then
        $sudo_ systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
# The three distributions, editable: the client (samclient/, which the server's requires),
# the server with the development tools, and the training code (training/, which needs
# both). Reinstall only when a pyproject.toml changed.
projects=(pyproject.toml samclient/pyproject.toml training/pyproject.toml)
stamp=.venv/.samserve-installed
if [ ! -f "$stamp" ] || ! cat "${projects[@]}" | cmp -s - "$stamp"; then
    echo "setup: installing dependencies into .venv (about a minute)" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ./samclient -e '.[dev]' -e ./training
    cat "${projects[@]}" > "$stamp"
fi
