//! The embedded log: the node's redb journal behind [`Log`].
//!
//! Appends go to the [`Journal`](crate::journal::Journal) actor, which group-commits
//! them (one fsync per group) and keeps the idempotency window; reads and truncation go
//! to the [`Store`](crate::store::Store) off the async runtime, except what the journal
//! committed last, which its [`Tail`] holds in memory. The journal pushes each commit's
//! records to the tail, then raises the [`Heads`], then acks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ractor::ActorRef;
use tokio::sync::watch;

use super::{AppendEntry, Heads, Log, LogError, Position, ReadAfter, Tail};
use crate::journal::{AppendRequest, JournalMsg};
use crate::store::{Store, StoreError};

/// How the embedded log reaches its journal actor.
#[derive(Clone)]
pub enum JournalRef {
    /// Resolved by registered name on every call (a restart changes the actor).
    Named(String),
    /// A fixed actor (tests).
    Actor(ActorRef<JournalMsg>),
}

/// The redb journal as a [`Log`].
pub struct EmbeddedLog {
    store: Store,
    heads: Arc<Heads>,
    tail: Arc<Tail>,
    journal: JournalRef,
    /// How long an append may wait for its commit group.
    timeout: Duration,
    /// Truncation marks by stream, as last written (answers reads served by the tail).
    marks: parking_lot::Mutex<rustc_hash::FxHashMap<u32, u64>>,
}

impl EmbeddedLog {
    /// The log over `store`, whose journal actor (reached through `journal`) raises
    /// `heads` and fills `tail`.
    pub fn new(
        store: Store,
        heads: Arc<Heads>,
        tail: Arc<Tail>,
        journal: JournalRef,
        timeout: Duration,
    ) -> Self {
        EmbeddedLog {
            store,
            heads,
            tail,
            journal,
            timeout,
            marks: Default::default(),
        }
    }

    fn actor(&self) -> Result<ActorRef<JournalMsg>, LogError> {
        match &self.journal {
            JournalRef::Actor(a) => Ok(a.clone()),
            JournalRef::Named(n) => ractor::registry::where_is(n.clone())
                .map(ActorRef::from)
                .ok_or_else(|| LogError::Unavailable(format!("the journal ({n}) is restarting"))),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, LogError> {
    crate::store::off_runtime(f).await.map_err(LogError::Failed)
}

#[async_trait]
impl Log for EmbeddedLog {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn append(&self, entries: Vec<AppendEntry>) -> Result<Vec<Position>, LogError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let journal = self.actor()?;
        let reply = journal
            .call(
                |p| JournalMsg::Append(AppendRequest::new(entries), p),
                Some(self.timeout),
            )
            .await
            .map_err(|e| LogError::Unavailable(format!("the journal did not answer: {e}")))?;
        let reply = match reply {
            ractor::rpc::CallResult::Success(r) => r,
            ractor::rpc::CallResult::Timeout => {
                return Err(LogError::Unavailable(
                    "the journal did not commit in time".into(),
                ))
            }
            ractor::rpc::CallResult::SenderError => {
                return Err(LogError::Unavailable(
                    "the journal stopped before answering".into(),
                ))
            }
        };
        match reply.error {
            None => Ok(reply.positions),
            Some(e) if e.starts_with("append refused") => Err(LogError::Refused(e)),
            Some(e) => Err(LogError::Unavailable(e)),
        }
    }

    async fn read(
        &self,
        stream: u32,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<ReadAfter, LogError> {
        if let Some(records) = self.tail.read(stream, after, upto, limit) {
            let cached = self.marks.lock().get(&stream).copied();
            let truncated = match cached {
                Some(m) => m,
                None => {
                    let store = self.store.clone();
                    let m = blocking(move || store.truncated(stream)).await?;
                    self.marks.lock().insert(stream, m);
                    m
                }
            };
            return Ok(ReadAfter { records, truncated });
        }
        let store = self.store.clone();
        blocking(move || store.read_after(stream, after, upto, limit)).await
    }

    fn head(&self, stream: u32) -> watch::Receiver<u64> {
        self.heads.subscribe(stream)
    }

    async fn refresh_head(&self, stream: u32) -> Result<u64, LogError> {
        // The journal raises the heads of every commit before it acks: they are current.
        Ok(self.heads.get(stream))
    }

    /// Heads are persisted and only grow: a stream's head is where it ends.
    async fn end(&self, stream: u32) -> Result<u64, LogError> {
        Ok(self.heads.get(stream))
    }

    async fn truncate(&self, stream: u32, before: u64) -> Result<u64, LogError> {
        let store = self.store.clone();
        let (n, mark) = blocking(move || {
            let n = store.truncate(stream, before)?;
            Ok((n, store.truncated(stream)?))
        })
        .await?;
        self.marks.lock().insert(stream, mark);
        Ok(n)
    }
}
