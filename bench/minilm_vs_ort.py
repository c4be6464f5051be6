#!/usr/bin/env python3
"""MiniLM embedding throughput: Troupe (tract-onnx) vs onnxruntime on the same ONNX file,
the same texts (MovieLens titles + genres), the same batch size and thread count, alternating
the two sides run by run because this VM's speed drifts. Prints embeddings/s and ratios.

usage: bench/run-minilm.sh [--texts 2000] [--repeats 5]
"""
import argparse
import csv
import json
import pathlib
import statistics
import subprocess
import tempfile
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

import charts  # bench/charts.py: ratio tables as SVG

ROOT = pathlib.Path(__file__).resolve().parent.parent
MOVIES = ROOT.parent / "shared" / "data" / "ml-latest-small" / "movies.csv"


def texts(n):
    out = []
    with open(MOVIES) as f:
        for row in csv.DictReader(f):
            g = [x for x in row["genres"].split("|") if x != "(no genres listed)"]
            out.append(row["title"] + (". " + ", ".join(g) if g else ""))
            if len(out) == n:
                break
    return out


def ort_rate(model, tx, batch, threads, max_len):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(f"{model}/model.onnx", so, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(f"{model}/tokenizer.json")
    tok.no_padding()
    tok.enable_padding()
    tok.enable_truncation(max_len)
    names = [i.name for i in sess.get_inputs()]
    t0 = time.perf_counter()
    for i in range(0, len(tx), batch):
        enc = tok.encode_batch(tx[i:i + batch])
        feed = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
        h = sess.run(None, {n: feed[n] for n in names})[0]
        m = feed["attention_mask"][..., None]
        v = (h * m).sum(1) / m.sum(1)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    return len(tx) / (time.perf_counter() - t0)


def troupe_rate(troupe, model, items, batch, threads, max_len):
    out = subprocess.run([troupe, "--threads", str(threads), "embed", "--items", str(items), "--content-model", model,
                          "--batch", str(batch), "--max-len", str(max_len), "--throughput-only"],
                         check=True, capture_output=True, text=True, env={"TROUPE_LOG": "warn", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout)["per_second"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--troupe", default=str(ROOT / "target" / "release" / "troupe"))
    ap.add_argument("--model", default=str(ROOT / "models" / "all-MiniLM-L6-v2"))
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=64)
    a = ap.parse_args()
    tx = texts(a.texts)
    with tempfile.TemporaryDirectory() as d:
        items = pathlib.Path(d) / "items.csv"
        with open(items, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["item", "text"])
            w.writerows((i, t) for i, t in enumerate(tx))
        print(f"{len(tx)} texts (MovieLens titles + genres), max_len {a.max_len}, median of {a.repeats}")
        print(f"{'batch':>5} {'threads':>7} {'troupe/s':>9} {'ort/s':>9} {'ratio':>6}")
        rows = []
        for batch in (32, 1):
            for threads in (1, 2):
                tr, orr = [], []
                for _ in range(a.repeats):
                    tr.append(troupe_rate(a.troupe, a.model, items, batch, threads, a.max_len))
                    orr.append(ort_rate(a.model, tx, batch, threads, a.max_len))
                t, o = statistics.median(tr), statistics.median(orr)
                print(f"{batch:>5} {threads:>7} {t:>9.1f} {o:>9.1f} {t / o:>6.2f}")
                rows.append((f"batch {batch}, {threads} thread(s)", t / o))
        charts.draw(a.troupe, "minilm", "MiniLM embeddings/s: Troupe (tract) / onnxruntime", rows)


if __name__ == "__main__":
    main()
