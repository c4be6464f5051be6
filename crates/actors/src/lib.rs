//! Troupe's actors: the journal, the online feature store, the live models, the ranker,
//! and the supervisors that keep them running on one node.
//!
//! ```text
//! HTTP (node crate) --append--> Log: Journal (redb, 1 fsync per commit group) or
//!      JetStream (pipelined publishes) --> ack
//!      Log: records -> tail, then head moves --> UserFeatures(p) (history, seen, fold-in)
//!              --> ItemStats (decayed popularity)   [all partitions, catalog]
//!              --> Catalog (catalog stream) --> ContentEncoder (pool)
//!      AlsTrainer reads every partition's interaction store, retrains, swaps models
//!      Ranker: UserFeatures + {ALS, content, popularity} under deadlines and breakers
//! ```
//! Every consumer applies by position (offsets may be sparse) through one runtime
//! ([`consumer`]) and can re-read the journal, so a lost message costs latency, never
//! data. Edges and what bounds them: appends are bounded by the HTTP layer's write
//! admission, the commit group size and the publishes in flight; head-moved wake-ups
//! are coalesced (one pending per consumer); encoder batches by a
//! semaphore of `workers`; ranker branches by their deadline.
//!
//! Modules: [`alloc`] (allocator counts and trim), [`record`] (journal records, hashing), [`store`] (redb),
//! [`log`] (the Log seam, heads, tail), [`state`] (the StateStore seam, fencing),
//! [`jetstream`] (the shared backend), [`journal`],
//! [`features`], [`item_stats`], [`catalog`], [`encoder`], [`trainer`], [`ranker`],
//! [`breaker`], [`supervisor`], [`consumer`] (the consumer runtime: cursors, poison
//! records, dedupe, checkpoint cadence), [`codec`] (bounded bincode),
//! [`node`] (assembles the supervision tree), [`ctx`] (shared state), [`settings`],
//! [`faults`], [`metrics`], [`messages`] (payloads of local messages). What crosses a
//! process boundary (records, the cross-node envelope, API types) is in [`proto`].

mod alloc;
pub mod api;
mod breaker;
mod catalog;
mod cluster;
mod consumer;
pub mod content_index;
mod ctx;
mod encoder;
pub mod faults;
mod features;
pub mod handles;
mod item_stats;
pub mod jetstream;
mod journal;
pub mod log;
mod messages;
mod metrics;
mod names;
pub mod node;
mod ranker;
mod serving;
pub mod settings;
mod snapshots;
pub mod state;
mod store;
mod supervisor;
pub mod trace;
mod trainer;
mod user_store;

pub use troupe_models as models;
pub use troupe_proto as proto;
/// Bounded bincode and the log record format live in the protocol crate.
pub use troupe_proto::{codec, record};

// The rest of the public surface: what the node binary and tests need from the private
// modules (the actors themselves stay inside; they are reached through `handles`).
pub use alloc::{limit_arenas, stats as allocator_stats};
pub use cluster::{rendezvous, PeerState};
pub use ctx::{Ctx, TAIL_RECORDS};
pub use journal::Journal;
pub use metrics::{labels2, stream_label};
pub use ranker::RankerMsg;
pub use store::{Store, DEFAULT_CACHE_BYTES};
pub use trainer::AlsTrainerMsg;

/// Explicitly discards a send result: the receiver (a caller that timed out, an actor
/// that is restarting) may be gone, and there is nothing useful to do about it here.
pub trait Discard {
    fn discard(self);
}

impl<T, E> Discard for Result<T, E> {
    fn discard(self) {}
}
