#!/usr/bin/env python3
"""The item-item branch (EASE): Troupe's fit against a plain NumPy EASE, same train/test
files, same lambda, in one run. Prints fit time, peak RSS and NDCG@10 (protocol, all
rows positive) of each side and the ratios (Troupe / NumPy).

Troupe fits through `troupe eval --json` (the `item_item` model: f32 Cholesky inverse with
faer over the most interacted items, rows pruned to `--neighbours` weights); its fit time
is the report's `fit_seconds`, its peak RSS that of the whole eval process (every branch).
NumPy fits the dense float64 closed form: G = XᵀX + λI, P = inv(G), B = -P / diag(P),
diag(B) = 0, scores = X B; its peak RSS is that of a child process doing only that.

Data sets: MovieLens latest-small with the shared split, and generated sets with
--items items (split per user 20 %, seed 42, by `troupe eval --save-split`).

usage: python3 -m venv bench/.venv && bench/.venv/bin/pip install numpy scipy
       bench/.venv/bin/python bench/ease_vs_numpy.py --troupe target/release/troupe \
           [--items 10000 20000] [--lam 300] [--neighbours 500]
"""
import argparse
import csv
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def run_measured(cmd):
    """Runs cmd; returns (stdout, peak RSS of the child in MiB)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        raise RuntimeError(f"{cmd[0]} failed ({status})")
    return out, ru.ru_maxrss / 1024


def read_pairs(path):
    with open(path) as f:
        r = csv.reader(f)
        header = next(r)
        ucol = next(i for i, h in enumerate(header) if h.lower() in ("user", "userid", "user_id"))
        icol = next(i for i, h in enumerate(header) if h.lower() in ("item", "movieid", "item_id"))
        return [(row[ucol], row[icol]) for row in r]


def numpy_side(train, test, lam):
    """Child process: fit and score with NumPy; prints a JSON line."""
    import numpy as np
    import scipy.sparse as sp

    tr, te = read_pairs(train), read_pairs(test)
    users = {u: k for k, u in enumerate(sorted({u for u, _ in tr + te}))}
    items = {i: k for k, i in enumerate(sorted({i for _, i in tr}))}
    rows = [users[u] for u, _ in tr]
    cols = [items[i] for _, i in tr]
    X = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(users), len(items)))
    X.data[:] = 1.0
    t = time.time()
    G = (X.T @ X).toarray().astype(np.float64)
    G[np.diag_indices_from(G)] += lam
    P = np.linalg.inv(G)
    B = -P / np.diag(P)
    B[np.diag_indices_from(B)] = 0.0
    fit = time.time() - t
    relevant = {}
    for u, i in te:
        relevant.setdefault(users[u], set()).add(items.get(i, -1))
    evaluated = sorted(relevant)
    S = np.asarray(X[evaluated] @ B)
    S[np.asarray(X[evaluated].todense()) > 0] = -np.inf
    top = np.argsort(-S, axis=1)[:, :10]
    ndcg = 0.0
    for r, u in enumerate(evaluated):
        rel = relevant[u]
        dcg = sum(1 / math.log2(k + 2) for k, i in enumerate(top[r]) if i in rel)
        idcg = sum(1 / math.log2(k + 2) for k in range(min(10, len(rel))))
        ndcg += dcg / idcg
    print(json.dumps({"fit": fit, "ndcg": ndcg / len(evaluated), "items": len(items)}))


def troupe_side(troupe, train, test, catalog, lam, neighbours, max_items):
    out, rss = run_measured([troupe, "eval", "--train", str(train), "--test", str(test),
                             "--items", str(catalog), "--json",
                             "--ease-lambda", str(lam), "--ease-neighbours", str(neighbours),
                             "--ease-max-items", str(max_items), "--iterations", "1"])
    r = json.loads(out)
    m = r["models"]["item_item"]
    d = r["details"]["item_item"]
    return {"fit": m["fit_seconds"], "ndcg": m["ndcg"], "rss": rss, "items": d["fitted_items"],
            "fit_bytes": d["fit_bytes"], "rows_bytes": d["memory_bytes"]}


def generated(troupe, work, items):
    d = pathlib.Path(work) / f"gen{items}"
    subprocess.run([troupe, "gen", "--out", str(d), "--users", str(items * 3), "--items", str(items),
                    "--events", str(items * 100), "--seed", "7"], check=True, capture_output=True)
    split = d / "split"
    subprocess.run([troupe, "eval", "--events", str(d / "events.csv"), "--items", str(d / "items.csv"),
                    "--split", "random", "--save-split", str(split), "--iterations", "1", "--json"],
                   check=True, capture_output=True)
    return split / "train.csv", split / "test.csv", d / "items.csv"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--troupe", default=str(ROOT / "target/release/troupe"))
    p.add_argument("--items", type=int, nargs="*", default=[10000])
    p.add_argument("--lam", type=float, default=300.0)
    p.add_argument("--neighbours", type=int, default=500)
    p.add_argument("--numpy-child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.numpy_child:
        numpy_side(a.numpy_child[0], a.numpy_child[1], float(a.numpy_child[2]))
        return
    work = tempfile.mkdtemp(prefix="troupe-ease-", dir=os.environ.get("TMPDIR", "/tmp"))
    sets = []
    ml = SHARED / "ml-latest-small" / "split"
    if ml.exists():
        sets.append(("MovieLens latest-small (all)", ml / "train.csv", ml / "test.csv",
                     ml.parent / "movies.csv"))
    for n in a.items:
        tr, te, catalog = generated(a.troupe, work, n)
        sets.append((f"generated, {n} items", tr, te, catalog))
    print(f"lambda {a.lam}, Troupe keeps {a.neighbours} weights per item; {os.cpu_count()} CPUs")
    print(f"{'data':<32} {'items':>6} {'troupe fit s':>12} {'numpy fit s':>11} {'fit ratio':>9}"
          f" {'troupe RSS MiB':>14} {'numpy RSS MiB':>13} {'troupe NDCG':>11} {'numpy NDCG':>10}")
    for name, tr, te, catalog in sets:
        t = troupe_side(a.troupe, tr, te, catalog, a.lam, a.neighbours, 1 << 30)
        out, rss = run_measured([sys.executable, __file__, "--numpy-child", str(tr), str(te), str(a.lam)])
        n = json.loads(out.strip().splitlines()[-1])
        print(f"{name:<32} {t['items']:>6} {t['fit']:>12.2f} {n['fit']:>11.2f} {t['fit'] / n['fit']:>9.2f}"
              f" {t['rss']:>14.0f} {rss:>13.0f} {t['ndcg']:>11.4f} {n['ndcg']:>10.4f}")
        print(f"{'':<32} troupe: dense fit {t['fit_bytes'] / 2**20:.0f} MiB (3 x items^2 f32),"
              f" kept rows {t['rows_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
