#!/usr/bin/env python3
"""ALS fit and recommend-for-all: Troupe vs implicit (CPU, conjugate gradient), same input,
same hyper-parameters, same thread count, in one run. Prints times, NDCG@10 and ratios
(Troupe / implicit), and each side's peak RSS.

Data sets: MovieLens latest-small with the shared split (pos4 and all conventions) and a
generated 100k users x 20k items x 5M events set (split here per user, 20 %, seed 42).
Both sides read the same train/test CSV files written under bench/out/.

usage: bench/run-als.sh   (sets up the venv and builds Troupe), or
       als_vs_implicit.py --troupe target/release/troupe [--seeds 3] [--skip-synthetic]
"""
import argparse
import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

import charts  # bench/charts.py: ratio tables as SVG

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
SHARED = ROOT.parent / "shared" / "data"


def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "value", "ts"])
        w.writerows(rows)


def prepare_movielens():
    split = SHARED / "ml-latest-small" / "split"
    sets = {}
    for conv in ("pos4", "all"):
        d = OUT / f"ml-{conv}"
        d.mkdir(parents=True, exist_ok=True)
        for part in ("train", "test"):
            with open(split / f"{part}.csv") as f:
                r = csv.DictReader(f)
                rows = [(x["userId"], x["movieId"], x["rating"], x["timestamp"]) for x in r
                        if conv == "all" or float(x["rating"]) >= 4.0]
            write_rows(d / f"{part}.csv", rows)
        sets[f"ml-{conv}"] = (d, SHARED / "ml-latest-small" / "movies.csv")
    return sets


def prepare_synthetic(troupe):
    d = OUT / "synthetic-5m"
    if not (d / "train.csv").exists():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([troupe, "gen", "--out", str(d), "--users", "100000", "--items", "20000",
                        "--events", "5000000", "--seed", "42"], check=True)
        rng = np.random.default_rng(42)
        by_user = {}
        with open(d / "events.csv") as f:
            r = csv.reader(f)
            next(r)
            for u, i, _k, _v, ts in r:
                by_user.setdefault(u, []).append((u, i, "1", ts))
        train, test = [], []
        for u, rows in by_user.items():
            n_test = int(np.floor(0.2 * len(rows) + 0.5))
            idx = rng.permutation(len(rows))
            held = set(idx[:n_test].tolist())
            for j, row in enumerate(rows):
                (test if j in held else train).append(row)
        write_rows(d / "train.csv", train)
        write_rows(d / "test.csv", test)
    return {"synthetic-5m": (d, d / "items.csv")}


def implicit_worker(args):
    """Runs in a child process so its peak RSS and threads are its own."""
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    d = pathlib.Path(args.data)
    users, items = {}, {}

    def load(path):
        u, i = [], []
        with open(path) as f:
            r = csv.reader(f)
            next(r)
            for row in r:
                u.append(users.setdefault(row[0], len(users)))
                i.append(items.setdefault(row[1], len(items)))
        return np.array(u), np.array(i)

    tu, ti = load(d / "train.csv")
    su, si = load(d / "test.csv")
    t0 = time.perf_counter()
    m = sp.csr_matrix((np.ones(len(tu), dtype=np.float32), (tu, ti)), shape=(len(users), len(items)))
    m.sum_duplicates()
    m.data[:] = 1.0
    model = AlternatingLeastSquares(factors=args.factors, regularization=args.reg, alpha=args.alpha,
                                    iterations=args.iterations, use_cg=True, num_threads=args.threads,
                                    random_state=args.seed, calculate_training_loss=False)
    model.fit(m, show_progress=False)
    fit = time.perf_counter() - t0
    test = {}
    for u, i in zip(su, si):
        test.setdefault(int(u), set()).add(int(i))
    uids = np.array(sorted(test))
    t0 = time.perf_counter()
    ids, _ = model.recommend(uids, m[uids], N=10, filter_already_liked_items=True)
    rec = time.perf_counter() - t0
    ndcg, prec = [], []
    for row, u in zip(ids, uids):
        rel = test[int(u)]
        hits = [1.0 if int(x) in rel else 0.0 for x in row[:10]]
        dcg = sum(h / np.log2(p + 2) for p, h in enumerate(hits))
        idcg = sum(1 / np.log2(p + 2) for p in range(min(10, len(rel))))
        ndcg.append(dcg / idcg)
        prec.append(sum(hits) / 10)
    print(json.dumps({"fit_seconds": fit, "recommend_seconds": rec, "ndcg": float(np.mean(ndcg)),
                      "precision": float(np.mean(prec)), "users": len(uids)}))


def run_implicit(data, a, seed):
    # Under /usr/bin/time like Troupe: Linux keeps ru_maxrss across exec, so a child's own
    # getrusage would report this (large) parent's peak.
    out = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, "--worker-implicit", "--data", str(data), "--seed", str(seed),
                          "--threads", str(a.threads), "--factors", str(a.factors), "--reg", str(a.reg),
                          "--alpha", str(a.alpha), "--iterations", str(a.iterations)],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for line in out.stderr.splitlines():
        if "Maximum resident set size" in line:
            r["peak_rss_mb"] = int(line.split()[-1]) / 1024
    return r


def run_troupe(troupe, data, items, a, seed):
    cmd = ["/usr/bin/time", "-v", troupe, "--threads", str(a.threads), "fit-als", "--train", str(data / "train.csv"),
           "--test", str(data / "test.csv"), "--items", str(items), "--factors", str(a.factors),
           "--reg", str(a.reg), "--alpha", str(a.alpha), "--iterations", str(a.iterations), "--seed", str(seed),
           "--reg-scaling", a.reg_scaling]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "TROUPE_LOG": "warn"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for line in out.stderr.splitlines():
        if "Maximum resident set size" in line:
            r["peak_rss_mb"] = int(line.split()[-1]) / 1024
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--troupe", default=str(ROOT / "target" / "release" / "troupe"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--factors", type=int, default=64)
    ap.add_argument("--reg", type=float, default=0.05)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--reg-scaling", default="count", choices=["count", "none"],
                    help="Troupe's regularisation scaling (none = implicit's objective)")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--worker-implicit", action="store_true")
    ap.add_argument("--data")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.worker_implicit:
        return implicit_worker(a)

    sets = prepare_movielens()
    if not a.skip_synthetic:
        sets.update(prepare_synthetic(a.troupe))
    results = {}
    print(f"threads {a.threads}, factors {a.factors}, reg {a.reg}, alpha {a.alpha}, iterations {a.iterations}, "
          f"troupe reg scaling {a.reg_scaling}, medians of {a.seeds} seeds")
    print(f"{'data':<14} {'side':<8} {'fit s':>8} {'rec s':>8} {'NDCG@10':>8} {'P@10':>7} {'RSS MB':>7}")
    for name, (data, items) in sets.items():
        runs = {"troupe": [], "implicit": []}
        for seed in range(a.seeds):
            # Alternate sides so drift in this VM's speed hits both alike.
            runs["implicit"].append(run_implicit(data, a, seed))
            runs["troupe"].append(run_troupe(a.troupe, data, items, a, seed))
        med = {side: {k: statistics.median(r[k] for r in rs) for k in
                      ("fit_seconds", "recommend_seconds", "ndcg", "precision", "peak_rss_mb")}
               for side, rs in runs.items()}
        for side in ("troupe", "implicit"):
            m = med[side]
            print(f"{name:<14} {side:<8} {m['fit_seconds']:>8.3f} {m['recommend_seconds']:>8.3f} "
                  f"{m['ndcg']:>8.4f} {m['precision']:>7.4f} {m['peak_rss_mb']:>7.0f}")
        ratio = {k: med["troupe"][k] / med["implicit"][k] for k in ("fit_seconds", "recommend_seconds")}
        print(f"{name:<14} ratio    fit {ratio['fit_seconds']:.2f}  recommend {ratio['recommend_seconds']:.2f}  "
              f"NDCG diff {med['troupe']['ndcg'] - med['implicit']['ndcg']:+.4f}")
        results[name] = {"median": med, "ratio": ratio, "runs": runs}
    charts.draw(a.troupe, f"als-{a.reg_scaling}", "ALS: Troupe / implicit (time, lower is faster)",
                [(f"{n} {k.replace('_seconds', '')}", r["ratio"][k]) for n, r in results.items()
                 for k in ("fit_seconds", "recommend_seconds")])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"als-{a.reg_scaling}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
