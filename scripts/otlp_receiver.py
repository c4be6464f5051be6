#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace receiver (JSON encoding), for looking at Troupe's traces
without a collector, and for the tests that check them.

    python3 scripts/otlp_receiver.py --port 4318 --out spans.jsonl
    # nodes: [telemetry] otlp_endpoint = "http://127.0.0.1:4318", otlp_protocol = "http/json"
    python3 scripts/otlp_receiver.py --show spans.jsonl     # traces as trees

Each received span is appended to --out as one JSON line: trace_id, span_id, parent
(empty for a root), name, service, instance (the node: `service.instance.id`), start and
end (ns since the epoch) and attributes. A body that is not OTLP JSON is answered 400
(protobuf bodies 415: set the node's `otlp_protocol = "http/json"`). Standard library only.
"""

import argparse
import base64
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _id(v):
    """OTLP JSON ids are hex strings; accept base64 too (protobuf-JSON mapping)."""
    if not v:
        return ""
    try:
        int(v, 16)
        return v.lower()
    except ValueError:
        return base64.b64decode(v).hex()


def _value(v):
    if "intValue" in v:
        return int(v["intValue"])  # a string in the protobuf-JSON mapping
    for k in ("stringValue", "doubleValue", "boolValue"):
        if k in v:
            return v[k]
    return v


def _attrs(lst):
    return {a["key"]: _value(a.get("value", {})) for a in lst or []}


def spans_of(body):
    out = []
    for rs in body.get("resourceSpans", []):
        res = _attrs(rs.get("resource", {}).get("attributes"))
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                out.append({
                    "trace_id": _id(s.get("traceId")),
                    "span_id": _id(s.get("spanId")),
                    "parent": _id(s.get("parentSpanId")),
                    "name": s.get("name", ""),
                    "service": res.get("service.name", ""),
                    "instance": res.get("service.instance.id", ""),
                    "start": int(s.get("startTimeUnixNano", 0)),
                    "end": int(s.get("endTimeUnixNano", 0)),
                    "attributes": _attrs(s.get("attributes")),
                })
    return out


def serve(port, out_path):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n)
            if "json" not in (self.headers.get("Content-Type") or ""):
                return self.answer(415, {"error": "only OTLP/HTTP JSON is understood"})
            try:
                spans = spans_of(json.loads(raw))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                return self.answer(400, {"error": f"not OTLP JSON: {e}"})
            with lock, open(out_path, "a", encoding="utf-8") as f:
                for s in spans:
                    f.write(json.dumps(s) + "\n")
            self.answer(200, {"partialSuccess": {}})

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"otlp receiver on http://127.0.0.1:{srv.server_address[1]} -> {out_path}", flush=True)
    srv.serve_forever()


def show(path):
    spans = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]
    by_trace = {}
    for s in spans:
        by_trace.setdefault(s["trace_id"], []).append(s)
    for tid, ss in by_trace.items():
        ids = {s["span_id"] for s in ss}
        kids = {}
        for s in ss:
            kids.setdefault(s["parent"] if s["parent"] in ids else "", []).append(s)
        print(f"trace {tid}")

        def walk(parent, depth):
            for s in sorted(kids.get(parent, []), key=lambda s: s["start"]):
                ms = (s["end"] - s["start"]) / 1e6
                print(f"{'  ' * (depth + 1)}{s['name']} [{s['instance'] or s['service']}] {ms:.2f} ms")
                walk(s["span_id"], depth + 1)

        walk("", 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=4318)
    ap.add_argument("--out", default="spans.jsonl")
    ap.add_argument("--show", metavar="FILE", help="print the traces of FILE as trees")
    a = ap.parse_args()
    if a.show:
        show(a.show)
    else:
        serve(a.port, a.out)


if __name__ == "__main__":
    sys.exit(main())
