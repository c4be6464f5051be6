#!/usr/bin/env python3
"""Compares Troupe's tract-onnx embeddings with onnxruntime's on the same ONNX model.

Runs `troupe embed` on the first N item texts, computes the same embeddings in Python with
onnxruntime and the `tokenizers` package (same tokenizer.json, padding to the batch's
longest, truncation at --max-len, mean pooling over the mask, L2 norm), and prints the
cosine for every text. Exits non-zero if any cosine is below the threshold.

usage: check_tract_vs_ort.py --troupe BIN --model DIR --items FILE [--n 100] [--max-len 64]
Needs: numpy, onnxruntime, tokenizers (PyPI).
"""
import argparse
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--troupe", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--items", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9999)
    a = ap.parse_args()

    out = subprocess.run([a.troupe, "embed", "--items", a.items, "--content-model", a.model,
                          "--limit", str(a.n), "--max-len", str(a.max_len)],
                         check=True, capture_output=True, text=True).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.strip()]
    rows = [r for r in rows if r["text"]]
    texts = [r["text"] for r in rows]
    tract = np.array([r["embedding"] for r in rows], dtype=np.float64)

    tok = Tokenizer.from_file(f"{a.model}/tokenizer.json")
    tok.no_padding()
    tok.enable_padding()
    tok.enable_truncation(a.max_len)
    sess = ort.InferenceSession(f"{a.model}/model.onnx", providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ref = []
    for i in range(0, len(texts), 32):
        enc = tok.encode_batch(texts[i:i + 32])
        feed = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
        h = sess.run(None, {n: feed[n] for n in names})[0]
        m = feed["attention_mask"][..., None]
        v = (h * m).sum(1) / m.sum(1)
        ref.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    ref = np.concatenate(ref)
    cos = (tract * ref).sum(1) / np.linalg.norm(tract, axis=1) / np.linalg.norm(ref, axis=1)
    for t, c in zip(texts, cos):
        print(f"{c:.7f}  {t[:70]}")
    print(f"texts {len(cos)}  min cosine {cos.min():.7f}  mean {cos.mean():.7f}  "
          f"max |diff| {np.abs(tract - ref).max():.2e}")
    if cos.min() < a.threshold:
        print(f"FAIL: min cosine below {a.threshold}")
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
