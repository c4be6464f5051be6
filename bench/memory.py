#!/usr/bin/env python3
"""Memory per retained event of a node, next to another build of Troupe on the same input.

For each binary: generate (once) `troupe gen --users U --items I --events E`, start a fresh
node with retraining on request only, `troupe load` the file, wait until every partition
has applied it, then read the node's RSS (VmRSS, peak VmHWM), the store's size on disk and
the feature stores' breakdown by structure (`/v1/cluster`, when the build reports one);
then retrain once and read RSS again. Checkpoint bytes per event (from `/metrics`, by
consumer and form) are reported for the load and for a second, smaller load into the
loaded node (`troupe gen` with another seed over the same ids: steady ingest into a big
store); each phase waits one checkpoint interval after catching up so its tail is
checkpointed too.

Usage: bench/memory.py --troupe target/release/troupe [--before OLD_BINARY]
                       [--users 300000 --items 20000 --events 3000000] [--dir DIR]
Standard library only.
"""
import argparse
import json
import os
import re
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


def checkpoint_bytes(node):
    """{(consumer, form): bytes} from the node's metrics (empty for builds without them)."""
    st, body = node.get("/metrics")
    out = {}
    text = body.decode() if isinstance(body, bytes) else ""
    for line in text.splitlines():
        m = re.match(r'troupe_checkpoint_bytes_total\{(.*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[f'{labels.get("consumer")}/{labels.get("form")}'] = float(m.group(2))
    return out


def per_event(after, before, events):
    keys = set(after) | set(before)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    d = {k: round(v / events, 1) for k, v in sorted(d.items()) if v}
    d["total"] = round(sum(after.values()) / events - sum(before.values()) / events, 1)
    return d


def count_rows(path):
    import gzip
    with gzip.open(path, "rt") as f:
        return sum(1 for _ in f) - 1


CHECKPOINT_INTERVAL_S = 30


def measure(troupe, data, extra, work, events, timeout):
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
        time.sleep(CHECKPOINT_INTERVAL_S + 2)
        cp_loaded = checkpoint_bytes(node)
        out["checkpoint_bytes_per_event_load"] = per_event(cp_loaded, {}, events)
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
        out["allocator_loaded"] = c.get("allocator")
        for a in c.get("actors", []):
            st = a.get("state", {})
            if "index_bytes" in st:
                out["content_index_bytes"] = st["index_bytes"]
            if "idempotency_keys" in st:
                out["idempotency_keys"] = st["idempotency_keys"]
        print(json.dumps({"loaded": out}), file=sys.stderr, flush=True)
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=7200)
        st, rep = node.post("/v1/admin/retrain", b"", ctype="application/json", conn=conn)
        out["retrain"] = {"status": st, "accepted": (rep or {}).get("accepted"),
                          "train_ms": (rep or {}).get("train_ms")}
        out["rss_retrained_mb"] = status_kb(pid, "VmRSS") / 1024
        out["allocator_retrained"] = node.get("/v1/cluster")[1].get("allocator")
        out["peak_after_retrain_mb"] = status_kb(pid, "VmHWM") / 1024
        if extra:
            path, n = extra
            subprocess.run([troupe, "load", "--url", f"http://127.0.0.1:{node.port}",
                            "--events", path, "--restart"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "TROUPE_STATE_DIR": work})
            wait_caught_up(node, timeout)
            time.sleep(CHECKPOINT_INTERVAL_S + 2)
            out["steady_ingest_events"] = n
            cp_all = checkpoint_bytes(node)
            out["checkpoint_bytes_per_event_steady"] = per_event(cp_all, cp_loaded, n)
            # Over the node's whole life (load and steady ingest, compactions included).
            out["checkpoint_bytes_per_event_lifetime"] = per_event(cp_all, {}, events + n)
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
    p.add_argument("--steady-events", type=int, default=None,
                   help="events of the second load (default: a tenth of --events; 0: none)")
    a = p.parse_args()
    base = os.path.abspath(a.dir) if a.dir else tempfile.mkdtemp(prefix="troupe-mem-")
    data = os.path.join(base, f"gen-{a.users}-{a.items}-{a.events}")
    troupe = os.path.abspath(a.troupe)
    if not os.path.exists(os.path.join(data, "events.csv.gz")):
        subprocess.run([troupe, "gen", "--out", data, "--users", str(a.users), "--items", str(a.items),
                        "--events", str(a.events), "--gzip"], check=True, stdout=subprocess.DEVNULL)
    n_events = count_rows(os.path.join(data, "events.csv.gz"))
    steady = a.events // 10 if a.steady_events is None else a.steady_events
    extra = None
    if steady:
        more = os.path.join(base, f"gen-{a.users}-{a.items}-{steady}-seed7")
        if not os.path.exists(os.path.join(more, "events.csv.gz")):
            subprocess.run([troupe, "gen", "--out", more, "--users", str(a.users), "--items",
                            str(a.items), "--events", str(steady), "--seed", "7", "--gzip"],
                           check=True, stdout=subprocess.DEVNULL)
        path = os.path.join(more, "events.csv.gz")
        extra = (path, count_rows(path))
    results = []
    for name, binary in (("troupe", troupe), ("before", a.before)):
        if not binary:
            continue
        work = os.path.join(base, f"node-{name}")
        shutil.rmtree(work, ignore_errors=True)
        r = measure(os.path.abspath(binary), data, extra, work, n_events, a.timeout)
        r["name"] = name
        results.append(r)
        print(json.dumps(r), flush=True)
    if len(results) == 2:
        t, b = results
        for k in ("rss_loaded_mb", "rss_retrained_mb", "peak_mb", "store_mb"):
            print(f"{k}: troupe {t[k]:.0f} / before {b[k]:.0f} = {t[k] / b[k]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
