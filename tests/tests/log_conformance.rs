//! One conformance suite for both backends of the [`Log`] and [`StateStore`] seams: the
//! embedded redb journal and state, and JetStream on a real `nats-server`, once on one
//! server and once on three servers with everything replicated three times (skipped with a
//! message where no server is installed, a failure with `TROUPE_REQUIRE_NATS=1`).
//!
//! Every check runs against each backend through the traits only. For JetStream, "another
//! node" is a second client connection; for the embedded backend it is a second handle on
//! the same store (one node).

use std::sync::Arc;
use std::time::Duration;

use troupe_actors::faults::Faults;
use troupe_actors::jetstream::{JetStream, JetStreamConfig, JetStreamLog, JetStreamState};
use troupe_actors::log::embedded::{EmbeddedLog, JournalRef};
use troupe_actors::log::{wait_head, AppendEntry, Heads, Log, LogError, Tail};
use troupe_actors::record::{partition_of, Event, Payload, CATALOG_STREAM};
use troupe_actors::settings::Settings;
use troupe_actors::state::embedded::EmbeddedState;
use troupe_actors::state::{Form, StateError, StateStore};
use troupe_actors::Ctx;
use troupe_actors::Journal;
use troupe_actors::Store;
use troupe_tests::nats::{NatsCluster, NatsServer};

const PARTITIONS: u32 = 4;

/// Two handles on one backend ("this node" and "another node").
struct Backend {
    name: &'static str,
    log: Arc<dyn Log>,
    other_log: Arc<dyn Log>,
    state: Arc<dyn StateStore>,
    other_state: Arc<dyn StateStore>,
    _keep: Box<dyn std::any::Any + Send>,
}

async fn embedded() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&dir.path().join("s.redb")).unwrap();
    let mut s = Settings::defaults("conformance");
    s.partitions = PARTITIONS;
    let ctx = Arc::new(Ctx::new(s, store.clone(), Faults::default()));
    let (journal, _) = ractor::Actor::spawn(None, Journal, ctx.clone())
        .await
        .unwrap();
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::new(
        store.clone(),
        ctx.heads.clone(),
        ctx.tail.clone(),
        JournalRef::Actor(journal.clone()),
        Duration::from_secs(10),
    ));
    let state: Arc<dyn StateStore> = Arc::new(EmbeddedState::new(store));
    Backend {
        name: "embedded",
        other_log: log.clone(),
        log,
        other_state: state.clone(),
        state,
        _keep: Box::new((dir, journal)),
    }
}

async fn jetstream() -> Option<Backend> {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap()?;
    let url = server.url();
    Some(jetstream_on(&url, 1, "conformance", Box::new(server), String::new).await)
}

/// Three servers forming one JetStream cluster, shared by the checks that run at the same
/// time (each on its own stream): started by the first, stopped when the last is done.
static R3: std::sync::Mutex<std::sync::Weak<NatsCluster>> =
    std::sync::Mutex::new(std::sync::Weak::new());

/// The backend on three servers with every stream and bucket replicated three times;
/// `stream`: the check's own stream.
async fn jetstream_r3(stream: &str) -> Option<Backend> {
    let cluster = tokio::task::spawn_blocking(|| {
        let mut shared = R3.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = shared.upgrade() {
            return Some(c);
        }
        let c = Arc::new(NatsCluster::start()?);
        *shared = Arc::downgrade(&c);
        Some(c)
    })
    .await
    .unwrap()?;
    let urls = cluster.urls();
    let logs = cluster.clone();
    let log = move || {
        logs.servers
            .iter()
            .map(|s| format!("--- {}:\n{}", s.name, s.log()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Some(jetstream_on(&urls, 3, stream, Box::new(cluster), log).await)
}

/// Two connections ("this node" and "another node") to the servers at `url`, on
/// `stream` with `replicas`; `keep` is held for as long as the backend lives.
async fn jetstream_on(
    url: &str,
    replicas: usize,
    stream: &str,
    keep: Box<dyn std::any::Any + Send>,
    server_log: impl Fn() -> String,
) -> Backend {
    let connect = || async {
        let mut c = JetStreamConfig::local(url, stream, PARTITIONS);
        c.timeout = Duration::from_secs(20);
        c.replicas = replicas;
        JetStream::connect(c)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}\n{}", server_log()))
    };
    let (a, b) = (connect().await, connect().await);
    assert!(
        a.server_version().starts_with('2'),
        "{}",
        a.server_version()
    );
    let open = |js: JetStream| async move {
        let heads = Arc::new(Heads::new(PARTITIONS));
        let tail = Arc::new(Tail::new(1000));
        let log: Arc<dyn Log> = Arc::new(JetStreamLog::open(js, heads, tail).await.unwrap());
        log
    };
    let log = open(a.clone()).await;
    let other_log = open(b.clone()).await;
    Backend {
        name: if replicas == 1 {
            "jetstream"
        } else {
            "jetstream-r3"
        },
        log,
        other_log,
        state: Arc::new(JetStreamState::new(a)),
        other_state: Arc::new(JetStreamState::new(b)),
        _keep: keep,
    }
}

/// Runs one check on every backend.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$check(&super::embedded().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jetstream() {
                if let Some(b) = super::jetstream().await {
                    super::$check(&b).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jetstream_r3() {
                if let Some(b) = super::jetstream_r3(stringify!($check)).await {
                    super::$check(&b).await;
                }
            }
        }
    )*};
}

conformance!(
    appends_acknowledge_positions_and_drop_duplicates,
    reads_follow_sparse_offsets_with_limits_across_batches,
    heads_move_and_can_be_waited_for,
    truncation_deletes_below_a_position_and_marks_it,
    records_compare_and_set,
    claims_fence_a_deposed_owner,
    checkpoints_replace_atomically_and_deltas_follow,
    failure_counts_and_dead_letters_are_fenced,
    snapshots_of_8_mib_and_more_round_trip,
    constants_are_stored_once,
    cache_entries_are_shared_and_namespaced,
    large_concurrent_appends_land_where_their_positions_say,
);

/// An event of `user` on `item`; its key is derived from its id.
fn event(user: &str, item: &str, id: &str) -> AppendEntry {
    AppendEntry::new(
        partition_of(user, PARTITIONS),
        Payload::Event(Event {
            event_id: Some(id.to_string()),
            user: user.to_string(),
            item: item.to_string(),
            kind: "view".into(),
            value: None,
            ts_ms: 1_700_000_000_000,
            request_id: None,
        }),
    )
}

/// A user whose events go to partition `p`.
fn user_in(p: u32) -> String {
    (0..)
        .map(|i| format!("user{i}"))
        .find(|u| partition_of(u, PARTITIONS) == p)
        .unwrap()
}

async fn appends_acknowledge_positions_and_drop_duplicates(b: &Backend) {
    let (u0, u1) = (user_in(0), user_in(1));
    let first = b
        .log
        .append(vec![
            event(&u0, "a", "e1"),
            event(&u1, "b", "e2"),
            event(&u0, "c", "e3"),
            AppendEntry::new(CATALOG_STREAM, Payload::ItemDelete { id: "x".into() }),
        ])
        .await
        .unwrap();
    assert_eq!(first.len(), 4, "{}", b.name);
    assert!(first.iter().all(|p| !p.duplicate && p.offset > 0));
    assert_eq!(
        first.iter().map(|p| p.stream).collect::<Vec<_>>(),
        vec![0, 1, 0, CATALOG_STREAM]
    );
    assert!(first[2].offset > first[0].offset, "offsets grow per stream");
    // A retry (same keys, possibly through another node) stores nothing again and
    // answers the original positions; a key twice in one request is stored once.
    let again = b
        .other_log
        .append(vec![
            event(&u0, "c", "e3"),
            event(&u1, "b", "e2"),
            event(&u1, "z", "e9"),
            event(&u1, "z", "e9"),
        ])
        .await
        .unwrap();
    assert_eq!(
        again
            .iter()
            .map(|p| (p.offset, p.duplicate))
            .collect::<Vec<_>>()[..2],
        [(first[2].offset, true), (first[1].offset, true)],
        "{}",
        b.name
    );
    assert!(!again[2].duplicate);
    assert_eq!(
        (again[3].offset, again[3].duplicate),
        (again[2].offset, true)
    );
    let read = b.log.read(1, 0, u64::MAX, 100).await.unwrap();
    assert_eq!(
        read.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![first[1].offset, again[2].offset],
        "{}: each record stored once",
        b.name
    );
    // Key 0 is never deduplicated.
    let mut e = event(&u0, "k", "k");
    e.key = 0;
    let two = b.log.append(vec![e.clone(), e]).await.unwrap();
    assert!(two.iter().all(|p| !p.duplicate) && two[1].offset > two[0].offset);
    // An entry for a stream that does not exist is refused, nothing written.
    let bad = b
        .log
        .append(vec![
            event(&u0, "ok", "ok1"),
            AppendEntry {
                stream: 99,
                ..event(&u0, "x", "x")
            },
        ])
        .await;
    assert!(
        matches!(bad, Err(LogError::Refused(_))),
        "{}: {bad:?}",
        b.name
    );
    assert_eq!(b.log.append(Vec::new()).await.unwrap(), Vec::new());
}

/// Appends bigger than one server batch (1,000), several at once from two nodes, over
/// every partition: each position names the record it was given for, and a retry of a
/// whole request answers every original position as a duplicate.
async fn large_concurrent_appends_land_where_their_positions_say(b: &Backend) {
    let users: Vec<String> = (0..PARTITIONS).map(user_in).collect();
    let request = |tag: usize| -> Vec<AppendEntry> {
        (0..2_500)
            .map(|i| {
                event(
                    &users[i % users.len()],
                    &format!("r{tag}-{i}"),
                    &format!("id-{tag}-{i}"),
                )
            })
            .collect()
    };
    let sent: Vec<Vec<AppendEntry>> = (0..4).map(request).collect();
    // An append the log calls unavailable (a replicated stream electing, no responders)
    // is retried with the same ids, as callers are told to: each entry is stored once.
    let appends = sent.iter().enumerate().map(|(i, entries)| async move {
        let log = if i % 2 == 0 { &b.log } else { &b.other_log };
        let mut tries = 0;
        loop {
            tries += 1;
            match log.append(entries.clone()).await {
                Err(LogError::Unavailable(_)) if tries < 5 => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                r => return r,
            }
        }
    });
    let results = futures_util::future::join_all(appends).await;
    let mut at: std::collections::HashMap<(u32, u64), String> = Default::default();
    for (entries, r) in sent.iter().zip(results) {
        let positions = r.unwrap_or_else(|e| panic!("{}: {e}", b.name));
        assert_eq!(positions.len(), entries.len());
        for (e, p) in entries.iter().zip(&positions) {
            // `duplicate` may be set here: an append retried after a partial store (by
            // this test on `Unavailable`, or by the log itself on "no responders") finds
            // what the earlier attempt stored. What must hold is below: one record per
            // position, and each the record it was given for.
            assert_eq!(p.stream, e.stream);
            let Payload::Event(ev) = &e.payload else {
                unreachable!()
            };
            let clash = at.insert((p.stream, p.offset), ev.item.clone());
            assert!(clash.is_none(), "{}: two records at one position", b.name);
        }
    }
    for p in 0..PARTITIONS {
        let mut after = 0;
        loop {
            let read = b.log.read(p, after, u64::MAX, 4096).await.unwrap();
            let Some(last) = read.records.last().map(|r| r.offset) else {
                break;
            };
            for r in &read.records {
                let Payload::Event(ev) = &r.payload else {
                    continue;
                };
                if let Some(item) = at.remove(&(p, r.offset)) {
                    assert_eq!(item, ev.item, "{}: position {p}/{}", b.name, r.offset);
                }
            }
            after = last;
        }
    }
    assert!(
        at.is_empty(),
        "{}: {} positions hold no record",
        b.name,
        at.len()
    );
    // The whole first request again: every entry a duplicate at its first position.
    let first = b.log.append(sent[0].clone()).await.unwrap();
    let again = b.other_log.append(sent[0].clone()).await.unwrap();
    assert!(again.iter().all(|p| p.duplicate), "{}", b.name);
    assert_eq!(
        again.iter().map(|p| p.offset).collect::<Vec<_>>(),
        first.iter().map(|p| p.offset).collect::<Vec<_>>()
    );
}

async fn reads_follow_sparse_offsets_with_limits_across_batches(b: &Backend) {
    let (u0, u1) = (user_in(0), user_in(1));
    let mut want = Vec::new();
    for batch in 0..10 {
        let mut entries = Vec::new();
        for i in 0..7 {
            entries.push(event(
                &u0,
                &format!("i{batch}-{i}"),
                &format!("a{batch}-{i}"),
            ));
            entries.push(event(&u1, "other", &format!("b{batch}-{i}")));
        }
        let pos = b.log.append(entries.clone()).await.unwrap();
        for (p, e) in pos.iter().zip(entries) {
            if p.stream == 0 {
                want.push((p.offset, e.key, e.payload));
            }
        }
    }
    let head = b.log.refresh_head(0).await.unwrap();
    assert_eq!(head, want.last().unwrap().0, "{}", b.name);
    // In chunks of 5: every record once, in order, with its key and payload.
    let mut got = Vec::new();
    let mut after = 0;
    loop {
        let r = b.log.read(0, after, head, 5).await.unwrap();
        assert!(r.records.len() <= 5);
        assert_eq!(r.truncated, 0);
        let Some(last) = r.records.last() else { break };
        after = last.offset;
        for rec in r.records {
            assert_eq!(rec.stream, 0);
            assert!(rec.at_ms > 1_600_000_000_000, "append time {}", rec.at_ms);
            got.push((rec.offset, rec.key, rec.payload.clone()));
        }
    }
    assert_eq!(got, want, "{}", b.name);
    // Up to a target between records: stops at the last record not after it.
    let (o3, o4) = (want[3].0, want[4].0);
    let r = b.log.read(0, 0, o4 - 1, 100).await.unwrap();
    assert_eq!(r.records.last().map(|r| r.offset), Some(o3));
    // Starting between records: the next one held.
    let r = b.log.read(0, o3, o4, 100).await.unwrap();
    assert_eq!(
        r.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![o4]
    );
    // Nothing after the head, nothing when the window is empty.
    assert!(b
        .log
        .read(0, head, u64::MAX, 10)
        .await
        .unwrap()
        .records
        .is_empty());
    assert!(b.log.read(0, o4, o3, 10).await.unwrap().records.is_empty());
    assert!(b
        .log
        .read(2, 0, u64::MAX, 10)
        .await
        .unwrap()
        .records
        .is_empty());
    // Another node reads the same records.
    let r = b.other_log.read(0, 0, head, 1000).await.unwrap();
    assert_eq!(r.records.len(), want.len());
}

async fn heads_move_and_can_be_waited_for(b: &Backend) {
    let u = user_in(3);
    let rx = b.other_log.head(3);
    let start = *rx.borrow();
    let pos = b.log.append(vec![event(&u, "h", "h1")]).await.unwrap();
    let target = pos[0].offset;
    // Both nodes learn it from the log.
    let mine = wait_head(b.log.as_ref(), 3, target, Duration::from_secs(20)).await;
    assert_eq!(mine, target, "{}", b.name);
    let seen = wait_head(b.other_log.as_ref(), 3, target, Duration::from_secs(20)).await;
    assert_eq!(seen, target, "{}", b.name);
    assert!(rx.has_changed().unwrap() || start == target);
    // A wait that cannot be met runs out and reports the head it saw.
    let short = wait_head(
        b.log.as_ref(),
        3,
        target + 1_000_000,
        Duration::from_millis(50),
    )
    .await;
    assert_eq!(short, target);
    assert_eq!(b.other_log.refresh_head(3).await.unwrap(), target);
}

async fn truncation_deletes_below_a_position_and_marks_it(b: &Backend) {
    let u = user_in(2);
    let mut offsets = Vec::new();
    for i in 0..20 {
        let p = b
            .log
            .append(vec![event(&u, "t", &format!("t{i}"))])
            .await
            .unwrap();
        offsets.push(p[0].offset);
    }
    let deleted = b.log.truncate(2, offsets[10]).await.unwrap();
    assert_eq!(deleted, 10, "{}", b.name);
    let r = b.other_log.read(2, 0, u64::MAX, 100).await.unwrap();
    assert_eq!(
        r.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        offsets[10..].to_vec(),
        "{}",
        b.name
    );
    // The mark covers what was deleted and nothing that was kept.
    assert!(
        r.truncated >= offsets[9] && r.truncated < offsets[10],
        "{}: {}",
        b.name,
        r.truncated
    );
    // Truncating again below the mark deletes nothing and never lowers it.
    assert_eq!(b.log.truncate(2, offsets[5]).await.unwrap(), 0);
    let again = b.log.read(2, offsets[12], u64::MAX, 100).await.unwrap();
    assert_eq!(again.truncated, r.truncated);
    assert_eq!(
        again.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        offsets[13..].to_vec(),
        "{}",
        b.name
    );
    // Appends continue above the head.
    let p = b.log.append(vec![event(&u, "t", "t-after")]).await.unwrap();
    assert!(p[0].offset > offsets[19]);
}

async fn records_compare_and_set(b: &Backend) {
    let s = &b.state;
    let r1 = s
        .compare_and_set("rec.a", b"one".to_vec(), None)
        .await
        .unwrap();
    let taken = s.compare_and_set("rec.a", b"two".to_vec(), None).await;
    assert!(
        matches!(&taken, Err(StateError::Conflict { found: Some(r), .. }) if *r == r1),
        "{}: {taken:?}",
        b.name
    );
    let r2 = b
        .other_state
        .compare_and_set("rec.a", b"two".to_vec(), Some(r1))
        .await
        .unwrap();
    assert!(r2 > r1);
    let stale = s
        .compare_and_set("rec.a", b"three".to_vec(), Some(r1))
        .await;
    assert!(
        matches!(stale, Err(StateError::Conflict { .. })),
        "{}: {stale:?}",
        b.name
    );
    let got = s.get("rec.a").await.unwrap().unwrap();
    assert_eq!((got.value.as_slice(), got.revision), (&b"two"[..], r2));
    let r3 = s.put("rec.b", b"x".to_vec()).await.unwrap();
    assert!(r3 > r2, "revisions only grow");
    assert_eq!(s.keys("rec.").await.unwrap(), vec!["rec.a", "rec.b"]);
    s.delete("rec.b").await.unwrap();
    assert_eq!(s.get("rec.b").await.unwrap(), None);
    assert_eq!(s.keys("rec.").await.unwrap(), vec!["rec.a"]);
    // Deleted, then created again.
    let r4 = s
        .compare_and_set("rec.b", b"y".to_vec(), None)
        .await
        .unwrap();
    assert!(r4 > r3);
}

async fn claims_fence_a_deposed_owner(b: &Backend) {
    let scope = "user_features-1";
    let mut a = b.state.claim(scope, "node-a").await.unwrap();
    assert_eq!((a.epoch(), a.owner()), (1, "node-a"));
    b.state
        .checkpoint(&mut a, Form::Full, b"state-a".to_vec(), vec![(1, 10)])
        .await
        .unwrap();
    // Another node claims: epoch 2. The first owner's next writes are refused before
    // the new owner wrote anything.
    let mut n = b.other_state.claim(scope, "node-b").await.unwrap();
    assert_eq!((n.epoch(), n.owner()), (2, "node-b"));
    let refused = b
        .state
        .checkpoint(&mut a, Form::Delta, b"late".to_vec(), vec![(1, 11)])
        .await;
    assert!(
        matches!(&refused, Err(StateError::Fenced { owner, epoch: 2, .. }) if owner == "node-b"),
        "{}: {refused:?}",
        b.name
    );
    let refused = b.state.count_failure(&mut a, 1, 11).await;
    assert!(
        matches!(refused, Err(StateError::Fenced { .. })),
        "{refused:?}"
    );
    let refused = b.state.dead_letter(&mut a, 1, 11, b"doc".to_vec()).await;
    assert!(
        matches!(refused, Err(StateError::Fenced { .. })),
        "{refused:?}"
    );
    // The new owner sees the old owner's last checkpoint, nothing of the refused writes.
    let loaded = b.other_state.load(scope).await.unwrap().unwrap();
    assert_eq!(loaded.base.as_deref(), Some(&b"state-a"[..]));
    assert!(loaded.deltas.is_empty());
    assert_eq!(loaded.pointer.positions, vec![(1, 10)]);
    assert!(loaded.pointer.failures.is_empty() && loaded.pointer.dead_letters.is_empty());
    assert_eq!(
        b.state
            .blob_names(&format!("cp/{scope}/"))
            .await
            .unwrap()
            .len(),
        1,
        "{}: the refused checkpoint's blob is gone",
        b.name
    );
    b.other_state
        .checkpoint(&mut n, Form::Delta, b"d1".to_vec(), vec![(1, 12)])
        .await
        .unwrap();
    // Two claims racing from the same read: one wins, the other is told.
    let (p, rev) = b.state.pointer(scope).await.unwrap().unwrap();
    assert_eq!((p.epoch, rev), (2, n.revision()));
    let c1 = b.state.claim(scope, "node-c").await.unwrap();
    assert_eq!(c1.epoch(), 3);
    let same = |_: &troupe_actors::state::Pointer| Some(p.clone());
    let lost = b.other_state.fenced_update(&mut n, &same).await;
    assert!(
        matches!(lost, Err(StateError::Fenced { epoch: 3, .. })),
        "{lost:?}"
    );
    // A scope nobody claimed has no pointer and no checkpoint.
    assert!(b.state.load("never").await.unwrap().is_none());
}

async fn checkpoints_replace_atomically_and_deltas_follow(b: &Backend) {
    let scope = "item_stats";
    let mut c = b.state.claim(scope, "node-a").await.unwrap();
    b.state
        .checkpoint(
            &mut c,
            Form::Full,
            b"base-1".to_vec(),
            vec![(0, 5), (CATALOG_STREAM, 2)],
        )
        .await
        .unwrap();
    for i in 0..3u64 {
        b.state
            .checkpoint(
                &mut c,
                Form::Delta,
                format!("delta-{i}").into_bytes(),
                vec![(0, 6 + i)],
            )
            .await
            .unwrap();
    }
    let l = b.other_state.load(scope).await.unwrap().unwrap();
    assert_eq!(l.base.as_deref(), Some(&b"base-1"[..]));
    assert_eq!(
        l.deltas,
        vec![
            b"delta-0".to_vec(),
            b"delta-1".to_vec(),
            b"delta-2".to_vec()
        ],
        "{}: deltas in order",
        b.name
    );
    assert_eq!(l.pointer.positions, vec![(0, 8)]);
    // A full checkpoint replaces base and deltas; their blobs are deleted.
    b.state
        .checkpoint(&mut c, Form::Full, b"base-2".to_vec(), vec![(0, 9)])
        .await
        .unwrap();
    let l = b.other_state.load(scope).await.unwrap().unwrap();
    assert_eq!(
        (l.base.as_deref(), l.deltas.len()),
        (Some(&b"base-2"[..]), 0)
    );
    assert_eq!(
        b.state.blob_names(&format!("cp/{scope}/")).await.unwrap(),
        vec![l.pointer.base.clone().unwrap()],
        "{}",
        b.name
    );
    // The claim survives a reload: a new claim keeps the checkpoint.
    let again = b.other_state.claim(scope, "node-a").await.unwrap();
    assert_eq!(again.pointer.base, l.pointer.base);
    assert_eq!(again.epoch(), c.epoch() + 1);
}

async fn failure_counts_and_dead_letters_are_fenced(b: &Backend) {
    let scope = "catalog";
    let mut c = b.state.claim(scope, "node-a").await.unwrap();
    assert_eq!(
        b.state
            .count_failure(&mut c, CATALOG_STREAM, 7)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        b.state
            .count_failure(&mut c, CATALOG_STREAM, 7)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        b.state
            .count_failure(&mut c, CATALOG_STREAM, 9)
            .await
            .unwrap(),
        1
    );
    // Counts survive the owner: the next claim sees them.
    let mut n = b.other_state.claim(scope, "node-b").await.unwrap();
    assert_eq!(
        n.pointer.failures,
        vec![(CATALOG_STREAM, 7, 2), (CATALOG_STREAM, 9, 1)],
        "{}",
        b.name
    );
    b.other_state
        .dead_letter(&mut n, CATALOG_STREAM, 7, b"{\"why\":\"poison\"}".to_vec())
        .await
        .unwrap();
    assert_eq!(n.pointer.failures, vec![(CATALOG_STREAM, 9, 1)]);
    let dead = b.state.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{}", b.name);
    assert_eq!(
        (dead[0].scope.as_str(), dead[0].doc.as_slice()),
        (scope, &b"{\"why\":\"poison\"}"[..])
    );
    // The deposed owner cannot add one.
    assert!(b
        .state
        .dead_letter(&mut c, CATALOG_STREAM, 9, b"x".to_vec())
        .await
        .is_err());
    assert_eq!(b.state.dead_letters().await.unwrap().len(), 1);
}

async fn snapshots_of_8_mib_and_more_round_trip(b: &Backend) {
    // Not compressible, not a repeated pattern: a chunking error cannot go unnoticed.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..(9 << 20) + 12_345)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut c = b.state.claim("als_trainer", "node-a").await.unwrap();
    b.state
        .checkpoint(&mut c, Form::Full, big.clone(), vec![])
        .await
        .unwrap();
    let l = b.other_state.load("als_trainer").await.unwrap().unwrap();
    assert!(
        l.base.as_deref() == Some(big.as_slice()),
        "{}: 9 MiB snapshot differs",
        b.name
    );
    // Replaced by a smaller one: readers get exactly the new bytes.
    b.state
        .checkpoint(&mut c, Form::Full, big[..(8 << 20)].to_vec(), vec![])
        .await
        .unwrap();
    let l = b.other_state.load("als_trainer").await.unwrap().unwrap();
    assert!(l.base.as_deref() == Some(&big[..(8 << 20)]), "{}", b.name);
    // Plain blobs too.
    b.state.put_blob("model/als/7", big.clone()).await.unwrap();
    assert!(
        b.other_state
            .get_blob("model/als/7")
            .await
            .unwrap()
            .as_deref()
            == Some(big.as_slice())
    );
    assert_eq!(b.state.get_blob("model/als/8").await.unwrap(), None);
    b.state.delete_blob("model/als/7").await.unwrap();
    assert_eq!(b.state.get_blob("model/als/7").await.unwrap(), None);
    b.state.delete_blob("model/als/7").await.unwrap();
}

async fn constants_are_stored_once(b: &Backend) {
    let first = b
        .state
        .constant("const.partitions", b"4".to_vec())
        .await
        .unwrap();
    assert_eq!(first, b"4");
    let other = b
        .other_state
        .constant("const.partitions", b"8".to_vec())
        .await
        .unwrap();
    assert_eq!(other, b"4", "{}: the first writer's value stays", b.name);
}

async fn cache_entries_are_shared_and_namespaced(b: &Backend) {
    let row = |x: u8| vec![x; 1536];
    let ns = "encoder with spaces/and:odd chars";
    b.state
        .cache_put(ns, vec![(1, row(1)), (u128::MAX, row(2))])
        .await
        .unwrap();
    // Another handle (another node) reads what this one cached; missing keys are None.
    // Cache reads may go to a replica that has not applied the write yet (a stale read
    // only costs a recomputation), so the other handle sees the entries soon, not at once.
    let want = vec![Some(row(1)), None, Some(row(2))];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while std::time::Instant::now() < deadline {
        got = b
            .other_state
            .cache_get(ns, &[1, 7, u128::MAX])
            .await
            .unwrap();
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got, want, "{}", b.name);
    // Another namespace (another encoder) does not see them.
    let other = b.other_state.cache_get("other", &[1]).await.unwrap();
    assert_eq!(other, vec![None], "{}", b.name);
    // Cache entries are not scopes: dead letters and scope listings ignore them.
    assert!(b.state.dead_letters().await.unwrap().is_empty());
}
