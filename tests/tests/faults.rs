//! Fault injection through the release binary's fault hook (`TROUPE_ALLOW_FAULTS=1`):
//! actor panics and restarts with replay, escalation, poison records, and the ranker's
//! circuit breaker.

use serde_json::{json, Value};
use troupe_tests::{timed, wait_until, Node};

const ALLOW: &[(&str, &str)] = &[("TROUPE_ALLOW_FAULTS", "1")];

const BASE: &str = "
[journal]
partitions = 3
poll_interval_ms = 20
[features]
checkpoint_every_records = 50
checkpoint_interval_ms = 200
[supervision]
backoff_base_ms = 5
backoff_max_ms = 40
";

fn post_ok(node: &Node, events: Value) -> Value {
    let r = node.post("/v1/events", &events.to_string());
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

fn child(cluster: &Value, name: &str) -> Value {
    cluster["supervisors"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["children"].as_array().cloned().unwrap_or_default())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no child {name} in {cluster}"))
}

fn restarts(node: &Node, name: &str) -> u64 {
    child(&node.get("/v1/cluster").body, name)["restarts"]
        .as_u64()
        .unwrap()
}

fn history_items(node: &Node, user: &str) -> Vec<String> {
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
fn every_actor_kind_restarts_after_a_panic_and_loses_nothing() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let faults = r#"
[[faults]]
target = "user_features"
action = "panic"
on = "ev-uf"
times = 1
[[faults]]
target = "item_stats"
action = "panic"
on = "ev-is"
times = 1
[[faults]]
target = "catalog"
action = "panic"
on = "item-cat"
times = 1
[[faults]]
target = "ranker"
action = "panic"
on = "victim"
times = 1
[[faults]]
target = "journal"
action = "error"
on = "ev-j"
times = 1
"#;
    let node = Node::start(dir.path(), &format!("{BASE}{faults}"), ALLOW);
    // Journal: a failed commit answers 503 and acks nothing; the retry is applied once.
    let batch = json!([{"event_id": "ev-j", "user": "a", "item": "j1", "kind": "view"}, {"event_id": "ev-j2", "user": "a", "item": "j2", "kind": "view"}]);
    let r = node.post("/v1/events", &batch.to_string());
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(r.retry_after.is_some());
    wait_until(30, "journal restarted", || {
        restarts(&node, "journal") >= 1 && node.get("/readyz").status == 200
    });
    let body = post_ok(&node, batch);
    assert_eq!(body["acked"], 2);
    // Consumers: each panics once on its record, restarts, replays from its checkpoint.
    for (id, user, item) in [("ev-uf", "b", "uf1"), ("ev-is", "c", "is1")] {
        post_ok(
            &node,
            json!([{"event_id": id, "user": user, "item": item, "kind": "click"}, {"user": user, "item": format!("{item}-after"), "kind": "view"}]),
        );
    }
    wait_until(30, "item_stats", || restarts(&node, "item_stats") >= 1);
    wait_until(30, "a user_features restart", || {
        (0..3).any(|p| restarts(&node, &format!("user_features-{p}")) >= 1)
    });
    for (user, item) in [
        ("a", "j1"),
        ("a", "j2"),
        ("b", "uf1"),
        ("b", "uf1-after"),
        ("c", "is1"),
    ] {
        wait_until(30, &format!("{user} has {item}"), || {
            history_items(&node, user).contains(&item.to_string())
        });
    }
    // Exactly once: the retried journal batch and the replayed panic record appear once.
    assert_eq!(
        history_items(&node, "a")
            .iter()
            .filter(|i| *i == "j1")
            .count(),
        1
    );
    assert_eq!(
        history_items(&node, "b")
            .iter()
            .filter(|i| *i == "uf1")
            .count(),
        1
    );
    // Catalog: panics on the upsert, restarts, replays it.
    assert_eq!(
        node.put("/v1/items/item-2", r#"{"text": "a blue bicycle"}"#)
            .status,
        200
    );
    assert_eq!(
        node.put(
            "/v1/items/item-cat",
            r#"{"text": "a red bicycle", "categories": ["bikes"]}"#
        )
        .status,
        200
    );
    wait_until(30, "catalog restarted", || restarts(&node, "catalog") >= 1);
    wait_until(30, "item embedded after the catalog's restart", || {
        let r = node.get("/v1/items/item-cat/similar?k=1");
        r.status == 200 && r.body["items"][0]["item"] == "item-2"
    });
    // Ranker: the panicking request fails, the next ones are served by the new incarnation.
    let r = node.get("/v1/recommendations/victim?k=3");
    assert_eq!(r.status, 503, "{:?}", r.body);
    wait_until(30, "ranker restarted", || {
        node.get("/v1/recommendations/victim?k=3").status == 200
    });
    assert!(restarts(&node, "ranker") >= 1);
    assert_eq!(node.get("/readyz").status, 200);
}

#[test]
fn poison_record_goes_to_dead_letters_and_the_rest_flows() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "{BASE}\n[[faults]]\ntarget = \"user_features\"\naction = \"panic\"\non = \"poison-1\"\n"
    );
    let node = Node::start(dir.path(), &format!("{extra}\n"), ALLOW);
    // Same user (same partition) before and after the poison record.
    post_ok(
        &node,
        json!([
            {"event_id": "ok-1", "user": "p", "item": "x1", "kind": "view"},
            {"event_id": "poison-1", "user": "p", "item": "bad", "kind": "view"},
            {"event_id": "ok-2", "user": "p", "item": "x2", "kind": "view"},
        ]),
    );
    wait_until(60, "poison record in dead letters", || {
        node.get("/v1/admin/dead-letters").body["dead_letters"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
    });
    let dl = node.get("/v1/admin/dead-letters").body;
    let letters = dl["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{dl}");
    assert!(letters[0]["consumer"]
        .as_str()
        .unwrap()
        .starts_with("user_features-"));
    assert_eq!(letters[0]["attempts"], 3);
    assert!(letters[0]["record"].as_str().unwrap().contains("poison-1"));
    wait_until(30, "later events applied", || {
        history_items(&node, "p") == vec!["x1".to_string(), "x2".to_string()]
    });
    post_ok(
        &node,
        json!([{"event_id": "ok-3", "user": "p", "item": "x3", "kind": "view"}]),
    );
    wait_until(30, "flow continues", || {
        history_items(&node, "p").contains(&"x3".to_string())
    });
}

#[test]
fn exceeding_restart_intensity_escalates_and_exits_non_zero() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let extra = "
[journal]
partitions = 2
poll_interval_ms = 20
[features]
poison_max_attempts = 1000
[supervision]
max_restarts = 2
window_ms = 60000
backoff_base_ms = 5
backoff_max_ms = 20
[[faults]]
target = \"user_features\"
action = \"panic\"
on = \"boom\"
";
    let mut node = Node::start(dir.path(), extra, ALLOW);
    post_ok(
        &node,
        json!([{"event_id": "boom", "user": "z", "item": "i", "kind": "view"}]),
    );
    let code = node.wait_exit(60);
    assert_eq!(code, Some(1), "node should exit 1 after escalation");
    let log = node.log(1);
    assert!(log.contains("escalat"), "{log}");
}

#[test]
fn failing_als_branch_degrades_answers_and_cycles_its_breaker() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "{BASE}
[als]
factors = 8
iterations = 3
min_interactions = 10
retrain_every_events = 1000000
[ranker]
breaker_failures = 3
breaker_open_ms = 300
branch_deadline_ms = 2000
[[faults]]
target = \"branch.als\"
action = \"error\"
times = 3
"
    );
    let node = Node::start(dir.path(), &extra, ALLOW);
    let mut evs = Vec::new();
    for u in 0..20 {
        for i in 0..8 {
            evs.push(json!({"user": format!("u{u}"), "item": format!("i{}", (u * 3 + i) % 40), "kind": "view"}));
        }
    }
    post_ok(&node, Value::Array(evs));
    wait_until(30, "trainer caught up", || {
        let r = node.post("/v1/admin/retrain", "");
        r.status == 200 && r.body["accepted"] == true
    });
    let als_status = |b: &Value| -> String {
        b["branches"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "als")
            .unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for _ in 0..3 {
        let r = node.get("/v1/recommendations/u1?k=5");
        assert_eq!(r.status, 200);
        assert_eq!(r.body["degraded"], true);
        assert_eq!(als_status(&r.body), "failed");
        assert!(
            !r.body["items"].as_array().unwrap().is_empty(),
            "other branches still answer"
        );
    }
    let r = node.get("/v1/recommendations/u1?k=5");
    assert_eq!(als_status(&r.body), "open");
    assert_eq!(r.body["degraded"], true);
    // After the open interval the half-open probe succeeds (the fault is spent).
    wait_until(30, "breaker closes", || {
        let r = node.get("/v1/recommendations/u1?k=5");
        als_status(&r.body) == "ok" && r.body["degraded"] == false
    });
    let cluster = node.get("/v1/cluster").body;
    let ranker = cluster["actors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "ranker")
        .unwrap();
    let als = ranker["state"]["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "als")
        .unwrap();
    let states: Vec<&str> = als["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t[0].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["open", "half_open", "closed"], "{als}");
    assert_eq!(als["state"], "closed");
}

#[test]
fn content_encoder_panic_restarts_and_re_requests_missing_embeddings() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("{BASE}\n[[faults]]\ntarget = \"content_encoder\"\naction = \"panic\"\non = \"enc-x\"\ntimes = 1\n");
    let node = Node::start(dir.path(), &extra, ALLOW);
    assert_eq!(
        node.put("/v1/items/enc-y", r#"{"text": "green tea from japan"}"#)
            .status,
        200
    );
    assert_eq!(
        node.put("/v1/items/enc-x", r#"{"text": "green tea from china"}"#)
            .status,
        200
    );
    wait_until(30, "encoder restarted", || {
        restarts(&node, "content_encoder") >= 1
    });
    wait_until(30, "enc-x embedded by the new incarnation", || {
        let r = node.get("/v1/items/enc-x/similar?k=1");
        r.status == 200 && r.body["items"][0]["item"] == "enc-y"
    });
}

#[test]
fn stalled_content_branch_times_out_and_is_flagged() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "{BASE}\n[ranker]\nbranch_deadline_ms = 100\n[[faults]]\ntarget = \"branch.content\"\naction = \"stall\"\nstall_ms = 5000\ntimes = 1\n"
    );
    let node = Node::start(dir.path(), &extra, ALLOW);
    assert_eq!(
        node.put("/v1/items/t1", r#"{"text": "red shoes"}"#).status,
        200
    );
    assert_eq!(
        node.put("/v1/items/t2", r#"{"text": "red boots"}"#).status,
        200
    );
    post_ok(
        &node,
        json!([{"user": "s", "item": "t1", "kind": "view"}, {"user": "q", "item": "t2", "kind": "view"}]),
    );
    wait_until(30, "content index ready", || {
        node.get("/v1/items/t1/similar?k=1").status == 200
    });
    let started = std::time::Instant::now();
    let r = node.get("/v1/recommendations/s?k=5");
    assert_eq!(r.status, 200);
    let content = r.body["branches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "content")
        .unwrap()
        .clone();
    assert_eq!(content["status"], "timeout", "{}", r.body);
    assert_eq!(r.body["degraded"], true);
    // Loose cap only: the answer did not wait for the stalled branch.
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    let r = node.get("/v1/recommendations/s?k=5");
    assert_eq!(r.body["degraded"], false, "{}", r.body);
}

#[test]
fn bearer_token_guards_writes_and_admin_only() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), BASE, &[("TROUPE_AUTH_TOKEN", "s3cret-token")]);
    let ev = json!([{"user": "a", "item": "b", "kind": "view"}]).to_string();
    let r = node.post("/v1/events", &ev);
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"], "unauthorized");
    assert_eq!(
        node.post_with("/v1/events", &ev, &[("Authorization", "Bearer wrong")])
            .status,
        401
    );
    assert_eq!(
        node.post_with(
            "/v1/events",
            &ev,
            &[("Authorization", "Bearer s3cret-token")]
        )
        .status,
        200
    );
    assert_eq!(node.get("/v1/admin/dead-letters").status, 401);
    assert_eq!(node.get("/v1/recommendations/a?k=3").status, 200);
    assert!(
        !node.log(1).contains("s3cret-token"),
        "the token must never be logged"
    );
}

#[test]
fn retention_deletes_only_what_every_consumer_checkpointed() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let extra = "
[journal]
partitions = 2
poll_interval_ms = 20
retention = true
[features]
history_len = 100000
checkpoint_every_records = 100
checkpoint_interval_ms = 100
";
    let mut node = Node::start(dir.path(), extra, &[]);
    let evs: Vec<Value> = (0..600).map(|i| json!({"event_id": format!("r{i}"), "user": format!("u{}", i % 7), "item": format!("it{i}"), "kind": "view"})).collect();
    for c in evs.chunks(100) {
        post_ok(&node, Value::Array(c.to_vec()));
    }
    let truncated = |node: &Node| {
        node.metrics()
            .lines()
            .find_map(|l| l.strip_prefix("troupe_log_truncated_records_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_until(30, "journal truncated", || truncated(&node) > 0.0);
    node.kill9();
    node.spawn();
    let total: usize = (0..7)
        .map(|u| history_items(&node, &format!("u{u}")).len())
        .sum();
    assert_eq!(total, 600, "every event survives retention and a SIGKILL");
}

fn actor_state(node: &Node, name: &str) -> Value {
    node.get("/v1/cluster").body["actors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no actor {name}"))["state"]
        .clone()
}

#[test]
fn an_error_counts_as_poison_for_every_consumer() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let mut faults = String::new();
    for (target, on) in [
        ("user_features", "err-uf"),
        ("item_stats", "err-is"),
        ("catalog", "item-err"),
    ] {
        faults.push_str(&format!(
            "[[faults]]\ntarget = \"{target}\"\naction = \"error\"\non = \"{on}\"\n"
        ));
    }
    let node = Node::start(dir.path(), &format!("{BASE}{faults}"), ALLOW);
    for (id, user) in [("err-uf", "e1"), ("err-is", "e2")] {
        post_ok(
            &node,
            json!([
                {"event_id": id, "user": user, "item": format!("{id}-x"), "kind": "view"},
                {"event_id": format!("{id}-after"), "user": user, "item": format!("{id}-after"), "kind": "view"},
            ]),
        );
    }
    assert_eq!(
        node.put("/v1/items/item-err", r#"{"text": "never applied"}"#)
            .status,
        200
    );
    assert_eq!(
        node.put("/v1/items/item-ok", r#"{"text": "applied"}"#)
            .status,
        200
    );
    // Each consumer fails three times on its record (an Err, not a panic), which is
    // counted; the record goes to the dead letters and the consumer moves on.
    wait_until(60, "three dead letters", || {
        node.get("/v1/admin/dead-letters").body["dead_letters"]
            .as_array()
            .is_some_and(|d| d.len() == 3)
    });
    let dl = node.get("/v1/admin/dead-letters").body;
    let mut consumers: Vec<String> = dl["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["attempts"], 3, "{d}");
            troupe_tests_kind(d["consumer"].as_str().unwrap())
        })
        .collect();
    consumers.sort();
    assert_eq!(consumers, vec!["catalog", "item_stats", "user_features"]);
    // The node kept running and the records after the poison ones were applied.
    assert_eq!(node.get("/healthz").status, 200);
    wait_until(30, "ready", || node.get("/readyz").status == 200);
    wait_until(30, "events after the poison record", || {
        history_items(&node, "e1") == vec!["err-uf-after".to_string()]
    });
    wait_until(30, "item after the poison record", || {
        node.get("/v1/items/item-ok").status == 200
    });
    assert_eq!(node.get("/v1/items/item-err").status, 404);
}

fn troupe_tests_kind(name: &str) -> String {
    name.split('-').next().unwrap().to_string()
}

#[test]
fn categories_applied_after_the_last_checkpoint_survive_a_kill() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    let extra = "
[journal]
partitions = 2
poll_interval_ms = 20
[features]
checkpoint_every_records = 1
checkpoint_interval_ms = 3600000
";
    let mut node = Node::start(dir.path(), extra, &[]);
    post_ok(
        &node,
        json!([
            {"user": "c1", "item": "lamp", "kind": "purchase"},
            {"user": "c2", "item": "lamp", "kind": "purchase"},
            {"user": "c3", "item": "chair", "kind": "view"},
        ]),
    );
    wait_until(30, "item stats checkpointed the events", || {
        actor_state(&node, "item_stats")["checkpoints"]
            .as_u64()
            .is_some_and(|c| c >= 1)
    });
    // The category arrives after that checkpoint.
    assert_eq!(
        node.put(
            "/v1/items/lamp",
            r#"{"text": "a lamp", "categories": ["lights"]}"#
        )
        .status,
        200
    );
    let lights = |node: &Node| -> Vec<String> {
        node.get("/v1/recommendations/newcomer?k=5&category=lights")
            .body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["item"].as_str().unwrap().to_string())
            .collect()
    };
    wait_until(30, "category applied", || lights(&node) == vec!["lamp"]);
    node.kill9();
    node.spawn();
    assert_eq!(lights(&node), vec!["lamp"], "category lost by the restart");
}

#[test]
fn after_a_kill_the_trainer_reads_every_acked_event_once_the_node_is_ready() {
    let _t = timed();
    let dir = tempfile::tempdir().unwrap();
    // Ticks are rare and nothing is checkpointed: after a kill the partitions replay the
    // whole journal, and the trainer (which reads the partitions' stores) must see every
    // acked event as soon as the node says it is ready.
    let extra = "
[journal]
partitions = 3
poll_interval_ms = 5000
[features]
checkpoint_every_records = 100000000
checkpoint_interval_ms = 3600000
[als]
min_interactions = 1000000000
";
    let mut node = Node::start(dir.path(), extra, &[]);
    let evs: Vec<Value> = (0..3000)
        .map(|i| json!({"event_id": format!("t{i}"), "user": format!("u{}", i % 50), "item": format!("i{i}"), "kind": "view"}))
        .collect();
    for c in evs.chunks(500) {
        post_ok(&node, Value::Array(c.to_vec()));
    }
    node.kill9();
    node.spawn();
    let trainer = actor_state(&node, "als_trainer");
    assert_eq!(trainer["recovering"], false, "{trainer}");
    assert_eq!(trainer["events"].as_u64(), Some(3000), "{trainer}");
    assert_eq!(trainer["users"].as_u64(), Some(50), "{trainer}");
    // A requested retrain trains on all of it.
    let r = node.post("/v1/admin/retrain", "");
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["interactions"].as_u64(), Some(3000), "{:?}", r.body);
    assert_eq!(r.body["users"].as_u64(), Some(50), "{:?}", r.body);
}
