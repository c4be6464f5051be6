//! The Journal: durable, partitioned, append-only log with group commit and idempotency.
//!
//! Appends from every partition wait in this actor's mailbox while a commit is under way;
//! the next `Flush` takes all of them (up to `max_commit_records`) into one store commit
//! (one fsync), then acks each caller with `{stream, offset}` per record. A record whose
//! idempotency key was acked within the window is not appended again; its original
//! position is returned with `duplicate: true`.
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
use ractor_cluster_derive::RactorClusterMessage;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::ctx::Ctx;
use crate::faults::FaultAction;
use crate::item_stats::ItemStatsMsg;
use crate::messages::{Observation, RecordBatch};
use crate::metrics::label;
use crate::names;
use crate::record::{Payload, Record, CATALOG_STREAM};
use crate::store::JournalBatch;
use crate::wire::{self, WIRE_VERSION};
use crate::wire_payload;
use crate::{catalog::CatalogMsg, features::UserFeaturesMsg};

/// Records to append (each with its stream).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppendRequest {
    pub version: u16,
    pub entries: Vec<(u32, Payload)>,
}

impl AppendRequest {
    pub fn new(entries: Vec<(u32, Payload)>) -> Self {
        AppendRequest {
            version: WIRE_VERSION,
            entries,
        }
    }
}

/// Where one record landed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Position {
    pub stream: u32,
    pub offset: u64,
    /// The record had been acked before (same idempotency key); this is its position.
    pub duplicate: bool,
}

/// Answer to an append: one position per entry, or an error for the whole request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppendReply {
    pub version: u16,
    pub positions: Vec<Position>,
    pub error: Option<String>,
}

wire_payload!(AppendRequest, AppendReply);

#[derive(RactorClusterMessage)]
pub enum JournalMsg {
    #[rpc]
    Append(AppendRequest, RpcReplyPort<AppendReply>),
    /// Commit what is pending (sent to itself).
    Flush,
    /// Delete records every consumer has checkpointed past (periodic, when enabled).
    Retain,
    #[rpc]
    Observe(RpcReplyPort<Observation>),
}

pub struct Journal;

pub struct JournalState {
    ctx: Arc<Ctx>,
    next: FxHashMap<u32, u64>,
    idem: FxHashMap<u128, (u32, u64, i64)>,
    idem_order: VecDeque<(i64, u128)>,
    pending: VecDeque<(AppendRequest, RpcReplyPort<AppendReply>)>,
    flush_scheduled: bool,
    commits: u64,
    records: u64,
    duplicates: u64,
    truncated: u64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn reply_error(port: RpcReplyPort<AppendReply>, msg: &str) {
    port.send(AppendReply {
        version: WIRE_VERSION,
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
        let (next, keys) =
            tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
                let mut next = FxHashMap::default();
                for s in streams {
                    next.insert(s, store.last_offset(s)?);
                }
                let keys = store.idempotency_window(now_ms() - window)?;
                Ok((next, keys))
            })
            .await??;
        let mut idem = FxHashMap::default();
        let mut order: Vec<(i64, u128)> = Vec::with_capacity(keys.len());
        for (k, s, o, at) in keys {
            idem.insert(k, (s, o, at));
            order.push((at, k));
        }
        order.sort_unstable();
        for (&s, &o) in &next {
            ctx.heads[ctx.head_index(s)].send_replace(o);
            ctx.metrics
                .journal_head
                .get_or_create(&label("stream", s))
                .set(o as i64);
        }
        ctx.health.journal_failed.store(false, Ordering::Relaxed);
        tracing::info!(
            streams = next.len(),
            idempotency_keys = idem.len(),
            "journal opened"
        );
        Ok(JournalState {
            ctx,
            next,
            idem,
            idem_order: order.into(),
            pending: VecDeque::new(),
            flush_scheduled: false,
            commits: 0,
            records: 0,
            duplicates: 0,
            truncated: 0,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<JournalMsg>,
        st: &mut JournalState,
    ) -> Result<(), ActorProcessingErr> {
        if st.ctx.settings.retention {
            myself.send_interval(st.ctx.settings.checkpoint_interval, || JournalMsg::Retain);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<JournalMsg>,
        msg: JournalMsg,
        st: &mut JournalState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JournalMsg::Append(req, port) => {
                if !wire::accepted(req.version) {
                    reply_error(port, "append request of an unknown wire version");
                    return Ok(());
                }
                if st.ctx.health.draining.load(Ordering::Relaxed) {
                    reply_error(port, "node is shutting down");
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
            JournalMsg::Retain => {
                let ctx = st.ctx.clone();
                let cuts: Vec<(u32, u64)> = ctx
                    .streams()
                    .into_iter()
                    .filter_map(|s| ctx.retainable(s).map(|o| (s, o + 1)))
                    .collect();
                let store = ctx.store.clone();
                let n = tokio::task::spawn_blocking(
                    move || -> Result<u64, crate::store::StoreError> {
                        let mut n = 0;
                        for (s, before) in cuts {
                            n += store.truncate(s, before)?;
                        }
                        Ok(n)
                    },
                )
                .await??;
                if n > 0 {
                    tracing::debug!(records = n, "journal records past every checkpoint deleted");
                }
                st.truncated += n;
            }
            JournalMsg::Observe(port) => {
                let heads: Vec<(u32, u64)> = {
                    let mut v: Vec<_> = st.next.iter().map(|(&s, &o)| (s, o)).collect();
                    v.sort_unstable();
                    v
                };
                port.send(Observation::new(
                    names::JOURNAL,
                    serde_json::json!({
                        "heads": heads,
                        "commits": st.commits,
                        "records": st.records,
                        "duplicates": st.duplicates,
                        "truncated": st.truncated,
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
        batch.push(st.pending.pop_front().expect("front exists"));
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
    let mut replies = Vec::with_capacity(batch.len());
    let mut injected = false;
    for (req, port) in batch {
        let mut positions = Vec::with_capacity(req.entries.len());
        for (stream, payload) in req.entries {
            let key = payload.idempotency_key();
            if key != 0 {
                let known = st
                    .idem
                    .get(&key)
                    .map(|&(s, o, _)| (s, o))
                    .or_else(|| fresh.get(&key).copied());
                if let Some((s, o)) = known {
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
            let rec = Record {
                stream,
                offset,
                payload,
            };
            if let Some(FaultAction::Error) = ctx.faults.on_record("journal", &rec) {
                injected = true;
            }
            batches
                .entry(stream)
                .or_insert_with(|| JournalBatch::new(stream, offset))
                .push(&rec.payload);
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
    let mut expired = 0;
    while st.idem_order.front().is_some_and(|(at, _)| *at < horizon) {
        let (at, k) = st.idem_order.pop_front().expect("front exists");
        if st.idem.get(&k).is_some_and(|v| v.2 == at) {
            st.idem.remove(&k);
            expired += 1;
        }
    }
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
                .append(&batches, &keys, now, (expired > 0).then_some(horizon))
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
        st.idem.insert(k, (s, o, now));
        st.idem_order.push_back((now, k));
    }
    // Publish heads and per-user acked offsets before acking, so a client that reads
    // right after its ack waits for its own events.
    for (&s, &o) in &st.next {
        let h = &ctx.heads[ctx.head_index(s)];
        if *h.borrow() != o {
            h.send_replace(o);
            ctx.metrics
                .journal_head
                .get_or_create(&label("stream", s))
                .set(o as i64);
        }
    }
    for r in &committed {
        // An erase counts too: a request after it waits for it, and cached candidates
        // of the user are dropped.
        let user = match &r.payload {
            Payload::Event(e) => Some(&e.user),
            Payload::EraseUser { user } => Some(user),
            _ => None,
        };
        if let Some(user) = user {
            let mut m = ctx.last_acked[r.stream as usize].lock();
            match m.get_mut(user) {
                Some(o) => *o = r.offset,
                None => {
                    m.insert(user.clone(), r.offset);
                }
            }
        }
    }
    let mut dups = 0;
    for (port, positions) in replies {
        let new = positions.iter().filter(|p| !p.duplicate).count() as u64;
        dups += positions.len() as u64 - new;
        ctx.metrics.events_acked.inc_by(new);
        port.send(AppendReply {
            version: WIRE_VERSION,
            positions,
            error: None,
        })
        .discard();
    }
    st.duplicates += dups;
    ctx.metrics.events_duplicate.inc_by(dups);
    notify(&ctx, committed);
    Ok(())
}

/// Hands committed records to their consumers. A lost notification only costs latency:
/// consumers poll the journal head and read what they missed from the store.
fn notify(ctx: &Ctx, committed: Vec<Record>) {
    let mut by_stream: FxHashMap<u32, Vec<(u64, Payload)>> = FxHashMap::default();
    for r in committed {
        by_stream
            .entry(r.stream)
            .or_default()
            .push((r.offset, r.payload));
    }
    for (stream, records) in by_stream {
        let batch = RecordBatch::new(stream, records);
        if stream == CATALOG_STREAM {
            if let Some(c) = ractor::registry::where_is(names::CATALOG) {
                c.send_message(CatalogMsg::Committed(batch)).discard();
            }
            continue;
        }
        if let Some(s) = ractor::registry::where_is(names::ITEM_STATS) {
            s.send_message(ItemStatsMsg::Committed(batch.clone()))
                .discard();
        }
        if let Some(f) = ractor::registry::where_is(names::user_features(stream)) {
            f.send_message(UserFeaturesMsg::Committed(batch)).discard();
        }
        let _ = ctx;
    }
}
