//! Typed settings every actor receives (the node crate builds them from `cluster.toml`;
//! actors never read files or the environment).

use std::time::Duration;

use troupe_models::als::AlsParams;
use troupe_models::blend::Normalization;
use troupe_models::dataset::WeightConfig;

/// Restart policy of one supervised child (OTP-like intensity plus capped backoff).
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// At most this many restarts within `window`; one more escalates.
    pub max_restarts: u32,
    pub window: Duration,
    /// First backoff; doubles per restart within the window, capped at `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(30),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Everything the actors of one node need to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    /// Event partitions (P > 1).
    pub partitions: u32,
    /// Largest number of records in one commit group.
    pub max_commit_records: usize,
    /// How long an idempotency key is remembered (the dedupe horizon, append and
    /// consumer side).
    pub idempotency_window: Duration,
    /// Most idempotency keys the journal keeps in memory; the oldest leave first.
    pub idempotency_max_keys: usize,
    /// Most keys a consumer remembers per stream for its own dedupe (0: off).
    pub consumer_dedupe_keys: usize,
    /// Events later than now + this are rejected.
    pub max_future_skew: Duration,
    /// Consumers check the journal head this often (catches up after a lost notification).
    pub poll_interval: Duration,
    pub checkpoint_every_records: u64,
    pub checkpoint_interval: Duration,
    /// Failures of one record before it goes to the dead letters.
    pub poison_max_attempts: u32,
    pub history_len: usize,
    pub weights: WeightConfig,
    /// Kinds whose items are filtered as already seen (empty: every positive kind).
    pub seen_kinds: Vec<String>,
    pub popularity_half_life: Duration,
    pub content: ContentSettings,
    pub als: AlsSettings,
    pub ranker: RankerSettings,
    pub restart: RestartPolicy,
    /// Journal records older than every consumer's position are deleted when true.
    pub retention: bool,
    /// Cluster mode (`None`: one node that owns every partition).
    pub cluster: Option<ClusterSettings>,
}

/// A configured member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Where its ractor_cluster node server listens (`host:port`, resolved on every
    /// connection attempt).
    pub cluster_addr: String,
    /// Its HTTP API (shown in `/v1/cluster`).
    pub http_addr: String,
    /// Whether it may lead the training (see [`crate::cluster::leader`]).
    pub trainer: bool,
}

/// How the nodes of a cluster find each other and share partitions.
#[derive(Clone)]
pub struct ClusterSettings {
    pub members: Vec<Member>,
    /// The shared secret of ractor_cluster's handshake (never logged).
    pub cookie: String,
    /// Liveness calls to every peer this often; `heartbeat_misses` missed in a row mark
    /// it unresponsive.
    pub heartbeat: Duration,
    pub heartbeat_misses: u32,
    /// A session that has not authenticated within this is closed.
    pub handshake_timeout: Duration,
    /// Reconnect backoff: doubles from `heartbeat` up to this.
    pub reconnect_max: Duration,
    /// A partition lease not renewed for this long may be taken by another node.
    pub lease_period: Duration,
    /// Leases (and this node's member record) are renewed this often.
    pub lease_renew: Duration,
    /// At most one partition handed to a returning or joining node per this interval.
    pub rebalance_interval: Duration,
    /// Deadline of a request forwarded to a partition's owner.
    pub forward_timeout: Duration,
    /// A member seen to lapse is given no partitions until it has been alive again for
    /// this long, doubled for every further lapse, up to `member_hold_down_max`.
    pub member_hold_down: Duration,
    pub member_hold_down_max: Duration,
    /// At most this many voluntary hand-overs in the whole cluster per
    /// `move_budget_window` (failovers are never held back).
    pub move_budget: u32,
    pub move_budget_window: Duration,
    /// Take over the partitions of a member whose process is known to have exited (its
    /// session closed and its host refuses connections on both its addresses) without
    /// waiting for the lease, and let a restarted process take back its predecessor's
    /// leases once they missed a renewal (ADR 017).
    pub takeover_on_exit: bool,
    /// The lease rounds read the lease, member and leader records from a copy one KV
    /// watch keeps, while it is known current, instead of one read per key and round
    /// (`cluster::records`).
    pub watch_records: bool,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("members", &self.members)
            .field("cookie", &"<redacted>")
            .field("heartbeat", &self.heartbeat)
            .field("heartbeat_misses", &self.heartbeat_misses)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("lease_period", &self.lease_period)
            .field("lease_renew", &self.lease_renew)
            .field("rebalance_interval", &self.rebalance_interval)
            .field("member_hold_down", &self.member_hold_down)
            .field("move_budget", &self.move_budget)
            .field("takeover_on_exit", &self.takeover_on_exit)
            .field("watch_records", &self.watch_records)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ContentSettings {
    /// `None`: hashed TF (uniform IDF) with `tfidf_dim` buckets.
    pub onnx_model_dir: Option<std::path::PathBuf>,
    pub onnx_max_len: usize,
    pub tfidf_dim: usize,
    pub batch_size: usize,
    /// Concurrent encoding batches.
    pub workers: usize,
    pub profile_half_life: Duration,
}

#[derive(Debug, Clone)]
pub struct AlsSettings {
    pub params: AlsParams,
    pub retrain_every_events: u64,
    pub retrain_interval: Duration,
    /// No training below this many interactions.
    pub min_interactions: usize,
    pub keep_versions: usize,
    /// Users held out (last interaction) to compare a candidate with the serving model.
    pub validation_users: usize,
    /// The item-item branch, trained with ALS and published in the same snapshot.
    pub item_item: troupe_models::ease::EaseParams,
}

#[derive(Debug, Clone)]
pub struct RankerSettings {
    /// Blend weights of als, content, popularity, item_item (the `Branch` order).
    pub weights: [f32; troupe_models::evaluate::NB],
    pub normalization: Normalization,
    pub candidates: usize,
    pub branch_deadline: Duration,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    /// How long a request waits for the user's acked events to be applied.
    pub freshness_wait: Duration,
    pub max_k: usize,
    /// Users whose ALS and content candidates are cached (0: no cache), counted in
    /// typical users of 256 ids each (candidates plus seen items; heavier users take
    /// more room, so memory stays bounded). An entry is used only while the user has no
    /// newer acked event, the ALS version is unchanged and it is younger than `cache_ttl`.
    pub cache_users: usize,
    pub cache_ttl: Duration,
    /// How long one popularity list (per category) is reused.
    pub popularity_refresh: Duration,
    /// ALS models with at least this many items get an HNSW index for candidate
    /// retrieval (0: always exact scans).
    pub ann_min_items: usize,
    pub ann: troupe_models::ann::AnnParams,
}

impl Settings {
    /// Defaults suited to tests and the demo (small intervals are set by callers).
    pub fn defaults(node_name: &str) -> Settings {
        // Model definitions and their defaults are the evaluation's: one place for both.
        let defaults = troupe_models::evaluate::EvalConfig::default();
        let days = |d: f64| Duration::from_secs_f64(d.max(0.0) * 86_400.0);
        Settings {
            node_name: node_name.to_string(),
            partitions: 4,
            max_commit_records: 20_000,
            idempotency_window: Duration::from_secs(24 * 3600),
            idempotency_max_keys: 1_000_000,
            consumer_dedupe_keys: 10_000,
            max_future_skew: Duration::from_secs(300),
            poll_interval: Duration::from_millis(200),
            checkpoint_every_records: 50_000,
            checkpoint_interval: Duration::from_secs(30),
            poison_max_attempts: 3,
            history_len: 200,
            weights: defaults.weights,
            seen_kinds: Vec::new(),
            popularity_half_life: days(defaults.popularity_half_life_days),
            content: ContentSettings {
                onnx_model_dir: None,
                onnx_max_len: 128,
                tfidf_dim: 1024,
                batch_size: 32,
                workers: 1,
                profile_half_life: days(defaults.content_half_life_days),
            },
            als: AlsSettings {
                params: defaults.als,
                retrain_every_events: 50_000,
                retrain_interval: Duration::from_secs(600),
                min_interactions: 100,
                keep_versions: 3,
                validation_users: 500,
                item_item: defaults.ease,
            },
            ranker: RankerSettings {
                weights: defaults.blend.weights,
                normalization: defaults.blend.normalization,
                candidates: defaults.blend.candidates,
                branch_deadline: Duration::from_millis(50),
                breaker_failures: 3,
                breaker_open: Duration::from_secs(2),
                freshness_wait: Duration::from_millis(200),
                max_k: 500,
                cache_users: 100_000,
                cache_ttl: Duration::from_secs(60),
                popularity_refresh: Duration::from_millis(500),
                ann_min_items: 500_000,
                ann: troupe_models::ann::AnnParams::default(),
            },
            restart: RestartPolicy::default(),
            retention: false,
            cluster: None,
        }
    }
}
