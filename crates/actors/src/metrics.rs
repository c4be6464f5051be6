//! Prometheus metrics of a node (prometheus-client), rendered by the node's `/metrics`.

use parking_lot::Mutex;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Metric handles (cheap clones of atomics) plus their registry.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub events_acked: Counter,
    pub events_duplicate: Counter,
    pub events_rejected: Family<Labels, Counter>,
    pub commit_seconds: Histogram,
    pub commit_records: Histogram,
    pub journal_errors: Counter,
    /// Log appends refused as unavailable (503), and reads postponed for it.
    pub log_write_errors: Counter,
    pub log_read_errors: Counter,
    /// Records deleted by retention.
    pub log_truncated: Counter,
    /// 1 while the log takes writes, 0 while it does not (server unreachable).
    pub log_writable: Gauge,
    /// 1 when every JetStream server fsyncs each write before acknowledging it, 0 when
    /// one does not, -1 unknown (no monitoring address configured, or unreachable).
    pub log_sync_always: Gauge,
    pub journal_head: Family<Labels, Gauge>,
    pub applied_offset: Family<Labels, Gauge>,
    pub actor_restarts: Family<Labels, Counter>,
    pub dead_letters: Counter,
    /// Consumers stopped because a newer owner claimed their scope.
    pub deposed: Counter,
    /// Checkpoints put off because the state store was unreachable.
    pub checkpoints_postponed: Counter,
    /// Cluster: partition lease events on this node (`claim`, `failover`, `handoff`,
    /// `lost`, `failed`).
    pub partition_events: Family<Labels, Counter>,
    /// Cluster: requests forwarded to a partition's owner, by outcome (`ok`, `failed`).
    pub forwarded: Family<Labels, Counter>,
    /// Cluster: peers by state, and partitions this node holds by state (set when
    /// scraped).
    pub peers: Family<Labels, Gauge>,
    pub partitions_held: Family<Labels, Gauge>,
    /// Cluster: failed state store calls of the lease actors, by operation (`renew`,
    /// `member`, `read`, `claim`, `release`).
    pub lease_store_errors: Family<Labels, Counter>,
    /// Cluster: lapses seen per member (heartbeat stopped without a graceful leave).
    pub member_lapses: Family<Labels, Counter>,
    /// Cluster: reads of the lease, member and leader records by the lease actors, by
    /// where they came from (`watch`: this node's copy kept by a KV watch; `store`: a
    /// request per key, when the watch is not known to be current).
    pub record_reads: Family<Labels, Counter>,
    /// Cluster: hand-overs put off because the cluster's move budget was spent.
    pub moves_deferred: Counter,
    /// Cluster: 1 while this node's last lease round could read the state store.
    pub log_reachable: Gauge,
    pub recommend_seconds: Histogram,
    pub recommendations: Family<Labels, Counter>,
    pub candidate_cache: Family<Labels, Counter>,
    pub branch_outcomes: Family<Labels, Counter>,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: Family<Labels, Gauge>,
    pub model_version: Gauge,
    /// Validation NDCG@10 of the served ALS version (measured when it was trained).
    pub model_ndcg: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Time from a write's arrival in the request layer to its acknowledgement by the
    /// log (either backend): the ack latency clients see, without HTTP parsing.
    pub append_seconds: Histogram,
    /// Records the log holds that the consumer serving a stream here has not applied
    /// yet (set when scraped; streams served by this node only).
    pub apply_lag: Family<Labels, Gauge>,
    /// Recommendations answered `stale` (not known to reflect every acked write).
    pub recommendations_stale: Counter,
    /// Cluster: partitions by state as this node sees the lease table (`owned`,
    /// `unowned`, `failed`; set when scraped).
    pub partitions: Family<Labels, Gauge>,
    /// Cluster: 1 while this node knows a trainer leader (set when scraped).
    pub trainer_leader_known: Gauge,
    pub retrains: Family<Labels, Counter>,
    pub model_load_failures: Counter,
    /// Approximate (HNSW) retrievals by branch and path (`graph`, or `exact_fallback`
    /// when the graph found fewer eligible items than asked).
    pub ann_searches: Family<Labels, Counter>,
    /// Rows of the HNSW index the ALS branch searches (0: exact scans), and the seconds
    /// its last build took.
    pub ann_index_items: Gauge,
    pub ann_build_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Rows of the HNSW graphs the content branch searches (0: exact scoring), and the
    /// seconds their last build took.
    pub content_ann_items: Gauge,
    pub content_ann_build_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub embeddings_computed: Counter,
    pub embeddings_cached: Counter,
    pub http_requests: Family<Labels, Counter>,
    /// Requests being handled, by admission class (`read`, `write`).
    pub http_in_flight: Family<Labels, Gauge>,
    /// Requests refused because their class was saturated, by class.
    pub http_saturated: Family<Labels, Counter>,
    /// Records a consumer skipped as duplicates of a key it applied within the horizon.
    pub consumer_duplicates: Counter,
    /// How far back (seconds of append time) the keys a consumer remembers per stream
    /// reach: a retry older than this is applied again (past the log's own dedupe).
    pub dedupe_reach: Family<Labels, Gauge>,
    /// Idempotency keys the journal remembers (bounded by `idempotency_max_keys`).
    pub idempotency_keys: Gauge,
    /// Checkpoint bytes written, by consumer kind and form (`full`, `delta`).
    pub checkpoint_bytes: Family<Labels, Counter>,
    /// Checkpoints written, by consumer kind and form.
    pub checkpoints: Family<Labels, Counter>,
}

impl Metrics {
    pub fn new(_partitions: u32) -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("troupe")),
            events_acked: Counter::default(),
            events_duplicate: Counter::default(),
            events_rejected: Family::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            commit_records: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            journal_errors: Counter::default(),
            log_write_errors: Counter::default(),
            log_read_errors: Counter::default(),
            log_truncated: Counter::default(),
            log_writable: Gauge::default(),
            log_sync_always: Gauge::default(),
            journal_head: Family::default(),
            applied_offset: Family::default(),
            actor_restarts: Family::default(),
            dead_letters: Counter::default(),
            deposed: Counter::default(),
            checkpoints_postponed: Counter::default(),
            partition_events: Family::default(),
            forwarded: Family::default(),
            peers: Family::default(),
            partitions_held: Family::default(),
            lease_store_errors: Family::default(),
            member_lapses: Family::default(),
            record_reads: Family::default(),
            moves_deferred: Counter::default(),
            log_reachable: Gauge::default(),
            checkpoint_bytes: Family::default(),
            checkpoints: Family::default(),
            recommend_seconds: Histogram::new(exponential_buckets(0.0002, 2.0, 14)),
            recommendations: Family::default(),
            candidate_cache: Family::default(),
            branch_outcomes: Family::default(),
            breaker_state: Family::default(),
            model_version: Gauge::default(),
            model_ndcg: Gauge::default(),
            append_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            apply_lag: Family::default(),
            recommendations_stale: Counter::default(),
            partitions: Family::default(),
            trainer_leader_known: Gauge::default(),
            retrains: Family::default(),
            model_load_failures: Counter::default(),
            ann_searches: Family::default(),
            ann_index_items: Gauge::default(),
            ann_build_seconds: Gauge::default(),
            content_ann_items: Gauge::default(),
            content_ann_build_seconds: Gauge::default(),
            embeddings_computed: Counter::default(),
            embeddings_cached: Counter::default(),
            http_requests: Family::default(),
            http_in_flight: Family::default(),
            http_saturated: Family::default(),
            consumer_duplicates: Counter::default(),
            dedupe_reach: Family::default(),
            idempotency_keys: Gauge::default(),
        };
        {
            // Lease events exist (at 0) before the first one, so that rules and boards
            // over them have a series from the start.
            for event in ["claim", "failover", "handoff", "lost", "failed"] {
                m.partition_events
                    .get_or_create(&label("event", event))
                    .inc_by(0);
            }
            let mut r = m.registry.lock();
            r.register(
                "events_acked",
                "Records (events and item changes) durably written to the log and acknowledged",
                m.events_acked.clone(),
            );
            r.register(
                "events_duplicate",
                "Records answered as duplicates of an acknowledged idempotency key (not written again)",
                m.events_duplicate.clone(),
            );
            r.register(
                "events_rejected",
                "Events rejected before the journal, by reason",
                m.events_rejected.clone(),
            );
            r.register(
                "journal_commit_seconds",
                "Duration of one group commit (write + fsync)",
                m.commit_seconds.clone(),
            );
            r.register(
                "journal_commit_records",
                "Records per group commit",
                m.commit_records.clone(),
            );
            r.register(
                "journal_errors",
                "Group commits that failed (the journal restarts)",
                m.journal_errors.clone(),
            );
            r.register(
                "log_write_errors",
                "Appends the log could not take (answered 503 with Retry-After)",
                m.log_write_errors.clone(),
            );
            r.register(
                "log_read_errors",
                "Consumer reads postponed because the log was unavailable",
                m.log_read_errors.clone(),
            );
            r.register(
                "log_truncated_records",
                "Records deleted by retention (every consumer had checkpointed past them)",
                m.log_truncated.clone(),
            );
            r.register(
                "log_writable",
                "1 while the log takes writes, 0 while it cannot be reached",
                m.log_writable.clone(),
            );
            r.register(
                "log_sync_always",
                "1 when every JetStream server fsyncs each write before acknowledging it, 0 when one does not, -1 unknown",
                m.log_sync_always.clone(),
            );
            r.register(
                "journal_head_offset",
                "Last durable offset per stream",
                m.journal_head.clone(),
            );
            r.register(
                "applied_offset",
                "Offset applied per consumer and stream",
                m.applied_offset.clone(),
            );
            r.register(
                "actor_restarts",
                "Actor restarts by child name",
                m.actor_restarts.clone(),
            );
            r.register(
                "dead_letters",
                "Records moved to the dead letters",
                m.dead_letters.clone(),
            );
            r.register(
                "checkpoints_postponed",
                "Checkpoints put off because the state store was unreachable",
                m.checkpoints_postponed.clone(),
            );
            r.register(
                "cluster_partition_events",
                "Partition lease events on this node: claim, failover (claimed after its owner's lease lapsed), handoff, lost, failed",
                m.partition_events.clone(),
            );
            r.register(
                "cluster_lease_store_errors",
                "Failed state store calls of the lease actors, by operation (renew, member, read, claim, release)",
                m.lease_store_errors.clone(),
            );
            r.register(
                "cluster_member_lapses",
                "Lapses seen per member (heartbeat stopped without a graceful leave)",
                m.member_lapses.clone(),
            );
            r.register(
                "cluster_record_reads",
                "Reads of the lease, member and leader records by the lease actors, by source (watch: the copy a KV watch keeps; store: one request per key)",
                m.record_reads.clone(),
            );
            r.register(
                "cluster_log_reachable",
                "1 while this node's lease actors can read and write the state store, 0 while they cannot",
                m.log_reachable.clone(),
            );
            r.register(
                "cluster_moves_deferred",
                "Hand-overs put off because the cluster's move budget was spent",
                m.moves_deferred.clone(),
            );
            r.register(
                "cluster_forwarded",
                "Requests forwarded to a partition's owner, by outcome",
                m.forwarded.clone(),
            );
            r.register(
                "cluster_peers",
                "Peers by state as this node sees them",
                m.peers.clone(),
            );
            r.register(
                "cluster_partitions_held",
                "Partitions whose lease this node holds, by state (serving, replaying, moving)",
                m.partitions_held.clone(),
            );
            r.register(
                "consumers_deposed",
                "Consumers stopped because a newer owner claimed their scope (fenced writes)",
                m.deposed.clone(),
            );
            r.register(
                "recommend_seconds",
                "Recommendation latency",
                m.recommend_seconds.clone(),
            );
            r.register(
                "recommendations",
                "Recommendations served, by outcome",
                m.recommendations.clone(),
            );
            r.register(
                "candidate_cache",
                "Per-user candidate cache lookups: hit, miss or bypass",
                m.candidate_cache.clone(),
            );
            r.register(
                "branch_outcomes",
                "Ranker branch outcomes",
                m.branch_outcomes.clone(),
            );
            r.register(
                "breaker_state",
                "Circuit breaker state per branch (0 closed, 1 open, 2 half-open)",
                m.breaker_state.clone(),
            );
            r.register(
                "als_model_version",
                "ALS model version being served",
                m.model_version.clone(),
            );
            r.register(
                "als_model_validation_ndcg",
                "Validation NDCG@10 of the served ALS version, measured on held-out events when it was trained",
                m.model_ndcg.clone(),
            );
            r.register(
                "append_seconds",
                "Time for the log to acknowledge one write request (the ack latency, either backend)",
                m.append_seconds.clone(),
            );
            r.register(
                "apply_lag_records",
                "Records in the log not yet applied by the consumer serving the stream on this node",
                m.apply_lag.clone(),
            );
            r.register(
                "recommendations_stale",
                "Recommendations answered stale (not known to reflect every acknowledged write)",
                m.recommendations_stale.clone(),
            );
            r.register(
                "cluster_partitions",
                "Partitions by state as this node sees the lease table: owned, unowned, failed",
                m.partitions.clone(),
            );
            r.register(
                "cluster_trainer_leader_known",
                "1 while this node knows which member leads the training, 0 while none does",
                m.trainer_leader_known.clone(),
            );
            r.register(
                "als_retrains",
                "ALS retrains by outcome",
                m.retrains.clone(),
            );
            r.register(
                "als_model_load_failures",
                "Published ALS snapshots this node refused to load (blob missing, hash mismatch, does not decode)",
                m.model_load_failures.clone(),
            );
            r.register(
                "ann_searches",
                "Approximate nearest-neighbour retrievals by branch and path (graph, exact_fallback)",
                m.ann_searches.clone(),
            );
            r.register(
                "ann_index_items",
                "Items in the HNSW index the ALS branch searches (0 while it scans exactly)",
                m.ann_index_items.clone(),
            );
            r.register(
                "ann_build_seconds",
                "Seconds the last HNSW index build took",
                m.ann_build_seconds.clone(),
            );
            r.register(
                "content_ann_items",
                "Rows in the HNSW graphs the content branch searches (0 while it scores exactly)",
                m.content_ann_items.clone(),
            );
            r.register(
                "content_ann_build_seconds",
                "Seconds the last build of the content branch's HNSW graphs took",
                m.content_ann_build_seconds.clone(),
            );
            r.register(
                "embeddings_computed",
                "Item embeddings computed",
                m.embeddings_computed.clone(),
            );
            r.register(
                "embeddings_cached",
                "Item embeddings taken from the cache",
                m.embeddings_cached.clone(),
            );
            r.register(
                "http_requests",
                "HTTP requests by route and status",
                m.http_requests.clone(),
            );
            r.register(
                "http_in_flight",
                "HTTP requests being handled, by admission class (read, write)",
                m.http_in_flight.clone(),
            );
            r.register(
                "http_saturated",
                "HTTP requests refused with 503 because their admission class was full",
                m.http_saturated.clone(),
            );
            r.register(
                "consumer_duplicates",
                "Records skipped by a consumer as duplicates of a key applied within the horizon",
                m.consumer_duplicates.clone(),
            );
            r.register(
                "consumer_dedupe_horizon_seconds",
                "How far back (append time) the keys a consumer remembers per stream reach: an older retry that the log stored again is applied again",
                m.dedupe_reach.clone(),
            );
            r.register(
                "idempotency_keys",
                "Idempotency keys the journal remembers",
                m.idempotency_keys.clone(),
            );
            r.register(
                "checkpoint_bytes",
                "Checkpoint bytes written, by consumer kind and form (full, delta)",
                m.checkpoint_bytes.clone(),
            );
            r.register(
                "checkpoints",
                "Checkpoints written, by consumer kind and form (full, delta)",
                m.checkpoints.clone(),
            );
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry.lock()).is_err() {
            out.clear();
        }
        out
    }
}

/// The label value of a stream: its partition number, or `catalog`.
pub fn stream_label(stream: u32) -> String {
    if stream == crate::record::CATALOG_STREAM {
        "catalog".to_string()
    } else {
        stream.to_string()
    }
}

/// One label pair.
pub fn label(k: &str, v: impl ToString) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

/// Two label pairs.
pub fn labels2(k1: &str, v1: impl ToString, k2: &str, v2: impl ToString) -> Labels {
    vec![
        (k1.to_string(), v1.to_string()),
        (k2.to_string(), v2.to_string()),
    ]
}
