//! The HTTP API as a client sees it, against a real node process: read-your-writes by
//! position, retries of requests without ids, the dedupe horizon at its edge, access
//! rules (tokens, HEAD, user data), field and query limits, and admission under slow
//! clients (header and body timeouts, oversize Content-Length, reads kept alive while
//! writes are saturated).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use troupe_tests::{timed, wait_until, Node};

const BASE: &str = "
[journal]
partitions = 3
poll_interval_ms = 20
[features]
history_len = 100000
checkpoint_interval_ms = 300
[als]
min_interactions = 1000000000
";

fn history(node: &Node, user: &str) -> Vec<String> {
    let r = node.get(&format!("/v1/users/{user}"));
    r.body["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|t| t["item"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn reads_reflect_a_write_by_its_position_or_say_stale() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), BASE, &[]);
    let r = node.post(
        "/v1/events",
        &json!([{"user": "ryw", "item": "a", "kind": "purchase"}]).to_string(),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let off = r.body["results"][0]["offset"].as_u64().unwrap();
    let rec = node.get(&format!("/v1/recommendations/ryw?k=5&min_offset={off}"));
    assert_eq!(rec.status, 200, "{:?}", rec.body);
    assert!(rec.body["applied_offset"].as_u64().unwrap() >= off);
    assert_eq!(
        (&rec.body["stale"], &rec.body["awaited_offset"]),
        (&json!(false), &json!(off))
    );
    let u = node.get(&format!("/v1/users/ryw?min_offset={off}"));
    assert_eq!((u.status, &u.body["stale"]), (200, &json!(false)));
    // Item statistics count every event naming an item, of every kind.
    let r = node.post(
        "/v1/events",
        &json!([{"user": "other", "item": "a", "kind": "view"}]).to_string(),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_until(20, "item a's two events counted", || {
        node.get("/v1/items/a/stats").body["event_count"] == 2
    });
    let never = node.get("/v1/items/never-seen/stats");
    assert_eq!(never.status, 404, "{:?}", never.body);
    assert_eq!(never.body["error"], "not_found", "{:?}", never.body);
    // A catalog item nobody touched counts 0; a deleted one is not found.
    assert_eq!(node.put("/v1/items/quiet", r#"{"text": "x"}"#).status, 200);
    let quiet = node.get("/v1/items/quiet/stats");
    assert_eq!(
        (quiet.status, &quiet.body["event_count"]),
        (200, &json!(0)),
        "{:?}",
        quiet.body
    );
    assert_eq!(node.delete("/v1/items/quiet").status, 200);
    assert_eq!(node.get("/v1/items/quiet/stats").status, 404);
    // Items and events are JSON objects: an array in their place (fields by position)
    // is refused.
    let r = node.put("/v1/items/arr", "[]");
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = node.post("/v1/items", r#"[["arr2", "text"]]"#);
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = node.post("/v1/events", r#"[["e1", "u", "i", "view"]]"#);
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(u.body["history"][0]["item"], "a");
    // A position the partition has not reached: answered within the freshness bound,
    // flagged stale.
    let started = Instant::now();
    let far = node.get(&format!(
        "/v1/recommendations/ryw?min_offset={}",
        off + 1_000_000
    ));
    assert_eq!(
        (far.status, &far.body["stale"]),
        (200, &json!(true)),
        "{:?}",
        far.body
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let u = node.get(&format!("/v1/users/ryw?min_offset={}", off + 1_000_000));
    assert_eq!((u.status, &u.body["stale"]), (200, &json!(true)));
    // Catalog reads wait on the catalog stream the same way.
    let w = node.put("/v1/items/ryw-item", r#"{"text": "a green lamp"}"#);
    assert_eq!(w.status, 200, "{:?}", w.body);
    assert_eq!(w.body["results"][0]["partition"], "catalog");
    let item = node.get("/v1/items/ryw-item");
    assert_eq!(
        (item.status, &item.body["text"]),
        (200, &json!("a green lamp"))
    );
    assert_eq!(node.delete("/v1/items/ryw-item").status, 200);
    assert_eq!(node.get("/v1/items/ryw-item").status, 404);
    assert_eq!(node.get("/v1/items/ryw-item/similar").status, 404);
    // Erasure: the next read (waiting for the head) no longer finds the user.
    assert_eq!(node.delete("/v1/users/ryw").status, 200);
    assert_eq!(node.get("/v1/users/ryw").status, 404);
}

#[test]
fn a_retried_request_without_ids_is_applied_once_and_the_horizon_has_an_edge() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        dir.path(),
        &BASE.replace(
            "partitions = 3",
            "partitions = 3\nidempotency_window_secs = 2",
        ),
        &[],
    );
    // Neither event_id nor ts: the same body twice is one request retried.
    let body = json!([
        {"user": "re", "item": "x1", "kind": "view"},
        {"user": "re", "item": "x2", "kind": "view"},
    ])
    .to_string();
    let a = node.post("/v1/events", &body);
    let b = node.post("/v1/events", &body);
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(
        (&a.body["acked"], &b.body["duplicates"]),
        (&json!(2), &json!(2))
    );
    assert_eq!(a.body["results"], {
        let mut r = b.body["results"].clone();
        for p in r.as_array_mut().unwrap() {
            p["duplicate"] = json!(false);
        }
        r
    });
    // With an Idempotency-Key the body may differ in form (here: NDJSON).
    let nd = "{\"user\":\"re\",\"item\":\"x3\",\"kind\":\"view\"}\n";
    let key = [
        ("Idempotency-Key", "req-77"),
        ("Content-Type", "application/x-ndjson"),
    ];
    assert_eq!(node.post_with("/v1/events", nd, &key).body["acked"], 1);
    let again = format!("\n{nd}");
    assert_eq!(
        node.post_with("/v1/events", &again, &key).body["duplicates"],
        1
    );
    wait_until(30, "three events applied", || {
        history(&node, "re").len() == 3
    });
    // The edge of the horizon (2 s): a retry inside it is a duplicate; the first retry
    // the node takes as new comes no earlier than the horizon after the original.
    let e =
        json!([{"event_id": "edge-1", "user": "edge", "item": "y", "kind": "view"}]).to_string();
    let first = node.post("/v1/events", &e);
    let acked_at = Instant::now();
    assert_eq!(first.body["acked"], 1);
    assert_eq!(node.post("/v1/events", &e).body["duplicates"], 1);
    let mut new_after = None;
    wait_until(20, "a retry past the horizon is taken as new", || {
        let r = node.post("/v1/events", &e);
        if r.body["acked"] == 1 {
            new_after = Some(acked_at.elapsed());
            true
        } else {
            assert_eq!(r.body["duplicates"], 1);
            false
        }
    });
    let new_after = new_after.unwrap();
    assert!(
        new_after >= Duration::from_secs(2),
        "taken as new after {new_after:?}"
    );
    wait_until(30, "the second copy applied", || {
        history(&node, "edge") == vec!["y".to_string(), "y".to_string()]
    });
}

#[test]
fn tokens_guard_writes_and_user_data_while_public_reads_and_head_stay_open() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        dir.path(),
        BASE,
        &[
            ("TROUPE_AUTH_TOKEN", "w-secret"),
            ("TROUPE_READ_TOKEN", "r-secret"),
        ],
    );
    let w = [("Authorization", "Bearer w-secret")];
    let r = [("Authorization", "Bearer r-secret")];
    let ev = json!([{"user": "tok", "item": "b", "kind": "view"}]).to_string();
    assert_eq!(node.post("/v1/events", &ev).status, 401);
    assert_eq!(
        node.post_with("/v1/events", &ev, &r).status,
        401,
        "the read token cannot write"
    );
    assert_eq!(node.post_with("/v1/events", &ev, &w).status, 200);
    // User data: either token; nothing without one (HEAD included).
    assert_eq!(node.get("/v1/users/tok").status, 401);
    assert_eq!(node.head("/v1/users/tok", &[]), 401);
    assert_eq!(node.get_with("/v1/users/tok", &r).status, 200);
    assert_eq!(node.get_with("/v1/users/tok", &w).status, 200);
    // Public reads and probes, GET and HEAD alike, without a token.
    for path in [
        "/v1/recommendations/tok?k=3",
        "/v1/cluster",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/openapi.json",
    ] {
        assert_eq!(node.get(path).status, 200, "GET {path}");
        assert_eq!(node.head(path, &[]), 200, "HEAD {path}");
    }
    assert_eq!(node.get("/v1/admin/dead-letters").status, 401);
    // The document says which routes need which token.
    let doc = node.get("/v1/openapi.json").body;
    assert!(doc["paths"]["/v1/users/{id}"]["get"]["security"].is_array());
    assert!(doc["paths"]["/v1/recommendations/{user}"]["get"]["security"].is_null());
    let log = node.log(1);
    assert!(
        !log.contains("w-secret") && !log.contains("r-secret"),
        "tokens must never be logged"
    );
}

#[test]
fn every_field_and_parameter_has_a_limit_and_errors_say_which() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), BASE, &[]);
    let long = "x".repeat(257);
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("POST", "/v1/events", json!([{"user": "u", "item": "i", "kind": "v", "request_id": long}]).to_string(), "request_id"),
        ("POST", "/v1/events", json!([{"user": "u", "item": "i", "kind": "v", "value": 1e308}]).to_string(), "out of range"),
        ("POST", "/v1/events", json!([{"user": "u", "item": "i", "kind": "v", "event_id": null}]).to_string(), "null"),
        ("POST", "/v1/events", "[7]".to_string(), "an event object"),
        ("PUT", "/v1/items/a", json!({"id": null}).to_string(), "null"),
        ("PUT", "/v1/items/a", json!({"attributes": {"k": "v".repeat(1025)}}).to_string(), "attribute `k`"),
        ("PUT", "/v1/items/a", json!({"attributes": (0..65).map(|i| (i.to_string(), json!(""))).collect::<serde_json::Map<_, _>>()}).to_string(), "attributes"),
        ("PUT", "/v1/items/a", json!({"categories": (0..33).map(|i| i.to_string()).collect::<Vec<_>>()}).to_string(), "categories"),
        ("PUT", "/v1/items/a", json!({"categories": [""]}).to_string(), "category"),
    ];
    for (method, path, body, needle) in cases {
        let r = if method == "PUT" {
            node.put(path, &body)
        } else {
            node.post(path, &body)
        };
        assert_eq!(r.status, 400, "{method} {path} {body}: {:?}", r.body);
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(needle) && !detail.contains("struct "),
            "{needle}: {detail}"
        );
    }
    for (path, needle) in [
        ("/v1/users/u?colour=red", "colour"),
        ("/v1/cluster?x=1", "takes none"),
        ("/v1/recommendations/u?k=3&k=4", "more than once"),
        ("/v1/recommendations/u?explain=", "explain"),
        ("/v1/recommendations/u?weights=1e3,0,0", "weights"),
        ("/v1/recommendations/u?min_offset=-1", "min_offset"),
        ("/v1/items/a/similar?k=0", "k must be"),
    ] {
        let r = node.get(path);
        assert_eq!(r.status, 400, "{path}: {:?}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains(needle),
            "{path}: {:?}",
            r.body
        );
    }
    assert_eq!(
        node.get("/v1/recommendations/u?exclude=a,b&exclude=c&k=2")
            .status,
        200
    );
    let r = node.post_with("/v1/events", "[]", &[("Content-Type", "text/plain")]);
    assert_eq!(r.status, 415, "{:?}", r.body);
    // Nothing accepted so far: the bad requests wrote nothing.
    assert_eq!(node.get("/v1/users/u").status, 404);
}

/// Sends the request head of a POST whose body never comes.
fn stalled_post(port: u16, path: &str, declared: usize) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n["
    )
    .unwrap();
    s
}

/// Reads what the server sends until it closes or `secs` pass.
fn read_reply(s: &mut TcpStream, secs: u64) -> String {
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn slow_clients_hold_only_write_slots_and_time_out() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let http = "max_in_flight_writes = 4\nbody_read_timeout_ms = 1500\nheader_read_timeout_ms = 1000\nmax_body_bytes = 100000";
    let node = Node::start_with(dir.path(), http, BASE, &[]);
    // An oversize Content-Length is refused before any body is sent.
    let mut big = stalled_post(node.port, "/v1/events", 10_000_000);
    let reply = read_reply(&mut big, 5);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // Four clients trickle bodies: every write slot is taken...
    let mut slow: Vec<TcpStream> = (0..4)
        .map(|_| stalled_post(node.port, "/v1/events", 500))
        .collect();
    wait_until(10, "writes saturated", || {
        node.get("/readyz").body["saturated"]["writes"] == true
    });
    let ev = json!([{"user": "s", "item": "i", "kind": "view"}]).to_string();
    let r = node.post("/v1/events", &ev);
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(r.retry_after.is_some());
    // ...while reads are answered as usual.
    for _ in 0..20 {
        assert_eq!(node.get("/v1/recommendations/s?k=3").status, 200);
    }
    let m = node.get("/metrics");
    assert_eq!(m.status, 200);
    // The stalled bodies time out with 408 and the slots come back.
    for s in &mut slow {
        let reply = read_reply(s, 10);
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    }
    wait_until(10, "writes admitted again", || {
        node.post("/v1/events", &ev).status == 200
    });
    // A client that never finishes its headers is disconnected.
    let mut s = TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let reply = read_reply(&mut s, 10);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "not disconnected: {reply}"
    );
    assert!(!reply.contains("200 OK"), "{reply}");
}

#[test]
fn openapi_document_states_the_nodes_limits() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{BASE}\n[ranker]\nmax_k = 77\n");
    let node = Node::start_with(dir.path(), "max_events_per_request = 123", &extra, &[]);
    let doc: Value = node.get("/v1/openapi.json").body;
    assert_eq!(doc["openapi"], "3.1.0");
    let recs = &doc["paths"]["/v1/recommendations/{user}"]["get"];
    let k = recs["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "k")
        .unwrap();
    assert_eq!(k["schema"]["maximum"], 77);
    assert_eq!(
        doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["maxItems"],
        123
    );
    for status in ["400", "408", "413", "415", "503"] {
        assert!(
            doc["paths"]["/v1/events"]["post"]["responses"][status].is_object(),
            "{status}"
        );
    }
    // No token configured: no route claims to need one.
    assert!(doc["paths"]["/v1/events"]["post"]["security"].is_null());
    assert_eq!(node.get("/v1/recommendations/u?k=78").status, 400);
    assert_eq!(node.get("/v1/recommendations/u?k=77").status, 200);
}
