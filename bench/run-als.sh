#!/usr/bin/env bash
# ALS fit/recommend: Troupe vs implicit on the same files, same settings. See als_vs_implicit.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/bench/.venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "implicit==0.7.*" numpy scipy onnxruntime tokenizers
(cd "$root" && cargo build --release --bin troupe)
exec "$venv/bin/python" "$root/bench/als_vs_implicit.py" --troupe "$root/target/release/troupe" "$@"
