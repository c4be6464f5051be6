#!/usr/bin/env python3
"""Benchmarks of a running Troupe node, each next to its reference measured in the same run.

  ingest     acked events/s at batch 1, 100, 1000 vs a raw write+fdatasync loop
  jetstream  the same on the JetStream backend vs a raw async-nats publish loop (and the
             embedded backend), with a nats-server the script starts
  serving    recommendations/s and latency (wrk) vs nginx serving a static file
  freshness  event ack -> applied_offset reaching it, p50/p99
  recovery   restart time vs journal length, checkpoints off and on
  restart-scale  JetStream: restart time vs events and distinct items, idle and under load
  cluster    three nodes on one JetStream server: a recommendation through a non-owner
             (one hop) vs through the owner, same users, same run; failover after SIGKILL
             of a node (detection, claim, replay, first full answer) per data size;
             --throughput: ingest and recommendations/s of three nodes vs one

Usage: node_bench.py <what> --troupe target/release/troupe [--out DIR]
Standard library only (plus `wrk` and `nginx` for `serving`).
"""
import argparse
import http.client
import json
import resource
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import charts  # bench/charts.py: ratio tables as SVG


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Node:
    def __init__(self, troupe, workdir, extra=""):
        self.troupe, self.dir = troupe, workdir
        self.port = free_port()
        self.cfg = os.path.join(workdir, "node.toml")
        with open(self.cfg, "w") as f:
            f.write(f'[node]\nname = "bench"\ndata_dir = "{workdir}/data"\n'
                    f'[http]\naddr = "127.0.0.1:{self.port}"\nmax_in_flight = 4096\n{extra}\n')
        self.proc = None
        self.log_level = "warn"

    def start(self, timeout=600):
        t0 = time.time()
        log = open(os.path.join(self.dir, "node.log"), "a")
        self.proc = subprocess.Popen([self.troupe, "node", "--config", self.cfg],
                                     stdout=log, stderr=log, env={**os.environ, "TROUPE_LOG": self.log_level})
        while time.time() - t0 < timeout:
            try:
                st, _ = self.get("/readyz")
                if st == 200:
                    return time.time() - t0
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError("node not ready")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait()

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def get(self, path, conn=None):
        c = conn or self.conn()
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        return r.status, json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path, body, conn=None, ctype="application/x-ndjson"):
        c = conn or self.conn()
        c.request("POST", path, body=body, headers={"Content-Type": ctype})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null")

    def caught_up(self):
        _, c = self.get("/v1/cluster")
        heads = {str(h["stream"]): h["offset"] for h in c["journal_heads"]}
        for a in c["actors"]:
            if a["name"].startswith("user_features-"):
                if "state" not in a:
                    return False  # busy applying (Observe timed out)
                p = str(a["state"]["partition"])
                if a["state"]["applied_offset"] < heads.get(p, 0):
                    return False
        return True


    def consumers_caught_up(self):
        """True when every consumer (user features and the ones of every partition, such as
        item stats) has applied each stream up to its head."""
        _, c = self.get("/v1/cluster")
        heads = {str(h["stream"]): h["offset"] for h in c["journal_heads"]}
        for a in c["actors"]:
            offsets = (a.get("state") or {}).get("applied_offsets")
            if a["name"].startswith("user_features-") or a["name"] == "item_stats":
                if offsets is None and "applied_offset" not in (a.get("state") or {}):
                    return False
                for o in offsets or []:
                    if o["offset"] < heads.get(str(o["stream"]), 0):
                        return False
        return self.caught_up()


def ndjson_batch(prefix, start, n, users=20000, items=10000):
    lines = []
    for k in range(start, start + n):
        lines.append('{"event_id":"%s-%d","user":"u%d","item":"i%d","kind":"view"}'
                     % (prefix, k, k * 7919 % users, k * 104729 % items))
    return ("\n".join(lines) + "\n").encode()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---------------------------------------------------------------- ingest
def raw_fsync_rate(path, record_bytes, batch, seconds=3.0):
    """Records/s of appending `batch` records of `record_bytes` then one fdatasync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    buf = os.urandom(record_bytes * batch)
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        os.write(fd, buf)
        os.fdatasync(fd)
        n += batch
    dt = time.time() - t0
    os.close(fd)
    os.unlink(path)
    return n / dt


def post_batches(nodes, bodies, seconds):
    """Acked events/s of one client per key of `bodies` (client c posts to
    `nodes[c % len(nodes)]` on its own connection) until its bodies or `seconds` run out."""
    acked = [0] * len(bodies)
    stop = time.time() + seconds

    def run(c):
        node = nodes[c % len(nodes)]
        conn = node.conn()
        for body in bodies[c]:
            if time.time() > stop:
                break
            st, r = node.post("/v1/events", body, conn)
            if st == 200:
                acked[c] += r["acked"]
    t0 = time.time()
    ts = [threading.Thread(target=run, args=(c,)) for c in range(len(bodies))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return sum(acked) / (time.time() - t0)


def measure_ingest(node, batch, clients, seconds):
    """Acked events/s from `clients` connections posting NDJSON batches of `batch` for
    `seconds`, and how long the consumers then took to catch up."""
    rate, lag, _ = measure_ingest_cpu(node, batch, clients, seconds)
    return rate, lag


def measure_ingest_cpu(node, batch, clients, seconds):
    """As `measure_ingest`, plus the node's CPU microseconds (user + system) per acked
    event from the first post until its consumers caught up."""
    bodies = {c: [ndjson_batch(f"b{batch}c{c}-{node.port}", k * batch, batch)
                  for k in range(4000 if batch == 1 else 400 if batch == 100 else 60)]
              for c in range(clients)}
    cpu0, t0 = proc_cpu(node.proc.pid), time.time()
    rate = post_batches([node], bodies, seconds)
    t1 = time.time()
    while not node.caught_up():
        time.sleep(0.01)
    cpu = proc_cpu(node.proc.pid) - cpu0
    return rate, time.time() - t1, cpu * 1e6 / max(rate * (t1 - t0), 1)


def ingest(a):
    work = tempfile.mkdtemp(prefix="troupe-ingest-", dir=a.dir)
    # TROUPE_BENCH_JOURNAL: extra `[journal]` keys (e.g. "cache_mb = 1024") to isolate one.
    extra = os.environ.get("TROUPE_BENCH_JOURNAL", "")
    node = Node(a.troupe, work, f"[journal]\npartitions = 8\n{extra}\n[als]\nmin_interactions = 1000000000\n")
    node.start()
    # The raw loop writes records of the size the client sends (one NDJSON line).
    record_bytes = len(ndjson_batch("b1000c0", 123456, 1))
    rows = []
    for batch, clients in ((1, 16), (100, 8), (1000, 4)):
        rate, lag = measure_ingest(node, batch, clients, a.seconds)
        raw = raw_fsync_rate(os.path.join(work, "raw.bin"), record_bytes, batch)
        rows.append((batch, clients, rate, raw, rate / raw, lag))
    node.stop()
    print(f"raw loop: {record_bytes}-byte records (one NDJSON event line), write + fdatasync per batch; {a.seconds:.0f} s per batch size")
    print(f"{'batch':>6} {'clients':>7} {'troupe ev/s':>12} {'raw ev/s':>12} {'ratio':>6} {'apply lag s':>11}")
    for b, c, r, raw, ratio, lag in rows:
        print(f"{b:>6} {c:>7} {r:>12.0f} {raw:>12.0f} {ratio:>6.2f} {lag:>11.2f}")
    charts.draw(a.troupe, "ingest-embedded", "Embedded ingest: Troupe / raw write+fdatasync loop",
                [(f"batch {b}, {c} clients", ratio) for b, c, _, _, ratio, _ in rows])
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- jetstream
def nats_server():
    return os.environ.get("TROUPE_NATS_SERVER") or shutil.which("nats-server") or "/usr/sbin/nats-server"


def nats_version():
    return subprocess.run([nats_server(), "--version"], capture_output=True, text=True).stdout.strip()


class NatsServers:
    """`n` JetStream servers on free loopback ports (n > 1: one cluster, routes between
    all), each from a config file with its store under `work`. `sync`: "always" (fsync
    every write before acknowledging it, the recommended setting) or "interval" (the
    release default: a flush every two minutes)."""

    def __init__(self, work, n=1, sync="always"):
        self.procs = []
        self.ports = [(free_port(), free_port(), free_port()) for _ in range(n)]
        routes = ", ".join(f'"nats-route://127.0.0.1:{r}"' for _, _, r in self.ports)
        for i, (port, mon, route) in enumerate(self.ports):
            d = os.path.join(work, f"nats{i}")
            os.makedirs(d, exist_ok=True)
            conf = os.path.join(d, "nats.conf")
            js_sync = "sync_interval: always, " if sync == "always" else ""
            cluster = f"cluster {{ name: bench, listen: 127.0.0.1:{route}, routes: [{routes}] }}\n" if n > 1 else ""
            with open(conf, "w") as f:
                f.write(f"server_name: s{i}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{mon}\n"
                        f"jetstream {{ store_dir: \"{d}/store\", {js_sync}max_mem_store: 1GB, max_file_store: 20GB }}\n{cluster}")
            log = open(os.path.join(d, "nats.log"), "w")
            self.procs.append(subprocess.Popen([nats_server(), "-c", conf], stdout=subprocess.DEVNULL, stderr=log))
        for port, mon, _ in self.ports:
            for _ in range(6000):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", mon, timeout=1)
                    c.request("GET", "/healthz")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.01)
            else:
                raise RuntimeError("nats-server did not start")
        self.url = ",".join(f"nats://127.0.0.1:{p}" for p, _, _ in self.ports)

    def kill(self):
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


def start_nats(work):
    """One JetStream server that fsyncs every write; returns (process list holder, url)."""
    s = NatsServers(work)
    return s, s.url


def raw_rate(a, url, stream, batch, clients, replicas, atomic):
    """The raw loop's records/s and its CPU microseconds per record."""
    args = [a.publisher, url, stream, str(batch), str(clients), str(a.seconds)]
    if atomic:
        args.append("atomic")
    # The publisher creates its stream as the node lays it out (atomic batches allowed).
    env = dict(os.environ, TROUPE_BENCH_REPLICAS=str(replicas))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = json.loads(out.strip().splitlines()[-1])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return r["rate"], cpu * 1e6 / max(r["records"], 1)


def proc_cpu(pid):
    """CPU seconds (user + system) a live process has used."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def jetstream(a):
    """Ingest on the JetStream backend vs the engine's own ceiling on the same servers (a
    raw async-nats loop publishing the same records to the same stream layout:
    `jetstream_publish`, one by one and in atomic batches) and vs the embedded backend, at
    batch 1, 100, 1000. `--servers 3` runs three servers with replicas 3; `--sync`
    chooses the servers' fsync setting."""
    work = tempfile.mkdtemp(prefix="troupe-js-", dir=a.dir)
    srv = NatsServers(work, a.servers, a.sync)
    url = srv.url
    replicas = 3 if a.servers > 1 else 1
    base = "[journal]\npartitions = 8\n[als]\nmin_interactions = 1000000000\n"
    rows = []
    try:
        for batch, clients in ((1, 16), (100, 8), (1000, 4)):
            raw, raw1_cpu = raw_rate(a, url, f"raw{batch}", batch, clients, replicas, False)
            raw_atomic, raw_cpu = raw_rate(a, url, f"rawa{batch}", batch, clients, replicas, True) if batch > 1 else (raw, raw1_cpu)
            d = os.path.join(work, f"js{batch}")
            os.makedirs(d)
            node = Node(a.troupe, d, base + f'[log]\nbackend = "jetstream"\n[log.jetstream]\nurl = "{url}"\nstream = "node{batch}"\nreplicas = {replicas}\n')
            node.start()
            js_rate, js_lag, js_cpu = measure_ingest_cpu(node, batch, clients, a.seconds)
            node.stop()
            d = os.path.join(work, f"emb{batch}")
            os.makedirs(d)
            node = Node(a.troupe, d, base)
            node.start()
            emb_rate, _ = measure_ingest(node, batch, clients, a.seconds)
            node.stop()
            rows.append((batch, clients, raw, raw_atomic, js_rate, js_lag, emb_rate, raw_cpu, js_cpu))
    finally:
        srv.kill()
    ver = nats_version()
    print(f"JetStream ingest ({ver}, {a.servers} server(s), replicas {replicas}, sync {a.sync}, file storage); "
          f"{a.seconds:.0f} s per row; raw = jetstream_publish (one connection): one by one / atomic batches")
    print(f"{'batch':>6} {'clients':>7} {'raw ev/s':>10} {'raw atomic':>11} {'troupe js ev/s':>15} {'js/raw atomic':>13} "
          f"{'apply lag s':>11} {'troupe embedded ev/s':>21} {'js/embedded':>11} {'raw cpu us/ev':>13} {'node cpu us/ev':>14}")
    for b, c, raw, rawa, r, lag, emb, rcpu, ncpu in rows:
        print(f"{b:>6} {c:>7} {raw:>10.0f} {rawa:>11.0f} {r:>15.0f} {r / rawa:>13.2f} {lag:>11.2f} {emb:>21.0f} {r / emb:>11.2f} "
              f"{rcpu:>13.2f} {ncpu:>14.2f}")
    print("cpu us/ev: user + system CPU of the raw loop (its atomic batches; one by one at batch 1) and of the node "
          "(HTTP, publish, follower and every consumer's apply until caught up) per acknowledged event")
    charts.draw(a.troupe, f"ingest-jetstream-{a.servers}", f"JetStream ingest ({a.servers} server(s)): Troupe / raw async-nats atomic batches",
                [(f"batch {b}, {c} clients", r / rawa) for b, c, _, rawa, r, *_ in rows])
    shutil.rmtree(work, ignore_errors=True)


def load_all(node, prefix, n, users, clients=4, batch=1000):
    """Posts `n` events of `users` in NDJSON batches over `clients` connections; waits
    for apply."""
    conns = [node.conn() for _ in range(clients)]

    def body(k0, m):
        return ("".join('{"event_id":"%s-%d","user":"%s","item":"i%d","kind":"view"}\n'
                        % (prefix, k, users[k * 7919 % len(users)], k * 104729 % 10000)
                        for k in range(k0, k0 + m))).encode()

    def run(c):
        for k in range(c * batch, n, clients * batch):
            st, r = node.post("/v1/events", body(k, min(batch, n - k)), conns[c])
            if st != 200:
                raise RuntimeError(f"load refused: {st} {r}")
    ts = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    while not node.caught_up():
        time.sleep(0.05)


def rebuild(a):
    """Rebuilding one partition on an empty node from the shared store: a node on
    JetStream (one partition) checkpoints `--base` events at a graceful stop, restarts,
    takes `--replay` more events without checkpointing them and is SIGKILLed; a second
    node on an empty data dir then loads the shared checkpoint and replays the rest.
    Prints the time from its start to ready and what it replayed."""
    work = tempfile.mkdtemp(prefix="troupe-rebuild-", dir=a.dir)
    srv, url = start_nats(work)
    cfg = ("[journal]\npartitions = 2\n[features]\ncheckpoint_every_records = 1000000000000\n"
           "checkpoint_interval_ms = 1000000000000\nhistory_len = 100000\n[als]\nmin_interactions = 1000000000\n"
           f'[log]\nbackend = "jetstream"\n[log.jetstream]\nurl = "{url}"\n')
    try:
        d1 = os.path.join(work, "first")
        os.makedirs(d1)
        first = Node(a.troupe, d1, cfg)
        first.start()
        # Users of partition 0 only (the node says where each event went).
        probe = [{"event_id": f"probe{u}", "user": f"u{u}", "item": "probe", "kind": "view"} for u in range(4000)]
        st, r = first.post("/v1/events", json.dumps(probe).encode(), ctype="application/json")
        users = [p["user"] for p, res in zip(probe, r["results"]) if str(res["partition"]) == "0"]
        load_all(first, "base", a.base, users)
        first.stop()  # graceful: final checkpoints to the shared store
        first.start()
        t0 = time.time()
        load_all(first, "replay", a.replay, users)
        load_s = time.time() - t0
        first.kill9()
        d2 = os.path.join(work, "second")
        os.makedirs(d2)
        second = Node(a.troupe, d2, cfg)
        ready_s = second.start()
        _, c = second.get("/v1/cluster")
        uf = [x["state"] for x in c["actors"] if x["name"] == "user_features-0"][0]
        second.stop()
    finally:
        srv.kill()
    ver = nats_version()
    print(f"rebuild of one partition on an empty data dir from JetStream ({ver}, R1):")
    print(f"  checkpoint: {a.base} events; replayed after it: {uf['replayed_on_start']} (loaded at {a.replay / load_s:.0f} ev/s)")
    print(f"  partition 0 of 2 (partition 1 is empty): users {uf['users']}, events held {uf['events']}")
    print(f"  start to ready: {ready_s:.2f} s (goal <= 10 s: ratio {ready_s / 10:.2f})")
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- freshness
def freshness(a):
    work = tempfile.mkdtemp(prefix="troupe-fresh-", dir=a.dir)
    node = Node(a.troupe, work, "[journal]\npartitions = 8\n")
    node.start()
    conn = node.conn()
    for k in range(0, 50000, 1000):
        node.post("/v1/events", ndjson_batch("warm", k, 1000), conn)
    # Background ingest at batch 100 while measuring, to include apply under load.
    stop = threading.Event()

    def background():
        c = node.conn()
        k = 0
        while not stop.is_set():
            node.post("/v1/events", ndjson_batch("bg", k, 100), c)
            k += 100
    bg = threading.Thread(target=background)
    bg.start()
    lat = []
    poll = node.conn()
    for k in range(a.samples):
        user = f"fresh{k % 500}"
        body = json.dumps([{"user": user, "item": f"i{k}", "kind": "purchase"}]).encode()
        st, r = node.post("/v1/events", body, conn, "application/json")
        t_ack = time.time()
        off = r["results"][0]["offset"]
        while True:
            _, u = node.get(f"/v1/users/{user}", poll)
            if isinstance(u, dict) and u.get("applied_offset", 0) >= off:
                break
        lat.append((time.time() - t_ack) * 1000)
    stop.set()
    bg.join()
    node.stop()
    print(f"freshness over {a.samples} events (background ingest at batch 100): "
          f"p50 {pct(lat, 0.5):.2f} ms  p99 {pct(lat, 0.99):.2f} ms  max {max(lat):.2f} ms "
          f"(includes one GET per poll, ~{statistics.mean(lat[:10]):.2f} ms)")
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- recovery
def recovery(a):
    print(f"{'events':>8} {'checkpoints':>11} {'restart to ready s':>18}")
    for n in a.sizes:
        for mode in ("off", "on"):
            work = tempfile.mkdtemp(prefix="troupe-recovery-", dir=a.dir)
            cp = ("checkpoint_every_records = 1000000000000\ncheckpoint_interval_ms = 1000000000000\n"
                  if mode == "off" else "checkpoint_every_records = 100000\ncheckpoint_interval_ms = 2000\n")
            node = Node(a.troupe, work, f"[journal]\npartitions = 8\n[features]\n{cp}[als]\nmin_interactions = 1000000000\n")
            node.start()
            conns = [node.conn() for _ in range(4)]

            def load(c):
                for k in range(c * 1000, n, 4000):
                    node.post("/v1/events", ndjson_batch("r", k, min(1000, n - k)), conns[c])
            ts = [threading.Thread(target=load, args=(c,)) for c in range(4)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            while not node.caught_up():
                time.sleep(0.05)
            if mode == "on":
                time.sleep(2.5)  # let the interval checkpoint land
            node.kill9()
            t = node.start()
            node.stop()
            print(f"{n:>8} {mode:>11} {t:>18.2f}")
            shutil.rmtree(work, ignore_errors=True)


def restart_scale(a):
    """Restart time on the JetStream backend against the size of the data: a node loads
    `n` events naming `n / 2` distinct items (NDJSON batches of 1,000 from 4 clients),
    checkpoints with its defaults, is SIGKILLed and restarted, first with no load, then
    while 2 clients keep writing; time from the restart to /readyz 200 and where recovery
    went (each consumer's recovery log line)."""
    print(f"{'events':>9} {'items':>8} {'load ev/s':>9} {'idle restart s':>14} {'restart under load s':>20}")
    for n in a.sizes:
        work = tempfile.mkdtemp(prefix="troupe-restart-", dir=a.dir)
        srv = NatsServers(work, 1, a.sync)
        items = n // 2
        os.makedirs(os.path.join(work, "n"))
        node = Node(a.troupe, os.path.join(work, "n"),
                    f'[journal]\npartitions = 4\n[als]\nmin_interactions = 1000000000\n'
                    f'[log]\nbackend = "jetstream"\n[log.jetstream]\nurl = "{srv.url}"\n')
        node.log_level = "info"
        node.start()
        bodies = {c: [ndjson_batch(f"s{c}", k, 1000, users=200000, items=items)
                      for k in range(c * 1000, n, 4000)] for c in range(4)}
        t0 = time.time()
        rate = post_batches([node], bodies, 1e9)
        loaded = time.time()
        while not node.consumers_caught_up():
            time.sleep(0.5)
        behind = time.time() - loaded
        time.sleep(35)  # one checkpoint interval (30 s by default) after the load
        node.kill9()
        idle = node.start()
        # Under load: two writers keep posting while the node is killed and restarted.
        stop = threading.Event()

        def writer(c):
            conn = None
            k = 0
            while not stop.is_set():
                try:
                    conn = conn or node.conn()
                    node.post("/v1/events", ndjson_batch(f"w{c}", k, 1000, users=200000, items=items), conn)
                except OSError:
                    conn = None
                    time.sleep(0.05)
                k += 1000
        ws = [threading.Thread(target=writer, args=(c,)) for c in range(2)]
        [w.start() for w in ws]
        time.sleep(5)
        node.kill9()
        loaded = node.start()
        stop.set()
        [w.join() for w in ws]
        node.stop()
        srv.kill()
        print(f"{n:>9} {items:>8} {rate:>9.0f} {idle:>14.2f} {loaded:>20.2f}"
              f"   (consumers caught up {behind:.1f} s after the load)")
        log = open(os.path.join(work, "n", "node.log")).read()
        for line in re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines():
            if " recovered " in line and ("replayed=0 users=0" not in line and "items=0 " not in line):
                print("   ", line[line.index("}:") + 3:] if "}:" in line else line)
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- serving
WRK_LUA = """
math.randomseed(7)
request = function()
  return wrk.format("GET", "/v1/recommendations/u" .. math.random(0, %d) .. "?k=10")
end
%s
"""


def wrk(url, conns, seconds, script=None):
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{int(seconds)}s", "--latency"]
    if script:
        cmd += ["-s", script]
    res = subprocess.run(cmd + [url], capture_output=True, text=True)
    out = res.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk failed on {url}: {out} {res.stderr}")
    rps = float(m.group(1))

    def lat(label):
        m = re.search(label + r"\s+([\d.]+)(us|ms|s)\b", out)
        v, u = float(m.group(1)), m.group(2)
        return v / 1000 if u == "us" else v * 1000 if u == "s" else v
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, lat("50%"), lat("99%"), int(errors.group(1)) if errors else 0


def metric(port, name, labels):
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def branch_outcomes(port):
    """Per branch: (answers with the branch `ok`, answers in all) so far."""
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("troupe_branch_outcomes_total{"):
            labels, value = line.rsplit(" ", 1)
            branch = labels.split('branch="', 1)[1].split('"', 1)[0]
            ok, total = out.get(branch, (0.0, 0.0))
            out[branch] = (ok + (float(value) if 'status="ok"' in labels else 0.0), total + float(value))
    return out


def ok_shares(before, after):
    """`branch ok%` for every branch between two `branch_outcomes` readings."""
    parts = []
    for b in sorted(after):
        ok = after[b][0] - before.get(b, (0, 0))[0]
        total = after[b][1] - before.get(b, (0, 0))[1]
        parts.append(f"{b} {ok / total:.0%}" if total else f"{b} -")
    return ", ".join(parts)


def start_demo(a, d, port, users, items, events, extra):
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "base.toml")
    with open(cfg, "w") as f:
        f.write("[http]\nmax_in_flight = 4096\n" + extra)
    demo = subprocess.Popen([a.troupe, "demo", "--dir", d, "--addr", f"127.0.0.1:{port}", "--config", cfg,
                             "--gen-users", str(users), "--gen-items", str(items), "--gen-events", str(events)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "TROUPE_LOG": "warn"})
    for line in demo.stdout:
        if line.startswith("serving at"):
            return demo
    raise RuntimeError(f"demo did not start (exit {demo.wait()})")


def wait_index(port, timeout=3600):
    """Waits until neither the served ALS model's HNSW index nor the content branch's
    graphs are being built; returns a description of both (state, build seconds,
    memory)."""
    t0 = time.time()
    while True:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/v1/cluster")
        doc = json.loads(c.getresponse().read())
        ixs = [(name, doc.get(key) or {}) for name, key in (("als", "als_index"), ("content", "content_index"))]
        if all(ix.get("state") != "building" for _, ix in ixs):
            out = []
            for name, ix in ixs:
                if ix.get("state") == "ready":
                    out.append(f"{name} ready ({ix['items']} items, {ix['build_seconds']:.1f} s, {ix['memory_bytes'] / 1e6:.0f} MB)")
                else:
                    out.append(f"{name} {ix.get('state', 'none')}")
            return ", ".join(out)
        if time.time() - t0 > timeout:
            raise RuntimeError("the HNSW index was not built in time")
        time.sleep(1)


def serving(a):
    work = tempfile.mkdtemp(prefix="troupe-serving-", dir=a.dir)
    # nginx answers every request path with a static file the size of a k=10 answer, so
    # both servers get the same request stream from the same wrk script.
    root = os.path.join(work, "www")
    os.makedirs(root)
    # nginx workers run as an unprivileged user: they must be able to read the file.
    os.chmod(work, 0o755)
    os.chmod(root, 0o755)
    port_n = free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 2; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 1024; }}
http {{ access_log off; default_type application/json;
  server {{ listen 127.0.0.1:{port_n}; root {root}; location / {{ try_files /rec.json =404; }} }} }}
""")
    users = 20000
    script = os.path.join(work, "rec.lua")
    with open(script, "w") as f:
        f.write(WRK_LUA % (users - 1, ""))
    for items in a.items:
        events = max(200000, items * 5)
        rows = []
        nginx_rps = None
        # Uncached: every request computes ALS, content and popularity candidates, with
        # ALS candidates by exact scan ("exact") or through the HNSW index ("hnsw").
        # Cached: the default settings (the index from 500k items on) with the per-user
        # candidate cache, warmed by one pass over the users first.
        modes = [("uncached exact", "[ranker]\ncache_users = 0\nann_min_items = 0\n"),
                 ("uncached hnsw", "[ranker]\ncache_users = 0\nann_min_items = 1\n"),
                 ("cached", "")]
        for mode, extra in modes:
            port = free_port()
            demo = start_demo(a, os.path.join(work, f"demo{items}-{mode.replace(' ', '-')}"), port, users, items,
                              events, extra)
            index = wait_index(port)
            url = f"http://127.0.0.1:{port}/"
            if nginx_rps is None:
                c = http.client.HTTPConnection("127.0.0.1", port)
                c.request("GET", "/v1/recommendations/u1?k=10")
                sample = c.getresponse().read()
                with open(os.path.join(root, "rec.json"), "wb") as f:
                    f.write(sample)
                ng = subprocess.Popen(["nginx", "-c", conf, "-g", "daemon off;"])
                t0 = time.time()
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port_n), timeout=1).close()
                        break
                    except OSError:
                        if ng.poll() is not None or time.time() - t0 > 30:
                            raise RuntimeError(f"nginx did not start (exit {ng.poll()})")
                        time.sleep(0.05)
                nginx_rps, n50, n99, n_err = wrk(f"http://127.0.0.1:{port_n}/", a.conns, a.seconds, script)
                if n_err:
                    raise RuntimeError(f"nginx answered {n_err} requests with an error status")
                ng.send_signal(signal.SIGQUIT)
                ng.wait()
            if mode == "cached":
                wrk(url, a.conns, a.seconds, script)
            hits0 = metric(port, "troupe_candidate_cache_total", 'outcome="hit"')
            miss0 = metric(port, "troupe_candidate_cache_total", 'outcome="miss"')
            b0 = branch_outcomes(port)
            t_rps, t50, t99, t_err = wrk(url, a.conns, a.seconds, script)
            b1 = branch_outcomes(port)
            hits = metric(port, "troupe_candidate_cache_total", 'outcome="hit"') - hits0
            miss = metric(port, "troupe_candidate_cache_total", 'outcome="miss"') - miss0
            # Half of the max rate: each connection waits between requests.
            delay_ms = max(0.0, a.conns / (t_rps / 2) * 1000 - t50)
            half = os.path.join(work, f"half-{mode}.lua")
            with open(half, "w") as f:
                f.write(WRK_LUA % (users - 1, "delay = function() return %d end" % round(delay_ms)))
            h_rps, h50, h99, _ = wrk(url, a.conns, a.seconds, half)
            b2 = branch_outcomes(port)
            demo.send_signal(signal.SIGTERM)
            demo.wait()
            hit_ratio = hits / (hits + miss) if hits + miss else 0.0
            rows.append((mode, t_rps, t50, t99, t_err, h_rps, h50, h99, hit_ratio, index,
                         ok_shares(b0, b1), ok_shares(b1, b2)))
        print(f"{items} items, {users} users ({len(sample)} B answers, {a.conns} connections, wrk -t2, 2 cores shared):")
        print(f"  nginx            {nginx_rps:9.0f} req/s  p50 {n50:6.2f} ms  p99 {n99:6.2f} ms  non-2xx {n_err}")
        # A branch that misses its deadline (or whose breaker is open) leaves the answer
        # without it: the shares say how many answers each branch was part of.
        for mode, t_rps, t50, t99, t_err, h_rps, h50, h99, hit_ratio, index, ok_full, ok_half in rows:
            print(f"  troupe {mode:14} {t_rps:9.0f} req/s  p50 {t50:6.2f} ms  p99 {t99:6.2f} ms  non-2xx {t_err}"
                  f"  ratio {t_rps / nginx_rps:.3f}  cache hits {hit_ratio:.0%}  als index {index}")
            print(f"    branches ok (computed, not cached): {ok_full}")
            print(f"    at ~half rate ({h_rps:.0f} req/s): p50 {h50:.2f} ms  p99 {h99:.2f} ms; branches ok: {ok_half}")
    shutil.rmtree(work, ignore_errors=True)


class ClusterNode(Node):
    def __init__(self, troupe, workdir, name, port, members, url, partitions):
        self.troupe, self.dir, self.name, self.port = troupe, workdir, name, port
        self.cfg = os.path.join(workdir, "node.toml")
        ms = ", ".join(f'{{ name = "{n}", cluster_addr = "127.0.0.1:{c}", http_addr = "127.0.0.1:{h}" }}'
                       for n, c, h in members)
        with open(self.cfg, "w") as f:
            f.write(f'[node]\nname = "{name}"\ndata_dir = "{workdir}/data"\n'
                    f'[http]\naddr = "127.0.0.1:{port}"\nmax_in_flight = 4096\n'
                    f'[journal]\npartitions = {partitions}\n[als]\nmin_interactions = 1000000000\n'
                    f'[log]\nbackend = "jetstream"\n[log.jetstream]\nurl = "{url}"\n'
                    f'[cluster]\nmembers = [{ms}]\n')
        self.proc = None
        self.log_level = "warn"

    def start(self, timeout=600):
        os.environ["TROUPE_CLUSTER_COOKIE"] = "bench-cookie"
        return Node.start(self, timeout)

    def view(self):
        try:
            _, c = self.get("/v1/cluster")
            return c["cluster"]
        except (OSError, ValueError, KeyError, TypeError):
            return None


def cluster_serving(nodes):
    n = 0
    for node in nodes:
        v = node.view()
        if v:
            n += sum(1 for p in v["partitions"] if p["state"] == "serving")
    return n


def cluster(a):
    """Cross-node query overhead and failover on a three-node cluster."""
    work = tempfile.mkdtemp(prefix="troupe-cluster-", dir=a.dir)
    srv, url = start_nats(work)
    partitions = a.partitions[0]
    print(f"three nodes and {nats_version()} (R1) on this machine; {partitions} partitions; "
          f"lease_period 15 s (default), renew 3 s")
    try:
        for size in a.sizes:
            names = ["n1", "n2", "n3"]
            members = [(n, free_port(), free_port()) for n in names]
            nodes = []
            for n, c, h in members:
                d = os.path.join(work, f"{size}-{n}")
                os.makedirs(d)
                nodes.append(ClusterNode(a.troupe, d, n, h, members, url, partitions))
            # One stream per size.
            for node in nodes:
                txt = open(node.cfg).read().replace('[log.jetstream]\n', f'[log.jetstream]\nstream = "s{size}"\n')
                open(node.cfg, "w").write(txt)
            for node in nodes:
                node.start()
            # Balanced: every member up, every partition served, every node serving some,
            # and the map unchanged for 5 s (hand-overs to later joiners are done).
            t0, stable_since, last_map = time.time(), None, None
            while True:
                if time.time() - t0 > 300:
                    raise RuntimeError("cluster did not balance")
                v = nodes[0].view()
                ok = (v is not None and all(m["state"] == "up" for m in v["members"])
                      and cluster_serving(nodes) == partitions
                      and all(any(p["state"] == "serving" for p in (n.view() or {"partitions": []})["partitions"]) for n in nodes))
                cur = [p["owner"] for p in v["partitions"]] if v else None
                if ok and cur == last_map:
                    if stable_since and time.time() - stable_since >= 5:
                        break
                else:
                    stable_since = time.time() if ok else None
                last_map = cur
                time.sleep(0.2)
            users = [f"u{k}" for k in range(max(1000, size // 50))]
            t_load = time.time()
            load_cluster(nodes, f"e{size}", size, users)
            print(f"\n{size} events loaded through {nodes[0].name} and applied by their owners in {time.time() - t_load:.1f} s")
            # Cross-node overhead: the same users through their owner and through another node.
            owner_of = {}
            for u in users[:a.samples]:
                _, r = nodes[0].get(f"/v1/recommendations/{u}?k=10")
                owner_of[u] = r["served_by"]
            by_name = {n.name: n for n in nodes}
            local, remote = [], []
            for rep in range(3):
                for u in users[:a.samples]:
                    own = by_name[owner_of[u]]
                    other = next(n for n in nodes if n.name != own.name)
                    for node, out, want in ((own, local, "local"), (other, remote, "forwarded")):
                        t = time.perf_counter()
                        st, r = node.get(f"/v1/recommendations/{u}?k=10")
                        dt = (time.perf_counter() - t) * 1000
                        if st == 200 and r["route"] == want and rep > 0:
                            out.append(dt)
            l50, l99, r50, r99 = pct(local, 0.5), pct(local, 0.99), pct(remote, 0.5), pct(remote, 0.99)
            print(f"{size} events: recommendation (k=10, cached candidates) p50/p99 ms:"
                  f" owner {l50:.3f}/{l99:.3f}, non-owner {r50:.3f}/{r99:.3f};"
                  f" added p50 {r50 - l50:.3f} ms, p99 {r99 - l99:.3f} ms; ratio p50 {r50 / l50:.2f}"
                  f" ({len(local)} + {len(remote)} samples)")
            # A hung peer: SIGSTOP one node, time until another shows it unresponsive.
            hung, watcher = nodes[2], nodes[0]
            t_stop = time.time()
            hung.proc.send_signal(signal.SIGSTOP)
            noticed = None
            while time.time() - t_stop < 60 and noticed is None:
                v = watcher.view()
                if v and any(m["name"] == hung.name and m["state"] in ("unresponsive", "down") for m in v["members"]):
                    noticed = time.time() - t_stop
                time.sleep(0.02)
            hung.proc.send_signal(signal.SIGCONT)
            while True:
                v = watcher.view()
                if v and all(m["state"] == "up" for m in v["members"]) and cluster_serving(nodes) == partitions:
                    break
                time.sleep(0.1)
            print(f"{size} events: SIGSTOPped peer shown unresponsive after {noticed:.2f} s"
                  f" (heartbeat 1 s, 3 misses; goal <= 5 s)")
            # Failover: SIGKILL the node owning most partitions.
            counts = {}
            for p in nodes[0].view()["partitions"]:
                counts[p["owner"]] = counts.get(p["owner"], 0) + 1
            victim = by_name[max(counts, key=counts.get)]
            survivors = [n for n in nodes if n is not victim]
            probe = next(u for u in users if owner_of.get(u) == victim.name) if victim.name in owner_of.values() else users[0]
            t_kill = time.time()
            victim.kill9()
            detect = claim = serve = first = None
            while time.time() - t_kill < 600 and first is None:
                v = survivors[0].view()
                now = time.time() - t_kill
                if v:
                    if detect is None and any(m["name"] == victim.name and m["state"] != "up" for m in v["members"]):
                        detect = now
                    if claim is None and all(p["owner"] in (s.name for s in survivors) for p in v["partitions"]):
                        claim = now
                if claim is not None and serve is None and cluster_serving(survivors) == partitions:
                    serve = time.time() - t_kill
                if serve is not None:
                    st, r = survivors[0].get(f"/v1/recommendations/{probe}?k=10")
                    if st == 200 and not r["degraded"]:
                        first = time.time() - t_kill
                time.sleep(0.02)
            print(f"{size} events: failover after SIGKILL of {victim.name} ({counts[victim.name]} of {partitions} partitions):"
                  f" session loss seen {detect:.2f} s, leases claimed {claim:.2f} s,"
                  f" checkpoint + replay done {serve:.2f} s, first full answer {first:.2f} s"
                  f" (lease period 15 s; goal: first full answer <= 5 s, ADR 017)")
            for n in survivors:
                n.stop()
        if a.throughput or a.idle:
            # Ingest and serving of three nodes at each partition count, and of one node
            # (same server, same clients, same run; the nodes, the server and the clients
            # share the 2 cores). Before the load: the state-store traffic of the idle
            # cluster (messages the server received and sent per second, from its /varz)
            # and each node's resident memory; with --idle also with the record watch off
            # (every lease round reads every record from the store).
            three = {}
            for parts in a.partitions:
                for watch in (["on", "off"] if a.idle else ["on"]):
                    names = [f"t{parts}{watch}a", f"t{parts}{watch}b", f"t{parts}{watch}c"]
                    members = [(n, free_port(), free_port()) for n in names]
                    trio = []
                    for n, c, h in members:
                        d = os.path.join(work, f"tp-{n}")
                        os.makedirs(d)
                        node = ClusterNode(a.troupe, d, n, h, members, url, parts)
                        txt = open(node.cfg).read().replace('[log.jetstream]\n', f'[log.jetstream]\nstream = "tp3p{parts}{watch}"\n')
                        txt = txt.replace('[cluster]\n', f'[cluster]\nwatch_records = {"true" if watch == "on" else "false"}\n')
                        open(node.cfg, "w").write(txt)
                        trio.append(node)
                    for node in trio:
                        node.start()
                    while cluster_serving(trio) != parts or not all(
                            any(p["state"] == "serving" for p in (n.view() or {"partitions": []})["partitions"]) for n in trio):
                        time.sleep(0.2)
                    # Settled: the first rounds (before the watch's copy is current) are over.
                    time.sleep(5)
                    (i0, o0), t0 = nats_msgs(srv), time.time()
                    time.sleep(max(10, a.seconds))
                    (i1, o1), t1 = nats_msgs(srv), time.time()
                    idle_in, idle_out = (i1 - i0) / (t1 - t0), (o1 - o0) / (t1 - t0)
                    rss = [rss_mib(n.proc.pid) for n in trio]
                    print(f"\nthree nodes, {parts} partitions, record watch {watch}: idle state-store traffic at the server"
                          f" {idle_in:.0f} msgs/s received, {idle_out:.0f} msgs/s sent;"
                          f" node RSS {', '.join(f'{r:.0f}' for r in rss)} MiB")
                    if a.throughput and watch == "on":
                        i3, s3 = throughput(trio, a.seconds)
                        three[parts] = (i3, s3)
                        print(f"three nodes, {parts} partitions: ingest (batch 1000, 4 clients) {i3:.0f} ev/s;"
                              f" recommendations (8 clients, k=10) {s3:.0f} req/s")
                    for node in trio:
                        node.stop()
        if a.throughput:
            first = a.partitions[0]
            for parts in a.partitions[1:]:
                print(f"{parts} partitions against {first}: ingest {three[parts][0] / three[first][0]:.3f},"
                      f" recommendations {three[parts][1] / three[first][1]:.3f}")
            d = os.path.join(work, "tp-one")
            os.makedirs(d)
            one = Node(a.troupe, d, f'[journal]\npartitions = {first}\n[als]\nmin_interactions = 1000000000\n'
                                    f'[log]\nbackend = "jetstream"\n[log.jetstream]\nurl = "{url}"\nstream = "tp1"\n')
            one.start()
            i1, s1 = throughput([one], a.seconds)
            one.stop()
            i3, s3 = three[first]
            print(f"\nthroughput, {a.seconds:.0f} s each, clients spread over the nodes, {first} partitions:"
                  f" ingest (batch 1000, 4 clients) three nodes {i3:.0f} ev/s vs one node {i1:.0f} ev/s (ratio {i3 / i1:.2f});"
                  f" recommendations (8 clients, k=10) three nodes {s3:.0f} req/s vs one node {s1:.0f} req/s (ratio {s3 / s1:.2f})")
    finally:
        srv.kill()
    shutil.rmtree(work, ignore_errors=True)


def throughput(nodes, seconds):
    """Acked events/s (4 clients, batches of 1000, spread over `nodes`) until applied,
    then recommendations/s (8 clients over the same users, spread over `nodes`)."""
    clients, batch = 4, 1000
    bodies = {c: [ndjson_batch(f"tp{len(nodes)}c{c}", k * batch, batch, users=20000) for k in range(200)]
              for c in range(clients)}
    cpu0, t0 = [proc_cpu(n.proc.pid) for n in nodes], time.time()
    ingest_rate = post_batches(nodes, bodies, seconds)
    events = ingest_rate * (time.time() - t0)
    while not all(n.consumers_caught_up() for n in nodes):
        time.sleep(0.05)
    # CPU per acked event of each node, from the first post until every node's consumers
    # caught up (each node applies its own partitions and the catalog; item statistics
    # are counted by one node, the trainer leader, and followed by the others from its
    # published checkpoints; every node's log follower still reads the whole stream).
    cpu = [(proc_cpu(n.proc.pid) - c) * 1e6 / max(events, 1) for n, c in zip(nodes, cpu0)]
    roles = []
    for n in nodes:
        _, c = n.get("/v1/cluster")
        st = next((x.get("state") or {} for x in c["actors"] if x["name"] == "item_stats"), {})
        roles.append(st.get("role", "?"))
    print(f"  {len(nodes)} node(s): CPU per acked event while ingesting and catching up:"
          f" {', '.join(f'{c:.1f} ({r})' for c, r in zip(cpu, roles))} us")
    done = [0] * 8
    stop = time.time() + seconds

    def get(c):
        node = nodes[c % len(nodes)]
        conn = node.conn()
        k = c
        while time.time() < stop:
            st, _ = node.get(f"/v1/recommendations/u{k * 7919 % 20000}?k=10", conn)
            if st == 200:
                done[c] += 1
            k += 8
    t0 = time.time()
    ts = [threading.Thread(target=get, args=(c,)) for c in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return ingest_rate, sum(done) / (time.time() - t0)


def load_cluster(nodes, prefix, n, users, clients=4, batch=1000, spread=False):
    """Posts `n` events through the first node and waits until every owner applied its
    partitions. `spread`: each pass over the users moves every user to other items (so
    most events are distinct user-item pairs, as a training set has)."""
    node = nodes[0]
    conns = [node.conn() for _ in range(clients)]

    def item(k):
        shift = (k // len(users)) * 7321 if spread else 0
        return (k * 104729 + shift) % 10000

    def body(k0, m):
        return ("".join('{"event_id":"%s-%d","user":"%s","item":"i%d","kind":"view"}\n'
                        % (prefix, k, users[k * 7919 % len(users)], item(k))
                        for k in range(k0, k0 + m))).encode()

    def run(c):
        for k in range(c * batch, n, clients * batch):
            while True:
                st, r = node.post("/v1/events", body(k, min(batch, n - k)), conns[c])
                if st == 200:
                    break
                time.sleep(0.1)
    ts = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    while True:
        behind = False
        for nd in nodes:
            _, c = nd.get("/v1/cluster")
            if c["cluster"] is None:
                behind = behind or not nd.caught_up()
                continue
            heads = {str(h["stream"]): h["offset"] for h in c["journal_heads"]}
            for p in c["cluster"]["partitions"]:
                if p["state"] == "serving" and (p["applied_offset"] or 0) < heads.get(str(p["partition"]), 0):
                    behind = True
        if not behind:
            break
        time.sleep(0.1)


def nats_msgs(servers):
    """Messages every server of `servers` has received and sent so far (its /varz)."""
    total_in, total_out = 0, 0
    for _, mon, _ in servers.ports:
        c = http.client.HTTPConnection("127.0.0.1", mon, timeout=5)
        c.request("GET", "/varz")
        v = json.loads(c.getresponse().read())
        total_in += v["in_msgs"]
        total_out += v["out_msgs"]
    return total_in, total_out


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def served_versions(nodes):
    out = []
    for n in nodes:
        try:
            _, c = n.get("/v1/cluster")
            out.append(c.get("als_model_version"))
        except (OSError, ValueError):
            out.append(None)
    return out


def retrain_everywhere(asked, nodes, timeout=3600):
    """POST retrain to `asked` (retried while no node leads); returns (report, seconds
    from the request to every node serving the published version)."""
    t0 = time.time()
    while True:
        st, r = asked.post("/v1/admin/retrain", b"", ctype="application/json")
        if st == 200:
            break
        if time.time() - t0 > timeout:
            raise RuntimeError(f"retrain refused: {st} {r}")
        time.sleep(0.2)
    v = r["serving_version"]
    while served_versions(nodes) != [v] * len(nodes):
        if time.time() - t0 > timeout:
            raise RuntimeError(f"not every node serves v{v}: {served_versions(nodes)}")
        time.sleep(0.05)
    return r, time.time() - t0


def leader_of(nodes):
    for n in nodes:
        v = n.view()
        if v and v.get("trainer", {}).get("this_node_leads"):
            return n
    return None


def model_plane(a):
    """One model for the cluster: retrain request to every node serving the new version,
    snapshot bytes, leader failover to the next version, leader RSS against one node."""
    work = tempfile.mkdtemp(prefix="troupe-model-", dir=a.dir)
    srv, url = start_nats(work)
    partitions = 8
    print(f"three nodes and {nats_version()} (R1) on this machine; {partitions} partitions; "
          "lease_period 15 s (default); events over size/50 users and 10,000 items")
    try:
        for size in a.sizes:
            users = [f"u{k}" for k in range(max(1000, size // 50))]
            # One node (embedded journal) on the same events, for the RSS comparison.
            d = os.path.join(work, f"{size}-single")
            os.makedirs(d)
            one = Node(a.troupe, d, f"[journal]\npartitions = {partitions}\n[als]\nmin_interactions = 1000000000\n")
            one.start()
            load_cluster([one], f"e{size}", size, users, spread=True)
            rss_before = rss_mib(one.proc.pid)
            st, rep = one.post("/v1/admin/retrain", b"", ctype="application/json")
            single_rss = rss_mib(one.proc.pid)
            print(f"\n{size} events, one node: trained in {rep['train_ms'] / 1000:.1f} s; RSS {single_rss:.0f} MiB"
                  f" ({single_rss * 2**20 / size:.0f} B per event; {rss_before:.0f} MiB before training)")
            one.stop()
            names = ["n1", "n2", "n3"]
            members = [(n, free_port(), free_port()) for n in names]
            nodes = []
            for n, c, h in members:
                d = os.path.join(work, f"{size}-{n}")
                os.makedirs(d)
                nodes.append(ClusterNode(a.troupe, d, n, h, members, url, partitions))
            for node in nodes:
                txt = open(node.cfg).read().replace('[log.jetstream]\n', f'[log.jetstream]\nstream = "m{size}"\n')
                open(node.cfg, "w").write(txt)
            for node in nodes:
                node.start()
            t0 = time.time()
            while cluster_serving(nodes) != partitions or leader_of(nodes) is None:
                if time.time() - t0 > 300:
                    raise RuntimeError("cluster did not place partitions and a leader")
                time.sleep(0.2)
            t_load = time.time()
            load_cluster(nodes, f"e{size}", size, users, spread=True)
            print(f"{size} events loaded through {nodes[0].name} in {time.time() - t_load:.1f} s")
            leader = leader_of(nodes)
            asked = next(n for n in nodes if n is not leader)
            rep, secs = retrain_everywhere(asked, nodes)
            _, c = leader.get("/v1/cluster")
            tr = next(x for x in c["actors"] if x["name"] == "als_trainer")["state"]
            snap = tr["record"]["versions"][-1]
            leader_rss = rss_mib(leader.proc.pid)
            others = [rss_mib(n.proc.pid) for n in nodes if n is not leader]
            print(f"{size} events, three nodes: retrain asked of {asked.name}, trained by {leader.name}"
                  f" ({rep['users']} users, {rep['interactions']} interactions, train {rep['train_ms'] / 1000:.1f} s);"
                  f" every node serving v{rep['serving_version']} {secs:.2f} s after the request"
                  f" ({secs - rep['train_ms'] / 1000:.2f} s beyond training); snapshot {snap['bytes'] / 2**20:.1f} MiB")
            print(f"{size} events: leader RSS {leader_rss:.0f} MiB = {leader_rss / single_rss:.2f} x one node's"
                  f" ({leader_rss * 2**20 / size:.0f} B per event); the others {', '.join(f'{r:.0f}' for r in others)} MiB")
            # Failover: SIGKILL the leader; time until another leads and every survivor
            # serves the next version (the retrain is asked as soon as it is accepted).
            t_kill = time.time()
            leader.kill9()
            rest = [n for n in nodes if n is not leader]
            rep2, _ = retrain_everywhere(rest[0], rest)
            total = time.time() - t_kill
            print(f"{size} events: leader SIGKILLed; v{rep2['serving_version']} published by"
                  f" {rep2['leader']} and served by both survivors {total:.1f} s after the kill"
                  f" (lease 15 s, training {rep2['train_ms'] / 1000:.1f} s)")
            for n in rest:
                n.stop()
    finally:
        srv.kill()


def client_api(a):
    """The client API (troupe-client over ractor_cluster) against HTTP on the same member
    and data, in one run: sequential latency and concurrent throughput of recommendations
    and of event ingest (`--bench-client`, built with
    `cargo build --release -p troupe-client --example client_bench`)."""
    work = tempfile.mkdtemp(prefix="troupe-client-", dir=a.dir)
    srv, url = start_nats(work)
    try:
        name = "m1"
        members = [(name, free_port(), free_port())]
        os.makedirs(os.path.join(work, name))
        node = ClusterNode(a.troupe, os.path.join(work, name), name, members[0][2], members, url, 8)
        node.start()
        while not (node.view() and all(p["state"] == "serving" for p in node.view()["partitions"])):
            time.sleep(0.1)
        size = a.sizes[0]
        users = [f"u{k}" for k in range(max(1000, size // 50))]
        t = time.time()
        load_cluster([node], "e", size, users)
        print(f"one member on {nats_version()} (R1), 8 partitions; {size} events for {len(users)} users "
              f"loaded over HTTP and applied in {time.time() - t:.1f} s")
        out = subprocess.run([a.bench_client, "--seed", f"127.0.0.1:{members[0][1]}",
                              "--http", f"127.0.0.1:{members[0][2]}", "--cookie", "bench-cookie",
                              "--users", str(len(users)), "--samples", str(a.samples),
                              "--threads", str(a.conns), "--seconds", str(a.seconds)],
                             capture_output=True, text=True, timeout=3600)
        print(out.stdout, end="")
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            raise RuntimeError("client_bench failed")
        node.stop()
    finally:
        srv.kill()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["ingest", "jetstream", "rebuild", "freshness", "recovery", "restart-scale", "serving", "cluster", "model-plane", "client-api"])
    p.add_argument("--troupe", default="target/release/troupe")
    p.add_argument("--publisher", default="target/release/examples/jetstream_publish",
                   help="the raw loop for `jetstream` (cargo build --release --example jetstream_publish)")
    p.add_argument("--bench-client", default="target/release/examples/client_bench",
                   help="client-api: the bench program (cargo build --release -p troupe-client --example client_bench)")
    p.add_argument("--dir", default=None, help="where temporary data dirs go (same disk as the raw loop)")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--base", type=int, default=200000, help="rebuild: events in the checkpoint")
    p.add_argument("--replay", type=int, default=1000000, help="rebuild: events replayed after it")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--sizes", type=int, nargs="*", default=[100000, 300000, 1000000])
    p.add_argument("--items", type=int, nargs="+", default=[10000, 100000])
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--throughput", action="store_true", help="cluster: also ingest and serving of three nodes vs one")
    p.add_argument("--idle", action="store_true",
                   help="cluster: idle state-store traffic of three nodes at each partition count, record watch on and off")
    p.add_argument("--partitions", type=int, nargs="+", default=[12],
                   help="cluster: partition counts (the first for the failover run and the one-node baseline;"
                        " --throughput runs three nodes at each)")
    p.add_argument("--servers", type=int, choices=[1, 3], default=1, help="jetstream: one server, or three with replicas 3")
    p.add_argument("--sync", choices=["always", "interval"], default="always",
                   help="jetstream: the servers fsync every write (always) or flush every two minutes (interval)")
    a = p.parse_args()
    a.troupe = os.path.abspath(a.troupe)
    a.publisher = os.path.abspath(a.publisher)
    a.bench_client = os.path.abspath(a.bench_client)
    a.dir = os.path.abspath(a.dir) if a.dir else None
    {"ingest": ingest, "jetstream": jetstream, "rebuild": rebuild, "freshness": freshness, "recovery": recovery,
     "restart-scale": restart_scale, "serving": serving, "cluster": cluster,
     "model-plane": model_plane, "client-api": client_api}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())
