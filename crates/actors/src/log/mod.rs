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
    /// shared log) and publishes it to [`Log::head`] if it is newer.
    async fn refresh_head(&self, stream: u32) -> Result<u64, LogError>;

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
