#!/usr/bin/env bash
# MiniLM throughput: Troupe (tract) vs onnxruntime. Fetches and converts the model if needed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/bench/.venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet numpy onnxruntime tokenizers
"$root/scripts/fetch-minilm.sh"
(cd "$root" && cargo build --release --bin troupe)
exec "$venv/bin/python" "$root/bench/minilm_vs_ort.py" "$@"
