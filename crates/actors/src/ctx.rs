//! State shared by the actors of one node: the store, offsets published as watch
//! channels, read-mostly serving views (catalog, content index, ALS model), health and
//! metrics. Actors own their mutable state; what is here is either immutable, atomic, or
//! behind a short, never-awaited lock.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;
use tokio::sync::watch;

use std::sync::Arc;

use crate::content_index::ContentIndex;
use crate::faults::Faults;
use crate::log::embedded::{EmbeddedLog, JournalRef};
use crate::log::{Heads, Log, Tail};
use crate::metrics::Metrics;
use crate::record::{partition_of, Payload, CATALOG_STREAM};
use crate::serving::{AlsServing, CatalogView};
use crate::settings::Settings;
use crate::store::Store;
use crate::user_store::{Rules, UserStore};

/// Records per stream the embedded journal keeps in memory for consumers that follow the
/// head (a commit group is at most `max_commit_records`).
pub const TAIL_RECORDS: usize = 8_192;

/// Longest wait of an append for its commit group (callers usually give up sooner).
pub const APPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Node health: readiness and the reason of an escalation.
#[derive(Debug, Default)]
pub struct Health {
    /// Actors still loading checkpoints, replaying or loading models.
    recovering: Mutex<BTreeSet<String>>,
    escalated: Mutex<Option<String>>,
    /// The journal hit a write error: no more acks until it restarted from disk.
    pub journal_failed: AtomicBool,
    /// Intake stopped (graceful shutdown under way).
    pub draining: AtomicBool,
}

impl Health {
    pub fn begin_recovery(&self, name: &str) {
        self.recovering.lock().insert(name.to_string());
    }
    pub fn end_recovery(&self, name: &str) {
        self.recovering.lock().remove(name);
    }
    pub fn recovering(&self) -> Vec<String> {
        self.recovering.lock().iter().cloned().collect()
    }
    pub fn escalate(&self, reason: String) {
        let mut e = self.escalated.lock();
        if e.is_none() {
            *e = Some(reason);
        }
    }
    pub fn escalated(&self) -> Option<String> {
        self.escalated.lock().clone()
    }
    /// Ready to serve: nothing recovering, no escalation, journal writable, not draining.
    pub fn ready(&self) -> bool {
        self.recovering.lock().is_empty()
            && self.escalated.lock().is_none()
            && !self.journal_failed.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
    }
}

/// The shared context of a node's actors.
pub struct Ctx {
    pub settings: Settings,
    pub store: Store,
    pub faults: Faults,
    /// The log every record is appended to and read from ([`crate::log`]): the embedded
    /// journal, or a shared one.
    pub log: Arc<dyn Log>,
    /// Offset of the last acknowledged record per stream this node knows (`0..P`
    /// partitions, then the catalog), raised by the log before it acks.
    pub heads: Arc<Heads>,
    /// The embedded journal's recent records (unused with a shared log, which keeps its
    /// own).
    pub tail: Arc<Tail>,
    /// Offset applied by the consumer that serves reads of each stream: UserFeatures of
    /// each partition, then the Catalog. Reads wait on these (read-your-writes).
    pub applied: Vec<watch::Sender<u64>>,
    /// Record each consumer is applying right now (for poison-record accounting).
    pub in_flight: Mutex<FxHashMap<String, (u32, u64)>>,
    /// Offset each consumer's last durable checkpoint covers, per stream (retention).
    pub checkpointed: Mutex<FxHashMap<(String, u32), u64>>,
    /// The compact interaction store of each partition. Its UserFeatures actor is the
    /// only writer (it replaces the store when it restarts and recovers); the trainer
    /// reads every partition's store for its input.
    pub user_stores: Vec<RwLock<UserStore>>,
    pub catalog: RwLock<CatalogView>,
    pub content: RwLock<ContentIndex>,
    pub als: ArcSwapOption<AlsServing>,
    pub health: Health,
    pub metrics: Metrics,
    pub started: Instant,
}

impl Ctx {
    /// A node on the embedded journal (reached as the `journal` actor).
    pub fn new(settings: Settings, store: Store, faults: Faults) -> Ctx {
        let heads = Arc::new(Heads::new(settings.partitions));
        let tail = Arc::new(Tail::new(TAIL_RECORDS));
        let log: Arc<dyn Log> = Arc::new(EmbeddedLog::new(
            store.clone(),
            heads.clone(),
            tail.clone(),
            JournalRef::Named(crate::names::JOURNAL.to_string()),
            APPEND_TIMEOUT,
        ));
        Ctx::with_log(settings, store, faults, heads, tail, log)
    }

    /// A node on `log`, which raises `heads`.
    pub fn with_log(
        settings: Settings,
        store: Store,
        faults: Faults,
        heads: Arc<Heads>,
        tail: Arc<Tail>,
        log: Arc<dyn Log>,
    ) -> Ctx {
        let p = settings.partitions as usize;
        let head = |_| watch::channel(0u64).0;
        Ctx {
            log,
            heads,
            tail,
            applied: (0..=p).map(head).collect(),
            in_flight: Mutex::new(FxHashMap::default()),
            checkpointed: Mutex::new(FxHashMap::default()),
            user_stores: (0..p).map(|_| RwLock::new(UserStore::default())).collect(),
            catalog: RwLock::new(CatalogView::default()),
            content: RwLock::new(ContentIndex::new(0, String::new())),
            als: ArcSwapOption::empty(),
            health: Health::default(),
            metrics: Metrics::new(p as u32),
            started: Instant::now(),
            settings,
            store,
            faults,
        }
    }

    /// How queries read the interaction stores: the node's current settings.
    pub fn user_rules(&self) -> Rules<'_> {
        Rules {
            weights: &self.settings.weights,
            seen_kinds: &self.settings.seen_kinds,
            history_len: self.settings.history_len,
        }
    }

    /// Index of a stream in `heads`.
    pub fn head_index(&self, stream: u32) -> usize {
        if stream == CATALOG_STREAM {
            self.settings.partitions as usize
        } else {
            stream as usize
        }
    }

    /// Last acknowledged offset of a stream this node knows.
    pub fn head(&self, stream: u32) -> u64 {
        self.heads.get(stream)
    }

    /// True when the log is the embedded journal (the node runs the `journal` actor).
    pub fn embedded_log(&self) -> bool {
        self.log.backend() == "embedded"
    }

    /// Offset applied by the serving consumer of a stream.
    pub fn applied(&self, stream: u32) -> u64 {
        *self.applied[self.head_index(stream)].borrow()
    }

    /// Publishes the serving consumer's position in a stream (wakes waiting reads).
    pub fn publish_applied(&self, stream: u32, offset: u64) {
        self.applied[self.head_index(stream)].send_if_modified(|o| {
            let changed = *o != offset;
            *o = offset;
            changed
        });
    }

    /// Waits (at most `wait`) until the serving consumer of `stream` has applied
    /// `target`; false when the wait ran out.
    pub async fn wait_applied(&self, stream: u32, target: u64, wait: std::time::Duration) -> bool {
        let mut rx = self.applied[self.head_index(stream)].subscribe();
        if *rx.borrow() >= target {
            return true;
        }
        let reached = matches!(
            tokio::time::timeout(wait, rx.wait_for(|&o| o >= target)).await,
            Ok(Ok(_))
        );
        reached
    }

    /// True for a stream this node has: a configured partition or the catalog.
    pub fn has_stream(&self, stream: u32) -> bool {
        stream == CATALOG_STREAM || stream < self.settings.partitions
    }

    /// Refuses an entry whose stream does not fit its payload: events and erasures go to
    /// their user's partition, item operations to the catalog.
    pub fn check_entry(&self, stream: u32, payload: &Payload) -> Result<(), String> {
        let p = self.settings.partitions;
        let want = match payload {
            Payload::Event(e) => partition_of(&e.user, p),
            Payload::EraseUser { user } => partition_of(user, p),
            Payload::ItemUpsert(_) | Payload::ItemDelete { .. } => CATALOG_STREAM,
        };
        if stream == want {
            Ok(())
        } else if !self.has_stream(stream) {
            Err(format!(
                "stream {stream} is neither a partition (0..{p}) nor the catalog"
            ))
        } else {
            Err(format!(
                "stream {stream} is not this record's stream ({})",
                crate::metrics::stream_label(want)
            ))
        }
    }

    /// Every entry in a configured stream that fits its payload, or the reasons why not.
    pub fn check_entries(&self, entries: &[crate::log::AppendEntry]) -> Result<(), String> {
        let problems: Vec<String> = entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                self.check_entry(e.stream, &e.payload)
                    .err()
                    .map(|why| format!("entry {}: {why}", i + 1))
            })
            .take(10)
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "append refused, nothing was written: {}",
                problems.join("; ")
            ))
        }
    }

    /// All streams: partitions then the catalog.
    pub fn streams(&self) -> Vec<u32> {
        (0..self.settings.partitions)
            .chain(std::iter::once(CATALOG_STREAM))
            .collect()
    }

    pub fn set_in_flight(&self, consumer: &str, stream: u32, offset: u64) {
        let mut m = self.in_flight.lock();
        match m.get_mut(consumer) {
            Some(v) => *v = (stream, offset),
            None => {
                m.insert(consumer.to_string(), (stream, offset));
            }
        }
    }

    /// Records that `consumer`'s durable checkpoint covers `stream` up to `offset`.
    pub fn note_checkpoint(&self, consumer: &str, stream: u32, offset: u64) {
        self.checkpointed
            .lock()
            .insert((consumer.to_string(), stream), offset);
    }

    /// Consumers whose checkpoints bound retention of `stream`.
    pub fn consumers_of(&self, stream: u32) -> Vec<String> {
        if stream == CATALOG_STREAM {
            vec![
                crate::names::CATALOG.to_string(),
                crate::names::ITEM_STATS.to_string(),
            ]
        } else {
            vec![
                crate::names::user_features(stream),
                crate::names::ITEM_STATS.to_string(),
            ]
        }
    }

    /// Highest offset of `stream` every consumer has checkpointed past (None if any
    /// consumer has no checkpoint in this process yet).
    pub fn retainable(&self, stream: u32) -> Option<u64> {
        let cp = self.checkpointed.lock();
        self.consumers_of(stream)
            .iter()
            .map(|c| cp.get(&(c.clone(), stream)).copied())
            .collect::<Option<Vec<u64>>>()
            .and_then(|v| v.into_iter().min())
    }

    pub fn clear_in_flight(&self, consumer: &str) {
        self.in_flight.lock().remove(consumer);
    }
}
