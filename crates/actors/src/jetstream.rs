//! The JetStream backend (cluster mode): [`JetStreamLog`] and [`JetStreamState`] over one
//! NATS server or cluster. Layout (ADR 010):
//!
//! - one stream (`stream`, default `troupe`) with a subject per partition,
//!   `<stream>.p.<n>`, and one for the catalog, `<stream>.catalog`; a record's offset is
//!   its stream sequence (increasing per subject, sparse);
//! - a record is its encoded payload (`record::encode`: format and checksum) with the
//!   idempotency key as `Nats-Msg-Id` (32 hex digits); its append time is the server's
//!   timestamp;
//! - state: a Key-Value bucket `<stream>_state` (pointers, constants, truncation marks,
//!   small records) and an Object Store bucket `<stream>_blobs` (checkpoints, snapshots,
//!   dead letters). The KV bucket's stream is created by hand (the client's
//!   `create_key_value` does not work against 2.9 servers, see `../shared/facts`).
//!
//! Appends are pipelined: every record of a batch is published before any ack is
//! awaited, and the client bounds the acks in flight (`max_in_flight`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::log::{AppendEntry, Heads, Log, LogError, Position, ReadAfter, Tail};
use crate::record::{self, Record, CATALOG_STREAM};
use crate::state::{StateError, StateStore, Versioned};

/// How to reach and lay out the JetStream backend (`[log.jetstream]` in `cluster.toml`).
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Stream name; also the subjects' prefix and the buckets' prefix.
    pub stream: String,
    /// Replicas of the stream and of every bucket created (1, 3 or 5).
    pub replicas: usize,
    /// The server's duplicate window (`Nats-Msg-Id` dedupe).
    pub duplicate_window: Duration,
    /// Age-based deletion of records (zero: off, the default: it would delete records a
    /// checkpoint still needs).
    pub max_age: Duration,
    /// Size limit of the stream in bytes (-1: none).
    pub max_bytes: i64,
    /// Publishes awaiting their ack at once, over all requests of this node.
    pub max_in_flight: usize,
    /// Time limit of one request to the server, and of an append's acks.
    pub timeout: Duration,
    /// Event partitions (the subjects `0..partitions`).
    pub partitions: u32,
    /// Connection name shown by the server.
    pub client_name: String,
    pub auth: Auth,
    /// Require TLS; with `ca_file`, trust that root.
    pub tls_required: bool,
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// Credentials, from the environment (never logged).
#[derive(Clone, Default)]
pub enum Auth {
    #[default]
    None,
    Token(String),
    CredsFile(std::path::PathBuf),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => write!(f, "none"),
            Auth::Token(_) => write!(f, "token (hidden)"),
            Auth::CredsFile(p) => write!(f, "creds file {}", p.display()),
        }
    }
}

impl JetStreamConfig {
    /// Defaults for a local server.
    pub fn local(url: &str, stream: &str, partitions: u32) -> Self {
        JetStreamConfig {
            url: url.to_string(),
            stream: stream.to_string(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_in_flight: 20_000,
            timeout: Duration::from_secs(10),
            partitions,
            client_name: "troupe".into(),
            auth: Auth::None,
            tls_required: false,
            tls_ca_file: None,
        }
    }

    /// Refuses names the server would refuse, and retention that cannot hold the
    /// duplicate window.
    pub fn validate(&self) -> Result<(), String> {
        if self.stream.is_empty()
            || !self
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "stream name {:?}: use letters, digits, '_' and '-'",
                self.stream
            ));
        }
        if !matches!(self.replicas, 1..=5) {
            return Err(format!("replicas = {}: must be 1 to 5", self.replicas));
        }
        if self.duplicate_window.is_zero() {
            return Err("duplicate_window must be positive".into());
        }
        if !self.max_age.is_zero() && self.duplicate_window > self.max_age {
            return Err(format!(
                "the duplicate window ({} s) does not fit inside the retention max_age ({} s)",
                self.duplicate_window.as_secs(),
                self.max_age.as_secs()
            ));
        }
        self.servers()?;
        if self.max_in_flight == 0 {
            return Err("max_in_flight must be positive".into());
        }
        Ok(())
    }

    /// The server addresses of `url` (comma-separated).
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .map_err(|e| format!("server URL {u:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.is_empty() {
                    Err("no server URL".to_string())
                } else {
                    Ok(v)
                }
            })
    }

    /// The subject of a stream (partition or catalog).
    pub fn subject(&self, stream: u32) -> String {
        if stream == CATALOG_STREAM {
            format!("{}.catalog", self.stream)
        } else {
            format!("{}.p.{stream}", self.stream)
        }
    }

    /// The stream (partition or catalog) of a subject of this layout.
    pub fn stream_of(&self, subject: &str) -> Option<u32> {
        let rest = subject.strip_prefix(&self.stream)?.strip_prefix('.')?;
        if rest == "catalog" {
            return Some(CATALOG_STREAM);
        }
        let p: u32 = rest.strip_prefix("p.")?.parse().ok()?;
        (p < self.partitions).then_some(p)
    }

    fn kv_bucket(&self) -> String {
        format!("{}_state", self.stream)
    }

    fn blob_bucket(&self) -> String {
        format!("{}_blobs", self.stream)
    }

    fn cache_bucket(&self) -> String {
        format!("{}_cache", self.stream)
    }

    /// A partition of this layout or the catalog.
    fn has_stream(&self, stream: u32) -> bool {
        stream == CATALOG_STREAM || stream < self.partitions
    }
}

/// A connection to the backend with the stream and buckets in place.
#[derive(Clone)]
pub struct JetStream {
    pub config: Arc<JetStreamConfig>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    stream: stream::Stream,
    kv: kv::Store,
    cache: kv::Store,
    blobs: object_store::ObjectStore,
    /// What the servers' monitoring endpoints said about durability (`sync_interval`),
    /// when the node could ask them (see [`SyncCheck`]).
    pub sync: SharedSync,
    /// When this connection was made (ns since the epoch): part of batch ids.
    started_ns: u128,
}

/// The last [`SyncCheck`], shared with the task that refreshes it.
pub type SharedSync = Arc<parking_lot::Mutex<SyncCheck>>;

/// Whether the servers fsync every write before acknowledging it, as far as this node
/// can tell: only the monitoring endpoint (`/varz`) says so, and only when the node is
/// given its address (`[log.jetstream] monitor_urls`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SyncCheck {
    /// No monitoring address configured: the node cannot tell.
    #[default]
    Unknown,
    /// Every server asked syncs every write (`sync_interval: always`).
    Always,
    /// These servers flush on an interval: an acknowledged write can be lost to a power
    /// failure within it.
    Interval { servers: Vec<String> },
    /// A monitoring endpoint did not answer.
    Unreachable { error: String },
}

impl SyncCheck {
    /// The check from the `/varz` documents of the servers (`(url, document)`):
    /// `jetstream.config.sync_always` is true on a server that fsyncs every write.
    pub fn from_varz(docs: &[(String, Result<serde_json::Value, String>)]) -> SyncCheck {
        if docs.is_empty() {
            return SyncCheck::Unknown;
        }
        let mut lazy = Vec::new();
        for (url, doc) in docs {
            match doc {
                Err(e) => {
                    return SyncCheck::Unreachable {
                        error: format!("{url}: {e}"),
                    }
                }
                Ok(v) => {
                    if v["jetstream"]["config"]["sync_always"].as_bool() != Some(true) {
                        let name = v["server_name"].as_str().unwrap_or(url).to_string();
                        lazy.push(name);
                    }
                }
            }
        }
        if lazy.is_empty() {
            SyncCheck::Always
        } else {
            SyncCheck::Interval { servers: lazy }
        }
    }

    /// The gauge value: 1 every server syncs every write, 0 some do not, -1 unknown.
    pub fn gauge(&self) -> i64 {
        match self {
            SyncCheck::Always => 1,
            SyncCheck::Interval { .. } => 0,
            SyncCheck::Unknown | SyncCheck::Unreachable { .. } => -1,
        }
    }
}

/// Oldest server release a replicated cluster (`replicas > 1`) may run on. 2.10.20 to
/// 2.10.22 could lose whole streams on a process crash (fixed in 2.10.23, Jepsen's NATS
/// analysis, 2025-12); 2.9.10 diverged a KV replica from its leader after a leader restart
/// in this project's own fault runs; atomic batch publish (durable ingest at batch rates)
/// arrived in 2.12. 2.12.1 is the release Jepsen analysed.
pub const REPLICATED_FLOOR: (u32, u32, u32) = (2, 12, 1);

/// The first release that takes atomic batch publishes.
pub const ATOMIC_SINCE: (u32, u32, u32) = (2, 12, 0);

/// Most messages in one atomic batch (the server's default limit, `max_batch_size`).
const ATOMIC_BATCH_MAX: usize = 1000;

/// Atomic batches this node has open at once (the server allows 50 per stream over all
/// its clients by default; beyond it a batch is refused and published one by one).
const ATOMIC_BATCHES_IN_FLIGHT: usize = 8;

/// Server error codes an atomic batch's commit can answer with.
const ERR_ATOMIC_DISABLED: u64 = 10174;
const ERR_ATOMIC_DUPLICATE: u64 = 10201;
const ERR_ATOMIC_TOO_MANY: u64 = 10210;

/// Parses a server version (`2.15.1`, `2.12.0-RC.3`).
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.trim().trim_start_matches('v').split(['.', '-']);
    let mut n = || it.next().and_then(|x| x.parse::<u32>().ok());
    Some((n()?, n()?, n().unwrap_or(0)))
}

/// Checks a server version against the floor: `Err` (refuse to start) for a replicated
/// stream on a server below [`REPLICATED_FLOOR`], `Ok(Some(warning))` for one server below
/// it, `Ok(None)` otherwise.
pub fn check_version(version: &str, replicas: usize) -> Result<Option<String>, String> {
    let floor = REPLICATED_FLOOR;
    let f = format!("{}.{}.{}", floor.0, floor.1, floor.2);
    match parse_version(version) {
        Some(v) if v >= floor => Ok(None),
        found => {
            let what = match found {
                Some(_) => format!("nats-server {version} is older than {f}"),
                None => format!("nats-server reports version {version:?}, which does not parse"),
            };
            if replicas > 1 {
                Err(format!(
                    "{what}, the oldest release a replicated cluster (replicas = {replicas}) may run on: older servers lost or diverged replicated data in known faults (2.10.20-2.10.22 lost whole streams on a crash; 2.9 diverged a KV replica from its leader). Upgrade the servers (scripts/install-nats-server.sh installs the tested release)"
                ))
            } else {
                Ok(Some(format!(
                    "{what}: one server below the floor is allowed but untested; records are published one by one (no atomic batches) and older servers have known JetStream faults"
                )))
            }
        }
    }
}

/// Why a start step did not succeed: worth another attempt, or refused for good (a
/// configuration that contradicts what the server holds).
#[derive(Debug)]
pub enum StartError {
    Transient(String),
    Refused(String),
}

impl From<String> for StartError {
    fn from(s: String) -> Self {
        StartError::Transient(s)
    }
}

/// Runs one start step until it succeeds, is refused, or `deadline` passes. Each attempt
/// is bounded by a short time that doubles from 500 ms up to `longest` (the request
/// timeout), with a short pause between attempts: a step that meets servers still
/// electing their leaders ("no responders", or no answer at all) is tried again within
/// about a second of the election instead of after a whole request timeout.
pub async fn retry_until<T, F, Fut>(
    what: &str,
    deadline: std::time::Instant,
    longest: Duration,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StartError>>,
{
    let mut bound = Duration::from_millis(500).min(longest);
    let mut pause = Duration::from_millis(50);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let why =
            match tokio::time::timeout(bound.min(left.max(Duration::from_millis(1))), attempt())
                .await
            {
                Ok(Ok(v)) => {
                    if tries > 1 {
                        tracing::info!(step = what, tries, "start step succeeded after retries");
                    }
                    return Ok(v);
                }
                Ok(Err(StartError::Refused(e))) => return Err(format!("{what}: {e}")),
                Ok(Err(StartError::Transient(e))) => e,
                Err(_) => format!("no answer within {} ms", bound.as_millis()),
            };
        if std::time::Instant::now() + pause >= deadline {
            return Err(format!("{what}: {why} (gave up after {tries} attempts)"));
        }
        tracing::warn!(step = what, attempt = tries, error = %why, "start step failed; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
        bound = (bound * 2).min(longest);
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl JetStream {
    /// Connects and creates (or checks) the stream and the buckets, retrying each step
    /// for up to three request timeouts (see [`JetStream::connect_until`]).
    pub async fn connect(config: JetStreamConfig) -> Result<JetStream, String> {
        let deadline = std::time::Instant::now() + config.timeout * 3;
        Self::connect_until(config, deadline).await
    }

    /// Connects and creates (or checks) the stream and the buckets; every step is retried
    /// until `deadline` ([`retry_until`]). A server version below the floor is refused
    /// for a replicated stream ([`check_version`]).
    pub async fn connect_until(
        config: JetStreamConfig,
        deadline: std::time::Instant,
    ) -> Result<JetStream, String> {
        config.validate()?;
        let longest = config.timeout;
        let client = retry_until(
            &format!("connecting to {}", config.url),
            deadline,
            longest,
            || async { Ok(Self::dial(&config).await?) },
        )
        .await?;
        let version = client.server_info().version;
        if let Some(w) = check_version(&version, config.replicas)? {
            tracing::warn!("{w}");
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(config.timeout)
            .max_ack_inflight(config.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let atomic = parse_version(&version).is_some_and(|v| v >= ATOMIC_SINCE);
        let (stream, kv, cache, blobs) = retry_until(
            "creating or checking the stream and buckets",
            deadline,
            longest,
            || {
                let (js, config) = (js.clone(), config.clone());
                async move {
                    let stream = ensure_stream(&js, &config, atomic).await?;
                    let kv = ensure_kv(&js, &config, &config.kv_bucket(), false).await?;
                    let cache = ensure_kv(&js, &config, &config.cache_bucket(), true).await?;
                    let blobs = ensure_blobs(&js, &config).await?;
                    // A stream just created on a cluster of servers answers reads only
                    // once its replicas elected a leader; until then a read finds "no
                    // responders". Start only when every one has a leader.
                    for name in [
                        config.stream.clone(),
                        format!("KV_{}", config.kv_bucket()),
                        format!("KV_{}", config.cache_bucket()),
                        format!("OBJ_{}", config.blob_bucket()),
                    ] {
                        has_leader(&js, &name).await?;
                    }
                    Ok((stream, kv, cache, blobs))
                }
            },
        )
        .await?;
        Ok(JetStream {
            config: Arc::new(config),
            client,
            js,
            stream,
            kv,
            cache,
            blobs,
            sync: Default::default(),
            started_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        })
    }

    async fn dial(config: &JetStreamConfig) -> Result<async_nats::Client, String> {
        let mut opts = async_nats::ConnectOptions::new()
            .name(&config.client_name)
            .connection_timeout(config.timeout)
            .request_timeout(Some(config.timeout))
            // Reconnect forever; a request made while disconnected fails by its timeout.
            .max_reconnects(None::<usize>);
        match &config.auth {
            Auth::None => {}
            Auth::Token(t) => opts = opts.token(t.clone()),
            Auth::CredsFile(p) => {
                opts = opts
                    .credentials_file(p)
                    .await
                    .map_err(|e| format!("credentials file {}: {e}", p.display()))?;
            }
        }
        if config.tls_required {
            opts = opts.require_tls(true);
        }
        if let Some(ca) = &config.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        opts.connect(config.servers()?)
            .await
            .map_err(|e| unavailable(&format!("cannot connect to {}", config.url), e))
    }

    /// The server's version string.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// True while the client holds a connection.
    pub fn connected(&self) -> bool {
        matches!(
            self.client.connection_state(),
            async_nats::connection::State::Connected
        )
    }
}

/// Whether a stream's replicas have elected a leader (a stream on one server without
/// clustering reports no cluster and always has one).
async fn has_leader(js: &jetstream::Context, name: &str) -> Result<(), StartError> {
    let mut s = js
        .get_stream(name)
        .await
        .map_err(|e| unavailable(&format!("stream {name}"), e))?;
    let info = s
        .info()
        .await
        .map_err(|e| unavailable(&format!("stream {name} info"), e))?;
    match &info.cluster {
        Some(c) if c.leader.is_none() => Err(StartError::Transient(format!(
            "stream {name} has no leader yet"
        ))),
        _ => Ok(()),
    }
}

/// The event stream, created or checked; `atomic`: the server takes atomic batches
/// (2.12+), which are then enabled on the stream (an existing stream is switched).
async fn ensure_stream(
    js: &jetstream::Context,
    c: &JetStreamConfig,
    atomic: bool,
) -> Result<stream::Stream, StartError> {
    let want = stream::Config {
        name: c.stream.clone(),
        subjects: vec![format!("{}.>", c.stream)],
        storage: stream::StorageType::File,
        num_replicas: c.replicas,
        duplicate_window: c.duplicate_window,
        max_age: c.max_age,
        max_bytes: c.max_bytes,
        allow_direct: true,
        allow_atomic_publish: atomic,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    let mut s = js
        .get_or_create_stream(want)
        .await
        .map_err(|e| unavailable(&format!("stream {}", c.stream), e))?;
    let info = s
        .info()
        .await
        .map_err(|e| unavailable(&format!("stream {} info", c.stream), e))?;
    let have = &info.config;
    if have.num_replicas != c.replicas {
        return Err(StartError::Refused(format!(
            "stream {} has {} replicas, the config says {}; change one of them (the server keeps the stream's)",
            c.stream, have.num_replicas, c.replicas
        )));
    }
    if !have.max_age.is_zero() && have.duplicate_window > have.max_age {
        return Err(StartError::Refused(format!(
            "stream {}: its duplicate window ({} s) does not fit inside its max_age ({} s)",
            c.stream,
            have.duplicate_window.as_secs(),
            have.max_age.as_secs()
        )));
    }
    if atomic && !have.allow_atomic_publish {
        let mut cfg = have.clone();
        cfg.allow_atomic_publish = true;
        s = js
            .update_stream(cfg)
            .await
            .map_err(|e| unavailable(&format!("stream {}: allowing atomic batches", c.stream), e))
            .map(|_| s)?;
        tracing::info!(stream = %c.stream, "atomic batch publish enabled on the stream");
    }
    Ok(s)
}

/// A Key-Value bucket's stream, created by hand (the client's `create_key_value` does not
/// decode 2.9 servers' answers). `direct`: reads may be answered by any replica (the
/// embedding cache, where a stale read costs a recomputation); without it every read goes
/// to the stream's leader, so a lease, member or pointer read is never answered by a
/// replica that lags (an existing bucket is switched over).
async fn ensure_kv(
    js: &jetstream::Context,
    c: &JetStreamConfig,
    bucket: &str,
    direct: bool,
) -> Result<kv::Store, StartError> {
    let cfg = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        num_replicas: c.replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: direct,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    let mut s = js
        .get_or_create_stream(cfg)
        .await
        .map_err(|e| unavailable(&format!("bucket {bucket}"), e))?;
    let info = s
        .info()
        .await
        .map_err(|e| unavailable(&format!("bucket {bucket} info"), e))?;
    if info.config.allow_direct != direct {
        let mut cfg = info.config.clone();
        cfg.allow_direct = direct;
        js.update_stream(cfg).await.map_err(|e| {
            unavailable(
                &format!("bucket {bucket}: setting allow_direct = {direct}"),
                e,
            )
        })?;
        tracing::info!(bucket, direct, "bucket's direct reads switched");
    }
    Ok(js
        .get_key_value(bucket)
        .await
        .map_err(|e| unavailable(&format!("bucket {bucket}"), e))?)
}

/// The Object Store bucket of blobs, its reads answered by the stream's leader (a blob a
/// pointer names was acknowledged by a quorum; a lagging replica might not have it yet).
async fn ensure_blobs(
    js: &jetstream::Context,
    c: &JetStreamConfig,
) -> Result<object_store::ObjectStore, StartError> {
    let bucket = c.blob_bucket();
    let failed = |e: &dyn std::fmt::Display| {
        StartError::Transient(unavailable(&format!("bucket {bucket}"), e))
    };
    if js.get_object_store(&bucket).await.is_err() {
        js.create_object_store(object_store::Config {
            bucket: bucket.clone(),
            num_replicas: c.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| failed(&e))?;
    }
    let mut s = js
        .get_stream(format!("OBJ_{bucket}"))
        .await
        .map_err(|e| failed(&e))?;
    let info = s.info().await.map_err(|e| failed(&e))?;
    if info.config.allow_direct {
        let mut cfg = info.config.clone();
        cfg.allow_direct = false;
        js.update_stream(cfg).await.map_err(|e| failed(&e))?;
    }
    js.get_object_store(&bucket).await.map_err(|e| failed(&e))
}

/// A publish that failed: a record over the size limit is refused; anything else (no
/// answer, a leader election, the same id being stored by a concurrent request) is worth
/// a retry with the same ids.
fn publish_error(err: jetstream::context::PublishError) -> LogError {
    match err.kind() {
        jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
            LogError::Refused(format!("record too large: {err}"))
        }
        _ => LogError::Unavailable(unavailable("publish", err)),
    }
}

/// The JetStream error code of a refused publish, if the server gave one.
fn server_code(err: &jetstream::context::PublishError) -> Option<u64> {
    let source = std::error::Error::source(err)?;
    source
        .downcast_ref::<jetstream::Error>()
        .map(|e| e.error_code().0)
}

/// The message header that carries the W3C trace context of the request that wrote a
/// record (sampled requests only).
const TRACEPARENT: &str = "traceparent";

/// The hex form of an idempotency key (`Nats-Msg-Id`).
fn msg_id(key: u128) -> String {
    format!("{key:032x}")
}

/// The shared log on JetStream.
pub struct JetStreamLog {
    js: JetStream,
    heads: Arc<Heads>,
    tail: Arc<Tail>,
    /// Appends go in atomic batches (the stream allows them).
    atomic: std::sync::atomic::AtomicBool,
    batches: tokio::sync::Semaphore,
    follower: Option<tokio::task::JoinHandle<()>>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    /// Set when the stream went backwards under this node (see [`Log::fault`]).
    fault: Arc<parking_lot::Mutex<Option<String>>>,
    /// Truncation marks as last read from the server.
    marks: parking_lot::Mutex<rustc_hash::FxHashMap<u32, u64>>,
    /// What this node published, until the follower meets it in the stream.
    kept: Arc<Kept>,
}

/// The records this node appended, by stream and sequence, so the follower takes them
/// as they were instead of decoding the bytes it receives again (CRC, bincode, the
/// key and trace headers). A record the follower met before its append was answered is
/// decoded as any other and dropped from here at the follower's next batch; at most
/// [`KEPT_MAX`] are held (beyond, records are simply decoded).
#[derive(Default)]
struct Kept {
    streams:
        parking_lot::Mutex<rustc_hash::FxHashMap<u32, std::collections::BTreeMap<u64, KeptRecord>>>,
    len: std::sync::atomic::AtomicUsize,
}

struct KeptRecord {
    key: u128,
    payload: crate::record::Payload,
    trace: Option<String>,
}

/// Records kept for the follower at most (about 100 bytes each).
const KEPT_MAX: usize = 200_000;

impl Kept {
    fn keep(&self, records: impl IntoIterator<Item = (u32, u64, KeptRecord)>) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.len.load(Relaxed) >= KEPT_MAX {
            return;
        }
        let mut streams = self.streams.lock();
        let mut added = 0;
        for (stream, seq, r) in records {
            if streams.entry(stream).or_default().insert(seq, r).is_none() {
                added += 1;
            }
        }
        self.len.fetch_add(added, Relaxed);
    }

    /// Takes the record at `seq` of `stream` when this node published it.
    fn take(&self, stream: u32, seq: u64) -> Option<KeptRecord> {
        let r = self.streams.lock().get_mut(&stream)?.remove(&seq);
        if r.is_some() {
            self.len.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    /// Drops what the follower has passed (`seen`: its last sequence per stream).
    fn passed(&self, seen: &rustc_hash::FxHashMap<u32, u64>) {
        let mut streams = self.streams.lock();
        let mut dropped = 0;
        for (stream, kept) in streams.iter_mut() {
            let last = seen.get(stream).copied().unwrap_or(0);
            if kept.first_key_value().is_some_and(|(&s, _)| s <= last) {
                let rest = kept.split_off(&(last + 1));
                dropped += kept.len();
                *kept = rest;
            }
        }
        if dropped > 0 {
            self.len
                .fetch_sub(dropped, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Drop for JetStreamLog {
    fn drop(&mut self) {
        for t in [self.follower.take(), self.watchdog.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

impl JetStreamLog {
    /// The log over `js`: every head read from the server, then a task that follows the
    /// whole stream from there (one ordered push consumer) and, for each record any node
    /// appends, adds it to `tail` and raises its head in `heads`. Consumers that follow
    /// the heads read those records from the tail; older ones are read from the server.
    pub async fn open(
        js: JetStream,
        heads: Arc<Heads>,
        tail: Arc<Tail>,
    ) -> Result<JetStreamLog, String> {
        Self::open_with_faults(js, heads, tail, Arc::default()).await
    }

    /// [`JetStreamLog::open`] with the node's injected faults: target `log_follow`
    /// stalls the follower before it hands on a batch (tests: a follower that falls
    /// behind while the heads watchdog raises the heads from the server).
    pub async fn open_with_faults(
        js: JetStream,
        heads: Arc<Heads>,
        tail: Arc<Tail>,
        faults: Arc<crate::faults::Faults>,
    ) -> Result<JetStreamLog, String> {
        let mut s = js.stream.clone();
        let info = s.info().await.map_err(|e| unavailable("stream info", e))?;
        let last = info.state.last_sequence;
        let atomic = info.config.allow_atomic_publish;
        let created = info.created;
        let mut log = JetStreamLog {
            js,
            heads,
            tail,
            atomic: std::sync::atomic::AtomicBool::new(atomic),
            batches: tokio::sync::Semaphore::new(ATOMIC_BATCHES_IN_FLIGHT),
            follower: None,
            watchdog: None,
            fault: Default::default(),
            marks: Default::default(),
            kept: Default::default(),
        };
        let streams: Vec<u32> = (0..log.js.config.partitions)
            .chain(std::iter::once(CATALOG_STREAM))
            .collect();
        let mut seen = rustc_hash::FxHashMap::default();
        for st in streams {
            let h = log.last_of(st).await.map_err(|e| e.to_string())?;
            log.heads.raise(st, h);
            seen.insert(st, h);
        }
        // The stream sequence up to which the follower has raised the heads.
        let position = Arc::new(std::sync::atomic::AtomicU64::new(last));
        log.follower = Some(tokio::spawn(follow(
            log.js.clone(),
            log.heads.clone(),
            log.tail.clone(),
            log.kept.clone(),
            (seen, last + 1),
            position.clone(),
            faults,
        )));
        log.watchdog = Some(tokio::spawn(watch_heads(
            log.js.clone(),
            log.heads.clone(),
            created,
            log.fault.clone(),
            position,
        )));
        Ok(log)
    }

    /// Publishes `entries` (no key twice): in atomic batches of up to 1,000 when the
    /// stream allows them, all batches in flight together, otherwise one by one
    /// (pipelined). One position per entry.
    async fn publish(&self, entries: &[&AppendEntry]) -> Result<Vec<Position>, LogError> {
        use std::sync::atomic::Ordering;
        if entries.len() < 2 || !self.atomic.load(Ordering::Relaxed) {
            return self.publish_pipelined(entries).await;
        }
        let batches = entries
            .chunks(ATOMIC_BATCH_MAX)
            .map(|chunk| self.publish_atomic(chunk));
        let mut out = Vec::with_capacity(entries.len());
        for r in futures_util::future::join_all(batches).await {
            out.extend(r?);
        }
        Ok(out)
    }

    /// One atomic batch: every message but the last published without an
    /// acknowledgement, the last one commits the batch and is acknowledged with the
    /// batch's last sequence; the server stores a batch whole and contiguously, so entry
    /// `i` of `n` lands at `last - n + 1 + i`. A batch holding an id the server has
    /// already stored (a retry) is refused whole: it is then published one by one, which
    /// answers each duplicate with its original position. The server writes a committed
    /// batch with one fsync, which is what makes `sync_interval: always` affordable.
    async fn publish_atomic(&self, chunk: &[&AppendEntry]) -> Result<Vec<Position>, LogError> {
        use async_nats::header::{self, HeaderMap};
        use std::sync::atomic::{AtomicU64, Ordering};
        static BATCH: AtomicU64 = AtomicU64::new(0);
        let cfg = &self.js.config;
        let _permit = self
            .batches
            .acquire()
            .await
            .map_err(|e| LogError::Failed(e.to_string()))?;
        let id = format!(
            "{}-{:x}-{:x}",
            std::process::id(),
            self.js.started_ns,
            BATCH.fetch_add(1, Ordering::Relaxed)
        );
        let n = chunk.len();
        let mut commit = None;
        for (i, e) in chunk.iter().enumerate() {
            let mut h = HeaderMap::new();
            h.insert(header::NATS_BATCH_ID, id.as_str());
            h.insert(header::NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
            if e.key != 0 {
                h.insert(header::NATS_MESSAGE_ID, msg_id(e.key).as_str());
            }
            if let Some(t) = &e.trace {
                h.insert(TRACEPARENT, t.as_str());
            }
            let payload = Bytes::from(record::encode(&e.payload));
            if i + 1 < n {
                self.js
                    .client
                    .publish_with_headers(cfg.subject(e.stream), h, payload)
                    .await
                    .map_err(|err| LogError::Unavailable(unavailable("publish", err)))?;
            } else {
                h.insert(header::NATS_BATCH_COMMIT, "1");
                let msg = jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .headers(h);
                commit = Some(
                    self.js
                        .js
                        .send_publish(cfg.subject(e.stream), msg)
                        .await
                        .map_err(publish_error)?,
                );
            }
        }
        let Some(commit) = commit else {
            return Ok(Vec::new());
        };
        match std::future::IntoFuture::into_future(commit).await {
            Ok(ack) => {
                if ack.batch_size.is_some_and(|c| c != n as u64) || ack.sequence < n as u64 {
                    return Err(LogError::Failed(format!(
                        "atomic batch of {n} acknowledged with count {:?} at sequence {}",
                        ack.batch_size, ack.sequence
                    )));
                }
                let first = ack.sequence + 1 - n as u64;
                Ok(chunk
                    .iter()
                    .enumerate()
                    .map(|(i, e)| Position {
                        stream: e.stream,
                        offset: first + i as u64,
                        duplicate: false,
                    })
                    .collect())
            }
            Err(err) => match server_code(&err) {
                Some(ERR_ATOMIC_DUPLICATE) | Some(ERR_ATOMIC_TOO_MANY) => {
                    self.publish_pipelined(chunk).await
                }
                Some(ERR_ATOMIC_DISABLED) => {
                    tracing::warn!("the stream refuses atomic batches; publishing one by one");
                    self.atomic.store(false, Ordering::Relaxed);
                    self.publish_pipelined(chunk).await
                }
                _ => Err(publish_error(err)),
            },
        }
    }

    /// Publishes every entry before awaiting any acknowledgement (the client bounds the
    /// acks in flight); one position per entry.
    async fn publish_pipelined(&self, entries: &[&AppendEntry]) -> Result<Vec<Position>, LogError> {
        let cfg = &self.js.config;
        let mut acks = Vec::with_capacity(entries.len());
        for e in entries {
            let mut msg = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(record::encode(&e.payload)));
            if e.key != 0 {
                msg = msg.message_id(msg_id(e.key));
            }
            if let Some(t) = &e.trace {
                msg = msg.header(TRACEPARENT, t.as_str());
            }
            let ack = self
                .js
                .js
                .send_publish(cfg.subject(e.stream), msg)
                .await
                .map_err(publish_error)?;
            acks.push(ack);
        }
        let mut positions = Vec::with_capacity(acks.len());
        for (ack, e) in futures_util::future::join_all(
            acks.into_iter().map(std::future::IntoFuture::into_future),
        )
        .await
        .into_iter()
        .zip(entries)
        {
            let ack = ack.map_err(publish_error)?;
            positions.push(Position {
                stream: e.stream,
                offset: ack.sequence,
                duplicate: ack.duplicate,
            });
        }
        Ok(positions)
    }

    /// The last offset of `stream`, asked of the stream's leader (a direct get may be
    /// answered by a replica that lags, which would miss acknowledged records).
    async fn last_of(&self, stream: u32) -> Result<u64, LogError> {
        let subject = self.js.config.subject(stream);
        match self
            .js
            .stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(LogError::Unavailable(unavailable("last record", e))),
        }
    }

    async fn truncated(&self, stream: u32) -> Result<u64, LogError> {
        match self.js.kv.get(truncation_key(stream)).await {
            Ok(Some(b)) => Ok(std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)),
            Ok(None) => Ok(0),
            Err(e) => Err(LogError::Unavailable(unavailable("truncation mark", e))),
        }
    }
}

fn truncation_key(stream: u32) -> String {
    format!("truncated.{stream}")
}

/// Messages the follower takes together at most.
const FOLLOW_BATCH: usize = 1024;

/// Follows every subject of the stream from sequence `from`: each record the tail wants
/// ([`Tail::wants`]: the catalog, and the partitions this node owns unless it counts item
/// statistics) is decoded into the tail (continuing each stream's last record seen,
/// `seen`), then its head is raised; the others only raise their heads.
/// Re-creates its consumer after errors (the ordered consumer itself restarts on gaps).
async fn follow(
    js: JetStream,
    heads: Arc<Heads>,
    tail: Arc<Tail>,
    kept: Arc<Kept>,
    (mut seen, mut from): (rustc_hash::FxHashMap<u32, u64>, u64),
    position: Arc<std::sync::atomic::AtomicU64>,
    faults: Arc<crate::faults::Faults>,
) {
    loop {
        let consumer = js
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: js.client.new_inbox(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await;
        let messages = match consumer {
            Ok(c) => c.messages().await,
            Err(e) => {
                tracing::debug!(error = %e, "log follower: consumer not created; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "log follower: no message stream; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Messages already delivered are taken together: the tail gets one push per
        // stream and the heads one raise per stream for the lot, not one per record.
        let mut ended = false;
        while let Some(first) = messages.next().await {
            if let Some(crate::faults::FaultAction::Stall(d)) = faults.on_call("log_follow") {
                tracing::warn!(stall_ms = d.as_millis() as u64, "injected stall");
                tokio::time::sleep(d).await;
            }
            let mut batch = vec![first];
            while batch.len() < FOLLOW_BATCH {
                match futures_util::FutureExt::now_or_never(messages.next()) {
                    Some(Some(m)) => batch.push(m),
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            let mut runs: rustc_hash::FxHashMap<u32, (u64, Vec<Record>, u64)> = Default::default();
            let mut skipped: rustc_hash::FxHashMap<u32, u64> = Default::default();
            let mut skipped_records = 0u64;
            let mut failed = false;
            for m in batch {
                let Ok(m) = m else {
                    failed = true;
                    break;
                };
                let Ok(info) = m.info() else {
                    continue;
                };
                let seq = info.stream_sequence;
                let at_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
                from = seq + 1;
                let Some(stream) = js.config.stream_of(m.subject.as_str()) else {
                    continue;
                };
                let prev = seen.get(&stream).copied().unwrap_or(0);
                if seq <= prev {
                    continue;
                }
                if !tail.wants(stream) {
                    // Not needed here: the head moves, nothing is decoded.
                    skipped_records += 1;
                    skipped.insert(stream, seq);
                    seen.insert(stream, seq);
                    continue;
                }
                let run = runs
                    .entry(stream)
                    .or_insert_with(|| (prev, Vec::new(), prev));
                if let Some(k) = kept.take(stream, seq) {
                    run.1.push(Record {
                        stream,
                        offset: seq,
                        key: k.key,
                        at_ms,
                        payload: k.payload,
                        trace: k.trace,
                    });
                    run.2 = seq;
                    seen.insert(stream, seq);
                    continue;
                }
                match decode_message(
                    &js.config,
                    stream,
                    seq,
                    at_ms,
                    m.headers.as_ref(),
                    &m.payload,
                ) {
                    Ok(r) => run.1.push(r),
                    Err(e) => {
                        // Left to the consumer's own read, which reports it: the run so far
                        // goes to the tail and the next one starts after this record, so
                        // the tail never holds a run with this record missing.
                        tracing::warn!(error = %e, "log follower: record does not decode");
                        tail.push(stream, run.0, std::mem::take(&mut run.1));
                        run.0 = seq;
                    }
                }
                run.2 = seq;
                seen.insert(stream, seq);
            }
            let decoded: usize = runs.values().map(|r| r.1.len()).sum();
            tail.followed(decoded as u64, skipped_records);
            for (stream, (prev, records, last)) in runs {
                tail.push(stream, prev, records);
                heads.raise(stream, last);
            }
            for (stream, last) in skipped {
                heads.raise(stream, last);
            }
            position.fetch_max(from - 1, std::sync::atomic::Ordering::Release);
            kept.passed(&seen);
            if failed || ended {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// True when a replicated stream's info came without a leader: a member answered with
/// its own state, which may lag (a replica catching up after a partition heals).
fn leaderless(info: &jetstream::stream::Info) -> bool {
    info.cluster
        .as_ref()
        .is_some_and(|c| c.leader.as_deref().is_none_or(str::is_empty))
}

/// A regression of the stream is acted on only when this many checks in a row, spanning
/// at least [`REGRESSION_CONFIRM`], see it: one answer from a replica that is catching up
/// (a healed partition) must not stop every node of the cluster.
const REGRESSION_CHECKS: u32 = 3;
const REGRESSION_CONFIRM: Duration = Duration::from_secs(4);

/// Liveness behind the follower: once a second, asks the server for the stream's last
/// sequence (one request). While the follower has reached what the server held a second
/// earlier, every head is current and nothing more is asked. Otherwise every stream's
/// last offset is read, and a head that has stayed behind it for two checks in a row is
/// raised to it (the tail does not hold those records, so consumers read them from the
/// server), so a follower that stalls (a consumer lost in a leader election, a slow
/// reconnect) delays consumers by a few seconds at most and never stops them. Idle, a
/// node asks one question a second whatever the partition count.
async fn watch_heads(
    js: JetStream,
    heads: Arc<Heads>,
    created: async_nats::datetime::DateTime,
    fault: Arc<parking_lot::Mutex<Option<String>>>,
    position: Arc<std::sync::atomic::AtomicU64>,
) {
    let streams: Vec<u32> = (0..js.config.partitions)
        .chain(std::iter::once(CATALOG_STREAM))
        .collect();
    let mut behind: rustc_hash::FxHashMap<u32, u64> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_connected = true;
    // A regression seen since (checks in a row): acted on only once confirmed.
    let mut suspected: Option<(Instant, u32)> = None;
    // The server's last sequence at the previous check.
    let mut previous: Option<u64> = None;
    loop {
        tick.tick().await;
        if !js.connected() {
            was_connected = false;
            previous = None;
            continue;
        }
        // Every check (and so on every reconnect): the stream must not have gone
        // backwards under this node (ADR 012).
        let mut stream = js.stream.clone();
        let info = match stream.info().await {
            Ok(i) => Some(i.clone()),
            Err(e) => {
                tracing::debug!(error = %e, "stream info not read");
                None
            }
        };
        if let Some(info) = &info {
            let seen = streams.iter().map(|&s| heads.get(s)).max().unwrap_or(0);
            match stream_regressed(&js.config.stream, info, created, seen) {
                Some(why) => {
                    let (since, n) = suspected.get_or_insert((Instant::now(), 0));
                    *n += 1;
                    if *n >= REGRESSION_CHECKS && since.elapsed() >= REGRESSION_CONFIRM {
                        tracing::error!(reason = %why, "the log went backwards; refusing to serve");
                        *fault.lock() = Some(why);
                        return;
                    }
                    tracing::warn!(reason = %why, checks = *n, "the log looks like it went backwards; checking again before refusing to serve");
                }
                None => suspected = None,
            }
        }
        // The follower has what the server held a second ago (or all it holds now):
        // every head is current, or will be within the second.
        let server_last = info
            .as_ref()
            .filter(|i| !leaderless(i))
            .map(|i| i.state.last_sequence);
        let followed = position.load(std::sync::atomic::Ordering::Acquire);
        let keeping_up = was_connected
            && server_last
                .is_some_and(|last| followed >= last || previous.is_some_and(|p| followed >= p));
        previous = server_last;
        was_connected = true;
        if keeping_up {
            behind.clear();
            continue;
        }
        for &s in &streams {
            let subject = js.config.subject(s);
            let Ok(m) = js.stream.direct_get_last_for_subject(subject).await else {
                continue;
            };
            let last = m.sequence;
            if last <= heads.get(s) {
                behind.remove(&s);
                continue;
            }
            match behind.get(&s) {
                Some(&seen) if heads.get(s) < seen => {
                    tracing::warn!(stream = s, head = heads.get(s), last = seen, "log follower behind the server; raising the head (consumers read from the server)");
                    heads.raise(s, seen);
                    behind.insert(s, last);
                }
                _ => {
                    behind.insert(s, last);
                }
            }
        }
    }
}

/// Why the stream `info` describes cannot be the one this node read up to `seen` (it was
/// re-created, or it ends below), if it cannot; `None` for a leaderless answer.
fn stream_regressed(
    name: &str,
    info: &jetstream::stream::Info,
    created: async_nats::datetime::DateTime,
    seen: u64,
) -> Option<String> {
    if leaderless(info) {
        // A replicated stream without a leader: a member answered with its own state,
        // which may lag (a replica catching up after a partition heals). Not evidence.
        return None;
    }
    if info.created != created {
        return Some(format!(
            "stream {name} was deleted and re-created while this node ran (created {} before, {} now): the records it held are gone; restore the stream or start the cluster on a new one",
            created, info.created
        ));
    }
    let last = info.state.last_sequence;
    if last < seen {
        return Some(format!(
            "stream {name} ends at sequence {last}, below {seen} which this node had already read: the server lost acknowledged records (writes it had not synced) or the stream was replaced; refusing to serve rather than skip"
        ));
    }
    None
}

fn decode_message(
    config: &JetStreamConfig,
    stream: u32,
    seq: u64,
    at_ms: i64,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<Record, LogError> {
    let payload = record::decode(payload).map_err(|e| {
        LogError::Failed(format!(
            "record {seq} of {} does not decode: {e}",
            config.subject(stream)
        ))
    })?;
    let key = headers
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .and_then(|v| u128::from_str_radix(v.as_str(), 16).ok())
        .unwrap_or(0);
    let trace = headers
        .and_then(|h| h.get(TRACEPARENT))
        .map(|v| v.as_str().to_string());
    Ok(Record {
        stream,
        offset: seq,
        key,
        at_ms,
        payload,
        trace,
    })
}

#[async_trait]
impl Log for JetStreamLog {
    fn backend(&self) -> &'static str {
        "jetstream"
    }

    async fn append(&self, entries: Vec<AppendEntry>) -> Result<Vec<Position>, LogError> {
        let cfg = &self.js.config;
        if let Some((i, e)) = entries
            .iter()
            .enumerate()
            .find(|(_, e)| !cfg.has_stream(e.stream))
        {
            return Err(LogError::Refused(format!(
                "append refused, nothing was written: entry {}: stream {} is neither a partition (0..{}) nor the catalog",
                i + 1,
                e.stream,
                cfg.partitions
            )));
        }
        if !self.js.connected() {
            return Err(LogError::Unavailable(
                "the JetStream server cannot be reached; nothing was written".into(),
            ));
        }
        // A key repeated within the request is published once (a replicated stream
        // refuses a second publish of an id still being stored: "duplicate message id is
        // in process") and answered with the first one's position.
        let mut first: rustc_hash::FxHashMap<u128, usize> = Default::default();
        let mut unique: Vec<&AppendEntry> = Vec::with_capacity(entries.len());
        let slots: Vec<(usize, bool)> = entries
            .iter()
            .map(|e| {
                if e.key != 0 {
                    if let Some(&j) = first.get(&e.key) {
                        return (j, true);
                    }
                    first.insert(e.key, unique.len());
                }
                unique.push(e);
                (unique.len() - 1, false)
            })
            .collect();
        // "No responders": the server this connection uses does not (yet) know of the
        // stream's subjects (a stream just created on other servers of a cluster, its
        // interest still travelling over the routes). Nothing was stored, and every
        // entry with a key is deduplicated by the server anyway: publish again for a
        // moment when every entry has one.
        let keyed = unique.iter().all(|e| e.key != 0);
        let retrying = async {
            let mut pause = Duration::from_millis(50);
            let started = std::time::Instant::now();
            loop {
                match self.publish(&unique).await {
                    Err(LogError::Unavailable(why))
                        if keyed
                            && started.elapsed() < NO_RESPONDERS_RETRY
                            && (why.contains("no stream found")
                                || why.contains("no responders")) =>
                    {
                        tracing::debug!(error = %why, "publish found no responders; again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(500));
                    }
                    r => return r,
                }
            }
        };
        let published = tokio::time::timeout(cfg.timeout, retrying)
            .await
            .map_err(|_| {
                LogError::Unavailable(format!(
                    "the server did not acknowledge every record within {} ms",
                    cfg.timeout.as_millis()
                ))
            })??;
        // The heads move when the follower has the records (tail first, then head); it
        // takes the records stored by this append as they are.
        drop(unique);
        self.kept.keep(
            entries
                .into_iter()
                .zip(&slots)
                .filter(|(_, (j, repeat))| !repeat && !published[*j].duplicate)
                .map(|(e, (j, _))| {
                    let p = published[*j];
                    let r = KeptRecord {
                        key: e.key,
                        payload: e.payload,
                        trace: e.trace,
                    };
                    (p.stream, p.offset, r)
                }),
        );
        Ok(slots
            .into_iter()
            .map(|(j, repeat)| {
                let p = published[j];
                Position {
                    duplicate: p.duplicate || repeat,
                    ..p
                }
            })
            .collect())
    }

    async fn read(
        &self,
        stream: u32,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<ReadAfter, LogError> {
        let cfg = &self.js.config;
        if !cfg.has_stream(stream) {
            return Err(LogError::Refused(format!("no stream {stream}")));
        }
        if let Some(records) = self.tail.read(stream, after, upto, limit) {
            // Every record after `after` is here: nothing this read needs was deleted.
            let truncated = self.marks.lock().get(&stream).copied().unwrap_or(0);
            return Ok(ReadAfter { records, truncated });
        }
        if !self.js.connected() {
            return Err(LogError::Unavailable(
                "the JetStream server cannot be reached".into(),
            ));
        }
        let truncated = self.truncated(stream).await?;
        self.marks.lock().insert(stream, truncated);
        let last = self.last_of(stream).await?;
        let upto = upto.min(last);
        let mut records = Vec::new();
        if after >= upto || limit == 0 {
            return Ok(ReadAfter { records, truncated });
        }
        let subject = cfg.subject(stream);
        let consumer = self
            .js
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| LogError::Unavailable(unavailable("reader", e)))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| LogError::Unavailable(unavailable("reader", e)))?;
        loop {
            let next = tokio::time::timeout(cfg.timeout, messages.next())
                .await
                .map_err(|_| {
                    LogError::Unavailable(format!(
                        "reading {subject} after {after}: no record within {} ms",
                        cfg.timeout.as_millis()
                    ))
                })?;
            let Some(m) = next else { break };
            let m = m.map_err(|e| LogError::Unavailable(unavailable("reading", e)))?;
            let info = m
                .info()
                .map_err(|e| LogError::Failed(unavailable("message info", e)))?;
            let seq = info.stream_sequence;
            let published = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
            if seq > upto {
                break;
            }
            records.push(Arc::new(decode_message(
                cfg,
                stream,
                seq,
                published,
                m.headers.as_ref(),
                &m.payload,
            )?));
            if seq >= upto || records.len() >= limit {
                break;
            }
        }
        Ok(ReadAfter { records, truncated })
    }

    fn head(&self, stream: u32) -> watch::Receiver<u64> {
        self.heads.subscribe(stream)
    }

    fn writable(&self) -> bool {
        self.js.connected()
    }

    fn syncs_every_write(&self) -> i64 {
        self.js.sync.lock().gauge()
    }

    fn fault(&self) -> Option<String> {
        self.fault.lock().clone()
    }

    /// The stream's last sequence (one sequence for every subject).
    async fn end(&self, _stream: u32) -> Result<u64, LogError> {
        let mut s = self.js.stream.clone();
        let info = s
            .info()
            .await
            .map_err(|e| LogError::Unavailable(unavailable("stream info", e)))?;
        if leaderless(info) {
            return Err(LogError::Unavailable(
                "the stream has no leader (a replica's own state may lag); asking again".into(),
            ));
        }
        Ok(info.state.last_sequence)
    }

    fn describe(&self) -> serde_json::Value {
        let c = &self.js.config;
        let mut warnings = Vec::new();
        if c.replicas == 1 {
            warnings.push("replicas = 1: every record is on one server; losing that server's disk loses acknowledged records (use 3 replicas on separate machines)".to_string());
        }
        let version = self.js.server_version();
        if let Ok(Some(w)) = check_version(&version, c.replicas) {
            warnings.push(w);
        }
        let sync = self.js.sync.lock().clone();
        match &sync {
            SyncCheck::Interval { servers } => warnings.push(format!(
                "servers {} write acknowledged records to disk on an interval (sync_interval), not before acknowledging them: a power failure of their machines can lose acknowledged records, even with replicas = 3; set `jetstream {{ sync_interval: always }}`",
                servers.join(", ")
            )),
            SyncCheck::Unreachable { error } => warnings.push(format!(
                "the servers' monitoring endpoint did not answer ({error}); whether they fsync every write is unknown"
            )),
            SyncCheck::Unknown | SyncCheck::Always => {}
        }
        serde_json::json!({
            "backend": "jetstream",
            "writable": self.writable(),
            "server_version": version,
            "stream": c.stream,
            "replicas": c.replicas,
            "duplicate_window_secs": c.duplicate_window.as_secs(),
            "sync": sync,
            "follower": self.tail.describe_interest(),
            "warnings": warnings,
        })
    }

    async fn refresh_head(&self, stream: u32) -> Result<u64, LogError> {
        self.last_of(stream).await
    }

    async fn truncate(&self, stream: u32, before: u64) -> Result<u64, LogError> {
        if before <= 1 {
            return Ok(0);
        }
        let subject = self.js.config.subject(stream);
        let purged = self
            .js
            .stream
            .purge()
            .filter(subject)
            .sequence(before)
            .await
            .map_err(|e| LogError::Unavailable(unavailable("purge", e)))?
            .purged;
        if purged > 0 {
            // The purge does not say which offsets it deleted; every one below `before`
            // is gone, so the mark is `before - 1` (retention only truncates below the
            // lowest checkpointed position, so no consumer is behind it).
            let mark = before - 1;
            if self.truncated(stream).await? < mark {
                self.js
                    .kv
                    .put(truncation_key(stream), Bytes::from(mark.to_string()))
                    .await
                    .map_err(|e| LogError::Unavailable(unavailable("truncation mark", e)))?;
            }
        }
        Ok(purged)
    }
}

/// The state store on JetStream: records in the KV bucket, blobs in the Object Store.
#[derive(Clone)]
pub struct JetStreamState {
    js: JetStream,
}

impl JetStreamState {
    pub fn new(js: JetStream) -> Self {
        JetStreamState { js }
    }
}

/// How long a state read answered "no responders" is tried again.
const NO_RESPONDERS_RETRY: Duration = Duration::from_secs(5);

/// An error whose cause is a request nobody answered at once (the client reports a 503
/// "no responders" status as a stream not found).
fn no_responders(e: &dyn std::error::Error) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if text.contains("no stream found") || text.contains("no responders") {
            return true;
        }
        cur = err.source();
    }
    false
}

fn state_unavailable(what: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(format!("{what}: {e}"))
}

/// Runs `op` on `key` again while it is answered "no responders" (a request that reached
/// no replica, so it changed nothing), for up to [`NO_RESPONDERS_RETRY`] with a growing
/// pause; any other answer is returned as it is.
async fn retry_no_responders<T, E, F>(key: &str, mut op: impl FnMut() -> F) -> Result<T, E>
where
    E: std::error::Error,
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut pause = Duration::from_millis(50);
    let started = std::time::Instant::now();
    loop {
        match op().await {
            Err(e) if started.elapsed() < NO_RESPONDERS_RETRY && no_responders(&e) => {
                tracing::debug!(key, error = %e, "state store found no responders; again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

#[async_trait]
impl StateStore for JetStreamState {
    fn backend(&self) -> &'static str {
        "jetstream"
    }

    async fn reconnect(&self) {
        tracing::warn!("the state store does not answer over a connection that is up: reconnecting (another server may reach the leaders)");
        if let Err(e) = self.js.client.force_reconnect().await {
            tracing::warn!(error = %e, "reconnect request failed");
        }
    }

    /// Every key read at once (direct gets in flight together).
    async fn cache_get(&self, ns: &str, keys: &[u128]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        let reads = keys.iter().map(|&k| {
            let key = crate::state::cache_key(ns, k);
            let kv = self.js.cache.clone();
            async move { kv.entry(key).await }
        });
        futures_util::future::join_all(reads)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(Some(e.value.to_vec())),
                Ok(_) => Ok(None),
                Err(e) => Err(state_unavailable("cache read", e)),
            })
            .collect()
    }

    /// Every entry written at once (publishes in flight together).
    async fn cache_put(&self, ns: &str, entries: Vec<(u128, Vec<u8>)>) -> Result<(), StateError> {
        let writes = entries.into_iter().map(|(k, v)| {
            let key = crate::state::cache_key(ns, k);
            let kv = self.js.cache.clone();
            async move { kv.put(key, Bytes::from(v)).await }
        });
        for r in futures_util::future::join_all(writes).await {
            r.map_err(|e| state_unavailable("cache write", e))?;
        }
        Ok(())
    }

    async fn watch(
        &self,
        key: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<u64>>, StateError> {
        let mut w = self
            .js
            .kv
            .watch(key)
            .await
            .map_err(|e| state_unavailable(key, e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let key = key.to_string();
        tokio::spawn(async move {
            while let Some(e) = w.next().await {
                match e {
                    Ok(e) => {
                        if tx.send(e.revision).await.is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        tracing::debug!(key = %key, error = %err, "watch ended");
                        return;
                    }
                }
            }
        });
        Ok(Some(rx))
    }

    async fn watch_records(
        &self,
        patterns: &[&str],
    ) -> Result<Option<tokio::sync::mpsc::Receiver<crate::state::WatchedRecord>>, StateError> {
        let mut w = self
            .js
            .kv
            .watch_many_with_history(patterns.iter().copied())
            .await
            .map_err(|e| state_unavailable("record watch", e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(e) = w.next().await {
                match e {
                    Ok(e) => {
                        let value = (e.operation == kv::Operation::Put).then(|| Versioned {
                            value: e.value.to_vec(),
                            revision: e.revision,
                        });
                        let rec = crate::state::WatchedRecord { key: e.key, value };
                        if tx.send(rec).await.is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "record watch ended");
                        return;
                    }
                }
            }
        });
        Ok(Some(rx))
    }

    /// A read answered "no responders" (a bucket whose replicas are electing a leader, a
    /// server whose JetStream is still starting, or one that has not yet learned over its
    /// routes of the other servers' direct-get subscriptions to a bucket just created) is
    /// tried again for up to 5 s: a read changes nothing.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StateError> {
        match retry_no_responders(key, || self.js.kv.entry(key)).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(Some(Versioned {
                value: e.value.to_vec(),
                revision: e.revision,
            })),
            Ok(_) => Ok(None),
            Err(e) => Err(state_unavailable(key, e)),
        }
    }

    /// A write answered "no responders" (the bucket's stream has no leader yet, as right
    /// after it was created on three servers) reached no replica and is tried again for
    /// up to 5 s; any other failure is returned, since the write may have landed.
    async fn compare_and_set(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, StateError> {
        let conflict = |this: &Self| {
            let key = key.to_string();
            let kv = this.js.kv.clone();
            async move {
                let found = kv
                    .entry(key.clone())
                    .await
                    .ok()
                    .flatten()
                    .filter(|e| e.operation == kv::Operation::Put)
                    .map(|e| e.revision);
                StateError::Conflict { key, found }
            }
        };
        let value = Bytes::from(value);
        match expected {
            None => {
                match retry_no_responders(key, || self.js.kv.create(key, value.clone())).await {
                    Ok(rev) => Ok(rev),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        Err(conflict(self).await)
                    }
                    Err(e) => Err(state_unavailable(key, e)),
                }
            }
            Some(rev) => {
                match retry_no_responders(key, || self.js.kv.update(key, value.clone(), rev)).await
                {
                    Ok(rev) => Ok(rev),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        Err(conflict(self).await)
                    }
                    Err(e) => Err(state_unavailable(key, e)),
                }
            }
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StateError> {
        let value = Bytes::from(value);
        retry_no_responders(key, || self.js.kv.put(key, value.clone()))
            .await
            .map_err(|e| state_unavailable(key, e))
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        self.js
            .kv
            .delete(key)
            .await
            .map_err(|e| state_unavailable(key, e))
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let mut keys = self
            .js
            .kv
            .keys()
            .await
            .map_err(|e| state_unavailable("keys", e))?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| state_unavailable("keys", e))?;
            if k.starts_with(prefix) {
                out.push(k);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn put_blob(&self, name: &str, bytes: Vec<u8>) -> Result<(), StateError> {
        let mut reader = bytes.as_slice();
        self.js
            .blobs
            .put(name, &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| state_unavailable(name, e))
    }

    async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let mut obj = match self.js.blobs.get(name).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(state_unavailable(name, e)),
        };
        let mut out = Vec::with_capacity(obj.info().size);
        obj.read_to_end(&mut out)
            .await
            .map_err(|e| state_unavailable(name, e))?;
        Ok(Some(out))
    }

    async fn delete_blob(&self, name: &str) -> Result<(), StateError> {
        match self.js.blobs.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(state_unavailable(name, e)),
        }
    }

    async fn blob_names(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let mut list = self
            .js
            .blobs
            .list()
            .await
            .map_err(|e| state_unavailable("blob list", e))?;
        let mut out = Vec::new();
        while let Some(o) = list.next().await {
            let o = o.map_err(|e| state_unavailable("blob list", e))?;
            if !o.deleted && o.name.starts_with(prefix) {
                out.push(o.name);
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_below_the_floor_are_refused_when_replicated() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("v2.12.0-RC.3"), Some((2, 12, 0)));
        assert_eq!(parse_version("x"), None);
        assert_eq!(check_version("2.15.1", 3), Ok(None));
        assert_eq!(check_version("2.12.1", 3), Ok(None));
        let e = check_version("2.10.22", 3).unwrap_err();
        assert!(e.contains("2.10.22") && e.contains("2.12.1"), "{e}");
        assert!(check_version("2.9.10", 5).is_err());
        // One server below the floor: a warning naming both versions.
        let w = check_version("2.9.10", 1).unwrap().unwrap();
        assert!(w.contains("2.9.10") && w.contains("2.12.1"), "{w}");
        assert!(check_version("garbage", 3).is_err());
    }

    #[test]
    fn sync_check_reads_varz() {
        let doc = |name: &str, always: bool| serde_json::json!({"server_name": name, "jetstream": {"config": {"sync_always": always}}});
        assert_eq!(SyncCheck::from_varz(&[]), SyncCheck::Unknown);
        let all = [
            ("http://a".to_string(), Ok(doc("s1", true))),
            ("http://b".to_string(), Ok(doc("s2", true))),
        ];
        assert_eq!(SyncCheck::from_varz(&all), SyncCheck::Always);
        let one_lazy = [
            ("http://a".to_string(), Ok(doc("s1", true))),
            (
                "http://b".to_string(),
                Ok(serde_json::json!({"server_name": "s2", "jetstream": {"config": {}}})),
            ),
        ];
        assert_eq!(
            SyncCheck::from_varz(&one_lazy),
            SyncCheck::Interval {
                servers: vec!["s2".into()]
            }
        );
        let down = [("http://a".to_string(), Err("refused".to_string()))];
        assert!(matches!(
            SyncCheck::from_varz(&down),
            SyncCheck::Unreachable { .. }
        ));
        assert_eq!(SyncCheck::from_varz(&all).gauge(), 1);
    }
}
