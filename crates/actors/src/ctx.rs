//! State shared by the actors of one node: the store, offsets published as watch
//! channels, read-mostly serving views (catalog, content index, ALS model), health and
//! metrics. Actors own their mutable state; what is here is either immutable, atomic, or
//! behind a short, never-awaited lock.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use parking_lot::{Mutex, RwLock};
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
use crate::state::StateStore;
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
    /// Cluster mode: a partition that is loading or replaying after a move does not make
    /// the node unready (the node answers for it through its owner or degraded).
    pub partitions_move: AtomicBool,
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
    pub fn is_recovering(&self, name: &str) -> bool {
        self.recovering.lock().contains(name)
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
        let moving = self.partitions_move.load(Ordering::Relaxed);
        self.recovering
            .lock()
            .iter()
            .all(|n| moving && n.starts_with(crate::names::USER_FEATURES_PREFIX))
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
    /// Where the node's state is kept: checkpoints, failure counts, dead letters, model
    /// snapshots ([`crate::state`]).
    pub state: Arc<dyn StateStore>,
    /// This process's claims of its consumers' scopes, and the record each consumer is
    /// applying right now (for poison-record accounting).
    pub consumers: crate::consumer::Registry,
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
    /// Cluster mode: peers and partition leases (`None`: this node owns every partition).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The request layer, once the node's transports built it (the gateway answers
    /// client calls through it). Weak: the layer holds this context.
    pub api: std::sync::OnceLock<std::sync::Weak<crate::api::Api>>,
}

impl Ctx {
    /// Serves `model` from the next request on (exact scans), then, when its catalogue
    /// is large enough (`ranker.ann_min_items`), builds its HNSW index on a thread of its
    /// own and swaps it in when done. A build for a model no longer served is skipped.
    pub fn serve_als(self: &Arc<Self>, model: AlsServing) {
        let model = Arc::new(model);
        self.als.store(Some(model.clone()));
        let r = &self.settings.ranker;
        if !model.wants_index(r.ann_min_items) {
            self.metrics.ann_index_items.set(0);
            return;
        }
        let ctx = self.clone();
        let spawned = std::thread::Builder::new()
            .name("ann-build".into())
            .spawn(move || {
                let current = |ctx: &Ctx| {
                    ctx.als
                        .load()
                        .as_ref()
                        .is_some_and(|m| Arc::ptr_eq(m, &model))
                };
                if !current(&ctx) {
                    return;
                }
                let index = match model.build_index(&ctx.settings.ranker.ann) {
                    Ok(index) => index,
                    Err(e) => {
                        tracing::error!(model_version = model.version, error = %e, "hnsw index build failed; exact scans answer");
                        return;
                    }
                };
                tracing::info!(
                    model_version = model.version,
                    items = index.rows(),
                    build_ms = (index.build_seconds() * 1e3) as u64,
                    "hnsw index built and swapped in"
                );
                if current(&ctx) {
                    ctx.metrics.ann_index_items.set(index.rows() as i64);
                    ctx.metrics.ann_build_seconds.set(index.build_seconds());
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the hnsw index build; exact scans answer");
        }
    }

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
        let state: Arc<dyn StateStore> =
            Arc::new(crate::state::embedded::EmbeddedState::new(store.clone()));
        Ctx::with_log(settings, store, faults, heads, tail, log, state)
    }

    /// A node on `log`, which raises `heads`, keeping its state in `state`.
    pub fn with_log(
        settings: Settings,
        store: Store,
        faults: Faults,
        heads: Arc<Heads>,
        tail: Arc<Tail>,
        log: Arc<dyn Log>,
        state: Arc<dyn StateStore>,
    ) -> Ctx {
        let p = settings.partitions as usize;
        let head = |_| watch::channel(0u64).0;
        Ctx {
            log,
            heads,
            tail,
            applied: (0..=p).map(head).collect(),
            state,
            consumers: crate::consumer::Registry::new(
                &settings.node_name,
                settings.cluster.is_some(),
            ),
            user_stores: (0..p).map(|_| RwLock::new(UserStore::default())).collect(),
            catalog: RwLock::new(CatalogView::default()),
            content: RwLock::new(ContentIndex::new(0, String::new())),
            als: ArcSwapOption::empty(),
            health: Health {
                partitions_move: AtomicBool::new(settings.cluster.is_some()),
                ..Default::default()
            },
            metrics: Metrics::new(p as u32),
            started: Instant::now(),
            cluster: settings.cluster.as_ref().map(|c| {
                Arc::new(crate::cluster::Cluster::new(
                    c.clone(),
                    &settings.node_name,
                    settings.partitions,
                ))
            }),
            settings,
            store,
            faults,
            api: std::sync::OnceLock::new(),
        }
    }

    /// True when this node answers for partition `p` from its own state: always on a
    /// single node; in a cluster, while it holds `p`'s lease and has finished loading and
    /// replaying it.
    pub fn serving(&self, p: u32) -> bool {
        match &self.cluster {
            None => true,
            Some(c) => c.holds(p) && !self.health.is_recovering(&crate::names::user_features(p)),
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
    /// Sets the gauges that are read when scraped: log state, the cluster's view, and
    /// the apply lag of the streams this node applies (every partition on a single node;
    /// those it holds, and the catalog, in a cluster; a stream let go loses its series).
    pub fn export_metrics(&self) {
        let m = &self.metrics;
        m.log_writable.set(i64::from(self.log.writable()));
        m.log_sync_always.set(self.log.syncs_every_write());
        if let Some(c) = &self.cluster {
            c.export(self);
        }
        for s in self.streams() {
            let labels = crate::metrics::label("stream", crate::metrics::stream_label(s));
            let applies_here =
                s == CATALOG_STREAM || self.cluster.as_ref().is_none_or(|c| c.holds(s));
            if applies_here {
                let lag = self.head(s).saturating_sub(self.applied(s));
                m.apply_lag.get_or_create(&labels).set(lag as i64);
            } else {
                m.apply_lag.remove(&labels);
            }
        }
    }

    pub fn streams(&self) -> Vec<u32> {
        (0..self.settings.partitions)
            .chain(std::iter::once(CATALOG_STREAM))
            .collect()
    }
}
