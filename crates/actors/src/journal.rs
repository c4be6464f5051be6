//! The Journal: durable, partitioned, append-only log with group commit and idempotency.
//!
//! Appends from every partition wait in this actor's mailbox while a commit is under way;
//! the next `Flush` takes all of them (up to `max_commit_records`) into one store commit
//! (one fsync), then acks each caller with `{stream, offset}` per record. A record whose
//! idempotency key was acked within the window (bounded in count by
//! `idempotency_max_keys`; the oldest keys leave first) is not appended again; its original
//! position is returned with `duplicate: true`.
//!
//! Entries are checked at the boundary: an event or erasure must name its user's
//! partition, an item operation the catalog stream; a request with any other entry is
//! refused whole. Offsets come from the store's persisted heads, so none is handed out
//! twice, whatever was cut from a torn tail.
//!
//! On a commit error (fsync failure, full disk) the journal answers every caller in the
//! batch with an error, marks the node unready, and fails: the supervisor restarts it,
//! and the new incarnation reloads offsets and keys from disk. The failed commit is never
//! retried (after a failed fsync the page cache cannot be trusted).

use crate::Discard;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use rustc_hash::FxHashMap;

use crate::ctx::Ctx;
use crate::faults::FaultAction;
use crate::messages::{Observation, RecordBatch};
use crate::metrics::label;
use crate::metrics::stream_label;
use crate::names;
use crate::record::{Record, CATALOG_STREAM};
use crate::store::JournalBatch;
use crate::supervisor::Fatal;

pub use troupe_proto::log::{AppendEntry, Position};

/// Records to append.
#[derive(Debug, Clone, Default)]
pub struct AppendRequest {
    pub entries: Vec<AppendEntry>,
}

impl AppendRequest {
    pub fn new(entries: Vec<AppendEntry>) -> Self {
        AppendRequest { entries }
    }
}

/// Answer to an append: one position per entry, or an error for the whole request.
#[derive(Debug, Clone, Default)]
pub struct AppendReply {
    pub positions: Vec<Position>,
    pub error: Option<String>,
}

#[derive(RactorMessage)]
pub enum JournalMsg {
    Append(AppendRequest, RpcReplyPort<AppendReply>),
    /// Commit what is pending (sent to itself).
    Flush,
    Observe(RpcReplyPort<Observation>),
}

pub struct Journal;

pub struct JournalState {
    ctx: Arc<Ctx>,
    /// Per stream, the highest offset ever assigned: the next record gets one more.
    next: FxHashMap<u32, u64>,
    /// Per stream, the offset of the last record the log holds (what consumers reach).
    last: FxHashMap<u32, u64>,
    idem: Idempotency,
    pending: VecDeque<(AppendRequest, RpcReplyPort<AppendReply>)>,
    flush_scheduled: bool,
    commits: u64,
    records: u64,
    duplicates: u64,
}

/// The keys acked within the idempotency window, bounded in count (the oldest leave
/// first): key -> (stream, offset), with the time each was acked.
///
/// Kept compact (about 50 bytes per key at the million-key default): the entries live
/// once, oldest first, in a ring addressed by a wrapping 32-bit sequence number, and a
/// hash table holds only sequence numbers (a key is already a 128-bit hash; its low half
/// is the table's hash). The ring never holds 2^32 entries (`max` is far below), so a
/// sequence number's distance from the first one is its position.
struct Idempotency {
    ring: VecDeque<Acked>,
    /// Sequence number of `ring[0]`.
    first: u32,
    table: hashbrown::HashTable<u32>,
    max: usize,
}

/// One acked key, 40 bytes.
#[derive(Debug, Clone, Copy)]
struct Acked {
    key: [u64; 2],
    at: i64,
    offset: u64,
    stream: u32,
}

fn split_key(key: u128) -> [u64; 2] {
    [key as u64, (key >> 64) as u64]
}

impl Idempotency {
    fn new(mut keys: Vec<(u128, u32, u64, i64)>, max: usize) -> Self {
        keys.sort_unstable_by_key(|k| k.3);
        let skip = keys.len().saturating_sub(max);
        let mut i = Idempotency {
            ring: VecDeque::new(),
            first: 0,
            table: hashbrown::HashTable::new(),
            max: max.min(u32::MAX as usize / 2),
        };
        for (k, s, o, at) in keys.into_iter().skip(skip) {
            i.insert(k, s, o, at);
        }
        i
    }

    fn entry(&self, seq: u32) -> &Acked {
        &self.ring[seq.wrapping_sub(self.first) as usize]
    }

    fn find(&self, key: [u64; 2]) -> Option<u32> {
        self.table
            .find(key[0], |&q| self.entry(q).key == key)
            .copied()
    }

    fn get(&self, key: u128) -> Option<(u32, u64)> {
        let e = self.entry(self.find(split_key(key))?);
        Some((e.stream, e.offset))
    }

    fn insert(&mut self, key: u128, stream: u32, offset: u64, at: i64) {
        let key = split_key(key);
        let seq = self.first.wrapping_add(self.ring.len() as u32);
        self.ring.push_back(Acked {
            key,
            at,
            offset,
            stream,
        });
        // A key inserted again points at its newest entry; the older one is dead.
        let (ring, first) = (&self.ring, self.first);
        match self
            .table
            .find_mut(key[0], |&q| ring[q.wrapping_sub(first) as usize].key == key)
        {
            Some(q) => *q = seq,
            None => {
                self.table.insert_unique(key[0], seq, |&q| {
                    ring[q.wrapping_sub(first) as usize].key[0]
                });
            }
        }
        while self.table.len() > self.max {
            self.pop_oldest();
        }
    }

    /// Forgets keys acked before `horizon`; returns how many.
    fn expire(&mut self, horizon: i64) -> usize {
        let mut n = 0;
        while self.ring.front().is_some_and(|e| e.at < horizon) {
            n += usize::from(self.pop_oldest());
        }
        n
    }

    /// Drops the oldest entry; true when it was its key's live one.
    fn pop_oldest(&mut self) -> bool {
        let Some(&e) = self.ring.front() else {
            return false;
        };
        let seq = self.first;
        let live = match self.table.find_entry(e.key[0], |&q| q == seq) {
            Ok(slot) => {
                slot.remove();
                true
            }
            Err(_) => false,
        };
        self.ring.pop_front();
        self.first = self.first.wrapping_add(1);
        live
    }

    fn len(&self) -> usize {
        self.table.len()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn reply_error(port: RpcReplyPort<AppendReply>, msg: &str) {
    port.send(AppendReply {
        positions: Vec::new(),
        error: Some(msg.to_string()),
    })
    .discard();
}

impl Actor for Journal {
    type Msg = JournalMsg;
    type State = JournalState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _: ActorRef<JournalMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<JournalState, ActorProcessingErr> {
        let store = ctx.store.clone();
        let streams = ctx.streams();
        let window = ctx.settings.idempotency_window.as_millis() as i64;
        let partitions = ctx.settings.partitions;
        let (next, last, keys) = tokio::task::spawn_blocking(
            move || -> Result<_, ActorProcessingErr> {
                // Records in streams the config does not have would belong to users that
                // now hash elsewhere: refuse rather than serve a split history.
                if let Some(s) = store
                    .streams()?
                    .into_iter()
                    .find(|&s| s != CATALOG_STREAM && s >= partitions)
                {
                    return Err(Fatal(format!("the store holds records of partition {s} but journal.partitions is {partitions}; the partition count is fixed for the life of the data")).into());
                }
                let mut next = FxHashMap::default();
                let mut last = FxHashMap::default();
                for s in streams {
                    next.insert(s, store.next_after(s)?);
                    last.insert(s, store.last_offset(s)?);
                }
                let keys = store.idempotency_window(now_ms() - window)?;
                Ok((next, last, keys))
            },
        )
        .await??;
        let idem = Idempotency::new(keys, ctx.settings.idempotency_max_keys.max(1));
        // A new incarnation may not continue what the tail held (a failed commit).
        ctx.tail.reset();
        for (&s, &o) in &last {
            ctx.heads.set(s, o);
            ctx.metrics
                .journal_head
                .get_or_create(&label("stream", stream_label(s)))
                .set(o as i64);
        }
        ctx.metrics.idempotency_keys.set(idem.len() as i64);
        ctx.health.journal_failed.store(false, Ordering::Relaxed);
        tracing::info!(
            streams = next.len(),
            idempotency_keys = idem.len(),
            "journal opened"
        );
        Ok(JournalState {
            ctx,
            next,
            last,
            idem,
            pending: VecDeque::new(),
            flush_scheduled: false,
            commits: 0,
            records: 0,
            duplicates: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<JournalMsg>,
        msg: JournalMsg,
        st: &mut JournalState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JournalMsg::Append(req, port) => {
                if st.ctx.health.draining.load(Ordering::Relaxed) {
                    reply_error(port, "node is shutting down");
                    return Ok(());
                }
                if let Err(e) = st.ctx.check_entries(&req.entries) {
                    reply_error(port, &e);
                    return Ok(());
                }
                st.pending.push_back((req, port));
                if !st.flush_scheduled {
                    st.flush_scheduled = true;
                    myself.send_message(JournalMsg::Flush)?;
                }
            }
            JournalMsg::Flush => {
                st.flush_scheduled = false;
                flush(st).await?;
                if !st.pending.is_empty() {
                    st.flush_scheduled = true;
                    myself.send_message(JournalMsg::Flush)?;
                }
            }
            JournalMsg::Observe(port) => {
                let heads: Vec<(String, u64)> = {
                    let mut v: Vec<_> = st.last.iter().map(|(&s, &o)| (s, o)).collect();
                    v.sort_unstable();
                    v.into_iter().map(|(s, o)| (stream_label(s), o)).collect()
                };
                port.send(Observation::new(
                    names::JOURNAL,
                    serde_json::json!({
                        "heads": heads,
                        "commits": st.commits,
                        "records": st.records,
                        "duplicates": st.duplicates,
                        "idempotency_keys": st.idem.len(),
                        "pending_requests": st.pending.len(),
                    }),
                ))
                .discard();
            }
        }
        Ok(())
    }
}

/// One group commit.
async fn flush(st: &mut JournalState) -> Result<(), ActorProcessingErr> {
    let ctx = st.ctx.clone();
    let max = ctx.settings.max_commit_records.max(1);
    let mut batch = Vec::new();
    let mut n = 0;
    while let Some((req, _)) = st.pending.front() {
        if n > 0 && n + req.entries.len() > max {
            break;
        }
        n += req.entries.len();
        batch.extend(st.pending.pop_front());
    }
    if batch.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut next = st.next.clone();
    let mut fresh: FxHashMap<u128, (u32, u64)> = FxHashMap::default();
    // One batch (one row) per stream, records encoded straight into it.
    let mut batches: FxHashMap<u32, JournalBatch> = FxHashMap::default();
    let mut committed: Vec<Record> = Vec::with_capacity(n);
    let mut traces: Vec<(u32, u64, String)> = Vec::new();
    let mut replies = Vec::with_capacity(batch.len());
    let mut injected = false;
    for (req, port) in batch {
        let mut positions = Vec::with_capacity(req.entries.len());
        for AppendEntry {
            stream,
            key,
            payload,
            trace,
        } in req.entries
        {
            if key != 0 {
                if let Some((s, o)) = st.idem.get(key).or_else(|| fresh.get(&key).copied()) {
                    positions.push(Position {
                        stream: s,
                        offset: o,
                        duplicate: true,
                    });
                    continue;
                }
            }
            let off = next.entry(stream).or_insert(0);
            *off += 1;
            let offset = *off;
            if key != 0 {
                fresh.insert(key, (stream, offset));
            }
            if let Some(t) = &trace {
                traces.push((stream, offset, t.clone()));
            }
            let rec = Record {
                stream,
                offset,
                key,
                at_ms: now,
                payload,
                trace,
            };
            if let Some(FaultAction::Error) = ctx.faults.on_record("journal", &rec) {
                injected = true;
            }
            batches
                .entry(stream)
                .or_insert_with(|| JournalBatch::new(stream, offset, now))
                .push(key, &rec.payload);
            committed.push(rec);
            positions.push(Position {
                stream,
                offset,
                duplicate: false,
            });
        }
        replies.push((port, positions));
    }
    // Keys that left the window are deleted in the same commit.
    let horizon = now - ctx.settings.idempotency_window.as_millis() as i64;
    let expired = st.idem.expire(horizon);
    let started = Instant::now();
    let result = if batches.is_empty() && expired == 0 {
        Ok(())
    } else if injected {
        Err("injected commit failure".to_string())
    } else {
        let store = ctx.store.clone();
        let batches: Vec<JournalBatch> = batches.into_values().collect();
        let keys: Vec<(u128, u32, u64)> = fresh.iter().map(|(&k, &(s, o))| (k, s, o)).collect();
        tokio::task::spawn_blocking(move || {
            store
                .append(
                    &batches,
                    &keys,
                    &traces,
                    now,
                    (expired > 0).then_some(horizon),
                )
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    };
    if let Err(e) = result {
        ctx.metrics.journal_errors.inc();
        ctx.health.journal_failed.store(true, Ordering::Relaxed);
        tracing::error!(error = %e, "journal commit failed; failing so the supervisor restarts from disk");
        for (port, _) in replies {
            reply_error(
                port,
                "journal write failed; nothing in this request was acknowledged",
            );
        }
        return Err(format!("journal commit failed: {e}").into());
    }
    ctx.metrics
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics.commit_records.observe(committed.len() as f64);
    st.commits += 1;
    st.records += committed.len() as u64;
    st.next = next;
    for (k, (s, o)) in fresh {
        st.idem.insert(k, s, o, now);
    }
    ctx.metrics.idempotency_keys.set(st.idem.len() as i64);
    // Group the records by stream with the position each batch follows, then publish
    // heads before acking, so a client that reads right after its ack waits for its own
    // events.
    let mut by_stream: FxHashMap<u32, RecordBatch> = FxHashMap::default();
    for r in committed {
        let prev = st.last.get(&r.stream).copied().unwrap_or(0);
        by_stream
            .entry(r.stream)
            .or_insert_with(|| RecordBatch::new(r.stream, prev, Vec::new()))
            .records
            .push(r);
    }
    for (s, b) in by_stream {
        let o = b.records.last().map_or(0, |r| r.offset);
        st.last.insert(s, o);
        ctx.tail.push(s, b.prev, b.records);
        ctx.heads.raise(s, o);
        ctx.metrics
            .journal_head
            .get_or_create(&label("stream", stream_label(s)))
            .set(o as i64);
    }
    let mut dups = 0;
    for (port, positions) in replies {
        dups += positions.iter().filter(|p| p.duplicate).count() as u64;
        port.send(AppendReply {
            positions,
            error: None,
        })
        .discard();
    }
    st.duplicates += dups;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::Faults;
    use crate::record::{partition_of, Event, Payload};
    use crate::settings::Settings;
    use crate::store::Store;

    fn ev(user: &str) -> Payload {
        Payload::Event(Event {
            event_id: Some(format!("id-{user}")),
            user: user.into(),
            item: "i".into(),
            kind: "view".into(),
            value: None,
            ts_ms: 1,
            request_id: None,
        })
    }

    #[tokio::test]
    async fn entries_outside_the_configured_streams_are_refused_at_the_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("s.redb")).unwrap();
        let mut s = Settings::defaults("t");
        s.partitions = 4;
        let ctx = Arc::new(Ctx::new(s, store, Faults::default()));
        let (j, _) = Actor::spawn(None, Journal, ctx.clone()).await.unwrap();
        let append = |entries: Vec<AppendEntry>| {
            let j = j.clone();
            async move {
                j.call(|p| JournalMsg::Append(AppendRequest::new(entries), p), None)
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        let p = partition_of("alice", 4);
        for (stream, payload) in [
            (99, ev("alice")),
            (CATALOG_STREAM - 1, ev("alice")),
            ((p + 1) % 4, ev("alice")),
            (p, Payload::ItemDelete { id: "x".into() }),
        ] {
            let r = append(vec![
                AppendEntry::new(p, ev("alice")),
                AppendEntry::new(stream, payload),
            ])
            .await;
            assert!(
                r.error.as_deref().is_some_and(|e| e.contains("entry 2")),
                "{r:?}"
            );
            assert!(r.positions.is_empty());
        }
        // Nothing of the refused requests was written; a good one gets offset 1.
        let r = append(vec![AppendEntry::new(p, ev("alice"))]).await;
        assert_eq!(r.error, None);
        assert_eq!(r.positions[0].offset, 1);
        assert_eq!(ctx.store.streams().unwrap(), vec![p]);
        j.stop(None);
    }

    #[test]
    fn idempotency_keys_are_bounded_by_time_and_count() {
        let mut i = Idempotency::new(vec![(1, 0, 1, 100), (2, 0, 2, 200), (3, 0, 3, 300)], 2);
        assert_eq!(i.len(), 2, "loading keeps the newest");
        assert_eq!(i.get(1), None);
        assert_eq!(i.get(3), Some((0, 3)));
        i.insert(4, 1, 1, 400);
        assert_eq!((i.len(), i.get(2)), (2, None), "the oldest leaves first");
        assert_eq!(i.expire(350), 1);
        assert_eq!((i.get(3), i.get(4)), (None, Some((1, 1))));
        // Keys sharing their low half are told apart; a key inserted again answers with
        // its newest position and outlives its older entry.
        let twin = 4 | (7u128 << 64);
        i.insert(twin, 2, 9, 500);
        assert_eq!((i.get(4), i.get(twin)), (Some((1, 1)), Some((2, 9))));
        i.insert(4, 3, 5, 600);
        assert_eq!(i.len(), 2);
        assert_eq!(i.get(4), Some((3, 5)));
        assert_eq!(
            i.expire(550),
            1,
            "the first entry of 4 was dead, twin expired"
        );
        assert_eq!((i.get(4), i.get(twin)), (Some((3, 5)), None));
        assert_eq!(std::mem::size_of::<Acked>(), 40);
        // Sequence numbers wrap around without losing a key.
        let mut w = Idempotency::new(Vec::new(), 3);
        w.first = u32::MAX - 1;
        for k in 1..=6u128 {
            w.insert(k, 0, k as u64, k as i64);
        }
        assert_eq!(
            (w.len(), w.get(3), w.get(4), w.get(6)),
            (3, None, Some((0, 4)), Some((0, 6)))
        );
    }
}
