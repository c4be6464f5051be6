#!/usr/bin/env bash
# Single-user top-k over N items x 64 factors vs a SIMD streaming sum over the same matrix,
# both from the criterion bench (same binary, same flags); prints GB/s and the ratio.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo bench -p troupe-models --bench hot_paths -- 'top_k_single|fold_in' >/dev/null
python3 - <<'PY'
import json, pathlib
base = pathlib.Path("target/criterion")
def ns(group, bench, n):
    p = base / group / bench / str(n) / "new" / "estimates.json"
    return json.loads(p.read_text())["median"]["point_estimate"]
for n in (10000, 100000):
    t, s = ns("top_k_single", "topk10", n), ns("top_k_single", "streaming_sum", n)
    gb = n * 64 * 4 / 1e9
    print(f"{n:>7} items: top-k {t/1e3:8.1f} us ({gb/(t/1e9):5.1f} GB/s)  sum {s/1e3:8.1f} us ({gb/(s/1e9):5.1f} GB/s)  ratio {t/s:.2f}")
for n in (10, 100, 1000):
    print(f"fold-in k=64, {n:>4} interactions: {ns('fold_in', 'k64', n)/1e3:8.1f} us")
PY
