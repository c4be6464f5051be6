//! Multi-process tests of `troupe node`: real processes on loopback ports, real disk,
//! SIGKILL at random points, and checks by event id that nothing acknowledged is lost or
//! applied twice.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use troupe_tests::nats::NatsServer;
use troupe_tests::{acked_rows, start_loader, timed, wait_until, write_events, Node};

const FAST: &str = "
[journal]
partitions = 4
poll_interval_ms = 20
[features]
history_len = 100000
checkpoint_every_records = 700
checkpoint_interval_ms = 300
[als]
min_interactions = 1000000000
[supervision]
backoff_base_ms = 5
backoff_max_ms = 50
";

/// item -> number of times it appears across all users' histories.
fn applied_items(node: &Node, users: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for u in 0..users {
        let r = node.get(&format!("/v1/users/u{u}"));
        if r.status == 404 {
            continue;
        }
        assert_eq!(r.status, 200, "{:?}", r.body);
        for h in r.body["history"].as_array().unwrap() {
            *seen
                .entry(h["item"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn kill9_during_load_loses_no_acked_event_and_applies_each_once() {
    let _t = timed();
    kill9_during_load("", 150);
}

/// The same on the JetStream backend: the records live in the server, the node's
/// checkpoints and deltas still on its disk.
#[test]
fn kill9_during_load_on_jetstream_loses_no_acked_event_and_applies_each_once() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(server) = NatsServer::start() else {
        return;
    };
    // Smaller batches: ingest on JetStream outruns the kill schedule at 150.
    kill9_during_load(&jetstream_config(&server), 50);
}

/// The JetStream tests start servers, nodes and loaders; run one at a time so that two
/// cores are enough for each (a poisoned lock from a failed test is still a lock).
static JETSTREAM_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    JETSTREAM_TESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until the node applied `n` events, then checks that each acked one was applied
/// exactly once (by its unique item) and nothing else was.
fn assert_each_acked_applied_once(node: &Node, acked: &[String], n: usize, users: usize) {
    wait_or_dump(node, 60, "all events applied", || {
        applied_items(node, users).len() >= n
    });
    let applied = applied_items(node, users);
    assert!(
        acked.iter().all(|i| applied.get(i) == Some(&1)),
        "an acked event missing or applied twice"
    );
    assert_eq!(applied.len(), n);
}

/// `wait_until` that prints the node's log and `/v1/cluster` before failing.
fn wait_or_dump(node: &Node, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = node.log(node.starts);
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    eprintln!(
        "node log (last 60 lines, newest first):\n{}",
        tail.join("\n")
    );
    eprintln!("cluster: {}", node.get("/v1/cluster").body);
    panic!("timed out after {secs} s waiting for: {what}");
}

/// The config lines that put a node on `server`'s JetStream.
fn jetstream_config(server: &NatsServer) -> String {
    format!(
        "[log]\nbackend = \"jetstream\"\n[log.jetstream]\nurl = \"{}\"\nmonitor_urls = [\"{}\"]\n",
        server.url(),
        server.monitor_url()
    )
}

/// Loads 12,000 events while the node is SIGKILLed six times, then checks by event id
/// that every acked event was applied exactly once, and again after a kill that
/// recovers from a full checkpoint and deltas.
fn kill9_during_load(backend: &str, batch: usize) {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.csv");
    let (n, users) = (12_000, 40);
    write_events(&events, 0..n, users);
    let mut node = Node::start(dir.path(), &format!("{FAST}{backend}"), &[]);
    let log = dir.path().join("acked.txt");
    let mut loader = start_loader(&node, &events, &log, batch);
    // Kill at pseudo-random points of the stream (seeded by the clock: a different
    // schedule every run; the seed is printed for replay).
    let seed = Instant::now().elapsed().subsec_nanos() as u64 ^ std::process::id() as u64;
    println!("kill schedule seed {seed}");
    let mut x = seed | 1;
    let mut kills = 0;
    for k in 0..6 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let target = (k * n / 8) + (x as usize % (n / 10));
        let deadline = Instant::now() + Duration::from_secs(120);
        while acked_rows(&log).len() < target && Instant::now() < deadline {
            if loader.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if loader.try_wait().unwrap().is_some() {
            break;
        }
        node.kill9();
        kills += 1;
        node.spawn();
    }
    let status = loader.wait().unwrap();
    assert!(status.success(), "loader failed: {status:?}");
    assert!(
        kills >= 5,
        "only {kills} kills happened before the load finished"
    );
    let acked = acked_rows(&log);
    assert_eq!(
        acked.iter().collect::<HashSet<_>>().len(),
        n,
        "every row acked once by the loader's log"
    );
    let check = |node: &Node| {
        let applied = applied_items(node, users);
        let missing: Vec<&String> = acked
            .iter()
            .filter(|i| !applied.contains_key(*i))
            .take(5)
            .collect();
        assert!(missing.is_empty(), "acked but not applied: {missing:?}");
        let twice: Vec<(&String, &usize)> =
            applied.iter().filter(|(_, c)| **c > 1).take(5).collect();
        assert!(twice.is_empty(), "applied more than once: {twice:?}");
        assert_eq!(applied.len(), n);
    };
    // Applied offsets catch up after the last restart; then compare id sets.
    wait_until(60, "all events applied", || {
        applied_items(&node, users).len() >= n
    });
    check(&node);
    // And once more after a kill with everything acked: recovery from a full checkpoint,
    // the deltas after it and the journal. Events for other users after the restart's
    // first (full) checkpoint make sure deltas exist at the kill.
    let deltas_written = |node: &Node| {
        node.metrics()
            .lines()
            .filter(|l| {
                l.starts_with("troupe_checkpoints_total{")
                    && l.contains("consumer=\"user_features\"")
                    && l.contains("form=\"delta\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    for round in 0..3 {
        let extra: Vec<Value> = (0..40)
            .map(|i| json!({"event_id": format!("x{round}-{i}"), "user": format!("x{i}"), "item": format!("xi{round}"), "kind": "view"}))
            .collect();
        assert_eq!(
            node.post("/v1/events", &Value::Array(extra).to_string())
                .status,
            200
        );
        let before = deltas_written(&node);
        wait_until(30, "a delta checkpoint", || deltas_written(&node) > before);
    }
    node.kill9();
    node.spawn();
    wait_until(60, "all events applied after restart", || {
        applied_items(&node, users).len() >= n
    });
    check(&node);
    let from_deltas: u64 = node.get("/v1/cluster").body["actors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["state"]["deltas_on_start"].as_u64())
        .sum();
    assert!(from_deltas > 0, "the restart replayed no delta checkpoint");
    for i in 0..40 {
        let h = node.get(&format!("/v1/users/x{i}")).body;
        let items: Vec<&str> = h["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["item"].as_str().unwrap())
            .collect();
        assert_eq!(items, ["xi0", "xi1", "xi2"], "x{i}: {h}");
    }
    let out = node.stdout(node.starts);
    assert!(out.contains("repaired="), "{out}");
}

#[test]
fn freshness_bad_input_items_and_graceful_stop() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start_with(dir.path(), "max_body_bytes = 4096", FAST, &[]);
    // Some history and items so every branch has something.
    let mut evs = Vec::new();
    for u in 0..20 {
        for i in 0..15 {
            evs.push(json!({"event_id": format!("s-{u}-{i}"), "user": format!("u{u}"), "item": format!("i{}", (u * 7 + i) % 60), "kind": "view"}));
        }
    }
    for chunk in evs.chunks(20) {
        let r = node.post("/v1/events", &Value::Array(chunk.to_vec()).to_string());
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let items: Vec<Value> = (0..60)
        .map(|i| {
            let (colour, cat) = (["red", "blue", "green"][i % 3], ["a", "b", "c"][i % 3]);
            json!({"id": format!("i{i}"), "text": format!("thing {i} {colour}"), "categories": [cat]})
        })
        .collect();
    for chunk in items.chunks(20) {
        assert_eq!(
            node.post("/v1/items", &Value::Array(chunk.to_vec()).to_string())
                .status,
            200
        );
    }
    // 6. Freshness by offsets: after an acked purchase of X by U, U's next answer has
    // applied_offset >= the acked offset and does not contain X.
    for round in 0..5 {
        let r = node.get("/v1/recommendations/u3?k=20");
        assert_eq!(r.status, 200, "{:?}", r.body);
        let x = r.body["items"][0]["item"]
            .as_str()
            .expect("an item to buy")
            .to_string();
        let ack = node.post("/v1/events", &json!([{"event_id": format!("buy-{round}"), "user": "u3", "item": x, "kind": "purchase"}]).to_string());
        assert_eq!(ack.status, 200);
        let off = ack.body["results"][0]["offset"].as_u64().unwrap();
        let r = node.get("/v1/recommendations/u3?k=20");
        assert!(
            r.body["applied_offset"].as_u64().unwrap() >= off,
            "{:?}",
            r.body
        );
        assert_eq!(r.body["stale"], false);
        assert!(
            r.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["item"] != x.as_str()),
            "bought item still recommended"
        );
    }
    // Idempotency: the same event id again is a duplicate with the original position.
    let again = node.post(
        "/v1/events",
        &json!([{"event_id": "buy-0", "user": "u3", "item": "zz", "kind": "purchase"}]).to_string(),
    );
    assert_eq!(again.body["duplicates"], 1);
    // A dislike filters the item for that user.
    let r = node.get("/v1/recommendations/u4?k=5");
    let top = r.body["items"][0]["item"].as_str().unwrap().to_string();
    node.post(
        "/v1/events",
        &json!([{"user": "u4", "item": top, "kind": "dislike"}]).to_string(),
    );
    let r = node.get("/v1/recommendations/u4?k=20");
    assert!(r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["item"] != top.as_str()));
    // The per-user candidate cache: a repeat is answered from it with the same items;
    // the user's next acked event drops the entry; a delete filters cached lists at once.
    wait_until(10, "an answer from the candidate cache", || {
        node.get("/v1/recommendations/u5?k=10").body["cached"] == true
    });
    let a = node.get("/v1/recommendations/u5?k=10");
    let b = node.get("/v1/recommendations/u5?k=10");
    assert_eq!(
        (&a.body["cached"], &b.body["cached"]),
        (&json!(true), &json!(true))
    );
    assert_eq!(a.body["items"], b.body["items"]);
    let gone = b.body["items"][1]["item"].as_str().unwrap().to_string();
    assert_eq!(node.delete(&format!("/v1/items/{gone}")).status, 200);
    wait_until(10, "delete filtered from the cached answer", || {
        let r = node.get("/v1/recommendations/u5?k=10");
        assert_eq!(r.body["cached"], true, "{:?}", r.body);
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["item"] != gone.as_str())
    });
    let bought = b.body["items"][0]["item"].as_str().unwrap().to_string();
    let ack = node.post(
        "/v1/events",
        &json!([{"user": "u5", "item": bought, "kind": "purchase"}]).to_string(),
    );
    let off = ack.body["results"][0]["offset"].as_u64().unwrap();
    let r = node.get("/v1/recommendations/u5?k=10");
    assert_eq!(r.body["cached"], false, "{:?}", r.body);
    assert!(r.body["applied_offset"].as_u64().unwrap() >= off);
    assert!(r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["item"] != bought.as_str() && i["item"] != gone.as_str()));
    // Delete takes effect at once for everyone; unknown users get a cold-start answer.
    let r = node.get("/v1/recommendations/nobody?k=5");
    assert_eq!(r.status, 200);
    assert_eq!(r.body["cold_start"], true);
    let popular = r.body["items"][0]["item"].as_str().unwrap().to_string();
    assert_eq!(node.delete(&format!("/v1/items/{popular}")).status, 200);
    wait_until(10, "delete applied", || {
        node.get("/v1/recommendations/nobody?k=50").body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["item"] != popular.as_str())
    });
    // 5. Bad input: status codes and JSON reasons.
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed json",
            "[{\"user\": ".into(),
            400,
            "not a JSON array",
        ),
        (
            "unknown field",
            json!([{"user": "u", "item": "i", "kind": "v", "colour": 1}]).to_string(),
            400,
            "colour",
        ),
        (
            "wrong type",
            json!([{"user": 5, "item": "i", "kind": "v"}]).to_string(),
            400,
            "event 1",
        ),
        (
            "future",
            json!([{"user": "u", "item": "i", "kind": "v", "ts": 32503680000000i64}]).to_string(),
            400,
            "after the node's clock",
        ),
        ("empty", "".into(), 400, "no events"),
        (
            "too big",
            format!(
                "[{}]",
                vec![json!({"user": "u", "item": "i", "kind": "v"}).to_string(); 200].join(",")
            ),
            413,
            "limit",
        ),
    ];
    for (name, body, status, needle) in cases {
        let r = node.post("/v1/events", &body);
        assert_eq!(r.status, status, "{name}: {:?}", r.body);
        assert!(
            r.body["error"].is_string() && r.body["detail"].as_str().unwrap().contains(needle),
            "{name}: {:?}",
            r.body
        );
    }
    let bad_utf8 = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .post(format!("{}/v1/events", node.url()))
        .send(&[b'[', 0xff, 0xfe, b']'][..])
        .unwrap();
    assert_eq!(bad_utf8.status().as_u16(), 400);
    for (q, status) in [
        ("k=0", 400),
        ("k=100000", 400),
        ("k=abc", 400),
        ("colour=red", 400),
        ("k=5", 200),
    ] {
        let r = node.get(&format!("/v1/recommendations/u1?{q}"));
        assert_eq!(r.status, status, "{q}: {:?}", r.body);
    }
    assert_eq!(node.get("/v1/nope").status, 404);
    assert_eq!(node.put("/v1/items/x", "{\"text\": 3}").status, 400);
    // Nothing accepted earlier was lost by the bad requests: u3's purchases are there.
    let u = node.get("/v1/users/u3");
    assert_eq!(u.body["kind_counts"]["purchase"], 5);
    // Observability routes.
    let c = node.get("/v1/cluster");
    assert_eq!(c.body["ready"], true);
    assert!(
        c.body["actors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["alive"] == true),
        "{:?}",
        c.body
    );
    let m = node.metrics();
    assert!(m.contains("troupe_events_acked_total"), "{m}");
    let spec: Value = node.get("/v1/openapi.json").body;
    for p in [
        "/v1/events",
        "/v1/items/{id}",
        "/v1/recommendations/{user}",
        "/v1/cluster",
        "/v1/admin/retrain",
    ] {
        assert!(spec["paths"][p].is_object(), "{p} missing from openapi");
    }
    // 7. Graceful shutdown: exit 0, and everything acked is there after restart.
    assert_eq!(node.terminate(), Some(0));
    node.spawn();
    assert_eq!(node.get("/v1/users/u3").body["kind_counts"]["purchase"], 5);
    assert!(node.log(1).contains("stopped cleanly"));
    assert!(
        !node.log(1).contains('\x1b'),
        "escape codes in a node's log file"
    );
}

/// `troupe [flags] demo --exit` on generated data in `dir`, with `TROUPE_LOG` unset.
fn demo(
    flags: &[&str],
    users: &str,
    items: &str,
    events: &str,
    dir: &std::path::Path,
) -> std::process::Output {
    std::process::Command::new(troupe_tests::troupe_bin())
        .args(flags)
        .args([
            "demo",
            "--exit",
            "--addr",
            "127.0.0.1:0",
            "--gen-users",
            users,
            "--gen-items",
            items,
            "--gen-events",
            events,
            "--dir",
            dir.to_str().unwrap(),
        ])
        .env_remove("TROUPE_LOG")
        .output()
        .unwrap()
}

#[test]
fn demo_runs_a_node_loads_trains_and_explains() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    // TROUPE_LOG unset: the demo's own default level is under test.
    let out = demo(&[], "300", "150", "6000", dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The generator aims at the requested event count (a few may be dropped as repeats).
    let loaded = stdout
        .lines()
        .find(|l| l.starts_with("loaded 150 items and "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let n: usize = loaded.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert!((5_900..=6_000).contains(&n), "{loaded}");
    assert!(stdout.contains("trained ALS v1"), "{stdout}");
    assert!(stdout.contains("serving at http://127.0.0.1:"), "{stdout}");
    let rec_lines = stdout
        .lines()
        .filter(|l| {
            ["als ", "content ", "popularity ", "item_item "]
                .iter()
                .all(|b| l.contains(b))
        })
        .count();
    assert!(rec_lines >= 10, "{stdout}");
    // Results without log lines in between (stderr is a pipe here: no escape codes
    // either); -v brings the node's INFO lines back, still without colour in a pipe.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(" INFO "), "{stderr}");
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "{stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = demo(&["-v"], "100", "50", "1000", dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .chars()
        .rev()
        .take(3000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert!(out.status.success(), "{tail}");
    assert!(stderr.contains(" INFO "), "{tail}");
    assert!(!stderr.contains('\x1b'), "escape codes in a pipe: {stderr}");
}

/// A minimal OTLP/HTTP collector: records (path, body) of every POST, answers 200.
/// Requests seen by the collector: (path, body).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

fn collector() -> (u16, Seen) {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    seen.lock().unwrap().push((path, body));
                    let mut w = stream.try_clone().unwrap();
                    w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n").unwrap();
                }
            });
        }
    });
    (port, out)
}

#[test]
fn spans_are_exported_over_otlp_http() {
    let _t = timed();
    let (port, seen) = collector();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{FAST}\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nservice_name = \"troupe-otlp-test\"\nsample_ratio = 1.0\n");
    let mut node = Node::start(dir.path(), &extra, &[]);
    assert_eq!(
        node.post(
            "/v1/events",
            &json!([{"user": "o", "item": "p", "kind": "view"}]).to_string()
        )
        .status,
        200
    );
    assert_eq!(node.get("/v1/recommendations/o?k=3").status, 200);
    assert_eq!(node.terminate(), Some(0));
    let got = seen.lock().unwrap().clone();
    let traces: Vec<&(String, Vec<u8>)> = got.iter().filter(|(p, _)| p == "/v1/traces").collect();
    assert!(
        !traces.is_empty(),
        "no OTLP export received: {:?}",
        got.iter().map(|g| &g.0).collect::<Vec<_>>()
    );
    let all: Vec<u8> = traces.iter().flat_map(|(_, b)| b.clone()).collect();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains("troupe-otlp-test"),
        "service name missing from the export"
    );
    assert!(
        text.contains("/v1/recommendations/{user}"),
        "request span missing from the export"
    );
}

/// A write made inside a caller's trace carries the trace into the journal: the apply of
/// its events by the partition's consumer is one span of the same trace, the child of the
/// write's request span on this node.
#[test]
fn an_events_apply_joins_the_trace_of_the_request_that_wrote_it() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let rx = troupe_tests::OtlpReceiver::start(dir.path());
    let extra = format!(
        "{FAST}\n[telemetry]\notlp_endpoint = \"{}\"\notlp_protocol = \"http/json\"\nsample_ratio = 1.0\n",
        rx.url()
    );
    let node = Node::start(dir.path(), &extra, &[]);
    let (trace_id, caller) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let events = json!([
        {"user": "traced", "item": "t1", "kind": "view"},
        {"user": "traced", "item": "t2", "kind": "view"}
    ]);
    let w = node.post_with(
        "/v1/events",
        &events.to_string(),
        &[("traceparent", &format!("00-{trace_id}-{caller}-01"))],
    );
    assert_eq!(w.status, 200, "{}", w.body);
    let mut spans: Vec<Value> = Vec::new();
    let http_of = |spans: &[Value]| {
        spans
            .iter()
            .find(|s| s["name"] == "http" && s["parent"] == caller)
            .cloned()
    };
    let apply_of = |spans: &[Value], http: &Value| {
        spans
            .iter()
            .find(|s| {
                s["name"] == "apply"
                    && s["attributes"]["consumer"] == "user_features"
                    && s["parent"] == http["span_id"]
            })
            .cloned()
    };
    wait_until(
        60,
        "the write's request span and its apply exported",
        || {
            spans = rx
                .spans()
                .into_iter()
                .filter(|s| s["trace_id"] == trace_id)
                .collect();
            http_of(&spans).is_some_and(|h| apply_of(&spans, &h).is_some())
        },
    );
    let http = http_of(&spans).unwrap();
    let apply = apply_of(&spans, &http).unwrap();
    assert_eq!(apply["instance"], http["instance"], "{apply}");
    // Both events of the write are applied in one span (consecutive records of a write).
    let offset = |k: &str| troupe_tests::as_int(&apply["attributes"][k]).unwrap_or(-1);
    assert_eq!(offset("last_offset") - offset("first_offset"), 1, "{apply}");
    assert_eq!(
        spans
            .iter()
            .filter(|s| s["name"] == "apply" && s["attributes"]["consumer"] == "user_features")
            .count(),
        1,
        "{spans:?}"
    );
}

#[test]
fn load_resumes_from_its_state_file_and_reports_bad_rows() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("ev.csv");
    write_events(&events, 0..500, 10);
    let items = dir.path().join("items.csv");
    std::fs::write(
        &items,
        "item,title,genres\nit1,red shoes,shoes\nit2,blue hat,hats\n",
    )
    .unwrap();
    let node = Node::start(dir.path(), FAST, &[]);
    let url = node.url();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "load",
            "--url",
            &url,
            "--batch",
            "64",
            "--events",
            events.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        troupe_tests::troupe(&args)
    };
    let first = run(&["--limit", "200", "--items", items.to_str().unwrap()]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let r1: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(r1["acked"], 200);
    let second = run(&[]);
    let r2: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(r2["resumed_after_row"], 200);
    assert_eq!(r2["acked"], 300);
    assert_eq!(r2["duplicates"], 0);
    wait_until(30, "all applied", || applied_items(&node, 10).len() == 500);
    assert_eq!(
        node.get("/v1/items/it1/similar?k=1").body["items"][0]["item"],
        "it2"
    );
    // The same file into a second, fresh node: its progress is its own, so it receives
    // every row (the first node's progress is not taken for it).
    let dir2 = tempfile::tempdir().unwrap();
    let fresh = Node::start(dir2.path(), FAST, &[]);
    let third = troupe_tests::troupe(&[
        "load",
        "--url",
        &fresh.url(),
        "--batch",
        "64",
        "--events",
        events.to_str().unwrap(),
    ]);
    assert!(
        third.status.success(),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    let r3: Value = serde_json::from_slice(&third.stdout).unwrap();
    assert_eq!(
        (r3["resumed_after_row"].as_u64(), r3["acked"].as_u64()),
        (Some(0), Some(500))
    );
    assert_ne!(r3["state"], r2["state"], "progress is kept per target");
    wait_until(30, "all applied on the fresh node", || {
        applied_items(&fresh, 10).len() == 500
    });
    // --restart sends every row again; the node drops them as duplicates.
    let again = run(&["--restart"]);
    let r4: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (r4["acked"].as_u64(), r4["duplicates"].as_u64()),
        (Some(0), Some(500))
    );
    // A malformed row: a clear error naming file, line and field; nothing after it sent.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "user,item,value\nu1,i1,2\nu2,i2,notanumber\n").unwrap();
    let out = troupe_tests::troupe(&["load", "--url", &url, "--events", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csv:3: field `value`"), "{err}");
}

/// One JetStream server, SIGKILLed in the middle of a load: writes are refused with 503
/// and Retry-After while it is down (the loader retries), reads keep answering, the
/// node reconnects by itself once the server is back, and every acked event is applied
/// exactly once.
#[test]
fn jetstream_server_killed_during_load_refuses_writes_serves_reads_and_loses_nothing() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut server) = NatsServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.csv");
    let (n, users) = (6_000, 30);
    write_events(&events, 0..n, users);
    let node = Node::start(
        dir.path(),
        &format!("{FAST}{}", jetstream_config(&server)),
        &[],
    );
    let log = dir.path().join("acked.txt");
    let mut loader = start_loader(&node, &events, &log, 100);
    wait_until(60, "a third of the load acked", || {
        acked_rows(&log).len() >= n / 3
    });
    server.kill9();
    // Writes: 503 with Retry-After, nothing accepted. The probe's user is not one of the
    // load's: a probe answered with an error before the 503 may still be stored once the
    // server is back (the client library sends what it buffered on reconnect), which is
    // allowed for a write never acknowledged, and must not count as a load event.
    let probe =
        json!([{"event_id": "probe", "user": "probe-user", "item": "probe", "kind": "view"}])
            .to_string();
    let mut refused = None;
    wait_until(30, "a write refused while the server is down", || {
        let r = node.post_with("/v1/events", &probe, &[]);
        if r.status == 503 {
            refused = Some(r);
            true
        } else {
            false
        }
    });
    let refused = refused.unwrap();
    assert!(
        refused.retry_after.is_some(),
        "503 without Retry-After: {:?}",
        refused.body
    );
    let cluster = node.get("/v1/cluster").body;
    assert_eq!(cluster["log"]["writable"], false, "{}", cluster["log"]);
    assert!(node.metrics().contains("troupe_log_writable 0"));
    // Reads: served from what the node holds, flagged stale (the node cannot know it is
    // current); still ready.
    let user = node.get("/v1/users/u1");
    assert_eq!(user.status, 200, "{:?}", user.body);
    assert_eq!(user.body["stale"], true, "{:?}", user.body);
    let recs = node.get("/v1/recommendations/u1?k=3");
    assert_eq!(recs.status, 200);
    assert_eq!(recs.body["stale"], true, "{:?}", recs.body);
    assert_eq!(node.get("/readyz").status, 200);
    let acked_while_down = acked_rows(&log).len();
    server.spawn();
    let status = loader.wait().unwrap();
    assert!(status.success(), "loader failed: {status:?}");
    let acked = acked_rows(&log);
    assert!(acked.len() > acked_while_down);
    assert_eq!(acked.iter().collect::<HashSet<_>>().len(), n);
    assert_each_acked_applied_once(&node, &acked, n, users);
    let cluster = node.get("/v1/cluster").body;
    assert_eq!(cluster["log"]["writable"], true);
    // The outage failed no actor: checkpoints that fell due were postponed.
    let restarts: u64 = cluster["supervisors"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["children"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["restarts"].as_u64())
        .sum();
    assert_eq!(restarts, 0, "{}", cluster["supervisors"]);
}

/// Three JetStream servers, an R3 stream: the stream leader's server is SIGKILLed in the
/// middle of a load. Ingest resumes once a new leader is elected (the loader retries the
/// refused batches with the same ids), every acked event is applied exactly once, and
/// the pause (the longest time without an acked batch) is printed.
#[test]
fn jetstream_r3_leader_killed_during_load_resumes_and_loses_nothing() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut cluster) = troupe_tests::nats::NatsCluster::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.csv");
    let (n, users) = (6_000, 30);
    write_events(&events, 0..n, users);
    let config = format!(
        "{FAST}[log]\nbackend = \"jetstream\"\n[log.jetstream]\nurl = \"{}\"\nreplicas = 3\nrequest_timeout_ms = 5000\nconnect_timeout_ms = 60000\n",
        cluster.urls()
    );
    let node = Node::start(dir.path(), &config, &[]);
    assert_eq!(node.get("/v1/cluster").body["log"]["replicas"], 3);
    let log = dir.path().join("acked.txt");
    let mut loader = start_loader(&node, &events, &log, 100);
    wait_until(60, "a third of the load acked", || {
        acked_rows(&log).len() >= n / 3
    });
    let mut leader = None;
    wait_until(30, "the stream has a leader", || {
        leader = cluster.stream_leader("troupe");
        leader.is_some()
    });
    let leader = leader.unwrap();
    // The longest gap between acked batches while the leader is gone and after.
    let (mut last_count, mut last_change, mut pause) =
        (acked_rows(&log).len(), Instant::now(), Duration::ZERO);
    cluster.servers[leader].kill9();
    let mut restarted = false;
    while loader.try_wait().unwrap().is_none() {
        let c = acked_rows(&log).len();
        if c != last_count {
            pause = pause.max(last_change.elapsed());
            (last_count, last_change) = (c, Instant::now());
        }
        // The killed server comes back on its store while the load goes on.
        if !restarted && c >= 2 * n / 3 {
            cluster.servers[leader].spawn();
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !restarted {
        cluster.servers[leader].spawn();
    }
    println!("R3 stream leader (server s{leader}) SIGKILLed and restarted during the load: longest pause between acked batches {:.1} s", pause.as_secs_f64());
    let status = loader.wait().unwrap();
    assert!(status.success(), "loader failed: {status:?}");
    let acked = acked_rows(&log);
    assert_eq!(acked.iter().collect::<HashSet<_>>().len(), n);
    assert_each_acked_applied_once(&node, &acked, n, users);
    // Whole again: every replica current, and writes after it acked and applied.
    wait_or_dump(&node, 120, "every replica current again", || {
        ["troupe", "KV_troupe_state", "OBJ_troupe_blobs"]
            .iter()
            .all(|s| cluster.stream_whole(s))
    });
    let body = format!(r#"[{{"event_id":"after","user":"u0","item":"it{n}","kind":"view"}}]"#);
    assert_eq!(node.post("/v1/events", &body).status, 200);
    let mut all = acked.clone();
    all.push(format!("it{n}"));
    assert_each_acked_applied_once(&node, &all, n + 1, users);
}

/// A temporary folder with a data folder for each of two nodes, `a` and `b`.
fn two_node_dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    (root, a, b)
}

/// `[journal]` of [`FAST`] with retention on (records every checkpoint covers are deleted).
fn fast_with_retention() -> String {
    FAST.replace("[journal]\n", "[journal]\nretention = true\n")
}

/// Number of items the node's catalog holds (`/v1/items/{id}` of `ids`).
fn items_known(node: &Node, ids: &[String]) -> usize {
    ids.iter()
        .filter(|id| node.get(&format!("/v1/items/{id}")).status == 200)
        .count()
}

/// Sum of one field over the node's actors whose name starts with `prefix`.
fn actor_sum(node: &Node, prefix: &str, field: &str) -> u64 {
    node.get("/v1/cluster").body["actors"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
                .filter_map(|x| x["state"][field].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// Moving state without a disk: a node loads events and items into JetStream, checkpoints
/// them to the shared state store and deletes every record its checkpoints cover
/// (retention), then dies with its disk. A node started on an empty data dir against the
/// same stream rebuilds every consumer's state from the shared checkpoints (the records
/// are gone, so a replay from the start would fail), replays only what came after them,
/// and has every acked event exactly once.
#[test]
fn jetstream_node_on_an_empty_disk_rebuilds_from_shared_checkpoints() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(server) = NatsServer::start() else {
        return;
    };
    let (root, dir_a, dir_b) = two_node_dirs();
    let config = format!("{}{}", fast_with_retention(), jetstream_config(&server));
    let events = root.path().join("events.csv");
    let (n, users) = (3_000, 30);
    write_events(&events, 0..n, users);
    let mut a = Node::start(&dir_a, &config, &[]);
    let ids: Vec<String> = (0..40).map(|i| format!("doc{i}")).collect();
    let items: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "text": format!("text of {id}"), "categories": ["c"]}))
        .collect();
    assert_eq!(
        a.post("/v1/items", &Value::Array(items).to_string()).status,
        200
    );
    let log = root.path().join("acked.txt");
    let status = start_loader(&a, &events, &log, 100).wait().unwrap();
    assert!(status.success(), "loader failed: {status:?}");
    let acked = acked_rows(&log);
    assert_each_acked_applied_once(&a, &acked, n, users);
    // Every record is covered by a shared checkpoint and deleted from the stream.
    wait_or_dump(&a, 60, "every record truncated", || {
        a.metric_sum("troupe_log_truncated_records_total", &[]) >= (n + ids.len()) as f64
    });
    // Events after the last truncation, acked just before the node dies: they are in the
    // stream and perhaps in no checkpoint.
    let late: Vec<Value> = (0..50)
        .map(|i| json!({"event_id": format!("late{i}"), "user": format!("u{}", i % users), "item": format!("late{i}"), "kind": "view"}))
        .collect();
    assert_eq!(
        a.post("/v1/events", &Value::Array(late).to_string()).status,
        200
    );
    a.kill9();
    drop(a);
    // A new node, a new empty disk, the same stream.
    let b = Node::start(&dir_b, &config, &[]);
    wait_or_dump(&b, 60, "all events applied on the new node", || {
        applied_items(&b, users).len() >= n + 50
    });
    let applied = applied_items(&b, users);
    assert!(
        acked.iter().all(|i| applied.get(i) == Some(&1)),
        "an acked event missing or applied twice on the new node"
    );
    assert!((0..50).all(|i| applied.get(&format!("late{i}")) == Some(&1)));
    assert_eq!(applied.len(), n + 50);
    assert_eq!(items_known(&b, &ids), ids.len(), "the catalog came back");
    // The embeddings came from the shared cache: the new node computed none.
    wait_or_dump(&b, 60, "every item embedded on the new node", || {
        b.metric_sum("troupe_embeddings_cached_total", &[]) >= ids.len() as f64
    });
    assert_eq!(b.metric_sum("troupe_embeddings_computed_total", &[]), 0.0);
    let replayed = actor_sum(&b, "user_features", "replayed_on_start");
    assert!(
        replayed <= 50,
        "replayed {replayed} events: only those after the checkpoints may be replayed"
    );
    let cluster = b.get("/v1/cluster").body;
    assert_eq!(cluster["state"]["backend"], "jetstream", "{cluster}");
    assert!(cluster["escalated"].is_null(), "{cluster}");
    // Popularity (ItemStats) came back too: the most popular item is known.
    let top = b.get("/v1/recommendations/nobody?k=3");
    assert_eq!(top.status, 200, "{:?}", top.body);
    assert!(!top.body["items"].as_array().unwrap().is_empty());
}

/// Fencing across processes: a second node on the same stream claims every scope; the
/// first node's next checkpoint write is refused, its consumers stop for good (deposed,
/// not restarted) and it applies nothing more, while the second applies everything.
#[test]
fn jetstream_a_second_owner_fences_the_first_one() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(server) = NatsServer::start() else {
        return;
    };
    let (_root, dir_a, dir_b) = two_node_dirs();
    let config = format!("{FAST}{}", jetstream_config(&server));
    let a = Node::start(&dir_a, &config, &[]);
    let batch = |tag: &str| {
        let rows: Vec<Value> = (0..20)
            .map(|i| json!({"event_id": format!("{tag}{i}"), "user": format!("u{i}"), "item": format!("{tag}{i}"), "kind": "view"}))
            .collect();
        Value::Array(rows).to_string()
    };
    assert_eq!(a.post("/v1/events", &batch("first")).status, 200);
    wait_until(30, "the first batch applied", || {
        applied_items(&a, 20).len() >= 20
    });
    let epoch_of = |node: &Node, scope: &str| {
        node.get("/v1/cluster").body["state"]["claims"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["scope"] == scope)
            .and_then(|c| c["epoch"].as_u64())
    };
    let first_epoch = epoch_of(&a, "user_features-0").expect("a claims its partitions");
    let b = Node::start(&dir_b, &config, &[]);
    let b_epoch = epoch_of(&b, "user_features-0").expect("b claims the partition");
    assert!(b_epoch > first_epoch);
    // More events through the new owner: the old one follows the stream, applies, and
    // is refused at its next checkpoint write.
    assert_eq!(b.post("/v1/events", &batch("second")).status, 200);
    let deposed = |node: &Node| {
        node.get("/v1/cluster").body["supervisors"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["children"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["deposed"] == true)
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect::<Vec<String>>()
    };
    wait_or_dump(&a, 60, "the old owner's partitions deposed", || {
        (0..4).all(|p| deposed(&a).contains(&format!("user_features-{p}")))
    });
    assert!(a.metric_sum("troupe_consumers_deposed_total", &[]) >= 4.0);
    let applied_offsets = |node: &Node| -> Vec<f64> {
        (0..4)
            .map(|p| {
                let stream = format!("stream=\"{p}\"");
                node.metric_sum(
                    "troupe_applied_offset",
                    &["consumer=\"user_features\"", &stream],
                )
            })
            .collect()
    };
    let applied_by_a = applied_offsets(&a);
    // Deposed consumers apply nothing more.
    assert_eq!(b.post("/v1/events", &batch("third")).status, 200);
    wait_until(30, "the new owner applied everything", || {
        applied_items(&b, 20).len() >= 60
    });
    let applied = applied_items(&b, 20);
    assert!(applied.values().all(|&c| c == 1), "{applied:?}");
    assert_eq!(
        applied_offsets(&a),
        applied_by_a,
        "a deposed consumer applied records"
    );
    // The new owner is not deposed by anything the old one did.
    let cluster = b.get("/v1/cluster").body;
    assert!(deposed(&b).is_empty(), "{cluster}");
}

/// What an acknowledgement means is read from the servers: with their monitoring
/// endpoint configured, a node on a server that fsyncs every write says so
/// (`log.sync.state = always`, `troupe_log_sync_always 1`, no warning), and one on a
/// server with the default flush interval warns about it (`interval`, gauge 0).
#[test]
fn jetstream_durability_is_read_from_the_servers_monitoring_endpoint() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(syncing) = NatsServer::start() else {
        return;
    };
    let Some(lazy) = NatsServer::start_with_interval_sync() else {
        return;
    };
    for (server, state, gauge) in [(&syncing, "always", 1.0), (&lazy, "interval", 0.0)] {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(
            dir.path(),
            &format!("{FAST}{}", jetstream_config(server)),
            &[],
        );
        wait_or_dump(&node, 30, "the servers' durability read", || {
            node.get("/v1/cluster").body["log"]["sync"]["state"] == state
        });
        let log = node.get("/v1/cluster").body["log"].clone();
        let warned = log["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap_or("").contains("sync_interval"));
        assert_eq!(warned, state == "interval", "{log}");
        assert_eq!(node.metric_sum("troupe_log_sync_always", &[]), gauge);
    }
}

/// Deletes the node's stream on `server` (as an operator would by hand) and creates it
/// again empty, with the node's layout.
fn recreate_stream(server: &NatsServer) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use troupe_actors::jetstream::{JetStream, JetStreamConfig};
        let js = JetStream::connect(JetStreamConfig::local(&server.url(), "troupe", 4))
            .await
            .unwrap();
        js.js.delete_stream("troupe").await.unwrap();
        JetStream::connect(JetStreamConfig::local(&server.url(), "troupe", 4))
            .await
            .unwrap();
    });
}

/// A stream that goes backwards (deleted and re-created by hand; a server that lost
/// writes it had not synced looks the same): the running node notices within seconds
/// and stops with exit 1 naming the cause instead of skipping, and a node started on the
/// re-created stream refuses too, since its checkpoints are past the stream's end.
#[test]
fn jetstream_stream_going_backwards_stops_the_node_instead_of_skipping() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(server) = NatsServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{FAST}{}", jetstream_config(&server));
    let mut node = Node::start(dir.path(), &config, &[]);
    let rows: Vec<Value> = (0..300)
        .map(|i| json!({"event_id": format!("e{i}"), "user": format!("u{}", i % 20), "item": format!("it{i}"), "kind": "view"}))
        .collect();
    assert_eq!(
        node.post("/v1/events", &Value::Array(rows).to_string())
            .status,
        200
    );
    wait_or_dump(&node, 30, "checkpoints past the events", || {
        node.metric_sum("troupe_checkpoints_total", &["consumer=\"user_features\""]) >= 4.0
    });
    recreate_stream(&server);
    let code = node.wait_exit(30);
    let log = node.log(1);
    assert_eq!(
        code,
        Some(1),
        "the node kept running on a re-created stream"
    );
    assert!(
        log.contains("re-created"),
        "{}",
        &log[log.len().saturating_sub(3000)..]
    );
    // Started again on the re-created stream: its checkpoints are past the stream's end.
    node.launch();
    let code = node.wait_exit(60);
    let log = node.log(2);
    assert_eq!(
        code,
        Some(1),
        "a node started on a stream behind its checkpoints"
    );
    assert!(
        log.contains("the log went backwards"),
        "{}",
        &log[log.len().saturating_sub(3000)..]
    );
}

/// A log follower that stalls (fault `log_follow`, 20 s, on its first batch) does not
/// hold the node's reads back: the heads watchdog finds the server ahead of the
/// follower, raises the heads from the server within seconds, and the consumers read the
/// records from the server. An acked event shows in the user's history, and an answer
/// asked for its position is not stale, long before the follower resumes.
#[test]
fn jetstream_stalled_log_follower_is_overtaken_by_the_heads_watchdog() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(server) = NatsServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{FAST}{}[[faults]]\ntarget = \"log_follow\"\naction = \"stall\"\nstall_ms = 20000\ntimes = 1\n",
        jetstream_config(&server)
    );
    let node = Node::start(dir.path(), &config, &[("TROUPE_ALLOW_FAULTS", "1")]);
    let ack = node.post(
        "/v1/events",
        &json!([{"event_id": "f1", "user": "u1", "item": "x1", "kind": "view"}]).to_string(),
    );
    assert_eq!(ack.status, 200, "{:?}", ack.body);
    let off = ack.body["results"][0]["offset"].as_u64().unwrap();
    let acked = std::time::Instant::now();
    wait_or_dump(
        &node,
        15,
        "the event applied while the follower stalls",
        || times_applied(&node, "u1", "x1") == 1,
    );
    let took = acked.elapsed();
    let r = node.get(&format!("/v1/recommendations/u1?k=5&min_offset={off}"));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["stale"], false, "{:?}", r.body);
    let log = node.log(1);
    assert!(log.contains("injected stall"), "the follower never stalled");
    assert!(
        log.contains("raising the head"),
        "the watchdog did not raise the heads: {}",
        &log[log.len().saturating_sub(3000)..]
    );
    // Well inside the 20 s stall (the watchdog needs two or three of its 1 s checks).
    assert!(
        took < std::time::Duration::from_secs(12),
        "applied only after {took:?}"
    );
    println!(
        "applied {:.1} s after the ack, follower stalled",
        took.as_secs_f64()
    );
}

/// Times `item` appears in `user`'s history (through `node`).
fn times_applied(node: &Node, user: &str, item: &str) -> usize {
    node.get(&format!("/v1/users/{user}")).body["history"]
        .as_array()
        .map(|h| h.iter().filter(|e| e["item"] == item).count())
        .unwrap_or(0)
}

/// Posts `body` until the answer's first result says `duplicate: false` (the server's
/// duplicate window has passed), polling every 100 ms for up to 30 s.
fn post_until_stored_again(node: &Node, body: &str) {
    wait_until(30, "the server's duplicate window to pass", || {
        let r = node.post("/v1/events", body);
        r.status == 200 && r.body["results"][0]["duplicate"] == false
    });
}

/// The dedupe horizon on JetStream is what the README and the OpenAPI document state: a
/// retry within the server's duplicate window is answered `duplicate: true`; a later one
/// is stored again but applied once while its key is among the consumers' last
/// `consumer_dedupe_keys` keys of its partition; past both it counts as a new event.
#[test]
fn jetstream_dedupe_horizon_is_the_servers_window_then_the_consumers_keys() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(server) = NatsServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}duplicate_window_secs = 1\n",
        FAST.replace("[journal]\n", "[journal]\nconsumer_dedupe_keys = 50\n"),
        jetstream_config(&server)
    );
    let node = Node::start(dir.path(), &config, &[]);
    let x = r#"[{"event_id":"x","user":"u0","item":"ix","kind":"view"}]"#;
    let first = node.post("/v1/events", x);
    assert_eq!(first.body["results"][0]["duplicate"], false);
    let again = node.post("/v1/events", x);
    assert_eq!(
        again.body["results"][0]["duplicate"], true,
        "within the server's window"
    );
    // After the server's window: stored again, applied once (the consumer remembers).
    post_until_stored_again(&node, x);
    let one = r#"[{"event_id":"one","user":"u0","item":"marker1","kind":"view"}]"#;
    assert_eq!(node.post("/v1/events", one).status, 200);
    wait_until(30, "the marker applied", || {
        times_applied(&node, "u0", "marker1") == 1
    });
    assert_eq!(
        times_applied(&node, "u0", "ix"),
        1,
        "a retry after the server window"
    );
    assert!(node.metric_sum("troupe_consumer_duplicates_total", &[]) >= 1.0);
    // Sixty more events of the same user (same partition) push the key out of the
    // consumers' 50; a retry after that counts as a new event, as documented.
    let rows: Vec<Value> = (0..60)
        .map(|i| json!({"event_id": format!("f{i}"), "user": "u0", "item": format!("f{i}"), "kind": "view"}))
        .collect();
    assert_eq!(
        node.post("/v1/events", &Value::Array(rows).to_string())
            .status,
        200
    );
    post_until_stored_again(&node, x);
    let two = r#"[{"event_id":"two","user":"u0","item":"marker2","kind":"view"}]"#;
    assert_eq!(node.post("/v1/events", two).status, 200);
    wait_until(30, "the second marker applied", || {
        times_applied(&node, "u0", "marker2") == 1
    });
    assert_eq!(
        times_applied(&node, "u0", "ix"),
        2,
        "past both horizons a retry is new"
    );
    let doc = node.get("/v1/openapi.json").body.to_string();
    assert!(doc.contains("duplicate window (log.jetstream.duplicate_window_secs, 1 s)"));
    assert!(node
        .metrics()
        .contains("troupe_consumer_dedupe_horizon_seconds"));
}

/// A graceful stop that cannot finish everything (the JetStream server is gone, so no
/// final checkpoint can be written) still exits 0 and says what it could not finish:
/// nothing acknowledged is lost, the next start replays from the last checkpoint.
#[test]
fn jetstream_sigterm_without_the_server_exits_0_and_names_what_it_could_not_finish() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut server) = NatsServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{FAST}{}request_timeout_ms = 1000\n",
        jetstream_config(&server)
    );
    let mut node = Node::start(dir.path(), &config, &[]);
    let rows: Vec<Value> = (0..50)
        .map(|i| json!({"event_id": format!("s{i}"), "user": format!("u{}", i % 10), "item": format!("it{i}"), "kind": "view"}))
        .collect();
    assert_eq!(
        node.post("/v1/events", &Value::Array(rows).to_string())
            .status,
        200
    );
    wait_until(30, "the events applied", || {
        applied_items(&node, 10).len() >= 50
    });
    server.kill9();
    assert_eq!(node.terminate(), Some(0));
    let log = node.log(1);
    assert!(
        log.contains("unfinished:"),
        "{}",
        &log[log.len().saturating_sub(2000)..]
    );
}
