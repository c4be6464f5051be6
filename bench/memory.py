#!/usr/bin/env python3
"""Memory per retained event of a node, next to another build of Troupe on the same input.

For each binary: generate (once) `troupe gen --users U --items I --events E`, start a fresh
node with retraining on request only, `troupe load` the file, wait until every partition
has applied it, then read the node's RSS (VmRSS, peak VmHWM), the store's size on disk and
the feature stores' breakdown by structure (`/v1/cluster`, when the build reports one);
then retrain once and read RSS again.

Usage: bench/memory.py --troupe target/release/troupe [--before OLD_BINARY]
                       [--users 300000 --items 20000 --events 3000000] [--dir DIR]
Standard library only.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from node_bench import Node  # noqa: E402


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for n in files:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def wait_caught_up(node, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if node.caught_up():
            return
        time.sleep(0.5)
    raise RuntimeError("node did not catch up")


def measure(troupe, data, work, events, timeout):
    os.makedirs(work, exist_ok=True)
    node = Node(troupe, work, "[als]\nmin_interactions = 1\nretrain_every_events = 1000000000\n"
                              "retrain_interval_ms = 86400000\n")
    node.start()
    pid = node.proc.pid
    out = {"binary": troupe, "rss_empty_mb": status_kb(pid, "VmRSS") / 1024}
    try:
        t0 = time.time()
        subprocess.run([troupe, "load", "--url", f"http://127.0.0.1:{node.port}",
                        "--events", os.path.join(data, "events.csv.gz"),
                        "--items", os.path.join(data, "items.csv"), "--restart"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "TROUPE_STATE_DIR": work})
        wait_caught_up(node, timeout)
        out["load_s"] = round(time.time() - t0, 1)
        out["rss_loaded_mb"] = status_kb(pid, "VmRSS") / 1024
        out["peak_mb"] = status_kb(pid, "VmHWM") / 1024
        out["store_mb"] = du(os.path.join(work, "data")) / 2**20
        _, c = node.get("/v1/cluster")
        mem = {}
        for a in c.get("actors", []):
            m = a.get("state", {}).get("memory")
            if m:
                for k, v in m.items():
                    mem[k] = mem.get(k, 0) + v
        out["feature_store"] = mem
        st, rep = node.post("/v1/admin/retrain", b"", ctype="application/json")
        out["retrain"] = {"status": st, "accepted": (rep or {}).get("accepted"),
                          "train_ms": (rep or {}).get("train_ms")}
        out["rss_retrained_mb"] = status_kb(pid, "VmRSS") / 1024
        out["peak_after_retrain_mb"] = status_kb(pid, "VmHWM") / 1024
        for k in ("rss_loaded_mb", "rss_retrained_mb"):
            out[k.replace("_mb", "_bytes_per_event")] = round(out[k] * 2**20 / events, 1)
        out["loaded_minus_empty_bytes_per_event"] = round(
            (out["rss_loaded_mb"] - out["rss_empty_mb"]) * 2**20 / events, 1)
    finally:
        node.stop()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--troupe", default="target/release/troupe")
    p.add_argument("--before", default=None, help="another troupe binary to measure the same way")
    p.add_argument("--users", type=int, default=300000)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--events", type=int, default=3000000)
    p.add_argument("--dir", default=None, help="where data and node folders go")
    p.add_argument("--timeout", type=float, default=3600)
    a = p.parse_args()
    base = os.path.abspath(a.dir) if a.dir else tempfile.mkdtemp(prefix="troupe-mem-")
    data = os.path.join(base, f"gen-{a.users}-{a.items}-{a.events}")
    troupe = os.path.abspath(a.troupe)
    if not os.path.exists(os.path.join(data, "events.csv.gz")):
        subprocess.run([troupe, "gen", "--out", data, "--users", str(a.users), "--items", str(a.items),
                        "--events", str(a.events), "--gzip"], check=True, stdout=subprocess.DEVNULL)
    results = []
    for name, binary in (("troupe", troupe), ("before", a.before)):
        if not binary:
            continue
        work = os.path.join(base, f"node-{name}")
        shutil.rmtree(work, ignore_errors=True)
        r = measure(os.path.abspath(binary), data, work, a.events, a.timeout)
        r["name"] = name
        results.append(r)
        print(json.dumps(r), flush=True)
    if len(results) == 2:
        t, b = results
        for k in ("rss_loaded_mb", "rss_retrained_mb", "peak_mb", "store_mb"):
            print(f"{k}: troupe {t[k]:.0f} / before {b[k]:.0f} = {t[k] / b[k]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
