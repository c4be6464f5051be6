#!/usr/bin/env bash
# Benchmarks of a release node next to their references, measured in the same run:
#   ingest     acked events/s at batch 1/100/1000 vs a raw write+fdatasync loop
#   serving    wrk against /v1/recommendations vs nginx serving a static file (10k, 100k items)
#   freshness  ack -> applied_offset, p50/p99
#   recovery   restart time vs journal length (checkpoints off/on)
# Usage: bench/run-node.sh [ingest|serving|freshness|recovery ...]  (default: all)
# Needs python3; `serving` needs nginx and wrk (apt-get install nginx-light wrk).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release --bin troupe
what=("$@")
[ ${#what[@]} -eq 0 ] && what=(ingest freshness recovery serving)
if [[ " ${what[*]} " == *" serving "* ]] && ! command -v wrk >/dev/null; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -q nginx-light wrk >/dev/null
fi
for w in "${what[@]}"; do
  echo "== $w"
  python3 bench/node_bench.py "$w" --troupe target/release/troupe --dir "${BENCH_DIR:-$root/target}"
done
