#!/usr/bin/env bash
# Fuzzes a live node's HTTP API from its own OpenAPI document with schemathesis (every
# check), once without a token and once with write and read tokens configured.
#
#   scripts/api-fuzz.sh [examples per operation, default 50]
#
# Builds nothing: uses $TROUPE_BIN (default target/debug/troupe). Installs schemathesis
# into a venv under target/ (PyPI). Exits non-zero on any failure of any check.
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-50}"
bin="${TROUPE_BIN:-target/debug/troupe}"
venv="${TROUPE_FUZZ_VENV:-target/fuzz-venv}"
st_version="4.32.5"

if [ ! -x "$venv/bin/st" ] || ! "$venv/bin/st" --version | grep -q "$st_version"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$st_version"
fi

work=$(mktemp -d)
node_pid=""
cleanup() {
  if [ -n "$node_pid" ]; then kill "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" gen --out "$work/data" --users 60 --items 120 --events 3000 --seed 3 >/dev/null

run() {
  local mode="$1"; shift
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$work/$mode"
  cat > "$work/$mode/node.toml" <<TOML
[node]
name = "fuzz-$mode"
data_dir = "$work/$mode/data"
[http]
addr = "127.0.0.1:$port"
[journal]
partitions = 4
poll_interval_ms = 20
[als]
factors = 8
iterations = 3
min_interactions = 50
retrain_every_events = 1000000
TOML
  env "$@" "$bin" node --config "$work/$mode/node.toml" >"$work/$mode/node.out" 2>"$work/$mode/node.log" &
  node_pid=$!
  local url="http://127.0.0.1:$port"
  for _ in $(seq 1 300); do
    if curl -sf "$url/readyz" >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
  curl -sf "$url/readyz" >/dev/null || { echo "node did not become ready"; tail -n 30 "$work/$mode/node.log"; return 1; }
  local auth=() token=()
  if [ "$mode" = token ]; then
    auth=(-H "Authorization: Bearer fuzz-write-token")
    token=(--token fuzz-write-token)
  fi
  env -u TROUPE_AUTH_TOKEN "$bin" load --url "$url" "${token[@]}" \
    --events "$work/data/events.csv" --items "$work/data/items.csv" \
    --state "$work/$mode/load-state.json" >/dev/null
  curl -sf -X POST "${auth[@]}" "$url/v1/admin/retrain" >/dev/null
  echo "=== schemathesis ($mode): $examples examples per operation against $url"
  local status=0
  PYTHONPATH=scripts SCHEMATHESIS_HOOKS=api_fuzz_hooks "$venv/bin/st" run "$url/v1/openapi.json" \
    --checks all --max-examples "$examples" --workers 1 --request-timeout 30 \
    --suppress-health-check all --seed 1 "${auth[@]}" || status=$?
  kill "$node_pid"; wait "$node_pid" 2>/dev/null || true; node_pid=""
  if [ "$status" -ne 0 ]; then
    echo "--- node log ($mode)"; tail -n 40 "$work/$mode/node.log"
  fi
  return "$status"
}

run open
run token TROUPE_AUTH_TOKEN=fuzz-write-token TROUPE_READ_TOKEN=fuzz-read-token
echo "=== api fuzz: no failures"
