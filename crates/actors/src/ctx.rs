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

use crate::content_index::ContentIndex;
use crate::faults::Faults;
use crate::metrics::Metrics;
use crate::record::CATALOG_STREAM;
use crate::serving::{AlsServing, CatalogView};
use crate::settings::Settings;
use crate::store::Store;

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
    /// Last durable offset per stream (`0..P` partitions, then the catalog).
    pub heads: Vec<watch::Sender<u64>>,
    /// Offset applied by each partition's UserFeatures.
    pub applied: Vec<watch::Sender<u64>>,
    /// Last acked offset per user, per partition (what a request waits for).
    pub last_acked: Vec<Mutex<FxHashMap<String, u64>>>,
    /// Record each consumer is applying right now (for poison-record accounting).
    pub in_flight: Mutex<FxHashMap<String, (u32, u64)>>,
    /// Offset each consumer's last durable checkpoint covers, per stream (retention).
    pub checkpointed: Mutex<FxHashMap<(String, u32), u64>>,
    pub catalog: RwLock<CatalogView>,
    pub content: RwLock<ContentIndex>,
    pub als: ArcSwapOption<AlsServing>,
    pub health: Health,
    pub metrics: Metrics,
    pub started: Instant,
}

impl Ctx {
    pub fn new(settings: Settings, store: Store, faults: Faults) -> Ctx {
        let p = settings.partitions as usize;
        let head = |_| watch::channel(0u64).0;
        Ctx {
            heads: (0..=p).map(head).collect(),
            applied: (0..p).map(head).collect(),
            last_acked: (0..p).map(|_| Mutex::new(FxHashMap::default())).collect(),
            in_flight: Mutex::new(FxHashMap::default()),
            checkpointed: Mutex::new(FxHashMap::default()),
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

    /// Index of a stream in `heads`.
    pub fn head_index(&self, stream: u32) -> usize {
        if stream == CATALOG_STREAM {
            self.settings.partitions as usize
        } else {
            stream as usize
        }
    }

    /// Last durable offset of a stream.
    pub fn head(&self, stream: u32) -> u64 {
        *self.heads[self.head_index(stream)].borrow()
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
            vec![crate::names::CATALOG.to_string()]
        } else {
            vec![
                crate::names::user_features(stream),
                crate::names::ITEM_STATS.to_string(),
                crate::names::ALS_TRAINER.to_string(),
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
