//! `cluster.toml`: the node's configuration file. Every key has a default; unknown keys
//! are errors; `validate` reports every problem at once. Deployment fields can be
//! overridden from the environment (`TROUPE_NODE_NAME`, `TROUPE_DATA_DIR`,
//! `TROUPE_HTTP_ADDR`, `TROUPE_AUTH_TOKEN`, `TROUPE_READ_TOKEN`, `TROUPE_OTLP_ENDPOINT`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use troupe_actors::faults::{Fault, FaultAction, Faults};
use troupe_actors::settings::{
    AlsSettings, ContentSettings, RankerSettings, RestartPolicy, Settings,
};
use troupe_models::als::{AlsParams, RegScaling};
use troupe_models::blend::Normalization;
use troupe_models::dataset::{ValueTransform, WeightConfig};

/// A secret string whose `Debug` never shows the value.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("Secret(<empty>)")
        } else {
            f.write_str("Secret(<redacted>)")
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeSection,
    pub http: HttpSection,
    pub journal: JournalSection,
    pub log: LogSection,
    pub cluster: ClusterSection,
    pub features: FeaturesSection,
    pub events: EventsSection,
    pub popularity: PopularitySection,
    pub content: ContentSection,
    pub als: AlsSection,
    pub item_item: ItemItemSection,
    pub ranker: RankerSection,
    pub supervision: SupervisionSection,
    pub telemetry: TelemetrySection,
    /// Test-only fault injection; refused unless `TROUPE_ALLOW_FAULTS=1`.
    pub faults: Vec<FaultSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    pub name: String,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    pub addr: String,
    pub max_body_bytes: usize,
    pub max_events_per_request: usize,
    /// Reads handled at once.
    pub max_in_flight: usize,
    /// Writes handled at once (admitted separately from reads).
    pub max_in_flight_writes: usize,
    pub auth_token: Secret,
    pub read_token: Secret,
    pub public_reads: bool,
    pub request_timeout_ms: u64,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSection {
    pub partitions: u32,
    pub max_commit_records: usize,
    pub idempotency_window_secs: u64,
    pub idempotency_max_keys: usize,
    pub consumer_dedupe_keys: usize,
    pub max_future_skew_secs: u64,
    pub poll_interval_ms: u64,
    pub retention: bool,
    /// Page cache of the embedded store (MiB).
    pub cache_mb: usize,
}

/// Cluster mode: the members, their cookie, leases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// The members this node is configured with (empty: one node). They are seeds:
    /// members not listed are discovered from their member records in the state store.
    /// This node is the one named `node.name`, listed here or described by `advertise`.
    pub members: Vec<MemberEntry>,
    /// This node's addresses when it is not among `members` (`{name}` stands for
    /// `node.name`, so one file serves every pod of a StatefulSet).
    pub advertise: Option<AdvertiseEntry>,
    /// File holding the cookie (used when `TROUPE_CLUSTER_COOKIE` is not set).
    pub cookie_file: String,
    /// Read from the environment or `cookie_file`, never from this file.
    #[serde(skip)]
    pub cookie: Secret,
    pub heartbeat_ms: u64,
    pub heartbeat_misses: u32,
    pub handshake_timeout_ms: u64,
    pub reconnect_max_ms: u64,
    pub lease_period_ms: u64,
    pub lease_renew_ms: u64,
    pub rebalance_interval_ms: u64,
    pub forward_timeout_ms: u64,
    pub member_hold_down_ms: u64,
    pub member_hold_down_max_ms: u64,
    pub move_budget: u32,
    pub move_budget_window_ms: u64,
    /// Take over an exited member's partitions before its lease runs out (ADR 017).
    pub takeover_on_exit: bool,
    /// Keep the lease, member and leader records through one KV watch instead of
    /// reading every key each round (JetStream).
    pub watch_records: bool,
    /// The newest cross-node protocol version this node speaks (0: this build's newest).
    /// During a rolling upgrade, pin it to the previous build's version until every
    /// member runs the new build, so nothing that needs the new version is used while a
    /// member could still be rolled back; nodes of adjacent versions talk in the older.
    pub protocol: u16,
}

/// Where this node listens for members and clients, when it is not listed.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdvertiseEntry {
    pub cluster_addr: String,
    pub http_addr: String,
    #[serde(default = "yes")]
    pub trainer: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemberEntry {
    pub name: String,
    pub cluster_addr: String,
    pub http_addr: String,
    /// Whether this member may lead the training (default: every member may).
    #[serde(default = "yes")]
    pub trainer: bool,
}

fn yes() -> bool {
    true
}

/// Where records and state live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `embedded` (this node's redb file) or `jetstream` (a shared NATS JetStream).
    pub backend: String,
    pub jetstream: JetStreamSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamSection {
    pub url: String,
    pub stream: String,
    pub replicas: usize,
    pub duplicate_window_secs: u64,
    pub max_age_secs: u64,
    pub max_bytes: i64,
    pub max_in_flight: usize,
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub tls: bool,
    pub tls_ca_file: String,
    /// Monitoring endpoints of the servers (`http://host:8222`), read for whether they
    /// fsync every write (`/varz`); empty: not checked.
    pub monitor_urls: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesSection {
    pub history_len: usize,
    pub checkpoint_every_records: u64,
    pub checkpoint_interval_ms: u64,
    pub poison_max_attempts: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSection {
    pub kind_weights: BTreeMap<String, f32>,
    pub default_weight: f32,
    pub value_transform: String,
    pub negative_kinds: Vec<String>,
    pub seen_kinds: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PopularitySection {
    pub half_life_hours: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentSection {
    /// Directory with model.onnx + tokenizer.json; empty: hashed TF encoder.
    pub onnx_model_dir: String,
    pub onnx_max_len: usize,
    pub tfidf_dim: usize,
    pub batch_size: usize,
    pub workers: usize,
    pub profile_half_life_days: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlsSection {
    pub factors: usize,
    pub iterations: usize,
    pub reg: f32,
    pub alpha: f32,
    pub reg_scaling: String,
    pub retrain_every_events: u64,
    pub retrain_interval_ms: u64,
    pub min_interactions: usize,
    pub keep_versions: usize,
    pub validation_users: usize,
}

/// The item-item branch (EASE), trained with ALS by the trainer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ItemItemSection {
    pub lambda: f32,
    pub max_items: usize,
    pub neighbours: usize,
    pub tail_neighbours: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RankerSection {
    pub weight_als: f32,
    pub weight_content: f32,
    pub weight_popularity: f32,
    pub weight_item_item: f32,
    pub normalization: String,
    pub rrf_k0: f32,
    pub candidates: usize,
    pub branch_deadline_ms: u64,
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
    pub freshness_wait_ms: u64,
    pub max_k: usize,
    pub cache_users: usize,
    pub cache_ttl_ms: u64,
    pub popularity_refresh_ms: u64,
    /// ALS models with at least this many items retrieve candidates through an HNSW
    /// index (0: exact scans always).
    pub ann_min_items: usize,
    pub ann_m: usize,
    pub ann_ef_construction: usize,
    pub ann_ef_search: usize,
    pub ann_norm_ranges: usize,
    /// f16 or f32: how the index stores vectors (scores are always exact f32).
    pub ann_quantization: String,
}

impl RankerSection {
    /// The blend weights in branch order.
    pub fn weights(&self) -> [f32; troupe_models::evaluate::NB] {
        [
            self.weight_als,
            self.weight_content,
            self.weight_popularity,
            self.weight_item_item,
        ]
    }

    /// The HNSW parameters, or why they are invalid.
    pub fn ann_params(&self) -> Result<troupe_models::ann::AnnParams, String> {
        let p = troupe_models::ann::AnnParams {
            m: self.ann_m,
            ef_construction: self.ann_ef_construction,
            ef_search: self.ann_ef_search,
            norm_ranges: self.ann_norm_ranges,
            quantization: self.ann_quantization.parse()?,
        };
        p.validate()?;
        Ok(p)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionSection {
    pub max_restarts: u32,
    pub window_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySection {
    /// OTLP/HTTP endpoint for traces; empty: no export.
    pub otlp_endpoint: String,
    pub service_name: String,
    /// `http/protobuf` (default) or `http/json`.
    pub otlp_protocol: String,
    /// Share of traces recorded where a trace starts (0..=1); a span whose caller sent a
    /// trace context follows the caller's decision (parent-based).
    pub sample_ratio: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSection {
    pub target: String,
    /// `panic`, `error` or `stall`.
    pub action: String,
    #[serde(default)]
    pub stall_ms: u64,
    /// Fire on records/requests with this event id, user or item id (any if absent).
    #[serde(default)]
    pub on: Option<String>,
    #[serde(default)]
    pub times: Option<u64>,
    /// Let this many occasions pass before the first firing (a control-plane fault
    /// after the cluster has settled).
    #[serde(default)]
    pub skip: u64,
}

impl Default for Config {
    fn default() -> Self {
        // Model settings default to the evaluation's (one place for both).
        let model = troupe_models::evaluate::EvalConfig::default();
        let ann = troupe_models::ann::AnnParams::default();
        Config {
            node: NodeSection {
                name: "node-1".into(),
                data_dir: PathBuf::from("./troupe-data"),
            },
            http: HttpSection {
                addr: "127.0.0.1:8080".into(),
                max_body_bytes: 16 << 20,
                max_events_per_request: 10_000,
                max_in_flight: 256,
                max_in_flight_writes: 64,
                auth_token: Secret::default(),
                read_token: Secret::default(),
                public_reads: true,
                request_timeout_ms: 10_000,
                header_read_timeout_ms: 5_000,
                body_read_timeout_ms: 10_000,
            },
            journal: JournalSection {
                partitions: 8,
                max_commit_records: 20_000,
                idempotency_window_secs: 24 * 3600,
                idempotency_max_keys: 1_000_000,
                consumer_dedupe_keys: 10_000,
                max_future_skew_secs: 300,
                poll_interval_ms: 100,
                retention: false,
                cache_mb: troupe_actors::DEFAULT_CACHE_BYTES >> 20,
            },
            log: LogSection {
                backend: "embedded".into(),
                jetstream: JetStreamSection {
                    url: "nats://127.0.0.1:4222".into(),
                    stream: "troupe".into(),
                    replicas: 1,
                    duplicate_window_secs: 120,
                    max_age_secs: 0,
                    max_bytes: -1,
                    max_in_flight: 20_000,
                    request_timeout_ms: 10_000,
                    connect_timeout_ms: 30_000,
                    tls: false,
                    tls_ca_file: String::new(),
                    monitor_urls: Vec::new(),
                },
            },
            cluster: ClusterSection {
                members: Vec::new(),
                advertise: None,
                cookie_file: String::new(),
                cookie: Secret::default(),
                heartbeat_ms: 1_000,
                heartbeat_misses: 3,
                handshake_timeout_ms: 5_000,
                reconnect_max_ms: 5_000,
                lease_period_ms: 15_000,
                lease_renew_ms: 3_000,
                rebalance_interval_ms: 2_000,
                forward_timeout_ms: 1_000,
                member_hold_down_ms: 30_000,
                member_hold_down_max_ms: 600_000,
                move_budget: 16,
                move_budget_window_ms: 60_000,
                takeover_on_exit: true,
                watch_records: true,
                protocol: 0,
            },
            features: FeaturesSection {
                history_len: 200,
                checkpoint_every_records: 50_000,
                checkpoint_interval_ms: 30_000,
                poison_max_attempts: 3,
            },
            events: EventsSection {
                kind_weights: [
                    ("view", 1.0),
                    ("click", 2.0),
                    ("add_to_cart", 4.0),
                    ("purchase", 8.0),
                    ("rating", 1.0),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
                default_weight: 1.0,
                value_transform: "binary".into(),
                negative_kinds: vec!["dislike".into()],
                seen_kinds: Vec::new(),
            },
            popularity: PopularitySection {
                half_life_hours: model.popularity_half_life_days * 24.0,
            },
            content: ContentSection {
                onnx_model_dir: String::new(),
                onnx_max_len: 128,
                tfidf_dim: 1024,
                batch_size: 32,
                workers: 1,
                profile_half_life_days: model.content_half_life_days,
            },
            als: AlsSection {
                factors: model.als.factors,
                iterations: model.als.iterations,
                reg: model.als.reg,
                alpha: model.als.alpha,
                reg_scaling: match model.als.reg_scaling {
                    RegScaling::Count => "count".into(),
                    RegScaling::None => "none".into(),
                },
                retrain_every_events: 50_000,
                retrain_interval_ms: 600_000,
                min_interactions: 100,
                keep_versions: 3,
                validation_users: 500,
            },
            item_item: ItemItemSection {
                lambda: model.ease.lambda,
                max_items: model.ease.max_items,
                neighbours: model.ease.neighbours,
                tail_neighbours: model.ease.tail_neighbours,
            },
            ranker: RankerSection {
                weight_als: model.blend.weights[0],
                weight_content: model.blend.weights[1],
                weight_popularity: model.blend.weights[2],
                weight_item_item: model.blend.weights[3],
                normalization: match model.blend.normalization {
                    Normalization::Rrf { .. } => "rrf".into(),
                    Normalization::ZScore => "zscore".into(),
                },
                rrf_k0: match model.blend.normalization {
                    Normalization::Rrf { k0 } => k0,
                    Normalization::ZScore => 60.0,
                },
                candidates: model.blend.candidates,
                branch_deadline_ms: 50,
                breaker_failures: 3,
                breaker_open_ms: 2_000,
                freshness_wait_ms: 200,
                max_k: 500,
                cache_users: 100_000,
                cache_ttl_ms: 60_000,
                popularity_refresh_ms: 500,
                ann_min_items: 500_000,
                ann_m: ann.m,
                ann_ef_construction: ann.ef_construction,
                ann_ef_search: ann.ef_search,
                ann_norm_ranges: ann.norm_ranges,
                ann_quantization: "f16".into(),
            },
            supervision: SupervisionSection {
                max_restarts: 5,
                window_ms: 30_000,
                backoff_base_ms: 50,
                backoff_max_ms: 5_000,
            },
            telemetry: TelemetrySection {
                otlp_endpoint: String::new(),
                service_name: "troupe".into(),
                otlp_protocol: "http/protobuf".into(),
                sample_ratio: 0.1,
            },
            faults: Vec::new(),
        }
    }
}

macro_rules! default_from {
    ($($t:ident . $f:ident),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                Config::default().$f
            }
        }
    )*};
}
impl Default for JetStreamSection {
    fn default() -> Self {
        Config::default().log.jetstream
    }
}

default_from!(
    NodeSection.node,
    HttpSection.http,
    JournalSection.journal,
    LogSection.log,
    ClusterSection.cluster,
    FeaturesSection.features,
    EventsSection.events,
    PopularitySection.popularity,
    ContentSection.content,
    AlsSection.als,
    ItemItemSection.item_item,
    RankerSection.ranker,
    SupervisionSection.supervision,
    TelemetrySection.telemetry
);

/// Reads an environment variable (a closure, so tests can pass their own).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// The JetStream backend's settings; credentials come from the environment
    /// (`TROUPE_NATS_CREDS`, a .creds file, or `TROUPE_NATS_TOKEN`), passed in as `env`.
    pub fn jetstream_config(
        &self,
        env: Option<EnvLookup<'_>>,
    ) -> troupe_actors::jetstream::JetStreamConfig {
        use troupe_actors::jetstream::{Auth, JetStreamConfig};
        let j = &self.log.jetstream;
        let ms = std::time::Duration::from_millis;
        let secs = std::time::Duration::from_secs;
        let auth = match env {
            Some(get) => match (get("TROUPE_NATS_CREDS"), get("TROUPE_NATS_TOKEN")) {
                (Some(path), _) if !path.is_empty() => Auth::CredsFile(PathBuf::from(path)),
                (_, Some(token)) if !token.is_empty() => Auth::Token(token),
                _ => Auth::None,
            },
            None => Auth::None,
        };
        JetStreamConfig {
            url: j.url.clone(),
            stream: j.stream.clone(),
            replicas: j.replicas,
            duplicate_window: secs(j.duplicate_window_secs),
            max_age: secs(j.max_age_secs),
            max_bytes: j.max_bytes,
            max_in_flight: j.max_in_flight,
            timeout: ms(j.request_timeout_ms),
            partitions: self.journal.partitions,
            client_name: format!("troupe {}", self.node.name),
            auth,
            tls_required: j.tls,
            tls_ca_file: (!j.tls_ca_file.is_empty()).then(|| PathBuf::from(&j.tls_ca_file)),
        }
    }

    /// Reads and parses a config file (syntax and unknown keys; see `validate`).
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Applies environment overrides for deployment fields.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(v) = get("TROUPE_NODE_NAME") {
            self.node.name = v;
        }
        if let Some(v) = get("TROUPE_DATA_DIR") {
            self.node.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("TROUPE_HTTP_ADDR") {
            self.http.addr = v;
        }
        if let Some(v) = get("TROUPE_AUTH_TOKEN") {
            self.http.auth_token = Secret(v);
        }
        if let Some(v) = get("TROUPE_READ_TOKEN") {
            self.http.read_token = Secret(v);
        }
        if let Some(v) = get("TROUPE_OTLP_ENDPOINT") {
            self.telemetry.otlp_endpoint = v;
        }
        if let Some(v) = get("TROUPE_CLUSTER_COOKIE") {
            self.cluster.cookie = Secret(v);
        }
    }

    /// Reads the cluster cookie from `cluster.cookie_file` unless the environment gave
    /// one (only in cluster mode).
    pub fn resolve_cookie(&mut self) -> Result<(), String> {
        let c = &mut self.cluster;
        if c.members.is_empty() || !c.cookie.0.is_empty() || c.cookie_file.is_empty() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&c.cookie_file)
            .map_err(|e| format!("cluster.cookie_file {}: {e}", c.cookie_file))?;
        c.cookie = Secret(text.trim().to_string());
        Ok(())
    }

    /// True when `[cluster] members` is set.
    pub fn clustered(&self) -> bool {
        !self.cluster.members.is_empty()
    }

    /// This node's own member entry: listed in `members`, or from `advertise`.
    pub fn own_member(&self) -> Option<MemberEntry> {
        let c = &self.cluster;
        let name = &self.node.name;
        c.members
            .iter()
            .find(|m| &m.name == name)
            .cloned()
            .or_else(|| {
                c.advertise.as_ref().map(|a| MemberEntry {
                    name: name.clone(),
                    cluster_addr: a.cluster_addr.replace("{name}", name),
                    http_addr: a.http_addr.replace("{name}", name),
                    trainer: a.trainer,
                })
            })
    }

    /// Every problem with the values, at once.
    pub fn validate(&self, faults_allowed: bool) -> Vec<String> {
        let mut p = Vec::new();
        let mut need = |ok: bool, msg: &str| {
            if !ok {
                p.push(msg.to_string());
            }
        };
        need(
            !self.node.name.trim().is_empty(),
            "node.name must not be empty",
        );
        need(
            self.http.addr.parse::<std::net::SocketAddr>().is_ok(),
            "http.addr must be host:port with a numeric IP (e.g. 127.0.0.1:8080)",
        );
        need(
            self.http.max_body_bytes >= 1024,
            "http.max_body_bytes must be >= 1024",
        );
        need(
            self.http.max_events_per_request >= 1,
            "http.max_events_per_request must be >= 1",
        );
        need(
            self.http.max_in_flight >= 1 && self.http.max_in_flight_writes >= 1,
            "http.max_in_flight and http.max_in_flight_writes must be >= 1",
        );
        need(
            self.http.request_timeout_ms >= 1
                && self.http.header_read_timeout_ms >= 1
                && self.http.body_read_timeout_ms >= 1,
            "http.request_timeout_ms, header_read_timeout_ms and body_read_timeout_ms must be >= 1",
        );
        need(
            self.http.read_token.0.is_empty() || !self.http.auth_token.0.is_empty(),
            "http.read_token needs http.auth_token (a read token alone would leave writes open)",
        );
        need(
            self.http.auth_token.0.is_empty()
                || self.http.read_token.0.is_empty()
                || self.http.auth_token != self.http.read_token,
            "http.read_token must differ from http.auth_token",
        );
        need(
            self.journal.idempotency_max_keys >= 1,
            "journal.idempotency_max_keys must be >= 1",
        );
        need(
            (2..=4096).contains(&self.journal.partitions),
            "journal.partitions must be in 2..=4096",
        );
        need(
            self.journal.max_commit_records >= 1,
            "journal.max_commit_records must be >= 1",
        );
        need(
            self.journal.poll_interval_ms >= 1,
            "journal.poll_interval_ms must be >= 1",
        );
        need(
            matches!(self.log.backend.as_str(), "embedded" | "jetstream"),
            "log.backend must be \"embedded\" or \"jetstream\"",
        );
        if self.log.backend == "jetstream" {
            let j = &self.log.jetstream;
            let problem = self.jetstream_config(None).validate().err();
            need(
                problem.is_none(),
                &format!("log.jetstream: {}", problem.unwrap_or_default()),
            );
            need(
                j.request_timeout_ms >= 1 && j.connect_timeout_ms >= 1,
                "log.jetstream.request_timeout_ms and connect_timeout_ms must be >= 1",
            );
            need(
                !j.url.trim().is_empty(),
                "log.jetstream.url must not be empty",
            );
            for u in &j.monitor_urls {
                need(
                    u.starts_with("http://") || u.starts_with("https://"),
                    &format!("log.jetstream.monitor_urls: {u:?} is not an http(s) URL"),
                );
            }
        }
        if self.clustered() {
            let c = &self.cluster;
            need(
                self.log.backend == "jetstream",
                "cluster mode ([cluster] members) needs log.backend = \"jetstream\": a partition can only move to another node when its record is in a shared log",
            );
            let valid_name = |n: &str| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            };
            let own = self.own_member();
            let listed = c.members.iter().any(|m| m.name == self.node.name);
            let entries = c
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| (format!("cluster.members[{i}]"), m.clone()))
                .chain(
                    own.filter(|_| !listed)
                        .map(|m| ("cluster.advertise".to_string(), m)),
                );
            for (at, m) in entries {
                need(
                    valid_name(&m.name),
                    &format!("{at}.name `{}` must be 1-64 of A-Z a-z 0-9 - _", m.name),
                );
                need(
                    m.cluster_addr.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                    }),
                    &format!("{at}.cluster_addr `{}` must be host:port", m.cluster_addr),
                );
                need(
                    m.http_addr
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                    &format!("{at}.http_addr `{}` must be host:port", m.http_addr),
                );
                need(
                    c.members.iter().filter(|o| o.name == m.name).count() <= 1,
                    &format!(
                        "cluster.members: the name `{}` appears more than once",
                        m.name
                    ),
                );
            }
            need(
                self.own_member().is_some(),
                &format!(
                    "node.name `{}` is not among cluster.members and cluster.advertise is not set",
                    self.node.name
                ),
            );
            need(
                !c.cookie.0.is_empty(),
                "cluster mode needs a cookie: set TROUPE_CLUSTER_COOKIE or cluster.cookie_file",
            );
            need(
                c.heartbeat_ms >= 10 && c.heartbeat_misses >= 1,
                "cluster.heartbeat_ms must be >= 10 and cluster.heartbeat_misses >= 1",
            );
            need(
                c.handshake_timeout_ms >= 10 && c.reconnect_max_ms >= c.heartbeat_ms,
                "cluster.handshake_timeout_ms must be >= 10 and cluster.reconnect_max_ms >= cluster.heartbeat_ms",
            );
            need(
                c.lease_renew_ms >= 10 && c.lease_renew_ms.saturating_mul(3) <= c.lease_period_ms,
                "cluster.lease_renew_ms must be >= 10 and at most a third of cluster.lease_period_ms",
            );
            need(
                c.forward_timeout_ms >= 1,
                "cluster.forward_timeout_ms must be >= 1",
            );
            need(
                c.member_hold_down_max_ms >= c.member_hold_down_ms,
                "cluster.member_hold_down_max_ms must be >= cluster.member_hold_down_ms",
            );
            need(
                c.move_budget >= 1 && c.move_budget_window_ms >= 1,
                "cluster.move_budget and cluster.move_budget_window_ms must be >= 1",
            );
            let (oldest, newest) = (
                troupe_actors::proto::wire::OLDEST,
                troupe_actors::proto::wire::PROTOCOL,
            );
            need(
                c.protocol == 0 || (oldest..=newest).contains(&c.protocol),
                &format!("cluster.protocol must be 0 (the newest) or in {oldest}..={newest}"),
            );
        }
        need(
            (1..=65_536).contains(&self.journal.cache_mb),
            "journal.cache_mb must be in 1..=65536",
        );
        need(
            self.features.history_len >= 1,
            "features.history_len must be >= 1",
        );
        need(
            self.features.checkpoint_every_records >= 1,
            "features.checkpoint_every_records must be >= 1",
        );
        need(
            self.features.checkpoint_interval_ms >= 1,
            "features.checkpoint_interval_ms must be >= 1",
        );
        need(
            self.features.poison_max_attempts >= 1,
            "features.poison_max_attempts must be >= 1",
        );
        need(
            self.events
                .kind_weights
                .values()
                .all(|w| w.is_finite() && *w >= 0.0),
            "events.kind_weights must be finite and >= 0",
        );
        need(
            self.events
                .value_transform
                .parse::<ValueTransform>()
                .is_ok(),
            "events.value_transform must be binary, raw or log1p",
        );
        need(
            self.popularity.half_life_hours >= 0.0,
            "popularity.half_life_hours must be >= 0",
        );
        need(
            self.content.tfidf_dim >= 1,
            "content.tfidf_dim must be >= 1",
        );
        need(
            self.content.batch_size >= 1,
            "content.batch_size must be >= 1",
        );
        need(self.content.workers >= 1, "content.workers must be >= 1");
        if !self.content.onnx_model_dir.is_empty() {
            let d = Path::new(&self.content.onnx_model_dir);
            need(
                d.join("model.onnx").is_file() && d.join("tokenizer.json").is_file(),
                "content.onnx_model_dir must contain model.onnx and tokenizer.json",
            );
        }
        need(
            (1..=1024).contains(&self.als.factors),
            "als.factors must be in 1..=1024",
        );
        need(self.als.iterations >= 1, "als.iterations must be >= 1");
        need(
            self.als.reg >= 0.0 && self.als.alpha >= 0.0,
            "als.reg and als.alpha must be >= 0",
        );
        need(
            matches!(self.als.reg_scaling.as_str(), "count" | "none"),
            "als.reg_scaling must be count or none",
        );
        need(
            self.als.retrain_every_events >= 1,
            "als.retrain_every_events must be >= 1",
        );
        need(
            self.als.retrain_interval_ms >= 1,
            "als.retrain_interval_ms must be >= 1",
        );
        need(
            self.als.keep_versions >= 1,
            "als.keep_versions must be >= 1",
        );
        let w = self.ranker.weights();
        need(
            self.item_item.lambda.is_finite() && self.item_item.lambda > 0.0,
            "item_item.lambda must be a finite number > 0",
        );
        need(
            self.item_item.max_items >= 1 && self.item_item.neighbours >= 1,
            "item_item.max_items and item_item.neighbours must be >= 1",
        );
        need(
            w.iter().all(|x| x.is_finite() && *x >= 0.0) && w.iter().sum::<f32>() > 0.0,
            "ranker weights must be >= 0 and not all 0",
        );
        need(
            matches!(self.ranker.normalization.as_str(), "rrf" | "zscore"),
            "ranker.normalization must be rrf or zscore",
        );
        need(
            self.ranker.candidates >= 1,
            "ranker.candidates must be >= 1",
        );
        need(
            self.ranker.branch_deadline_ms >= 1,
            "ranker.branch_deadline_ms must be >= 1",
        );
        need(
            self.ranker.breaker_failures >= 1,
            "ranker.breaker_failures must be >= 1",
        );
        need(
            (1..=10_000).contains(&self.ranker.max_k),
            "ranker.max_k must be in 1..=10000",
        );
        let ann = self.ranker.ann_params().err();
        need(
            ann.is_none(),
            &format!("ranker.ann_*: {}", ann.clone().unwrap_or_default()),
        );
        need(
            self.supervision.backoff_base_ms <= self.supervision.backoff_max_ms,
            "supervision.backoff_base_ms must be <= backoff_max_ms",
        );
        need(
            self.supervision.window_ms >= 1,
            "supervision.window_ms must be >= 1",
        );
        need(
            matches!(
                self.telemetry.otlp_protocol.as_str(),
                "http/protobuf" | "http/json"
            ),
            "telemetry.otlp_protocol must be http/protobuf or http/json",
        );
        need(
            (0.0..=1.0).contains(&self.telemetry.sample_ratio),
            "telemetry.sample_ratio must be in 0..=1",
        );
        if !self.faults.is_empty() && !faults_allowed {
            p.push(
                "[[faults]] is set but TROUPE_ALLOW_FAULTS=1 is not: refusing to inject faults"
                    .into(),
            );
        }
        for (i, f) in self.faults.iter().enumerate() {
            if !matches!(f.action.as_str(), "panic" | "error" | "stall") {
                p.push(format!("faults[{i}].action must be panic, error or stall"));
            }
        }
        p
    }

    /// Typed settings for the actors.
    pub fn settings(&self) -> Settings {
        let ms = Duration::from_millis;
        let mut s = Settings::defaults(&self.node.name);
        s.partitions = self.journal.partitions;
        s.max_commit_records = self.journal.max_commit_records;
        s.idempotency_window = Duration::from_secs(self.journal.idempotency_window_secs);
        s.idempotency_max_keys = self.journal.idempotency_max_keys;
        s.consumer_dedupe_keys = self.journal.consumer_dedupe_keys;
        s.max_future_skew = Duration::from_secs(self.journal.max_future_skew_secs);
        s.poll_interval = ms(self.journal.poll_interval_ms);
        s.retention = self.journal.retention;
        s.checkpoint_every_records = self.features.checkpoint_every_records;
        s.checkpoint_interval = ms(self.features.checkpoint_interval_ms);
        s.poison_max_attempts = self.features.poison_max_attempts;
        s.history_len = self.features.history_len;
        s.weights = WeightConfig {
            kind_weights: self
                .events
                .kind_weights
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), *v))
                .collect(),
            default_weight: self.events.default_weight,
            transform: self
                .events
                .value_transform
                .parse()
                .unwrap_or(ValueTransform::Binary),
            negative_kinds: self
                .events
                .negative_kinds
                .iter()
                .map(|k| k.to_ascii_lowercase())
                .collect(),
        };
        s.seen_kinds = self.events.seen_kinds.clone();
        s.popularity_half_life = Duration::from_secs_f64(self.popularity.half_life_hours * 3600.0);
        s.content = ContentSettings {
            onnx_model_dir: (!self.content.onnx_model_dir.is_empty())
                .then(|| PathBuf::from(&self.content.onnx_model_dir)),
            onnx_max_len: self.content.onnx_max_len,
            tfidf_dim: self.content.tfidf_dim,
            batch_size: self.content.batch_size,
            workers: self.content.workers,
            profile_half_life: Duration::from_secs_f64(
                self.content.profile_half_life_days * 86_400.0,
            ),
        };
        s.als = AlsSettings {
            params: AlsParams {
                factors: self.als.factors,
                iterations: self.als.iterations,
                reg: self.als.reg,
                alpha: self.als.alpha,
                reg_scaling: if self.als.reg_scaling == "none" {
                    RegScaling::None
                } else {
                    RegScaling::Count
                },
                ..AlsParams::default()
            },
            retrain_every_events: self.als.retrain_every_events,
            retrain_interval: ms(self.als.retrain_interval_ms),
            min_interactions: self.als.min_interactions,
            keep_versions: self.als.keep_versions,
            validation_users: self.als.validation_users,
            item_item: troupe_models::ease::EaseParams {
                lambda: self.item_item.lambda,
                max_items: self.item_item.max_items,
                neighbours: self.item_item.neighbours,
                tail_neighbours: self.item_item.tail_neighbours,
            },
        };
        s.ranker = RankerSettings {
            weights: self.ranker.weights(),
            normalization: if self.ranker.normalization == "zscore" {
                Normalization::ZScore
            } else {
                Normalization::Rrf {
                    k0: self.ranker.rrf_k0,
                }
            },
            candidates: self.ranker.candidates,
            branch_deadline: ms(self.ranker.branch_deadline_ms),
            breaker_failures: self.ranker.breaker_failures,
            breaker_open: ms(self.ranker.breaker_open_ms),
            freshness_wait: ms(self.ranker.freshness_wait_ms),
            max_k: self.ranker.max_k,
            cache_users: self.ranker.cache_users,
            cache_ttl: ms(self.ranker.cache_ttl_ms),
            popularity_refresh: ms(self.ranker.popularity_refresh_ms),
            ann_min_items: self.ranker.ann_min_items,
            ann: self.ranker.ann_params().unwrap_or_default(),
        };
        if self.clustered() {
            let c = &self.cluster;
            s.cluster = Some(troupe_actors::settings::ClusterSettings {
                members: c
                    .members
                    .iter()
                    .chain(
                        self.own_member()
                            .filter(|o| !c.members.iter().any(|m| m.name == o.name))
                            .as_ref(),
                    )
                    .map(|m| troupe_actors::settings::Member {
                        name: m.name.clone(),
                        cluster_addr: m.cluster_addr.clone(),
                        http_addr: m.http_addr.clone(),
                        trainer: m.trainer,
                    })
                    .collect(),
                cookie: c.cookie.0.clone(),
                heartbeat: ms(c.heartbeat_ms),
                heartbeat_misses: c.heartbeat_misses,
                handshake_timeout: ms(c.handshake_timeout_ms),
                reconnect_max: ms(c.reconnect_max_ms),
                lease_period: ms(c.lease_period_ms),
                lease_renew: ms(c.lease_renew_ms),
                rebalance_interval: ms(c.rebalance_interval_ms),
                forward_timeout: ms(c.forward_timeout_ms),
                member_hold_down: ms(c.member_hold_down_ms),
                member_hold_down_max: ms(c.member_hold_down_max_ms),
                move_budget: c.move_budget,
                move_budget_window: ms(c.move_budget_window_ms),
                takeover_on_exit: c.takeover_on_exit,
                watch_records: c.watch_records,
            });
        }
        s.restart = RestartPolicy {
            max_restarts: self.supervision.max_restarts,
            window: ms(self.supervision.window_ms),
            backoff_base: ms(self.supervision.backoff_base_ms),
            backoff_max: ms(self.supervision.backoff_max_ms),
        };
        s
    }

    pub fn faults(&self) -> Faults {
        Faults {
            list: self
                .faults
                .iter()
                .map(|f| {
                    let action = match f.action.as_str() {
                        "panic" => FaultAction::Panic,
                        "error" => FaultAction::Error,
                        _ => FaultAction::Stall(Duration::from_millis(f.stall_ms)),
                    };
                    Fault::new(&f.target, action, f.on.clone(), f.times).skipping(f.skip)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster.toml");
        let c = Config::load(&path).unwrap();
        assert!(c.validate(false).is_empty(), "{:?}", c.validate(false));
        let s = c.settings();
        assert!(s.partitions > 1);
    }

    #[test]
    fn model_defaults_are_the_evaluations_and_the_shipped_file_states_them() {
        let eval = troupe_models::evaluate::EvalConfig::default();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster.toml");
        for s in [
            Config::default().settings(),
            Config::load(&path).unwrap().settings(),
        ] {
            assert_eq!(s.ranker.weights, eval.blend.weights);
            assert_eq!(s.ranker.normalization, eval.blend.normalization);
            assert_eq!(s.ranker.candidates, eval.blend.candidates);
            let days = |d: Duration| d.as_secs_f64() / 86_400.0;
            assert!((days(s.popularity_half_life) - eval.popularity_half_life_days).abs() < 1e-9);
            assert!((days(s.content.profile_half_life) - eval.content_half_life_days).abs() < 1e-9);
            let (a, b) = (&s.als.params, &eval.als);
            assert_eq!(
                (a.factors, a.iterations, a.reg, a.alpha),
                (b.factors, b.iterations, b.reg, b.alpha)
            );
            assert_eq!(a.reg_scaling, b.reg_scaling);
        }
    }

    #[test]
    fn every_problem_reported_and_unknown_keys_refused() {
        let c = Config::parse("[journal]\npartitions = 1\n[ranker]\nmax_k = 0\n[[faults]]\ntarget = \"x\"\naction = \"boom\"\n").unwrap();
        let p = c.validate(false);
        assert!(p.iter().any(|m| m.contains("journal.partitions")));
        assert!(p.iter().any(|m| m.contains("ranker.max_k")));
        assert!(p.iter().any(|m| m.contains("TROUPE_ALLOW_FAULTS")));
        assert!(p.iter().any(|m| m.contains("faults[0].action")));
        let e = Config::parse("[journal]\npartitons = 4\n").unwrap_err();
        assert!(e.contains("partitons"), "{e}");
    }

    proptest::proptest! {
        /// Any text as a config file: a config or an error, never a panic.
        #[test]
        fn any_text_parses_or_is_refused(text in "\\PC*") {
            if let Ok(c) = Config::parse(&text) {
                let _ = c.validate(false);
            }
        }
    }

    #[test]
    fn a_node_not_listed_describes_itself_by_advertise() {
        let seeds = "[log]\nbackend = \"jetstream\"\n[cluster]\nmembers = [{ name = \"s-0\", cluster_addr = \"s-0.troupe:7100\", http_addr = \"s-0.troupe:8080\" }]\n";
        let mut c = Config::parse(seeds).unwrap();
        c.apply_env(|k| match k {
            "TROUPE_NODE_NAME" => Some("s-7".into()),
            "TROUPE_CLUSTER_COOKIE" => Some("x".into()),
            _ => None,
        });
        let p = c.validate(false);
        assert!(
            p.iter()
                .any(|m| m.contains("`s-7` is not among cluster.members")),
            "{p:?}"
        );
        let mut c = Config::parse(&format!(
            "{seeds}advertise = {{ cluster_addr = \"{{name}}.troupe:7100\", http_addr = \"{{name}}.troupe:8080\", trainer = false }}\n"
        ))
        .unwrap();
        c.apply_env(|k| match k {
            "TROUPE_NODE_NAME" => Some("s-7".into()),
            "TROUPE_CLUSTER_COOKIE" => Some("x".into()),
            _ => None,
        });
        assert_eq!(c.validate(false), Vec::<String>::new());
        let own = c.own_member().unwrap();
        assert_eq!(
            (
                own.cluster_addr.as_str(),
                own.http_addr.as_str(),
                own.trainer
            ),
            ("s-7.troupe:7100", "s-7.troupe:8080", false)
        );
        let members = c.settings().cluster.unwrap().members;
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["s-0", "s-7"]);
        // A bad advertised address is named as such.
        let mut c = Config::parse(&format!(
            "{seeds}advertise = {{ cluster_addr = \"{{name}}\", http_addr = \"{{name}}:8080\" }}\n"
        ))
        .unwrap();
        c.apply_env(|k| (k == "TROUPE_CLUSTER_COOKIE").then(|| "x".to_string()));
        let p = c.validate(false);
        assert!(
            p.iter()
                .any(|m| m.contains("cluster.advertise.cluster_addr")),
            "{p:?}"
        );
    }

    #[test]
    fn secrets_are_redacted_and_env_overrides() {
        let mut c = Config::default();
        c.apply_env(|k| (k == "TROUPE_AUTH_TOKEN").then(|| "hunter2".to_string()));
        assert_eq!(c.http.auth_token.0, "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
