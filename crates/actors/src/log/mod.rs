//! The durable log behind one seam: the [`Log`] trait.
//!
//! Every state change (event, erasure, item operation) is appended to the log before
//! anything applies it, and an acknowledged append is never lost. Two backends implement
//! the trait and pass one conformance suite (`tests/tests/log_conformance.rs`):
//!
//! - [`embedded::EmbeddedLog`]: the node's redb journal (group commit, one fsync per
//!   commit group, idempotency keys remembered for `idempotency_window`);
//! - [`crate::jetstream::JetStreamLog`]: one NATS JetStream stream, a subject per
//!   partition plus one for the catalog, the record's idempotency key as `Nats-Msg-Id`
//!   (the server's duplicate window is short; older retries are caught by the consumers'
//!   own dedupe, see `consumer.rs`).
//!
//! Positions: a record's offset increases within its stream but may be sparse (JetStream
//! numbers every subject of a stream from one sequence). Nothing may compute "the next
//! offset"; readers ask for what the log holds after a position.

pub mod embedded;

use async_trait::async_trait;
use tokio::sync::watch;

pub use crate::journal::{AppendEntry, Position};
pub use crate::store::ReadAfter;

/// Why a log operation did not succeed. `Unavailable` is the transient kind: an HTTP
/// write answers 503 with `Retry-After`, and a retry with the same idempotency keys is
/// safe (nothing is stored twice).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LogError {
    /// The backend cannot take writes (or reads) now: server unreachable or restarting,
    /// a stream leader election, too many publishes in flight, the journal restarting
    /// after a write error. Some entries of a failed append may be stored.
    #[error("the log is unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (an entry in a stream that does not exist, a record
    /// over the size limit); nothing was written.
    #[error("refused by the log: {0}")]
    Refused(String),
    /// Anything else (a record that does not decode, a storage error).
    #[error("log failure: {0}")]
    Failed(String),
}

/// An append-only log of records in streams (partitions `0..P` and the catalog).
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// The backend's name (`embedded`, `jetstream`), for `/v1/cluster` and logs.
    fn backend(&self) -> &'static str;

    /// Appends `entries` in order and returns one position per entry once the backend
    /// has acknowledged every one of them (see the README for what an ack means per
    /// backend). An entry whose idempotency key (non-zero) was appended before, within
    /// the backend's window, is not stored again: its original position comes back with
    /// `duplicate: true`. On an error nothing is acknowledged, though some entries may be
    /// stored: the caller's retry with the same keys stores each once.
    async fn append(&self, entries: Vec<AppendEntry>) -> Result<Vec<Position>, LogError>;

    /// Up to `limit` records of `stream` with offsets `> after` and `<= upto`, in offset
    /// order, with how far truncation has deleted the stream. Records appended
    /// concurrently may or may not be included (read up to a head for a stable answer).
    async fn read(
        &self,
        stream: u32,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<ReadAfter, LogError>;

    /// The offset of the last record of `stream` this node knows to be acknowledged, as
    /// a watch: it moves when this node appends and, for a shared log, when any node
    /// does.
    fn head(&self, stream: u32) -> watch::Receiver<u64>;

    /// Asks the backend for the current last offset of `stream` (a round trip for a
    /// shared log). [`Log::head`] reaches it once this node holds the records.
    async fn refresh_head(&self, stream: u32) -> Result<u64, LogError>;

    /// False while the backend cannot take writes (a shared log's server unreachable);
    /// appends then fail with [`LogError::Unavailable`].
    fn writable(&self) -> bool {
        true
    }

    /// Whether an acknowledged record is on disk (fsynced) before its ack: 1 yes, 0 no
    /// (a server that flushes on an interval), -1 unknown. The embedded journal fsyncs
    /// every commit group before it acks.
    fn syncs_every_write(&self) -> i64 {
        1
    }

    /// Set once the backend went backwards under this node (a shared log deleted and
    /// re-created, or ending below a position this node had read): the node escalates
    /// and stops instead of skipping what it had not applied.
    fn fault(&self) -> Option<String> {
        None
    }

    /// An offset at or above the highest the log has ever assigned in `stream` (never
    /// lower than a position a consumer applied, unless records were lost): a shared
    /// log's last sequence, the embedded journal's persisted head.
    async fn end(&self, stream: u32) -> Result<u64, LogError>;

    /// What `/v1/cluster` shows of the backend (server version, replicas, warnings).
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "backend": self.backend(), "writable": self.writable() })
    }

    /// Deletes the records of `stream` with offsets `< before` (retention); the highest
    /// deleted offset becomes the stream's truncation mark, which later reads report.
    /// Returns how many records were deleted (the embedded journal deletes whole commit
    /// groups, so it may keep a few records below `before`).
    async fn truncate(&self, stream: u32, before: u64) -> Result<u64, LogError>;
}

/// Waits until `stream`'s head reaches `target` or `wait` runs out; the head reached.
pub async fn wait_head(log: &dyn Log, stream: u32, target: u64, wait: std::time::Duration) -> u64 {
    let mut rx = log.head(stream);
    let reached = tokio::time::timeout(wait, rx.wait_for(|&h| h >= target))
        .await
        .ok()
        .and_then(|r| r.ok().map(|h| *h));
    reached.unwrap_or_else(|| *rx.borrow())
}

/// The heads of a node's streams as watch channels (partitions `0..P`, then the
/// catalog), shared by the log that moves them and the readers that wait on them.
pub struct Heads {
    partitions: u32,
    tx: Vec<watch::Sender<u64>>,
}

impl Heads {
    pub fn new(partitions: u32) -> Self {
        Heads {
            partitions,
            tx: (0..=partitions).map(|_| watch::channel(0).0).collect(),
        }
    }

    fn index(&self, stream: u32) -> Option<usize> {
        if stream == crate::record::CATALOG_STREAM {
            Some(self.partitions as usize)
        } else if stream < self.partitions {
            Some(stream as usize)
        } else {
            None
        }
    }

    /// The last acknowledged offset of `stream` this node knows (0 for an unknown stream).
    pub fn get(&self, stream: u32) -> u64 {
        self.index(stream).map_or(0, |i| *self.tx[i].borrow())
    }

    pub fn subscribe(&self, stream: u32) -> watch::Receiver<u64> {
        match self.index(stream) {
            Some(i) => self.tx[i].subscribe(),
            None => watch::channel(0).1,
        }
    }

    /// Moves the head of `stream` up to `offset` (never down); wakes the watchers.
    pub fn raise(&self, stream: u32, offset: u64) {
        if let Some(i) = self.index(stream) {
            self.tx[i].send_if_modified(|h| {
                let moved = offset > *h;
                if moved {
                    *h = offset;
                }
                moved
            });
        }
    }

    /// Sets the head of `stream` (a journal reopening from disk).
    pub fn set(&self, stream: u32, offset: u64) {
        if let Some(i) = self.index(stream) {
            self.tx[i].send_replace(offset);
        }
    }
}

/// The most recent records of every stream, in memory, so consumers that follow the head
/// read what was just appended without going to the backend. Each stream keeps one run
/// of consecutive records (every record of the stream between the run's `prev` and its
/// last offset), at most `cap` of them; a record that does not continue the run starts a
/// new one.
pub struct Tail {
    cap: usize,
    runs: parking_lot::Mutex<rustc_hash::FxHashMap<u32, Run>>,
    interest: parking_lot::RwLock<Interest>,
    /// Records the follower decoded into the tail, and records it only counted.
    decoded: std::sync::atomic::AtomicU64,
    skipped: std::sync::atomic::AtomicU64,
}

/// The streams whose records a shared log's follower decodes into the tail: the catalog
/// always, every partition while this node counts item statistics or trains (`all`),
/// otherwise the partitions it owns. Records of the others only raise their heads; a
/// consumer that needs them after all (a partition taken over) reads them from the log.
struct Interest {
    all: bool,
    partitions: rustc_hash::FxHashSet<u32>,
}

struct Run {
    /// The stream's offset before the run's first record (0: the stream's start).
    prev: u64,
    records: std::collections::VecDeque<std::sync::Arc<crate::record::Record>>,
}

impl Run {
    fn last(&self) -> u64 {
        self.records.back().map_or(self.prev, |r| r.offset)
    }
}

impl Tail {
    pub fn new(cap: usize) -> Self {
        Tail {
            cap: cap.max(1),
            runs: parking_lot::Mutex::new(Default::default()),
            interest: parking_lot::RwLock::new(Interest {
                all: true,
                partitions: Default::default(),
            }),
            decoded: Default::default(),
            skipped: Default::default(),
        }
    }

    /// Counts what a follower did with a batch: records decoded, records skipped.
    pub fn followed(&self, decoded: u64, skipped: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.decoded.fetch_add(decoded, Relaxed);
        self.skipped.fetch_add(skipped, Relaxed);
    }

    /// What the follower decodes and has decoded (`/v1/cluster`, under `log`).
    pub fn describe_interest(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let i = self.interest.read();
        let mut partitions: Vec<u32> = i.partitions.iter().copied().collect();
        partitions.sort_unstable();
        serde_json::json!({
            "all_partitions": i.all,
            "partitions": partitions,
            "tailed_records": self.decoded.load(Relaxed),
            "skipped_records": self.skipped.load(Relaxed),
        })
    }

    /// Whether the follower should decode `stream`'s records into the tail.
    pub fn wants(&self, stream: u32) -> bool {
        if stream == crate::record::CATALOG_STREAM {
            return true;
        }
        let i = self.interest.read();
        i.all || i.partitions.contains(&stream)
    }

    /// Every partition wanted (`true`, the default), or only those named by [`Tail::want`].
    pub fn want_all(&self, all: bool) {
        if self.interest.read().all != all {
            self.interest.write().all = all;
        }
    }

    /// Partition `p` wanted (this node owns it) or not.
    pub fn want(&self, p: u32, wanted: bool) {
        let mut i = self.interest.write();
        if wanted {
            i.partitions.insert(p);
        } else {
            i.partitions.remove(&p);
        }
    }

    /// Adds records of `stream` that follow offset `prev` (the stream's last record
    /// before them), in offset order. Records at or below the run's end are ignored.
    pub fn push(
        &self,
        stream: u32,
        prev: u64,
        records: impl IntoIterator<Item = crate::record::Record>,
    ) {
        let mut runs = self.runs.lock();
        let run = runs.entry(stream).or_insert_with(|| Run {
            prev,
            records: Default::default(),
        });
        if run.last() != prev && prev > run.last() {
            // A gap: what lies between is not known here.
            run.prev = prev;
            run.records.clear();
        }
        for r in records {
            if r.offset <= run.last() {
                continue;
            }
            run.records.push_back(std::sync::Arc::new(r));
            if run.records.len() > self.cap {
                if let Some(old) = run.records.pop_front() {
                    run.prev = old.offset;
                }
            }
        }
    }

    /// Records of `stream` with offsets `> after` and `<= upto`, at most `limit`, when the
    /// tail holds every one of them; `None` when the backend must be read. Logs push a
    /// commit's records here before they raise the head, so a reader that follows the
    /// head finds them.
    pub fn read(
        &self,
        stream: u32,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Option<Vec<std::sync::Arc<crate::record::Record>>> {
        let runs = self.runs.lock();
        let run = runs.get(&stream)?;
        if after < run.prev {
            return None;
        }
        let start = run.records.partition_point(|r| r.offset <= after);
        let out: Vec<std::sync::Arc<crate::record::Record>> = run
            .records
            .range(start..)
            .take_while(|r| r.offset <= upto)
            .take(limit)
            .cloned()
            .collect();
        // Complete only when the limit was reached or the run covers `upto`: records
        // after the run's end may exist that it has not seen yet.
        (out.len() >= limit || upto <= run.last()).then_some(out)
    }

    /// Forgets the stream (a journal reopening: the run may not continue what it held).
    pub fn reset(&self) {
        self.runs.lock().clear();
    }
}
