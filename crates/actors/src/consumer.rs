//! The consumer runtime: everything a journal consumer does besides applying a record.
//!
//! Each consumer actor (UserFeatures, ItemStats, Catalog, AlsTrainer) keeps a
//! [`ConsumerRuntime`] beside its own state and gives it an [`Apply`] implementation. The
//! runtime owns, per stream it reads, the [`Cursor`] (applied position and the keys of
//! recently applied records), and for the consumer as a whole the durable failure counts,
//! the in-flight mark, dead-lettering and the checkpoint cadence.
//!
//! Positions: offsets increase within a stream but may be sparse. "The next record" is
//! whatever the log holds after the applied position: the runtime reads the log
//! ([`crate::log::Log::read`]) after the position, up to the stream's head. A consumer
//! learns that a head moved from [`follow_heads`] (and polls as a fallback); a log that
//! is unavailable postpones the catch-up, it never fails the consumer.
//! Records deleted by retention while a consumer still needed them stop the consumer with
//! a [`Fatal`] error: never a silent skip.
//!
//! Poison records: the record being applied is marked in flight (in `Ctx`) while its
//! checks and its apply run; the mark is cleared only after every record of a step
//! succeeded, so a panic or an `Err` leaves it for the supervisor's failure hook
//! ([`count_failure`]), which counts it durably. After `poison_max_attempts` counted
//! failures the record goes to the dead letters and the consumer moves past it.
//!
//! Dedupe: a record whose idempotency key was applied within the horizon (the records'
//! append time, `idempotency_window`) and among the last `consumer_dedupe_keys` keys of its
//! stream is skipped. The window is part of the cursor, so it is checkpointed with the
//! state and replay makes the same decisions.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use ractor::ActorProcessingErr;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::ctx::Ctx;
use crate::faults;
use crate::record::{Record, CATALOG_STREAM};
use crate::settings::Settings;
use crate::state::{Claim, Form, StateError};
use crate::supervisor::{Deposed, Fatal};

/// Records read from the log per catch-up step. One read costs a fixed set of round trips
/// (on JetStream: the stream's bounds and an ordered consumer created for it), which under
/// heavy writes dominates a replay with small reads; a step of this size holds the actor
/// for about 0.1-0.3 s when it replays.
pub const CATCH_UP_CHUNK: usize = 16_384;
/// How often a long catch-up logs its progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keys of the records a consumer applied recently in one stream, oldest first. Bounded
/// by count and by the records' append time; stored as the low 64 bits of the key.
#[derive(Debug, Clone, Default)]
pub struct RecentKeys {
    order: VecDeque<(i64, u64)>,
    set: FxHashSet<u64>,
}

impl RecentKeys {
    /// True when `key` (appended at `at_ms`) was applied within the window: the record is
    /// a duplicate. Otherwise remembers it. Keys 0 and records of unknown time are never
    /// duplicates.
    pub fn seen_or_insert(&mut self, key: u128, at_ms: i64, horizon_ms: i64, cap: usize) -> bool {
        if key == 0 || at_ms <= 0 || cap == 0 {
            return false;
        }
        let k = key as u64;
        while self
            .order
            .front()
            .is_some_and(|&(t, _)| t < at_ms.saturating_sub(horizon_ms))
        {
            if let Some((_, old)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        if self.set.contains(&k) {
            return true;
        }
        self.order.push_back((at_ms, k));
        self.set.insert(k);
        while self.order.len() > cap {
            if let Some((_, old)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        false
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }

    /// How far back the keys held reach: the append time of the newest minus that of the
    /// oldest, ms (a retry older than this is no longer recognised).
    pub fn reach_ms(&self) -> i64 {
        match (self.order.front(), self.order.back()) {
            (Some(&(old, _)), Some(&(new, _))) => new - old,
            _ => 0,
        }
    }
}

/// Checkpointed as `(time difference from the previous key, zigzag; key bytes)` per key:
/// about ten bytes a key instead of eighteen (times are close together, keys are random).
impl Serialize for RecentKeys {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.order.len()))?;
        let mut prev = 0i64;
        for &(at, k) in &self.order {
            let d = at.wrapping_sub(prev);
            seq.serialize_element(&(((d << 1) ^ (d >> 63)) as u64, k.to_le_bytes()))?;
            prev = at;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for RecentKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire: Vec<(u64, [u8; 8])> = Vec::deserialize(d)?;
        let mut prev = 0i64;
        let order: VecDeque<(i64, u64)> = wire
            .into_iter()
            .map(|(z, k)| {
                prev = prev.wrapping_add(((z >> 1) as i64) ^ -((z & 1) as i64));
                (prev, u64::from_le_bytes(k))
            })
            .collect();
        let set = order.iter().map(|&(_, k)| k).collect();
        Ok(RecentKeys { order, set })
    }
}

/// One consumer of the log: its scope (the name its state is kept under in the
/// [`crate::state::StateStore`], also its actor's registered name), its actor kind, and
/// the streams it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSpec {
    pub scope: String,
    pub kind: Kind,
    pub streams: Vec<u32>,
}

/// The kinds of consumer a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Catalog,
    ItemStats,
    UserFeatures,
}

/// Every consumer a node runs: the one list that retention, the supervision tree and
/// `/v1/cluster` read.
pub fn consumers(settings: &Settings) -> Vec<ConsumerSpec> {
    let p = settings.partitions;
    let mut out = vec![
        ConsumerSpec {
            scope: crate::names::CATALOG.to_string(),
            kind: Kind::Catalog,
            streams: vec![CATALOG_STREAM],
        },
        ConsumerSpec {
            scope: crate::names::ITEM_STATS.to_string(),
            kind: Kind::ItemStats,
            streams: (0..p).chain(std::iter::once(CATALOG_STREAM)).collect(),
        },
    ];
    out.extend((0..p).map(|i| ConsumerSpec {
        scope: crate::names::user_features(i),
        kind: Kind::UserFeatures,
        streams: vec![i],
    }));
    out
}

/// What a node knows about its consumers outside their actors (which a failure drops):
/// the claim of each scope (kept across restarts of the actor, so the supervisor's
/// failure hook can count a failure under it) and the record each is applying.
pub struct Registry {
    /// This process as an owner of scopes (`node name#pid-start time`).
    owner: String,
    /// In a cluster every node runs its own singletons (catalog, item stats), each under
    /// its own scope `<name>.<node>`; a partition's scope is the same on every node (one
    /// owner at a time).
    node_scope: Option<String>,
    entries: parking_lot::Mutex<FxHashMap<String, Entry>>,
}

#[derive(Default)]
struct Entry {
    claim: Option<Arc<tokio::sync::Mutex<Claim>>>,
    /// The claim's epoch (fixed for the life of a claim; read without its lock).
    epoch: u64,
    in_flight: Option<(u32, u64)>,
}

impl Registry {
    pub fn new(node_name: &str, cluster: bool) -> Registry {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Registry {
            owner: format!("{node_name}#{}-{started}", std::process::id()),
            node_scope: cluster.then(|| node_name.to_string()),
            entries: Default::default(),
        }
    }

    /// The state scope of consumer `name` on this node.
    pub fn scope_of(&self, name: &str) -> String {
        match &self.node_scope {
            Some(node) if !name.starts_with(crate::names::USER_FEATURES_PREFIX) => {
                singleton_scope(name, node)
            }
            _ => name.to_string(),
        }
    }

    /// This process's owner name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The claim of `scope`: the one this process holds, or a new one (raising the
    /// scope's epoch, so any earlier owner is fenced).
    pub async fn claim(
        &self,
        state: &dyn crate::state::StateStore,
        scope: &str,
    ) -> Result<Arc<tokio::sync::Mutex<Claim>>, StateError> {
        if let Some(c) = self.entries.lock().get(scope).and_then(|e| e.claim.clone()) {
            return Ok(c);
        }
        let mut tries = 0;
        let state_scope = self.scope_of(scope);
        let claim = loop {
            match state.claim(&state_scope, &self.owner).await {
                Ok(c) => break c,
                // Another claimant raced this one: read again and raise past it.
                Err(StateError::Conflict { .. }) if tries < 5 => tries += 1,
                Err(e) => return Err(e),
            }
        };
        tracing::info!(scope, epoch = claim.epoch(), owner = %self.owner, "scope claimed");
        let epoch = claim.epoch();
        let claim = Arc::new(tokio::sync::Mutex::new(claim));
        let mut entries = self.entries.lock();
        let e = entries.entry(scope.to_string()).or_default();
        e.claim = Some(claim.clone());
        e.epoch = epoch;
        drop(entries);
        Ok(claim)
    }

    /// Forgets the claim of a scope a newer owner took.
    pub fn deposed(&self, scope: &str) {
        if let Some(e) = self.entries.lock().get_mut(scope) {
            e.claim = None;
        }
    }

    /// `(scope, epoch)` of every claim this process holds.
    pub fn claims(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .entries
            .lock()
            .iter()
            .filter(|(_, e)| e.claim.is_some())
            .map(|(k, e)| (k.clone(), e.epoch))
            .collect();
        out.sort();
        out
    }

    pub fn set_in_flight(&self, consumer: &str, stream: u32, offset: u64) {
        let mut m = self.entries.lock();
        match m.get_mut(consumer) {
            Some(e) => e.in_flight = Some((stream, offset)),
            None => {
                m.entry(consumer.to_string()).or_default().in_flight = Some((stream, offset));
            }
        }
    }

    pub fn clear_in_flight(&self, consumer: &str) {
        if let Some(e) = self.entries.lock().get_mut(consumer) {
            e.in_flight = None;
        }
    }

    /// The record `consumer` was applying when it failed (taken).
    pub fn take_in_flight(&self, consumer: &str) -> Option<(u32, u64)> {
        self.entries.lock().get_mut(consumer)?.in_flight.take()
    }

    pub fn in_flight(&self, consumer: &str) -> Option<(u32, u64)> {
        self.entries.lock().get(consumer)?.in_flight
    }

    fn claim_of(&self, consumer: &str) -> Option<Arc<tokio::sync::Mutex<Claim>>> {
        self.entries.lock().get(consumer)?.claim.clone()
    }
}

/// How long a consumer's start keeps trying to claim its scope while the state store
/// does not answer.
const CLAIM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a state store call of a consumer's recovery until the store answers (or
/// `patience` runs out): an unreachable store (a leader election, a server cut off)
/// postpones the recovery, the consumer staying "recovering", instead of failing it, so
/// transient unavailability never exhausts a restart intensity or gives a partition up.
pub async fn until_answered<T, F, Fut>(
    consumer: &str,
    patience: Option<std::time::Duration>,
    mut call: F,
) -> Result<T, StateError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StateError>>,
{
    let started = Instant::now();
    let mut pause = std::time::Duration::from_millis(100);
    let mut warned = false;
    loop {
        match call().await {
            Err(StateError::Unavailable(why))
                if patience.is_none_or(|p| started.elapsed() + pause < p) =>
            {
                if !warned {
                    tracing::warn!(consumer, error = %why, "state store unavailable during recovery; waiting for it");
                    warned = true;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// A state write the store could not take now (its server unreachable): a running
/// consumer postpones its checkpoint instead of failing.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// A state error as an actor error: a fenced write deposes the consumer (it stops for
/// good, see [`Deposed`]); an unreachable store is [`Unavailable`]; anything else fails
/// it (restart with backoff).
fn state_failure(ctx: &Ctx, scope: &str, e: StateError) -> ActorProcessingErr {
    match e {
        StateError::Fenced { .. } => {
            ctx.consumers.deposed(scope);
            ctx.metrics.deposed.inc();
            Deposed(format!("{scope}: {e}")).into()
        }
        StateError::Unavailable(_) => Unavailable(format!("{scope}: {e}")).into(),
        e => format!("{scope}: {e}").into(),
    }
}

/// Where a consumer stands in one stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Offset of the last record applied (0: none).
    pub applied: u64,
    pub recent: RecentKeys,
}

/// Cursors by stream, as a consumer's checkpoint stores them.
pub type Cursors = BTreeMap<u32, Cursor>;

/// How a consumer applies one record. An `Err` fails the actor and counts against the
/// record (as a panic does).
pub trait Apply: Send {
    fn apply(&mut self, r: &Record) -> Result<(), ActorProcessingErr>;
}

/// What a consumer supplies besides applying records: what to do after a step's records
/// were applied, and how to snapshot its state for a checkpoint. The runtime does the
/// rest ([`ConsumerRuntime::step`], [`ConsumerRuntime::checkpoint`]).
pub trait Consumer: Apply {
    /// After a step (records applied or not): publish positions, side effects.
    fn stepped(&mut self, _rt: &ConsumerRuntime) {}
    /// The state as checkpoint bytes at `rt`'s positions, and its form.
    fn snapshot(&mut self, rt: &ConsumerRuntime) -> Result<(Form, Vec<u8>), ActorProcessingErr>;
    /// Whether the checkpoint of `bytes` bytes in `form` was written.
    fn checkpointed(&mut self, _form: Form, _bytes: usize, _written: bool) {}
}

/// The outcome of one catch-up step.
#[derive(Debug, Clone, Copy, Default)]
pub struct Step {
    /// Records applied (duplicates and dead letters not counted).
    pub applied: u64,
    /// The log holds nothing more up to the target.
    pub done: bool,
}

/// The `apply` span of record `r` when the request that wrote it was traced: a child of
/// that request's span (so the apply on the partition's owner is part of the writer's
/// trace, whichever node wrote it), shared by consecutive records of the same write.
/// `None` for untraced records: applying them costs no span.
fn apply_span<'a>(
    traced: &'a mut Option<(String, tracing::Span)>,
    consumer: &'static str,
    r: &Record,
) -> Option<&'a tracing::Span> {
    let Some(tp) = &r.trace else {
        *traced = None;
        return None;
    };
    if traced.as_ref().is_none_or(|(t, _)| t != tp) {
        let span = tracing::info_span!(
            "apply",
            consumer,
            stream = r.stream,
            first_offset = r.offset,
            last_offset = r.offset,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        crate::trace::adopt(
            &span,
            &crate::proto::wire::TraceContext {
                traceparent: tp.clone(),
                tracestate: String::new(),
            },
        );
        crate::trace::record_ids(&span);
        *traced = Some((tp.clone(), span));
    }
    let span = traced.as_ref().map(|(_, s)| s)?;
    span.record("last_offset", r.offset);
    Some(span)
}

/// Per-consumer bookkeeping for applying records (see the module docs).
pub struct ConsumerRuntime {
    /// Registered name (`user_features-3`); failure counts and dead letters are kept
    /// under it.
    pub name: String,
    /// Actor kind used for fault targets (`user_features`).
    pub kind: &'static str,
    pub cursors: Cursors,
    failures: FxHashMap<(u32, u64), u32>,
    pub dead_lettered: u64,
    pub duplicates: u64,
    /// Records applied since the last checkpoint.
    pub since_checkpoint: u64,
    pub last_checkpoint: Instant,
    pub checkpoints: u64,
    /// This process's claim of the consumer's scope (every state write is fenced by it).
    claim: Arc<tokio::sync::Mutex<Claim>>,
    /// A checkpoint an older build wrote in the embedded store's own table, read on start
    /// and deleted after the first full checkpoint through the state store.
    legacy: Option<String>,
    /// No checkpoint is due before this (set when the state store was unreachable).
    retry_at: Option<Instant>,
    /// The chain `load_checkpoint` restored from this scope's own pointer (a consumer
    /// may append deltas to it instead of starting with a full checkpoint).
    pub restored_chain: Option<DeltaChain>,
    /// A checkpoint interval of this consumer's own instead of `checkpoint_interval`
    /// (item statistics publish theirs this often for the members following them).
    pub checkpoint_interval: Option<std::time::Duration>,
}

/// An incremental checkpoint chain as its writer accounts it: the bytes of the full
/// checkpoint it continues (0: none this actor can continue, so the next one is full), of
/// the deltas written after it, and their number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaChain {
    pub full_bytes: usize,
    pub delta_bytes: usize,
    pub deltas: u64,
}

impl DeltaChain {
    /// Whether a delta may come next: there is a full checkpoint to continue and fewer
    /// than `max` deltas after it.
    pub fn open(&self, max: u64) -> bool {
        self.full_bytes > 0 && self.deltas < max
    }

    /// The sequence number the next delta carries (1 for the first after a full one).
    pub fn next_seq(&self) -> u64 {
        self.deltas + 1
    }

    /// Whether a delta of `len` bytes keeps the deltas within `ratio` times the full
    /// checkpoint (past that, a full one costs less to load).
    pub fn fits(&self, len: usize, ratio: usize) -> bool {
        self.delta_bytes + len <= ratio * self.full_bytes
    }

    /// The checkpoint to write: `delta` (already encoded, `None` when none may be
    /// written) while it fits within `ratio` times the full checkpoint, else the full
    /// one `full` encodes.
    pub fn choose<E>(
        &self,
        delta: Option<Vec<u8>>,
        ratio: usize,
        full: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<(Form, Vec<u8>), E> {
        match delta {
            Some(b) if self.fits(b.len(), ratio) => Ok((Form::Delta, b)),
            _ => Ok((Form::Full, full()?)),
        }
    }

    /// Accounts a checkpoint write. After a write that failed or whose outcome is
    /// unknown, only a full checkpoint is right next (the changes were taken for it).
    pub fn written(&mut self, form: Form, bytes: usize, ok: bool) {
        if !ok {
            self.full_bytes = 0;
            return;
        }
        match form {
            Form::Full => {
                *self = DeltaChain {
                    full_bytes: bytes,
                    ..Default::default()
                }
            }
            Form::Delta => {
                self.delta_bytes += bytes;
                self.deltas += 1;
            }
        }
    }
}

/// The `seq`-th delta (from 1) of a chain written in `format`: refused when it has
/// another format, does not decode, or carries another sequence number (`seq_of`), which
/// means a delta is missing.
pub fn decode_delta<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    seq: u64,
    format: u16,
    seq_of: impl Fn(&T) -> u64,
) -> Result<T, String> {
    let found =
        checkpoint_format(bytes).map_err(|e| format!("delta {seq} does not decode: {e}"))?;
    if found != format {
        return Err(format!(
            "delta {seq} has format {found}, this build reads {format}"
        ));
    }
    let d: T = decode_checkpoint(bytes).map_err(|e| format!("delta {seq} does not decode: {e}"))?;
    if seq_of(&d) != seq {
        return Err(format!(
            "delta {seq} has sequence {}: a delta is missing",
            seq_of(&d)
        ));
    }
    Ok(d)
}

impl ConsumerRuntime {
    /// A runtime reading `streams` from their start: claims the consumer's scope (or
    /// keeps this process's claim) and loads its durable failure counts.
    pub async fn load(
        ctx: &Arc<Ctx>,
        name: &str,
        kind: &'static str,
        streams: impl IntoIterator<Item = u32>,
    ) -> Result<ConsumerRuntime, ActorProcessingErr> {
        // Bounded here (pre-start blocks its supervisor); a store that stays away fails
        // the start, which the supervisor retries after its backoff.
        let claim = until_answered(name, Some(CLAIM_PATIENCE), || {
            ctx.consumers.claim(&*ctx.state, name)
        })
        .await
        .map_err(|e| state_failure(ctx, name, e))?;
        let failures: FxHashMap<(u32, u64), u32> = claim
            .lock()
            .await
            .pointer
            .failures
            .iter()
            .map(|&(s, o, n)| ((s, o), n))
            .collect();
        Ok(ConsumerRuntime {
            claim,
            legacy: None,
            restored_chain: None,
            checkpoint_interval: None,
            retry_at: None,
            name: name.to_string(),
            kind,
            cursors: streams
                .into_iter()
                .map(|s| (s, Cursor::default()))
                .collect(),
            failures,
            dead_lettered: 0,
            duplicates: 0,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            checkpoints: 0,
        })
    }

    /// Positions from a checkpoint; streams it does not name start from 0, streams it
    /// names that this consumer does not read are refused.
    pub fn restore(&mut self, cursors: Cursors) -> Result<(), String> {
        for (s, c) in cursors {
            match self.cursors.get_mut(&s) {
                Some(slot) => *slot = c,
                None => return Err(format!("it has a position in stream {s}, which this consumer does not read (was the partition count changed?)")),
            }
        }
        Ok(())
    }

    /// Refuses to go on when the log ends below a position this consumer has applied
    /// (restored from its checkpoint): records were lost (a server that had not synced
    /// them) or the stream was re-created. Skipping ahead would silently miss whatever
    /// the log holds there later, so the consumer stops with a [`Fatal`] error instead.
    /// An unreachable log postpones the check to the first catch-up that reaches it.
    pub async fn verify_log(&self, ctx: &Ctx) -> Result<(), ActorProcessingErr> {
        for (&s, c) in &self.cursors {
            if c.applied == 0 {
                continue;
            }
            match ctx.log.end(s).await {
                Ok(end) if end < c.applied => {
                    return Err(Fatal(format!(
                        "the log went backwards: stream {} ends at offset {end}, but {} has applied up to {} (its checkpoint); records were lost (a server that had not synced them) or the stream was re-created. Refusing to serve rather than skip: restore the stream, or reset this consumer's state",
                        crate::metrics::stream_label(s),
                        self.name,
                        c.applied
                    ))
                    .into())
                }
                Ok(_) => {}
                Err(crate::log::LogError::Unavailable(_)) => return Ok(()),
                Err(e) => return Err(e.to_string().into()),
            }
        }
        Ok(())
    }

    /// Offset applied in `stream` (0 for a stream this consumer does not read).
    pub fn applied(&self, stream: u32) -> u64 {
        self.cursors.get(&stream).map_or(0, |c| c.applied)
    }

    /// Applied offsets of every stream, in stream order.
    pub fn positions(&self) -> Vec<(u32, u64)> {
        self.cursors.iter().map(|(&s, c)| (s, c.applied)).collect()
    }

    /// Reads at most `limit` records of `stream` after the applied position and up to
    /// `upto` from the log and applies them.
    pub async fn catch_up<A: Apply>(
        &mut self,
        ctx: &Arc<Ctx>,
        stream: u32,
        upto: u64,
        limit: usize,
        target: &mut A,
    ) -> Result<Step, ActorProcessingErr> {
        let after = self.applied(stream);
        if after >= upto {
            return Ok(Step {
                applied: 0,
                done: true,
            });
        }
        let read = match ctx.log.read(stream, after, upto, limit).await {
            Ok(r) => r,
            Err(crate::log::LogError::Unavailable(why)) => {
                // The shared log is unreachable: keep the position and try again on the
                // next wake-up or tick (no restart, no escalation).
                tracing::debug!(consumer = %self.name, stream, after, %why, "log unavailable; catch-up postponed");
                ctx.metrics.log_read_errors.inc();
                return Ok(Step {
                    applied: 0,
                    done: true,
                });
            }
            Err(e) => return Err(e.to_string().into()),
        };
        if read.truncated > after {
            return Err(Fatal(format!(
                "records of stream {stream} after offset {after} (up to {}) were deleted by retention while {} still needed them; restore the store from a backup or reset this consumer",
                read.truncated, self.name
            ))
            .into());
        }
        let done = read.records.len() < limit;
        let applied = self
            .apply_records(ctx, stream, read.records, target)
            .await?;
        Ok(Step { applied, done })
    }

    /// Catches up every stream with its head (as published now), chunk by chunk.
    pub async fn catch_up_all<A: Apply>(
        &mut self,
        ctx: &Arc<Ctx>,
        target: &mut A,
    ) -> Result<u64, ActorProcessingErr> {
        let streams: Vec<u32> = self.cursors.keys().copied().collect();
        let mut n = 0;
        for s in streams {
            let head = ctx.head(s);
            let from = self.cursors.get(&s).map_or(0, |c| c.applied);
            let started = Instant::now();
            let mut reported = started;
            loop {
                let step = self.catch_up(ctx, s, head, CATCH_UP_CHUNK, target).await?;
                n += step.applied;
                if step.done {
                    break;
                }
                // A long catch-up (replay on start, a moved partition) says where it is
                // every 5 s, with its rate and the time left at that rate.
                if reported.elapsed() >= PROGRESS_EVERY {
                    reported = Instant::now();
                    let at = self.cursors.get(&s).map_or(from, |c| c.applied);
                    let rate =
                        at.saturating_sub(from) as f64 / started.elapsed().as_secs_f64().max(1e-3);
                    tracing::info!(
                        consumer = %self.name,
                        stream = %crate::metrics::stream_label(s),
                        applied = at,
                        head,
                        records_per_s = rate.round() as u64,
                        eta_s = (head.saturating_sub(at) as f64 / rate.max(1.0)).round() as u64,
                        "catching up"
                    );
                }
            }
        }
        Ok(n)
    }

    /// One step of a running consumer (on a head move or a tick): catches up every
    /// stream that is behind its head, lets the consumer publish, and checkpoints when
    /// the cadence asks for one.
    pub async fn step<C: Consumer>(
        &mut self,
        ctx: &Arc<Ctx>,
        consumer: &mut C,
    ) -> Result<u64, ActorProcessingErr> {
        let behind = self.cursors.iter().any(|(&s, c)| ctx.head(s) > c.applied);
        let n = if behind {
            self.catch_up_all(ctx, consumer).await?
        } else {
            0
        };
        consumer.stepped(self);
        self.checkpoint_if_due(ctx, consumer).await?;
        Ok(n)
    }

    /// Checkpoints when the cadence asks for one; a state store out of reach postpones
    /// it (the consumer goes on).
    pub async fn checkpoint_if_due<C: Consumer>(
        &mut self,
        ctx: &Arc<Ctx>,
        consumer: &mut C,
    ) -> Result<(), ActorProcessingErr> {
        if self.checkpoint_due(ctx) {
            match self.checkpoint(ctx, consumer).await {
                Err(e) if e.downcast_ref::<Unavailable>().is_some() => {
                    // Applying goes on; the checkpoint is tried again after an interval
                    // (replay after a restart covers the records meanwhile).
                    tracing::warn!(consumer = %self.name, error = %e, "checkpoint postponed: the state store is unreachable");
                    ctx.metrics.checkpoints_postponed.inc();
                    self.retry_at = Some(
                        Instant::now()
                            + ctx
                                .settings
                                .checkpoint_interval
                                .max(std::time::Duration::from_secs(1)),
                    );
                }
                r => r?,
            }
        }
        Ok(())
    }

    /// Writes a checkpoint of `consumer` now.
    pub async fn checkpoint<C: Consumer>(
        &mut self,
        ctx: &Arc<Ctx>,
        consumer: &mut C,
    ) -> Result<(), ActorProcessingErr> {
        let started = Instant::now();
        let (form, bytes) = consumer.snapshot(self)?;
        let encoded_ms = started.elapsed().as_millis() as u64;
        let len = bytes.len();
        let r = self.write_checkpoint(ctx, form, bytes).await;
        consumer.checkpointed(form, len, r.is_ok());
        tracing::debug!(
            consumer = %self.name,
            form = ?form,
            bytes = len,
            encoded_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = r.is_ok(),
            "checkpoint"
        );
        r
    }

    /// Applies records of `stream` that follow the applied position, in order, each past
    /// its checks (poison accounting, dedupe, fault hook).
    async fn apply_records<A: Apply>(
        &mut self,
        ctx: &Arc<Ctx>,
        stream: u32,
        records: Vec<Arc<Record>>,
        target: &mut A,
    ) -> Result<u64, ActorProcessingErr> {
        let horizon = ctx.settings.idempotency_window.as_millis() as i64;
        let cap = ctx.settings.consumer_dedupe_keys;
        let mut n = 0;
        // The span of the traced write whose records are being applied (one per run of
        // records written by the same sampled request).
        let mut traced: Option<(String, tracing::Span)> = None;
        for r in records {
            let Some(cursor) = self.cursors.get_mut(&stream) else {
                break;
            };
            if r.offset <= cursor.applied {
                continue;
            }
            let attempts = self
                .failures
                .get(&(r.stream, r.offset))
                .copied()
                .unwrap_or(0);
            if attempts >= ctx.settings.poison_max_attempts {
                self.dead_letter(ctx, &r, attempts).await?;
                if let Some(c) = self.cursors.get_mut(&stream) {
                    c.applied = r.offset;
                }
                continue;
            }
            ctx.consumers.set_in_flight(&self.name, r.stream, r.offset);
            faults::apply(&ctx.faults, self.kind, &r).await?;
            let Some(cursor) = self.cursors.get_mut(&stream) else {
                break;
            };
            if cursor.recent.seen_or_insert(r.key, r.at_ms, horizon, cap) {
                self.duplicates += 1;
                ctx.metrics.consumer_duplicates.inc();
            } else {
                let span = apply_span(&mut traced, self.kind, &r);
                let _in = span.map(tracing::Span::enter);
                target.apply(&r)?;
                n += 1;
            }
            if let Some(c) = self.cursors.get_mut(&stream) {
                c.applied = r.offset;
            }
        }
        // Cleared only when every record of the step went through: an error above leaves
        // the mark for the supervisor's failure hook.
        ctx.consumers.clear_in_flight(&self.name);
        self.since_checkpoint += n;
        let labels = crate::metrics::labels2(
            "consumer",
            self.kind,
            "stream",
            crate::metrics::stream_label(stream),
        );
        ctx.metrics
            .applied_offset
            .get_or_create(&labels)
            .set(self.applied(stream) as i64);
        if let Some(c) = self.cursors.get(&stream) {
            ctx.metrics
                .dedupe_reach
                .get_or_create(&labels)
                .set(c.recent.reach_ms() / 1000);
        }
        Ok(n)
    }

    async fn dead_letter(
        &mut self,
        ctx: &Arc<Ctx>,
        r: &Record,
        attempts: u32,
    ) -> Result<(), ActorProcessingErr> {
        let doc = serde_json::json!({
            "consumer": self.name,
            "stream": crate::metrics::stream_label(r.stream),
            "offset": r.offset,
            "attempts": attempts,
            "record": format!("{:?}", r.payload),
        });
        {
            let mut claim = self.claim.lock().await;
            ctx.state
                .dead_letter(&mut claim, r.stream, r.offset, doc.to_string().into_bytes())
                .await
                .map_err(|e| state_failure(ctx, &self.name, e))?;
        }
        tracing::warn!(consumer = %self.name, stream = r.stream, offset = r.offset, attempts, "record moved to dead letters");
        ctx.metrics.dead_letters.inc();
        self.failures.remove(&(r.stream, r.offset));
        self.dead_lettered += 1;
        Ok(())
    }

    /// True when the checkpoint cadence asks for one: `checkpoint_every_records` per
    /// partition this consumer reads (a consumer of every partition applies that many
    /// times more records, and checkpoints about as often as one partition's), or
    /// `checkpoint_interval` since the last.
    pub fn checkpoint_due(&self, ctx: &Ctx) -> bool {
        let s = &ctx.settings;
        let partitions = self
            .cursors
            .keys()
            .filter(|&&k| k != crate::record::CATALOG_STREAM)
            .count()
            .max(1) as u64;
        self.since_checkpoint > 0
            && self.retry_at.is_none_or(|t| Instant::now() >= t)
            && (self.since_checkpoint >= s.checkpoint_every_records.saturating_mul(partitions)
                || self.last_checkpoint.elapsed()
                    >= self.checkpoint_interval.unwrap_or(s.checkpoint_interval))
    }

    /// Writes a checkpoint of the consumer's state (`bytes`) at its current positions
    /// through the state store, fenced by its claim. A refused write deposes the
    /// consumer. After the first full one, a checkpoint of an older build is deleted.
    pub async fn write_checkpoint(
        &mut self,
        ctx: &Arc<Ctx>,
        form: Form,
        bytes: Vec<u8>,
    ) -> Result<(), ActorProcessingErr> {
        let len = bytes.len();
        {
            let mut claim = self.claim.lock().await;
            ctx.state
                .checkpoint(&mut claim, form, bytes, self.positions())
                .await
                .map_err(|e| state_failure(ctx, &self.name, e))?;
        }
        let l = crate::metrics::labels2(
            "consumer",
            self.kind,
            "form",
            match form {
                Form::Full => "full",
                Form::Delta => "delta",
            },
        );
        ctx.metrics
            .checkpoint_bytes
            .get_or_create(&l)
            .inc_by(len as u64);
        ctx.metrics.checkpoints.get_or_create(&l).inc();
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.retry_at = None;
        self.checkpoints += 1;
        if form == Form::Full {
            if let Some(old) = self.legacy.take() {
                let store = ctx.store.clone();
                let r =
                    tokio::task::spawn_blocking(move || -> Result<(), crate::store::StoreError> {
                        for name in store.checkpoints_under(&format!("{old}/"))? {
                            store.delete_checkpoint(&name)?;
                        }
                        store.delete_checkpoint(&old)
                    })
                    .await?;
                match r {
                    Ok(()) => {
                        tracing::info!(consumer = %self.name, "checkpoint of an older build deleted")
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %self.name, error = %e, "checkpoint of an older build not deleted")
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the consumer's checkpoint: the base decoded as `T` and the deltas after it
    /// as bytes, in order. Every checkpoint struct starts with its `format: u16`:
    ///
    /// - the format this build writes: decoded, then `check` may refuse a shape that does
    ///   not fit the configuration;
    /// - an older format: dropped (the state is rebuilt by replaying the log) when the log
    ///   still holds every record of the consumer's streams; otherwise a [`Fatal`] error,
    ///   since a rebuild would silently miss what retention deleted;
    /// - a newer format (written by a newer build): refused.
    ///
    /// With the embedded backend, a scope without a checkpoint falls back to one an older
    /// build kept under `legacy` (and `legacy/…` deltas) in the store's own table.
    pub async fn load_checkpoint<T, F>(
        &mut self,
        ctx: &Arc<Ctx>,
        legacy: &str,
        format: u16,
        check: F,
    ) -> Result<Option<(T, Vec<Vec<u8>>)>, ActorProcessingErr>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
        F: FnOnce(&T) -> Result<(), String> + Send + 'static,
    {
        let name = self.name.clone();
        let scope = ctx.consumers.scope_of(&name);
        let started = Instant::now();
        let loaded = until_answered(&name, None, || ctx.state.load(&scope))
            .await
            .map_err(|e| state_failure(ctx, &name, e))?;
        let mut own = false;
        let (base, deltas) = match loaded {
            Some(l) if l.base.is_some() => {
                own = true;
                (l.base.unwrap_or_default(), l.deltas)
            }
            Some(l) if !l.deltas.is_empty() => {
                return Err(format!(
                    "checkpoint of {name}: {} deltas but no full checkpoint",
                    l.deltas.len()
                )
                .into())
            }
            _ => match ctx
                .state
                .legacy_checkpoint(legacy)
                .await
                .map_err(|e| state_failure(ctx, &name, e))?
            {
                Some(f) => {
                    tracing::info!(consumer = %name, legacy, "reading the checkpoint an older build wrote");
                    self.legacy = Some(legacy.to_string());
                    f
                }
                None => match self.peer_checkpoint(ctx).await? {
                    Some(f) => f,
                    None => return Ok(None),
                },
            },
        };
        let found = checkpoint_format(&base)
            .map_err(|e| format!("checkpoint of {name} does not decode: {e}"))?;
        if found < format {
            for &s in self.cursors.keys() {
                let cut = ctx
                    .log
                    .read(s, 0, 1, 1)
                    .await
                    .map_err(|e| format!("checkpoint of {name}: {e}"))?
                    .truncated;
                if cut > 0 {
                    return Err(Fatal(format!("checkpoint of {name} has format {found}, this build reads {format}, and retention deleted stream {s} up to offset {cut}: the state cannot be rebuilt by replay")).into());
                }
            }
            tracing::warn!(consumer = %name, found, expected = format, "checkpoint of an older format dropped; rebuilding by replaying the log");
            return Ok(None);
        }
        if found > format {
            return Err(format!(
                "checkpoint of {name} has format {found}, newer than this build's {format}"
            )
            .into());
        }
        let fetched_ms = started.elapsed().as_millis() as u64;
        let delta_bytes = deltas.iter().map(Vec::len).sum::<usize>();
        let bytes = base.len() + delta_bytes;
        self.restored_chain = own.then_some(DeltaChain {
            full_bytes: base.len(),
            delta_bytes,
            deltas: deltas.len() as u64,
        });
        let cp = tokio::task::spawn_blocking(move || -> Result<T, String> {
            let cp = decode_checkpoint::<T>(&base)
                .map_err(|e| format!("checkpoint of {name} does not decode: {e}"))?;
            check(&cp).map_err(|e| format!("checkpoint of {name}: {e}"))?;
            Ok(cp)
        })
        .await??;
        tracing::debug!(
            consumer = %self.name,
            bytes,
            deltas = deltas.len(),
            fetched_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "checkpoint loaded"
        );
        Ok(Some((cp, deltas)))
    }

    /// Cluster mode, a node-scoped consumer without a checkpoint of its own (a member
    /// that joins, or returns after its scope was reset): the most advanced checkpoint
    /// another member wrote for the same consumer. Its state is a function of the shared
    /// log alone, so it is this node's as well; starting from it, the node replays only
    /// what follows it instead of the log from offset 0, which retention may have cut.
    async fn peer_checkpoint(
        &self,
        ctx: &Arc<Ctx>,
    ) -> Result<Option<(Vec<u8>, Vec<Vec<u8>>)>, ActorProcessingErr> {
        let Some(cluster) = ctx.cluster.as_ref() else {
            return Ok(None);
        };
        if self.name.starts_with(crate::names::USER_FEATURES_PREFIX) {
            return Ok(None);
        }
        let mut best: Option<(u64, String, crate::state::Loaded)> = None;
        for m in cluster
            .member_names()
            .into_iter()
            .filter(|m| *m != ctx.settings.node_name)
        {
            let scope = singleton_scope(&self.name, &m);
            let loaded = until_answered(&self.name, None, || ctx.state.load(&scope))
                .await
                .map_err(|e| state_failure(ctx, &self.name, e))?;
            let Some(l) = loaded.filter(|l| l.base.is_some()) else {
                continue;
            };
            let covered: u64 = l.pointer.positions.iter().map(|&(_, o)| o).sum();
            if best.as_ref().is_none_or(|(c, _, _)| covered > *c) {
                best = Some((covered, scope, l));
            }
        }
        Ok(best.map(|(_, scope, l)| {
            tracing::info!(consumer = %self.name, from = %scope, "no checkpoint of its own: starting from another member's");
            (l.base.unwrap_or_default(), l.deltas)
        }))
    }

    /// Counters for `Observe`.
    pub fn observe(&self) -> serde_json::Value {
        serde_json::json!({
            "applied_offsets": self.positions().iter().map(|&(s, o)| serde_json::json!({"stream": crate::metrics::stream_label(s), "offset": o})).collect::<Vec<_>>(),
            "checkpoints": self.checkpoints,
            "dead_lettered": self.dead_lettered,
            "duplicates_skipped": self.duplicates,
        })
    }
}

/// Wakes a consumer actor whenever the head of a stream it reads moves: one task per
/// stream watches the head and sends `wake()` unless a wake-up is already pending (the
/// returned flag, which the actor clears before it catches up). A task ends when the
/// actor is gone.
pub fn follow_heads<M: ractor::Message>(
    ctx: &Ctx,
    streams: impl IntoIterator<Item = u32>,
    actor: ractor::ActorRef<M>,
    wake: fn() -> M,
) -> Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pending = Arc::new(AtomicBool::new(false));
    for s in streams {
        let mut rx = ctx.heads.subscribe(s);
        let (actor, pending) = (actor.clone(), pending.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if !pending.swap(true, Ordering::AcqRel) && actor.send_message(wake()).is_err() {
                    break;
                }
            }
        });
    }
    pending
}

/// The supervisors' failure hook: counts a failure against the record the failed
/// consumer was applying, durably (under this process's claim of its scope) and outside
/// the failed actor.
pub async fn count_failure(ctx: &Ctx, child: &str) {
    ctx.metrics
        .actor_restarts
        .get_or_create(&crate::metrics::label("actor", child))
        .inc();
    let Some((s, o)) = ctx.consumers.take_in_flight(child) else {
        return;
    };
    let Some(claim) = ctx.consumers.claim_of(child) else {
        tracing::warn!(
            consumer = child,
            stream = s,
            offset = o,
            "failure not counted: the scope is not claimed"
        );
        return;
    };
    let mut claim = claim.lock().await;
    match ctx.state.count_failure(&mut claim, s, o).await {
        Ok(n) => tracing::warn!(
            consumer = child,
            stream = s,
            offset = o,
            failures = n,
            "failure counted against record"
        ),
        Err(e) => {
            tracing::error!(consumer = child, error = %e, "could not count a record failure")
        }
    }
}

/// Per stream, the highest offset that every consumer reading it has checkpointed past,
/// from the consumers' pointers in the state store, each read once. A stream is absent
/// while any of its consumers has no checkpoint covering it: retention deletes nothing a
/// checkpoint still needs.
pub async fn retainable(ctx: &Ctx) -> Result<BTreeMap<u32, u64>, StateError> {
    let mut low: BTreeMap<u32, Option<u64>> = BTreeMap::new();
    // In a cluster, every member's copy of a singleton counts: the members known here
    // and every member with a record in the store (one discovered elsewhere, or not yet
    // discovered by a node that just started, keeps what its checkpoints need).
    let mut members: Vec<String> = ctx
        .cluster
        .as_ref()
        .map(|c| c.member_names())
        .unwrap_or_default();
    if !members.is_empty() {
        let prefix = crate::cluster::lease::MEMBER_PREFIX;
        for key in ctx.state.keys(prefix).await? {
            if let Some(name) = key.strip_prefix(prefix) {
                if !members.iter().any(|m| m == name) {
                    members.push(name.to_string());
                }
            }
        }
    }
    let mut scopes = Vec::new();
    for c in consumers(&ctx.settings) {
        if members.is_empty() || c.kind == Kind::UserFeatures {
            scopes.push((c.scope.clone(), c.streams.clone()));
        } else {
            for m in &members {
                scopes.push((singleton_scope(&c.scope, m), c.streams.clone()));
            }
        }
    }
    for (scope, streams) in scopes {
        let pointer = ctx.state.pointer(&scope).await?.map(|(p, _)| p);
        for &s in &streams {
            let covered = pointer
                .as_ref()
                .filter(|p| p.base.is_some())
                .and_then(|p| p.positions.iter().find(|&&(ps, _)| ps == s))
                .map(|&(_, o)| o);
            let slot = low.entry(s).or_insert(covered);
            *slot = match (*slot, covered) {
                (Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            };
        }
    }
    Ok(low.into_iter().filter_map(|(s, o)| Some((s, o?))).collect())
}

/// The scope of singleton consumer `name` run by cluster member `node`.
pub fn singleton_scope(name: &str, node: &str) -> String {
    format!("{name}.{node}")
}

/// The format number every checkpoint starts with.
pub fn checkpoint_format(bytes: &[u8]) -> Result<u16, String> {
    crate::codec::decode::<u16>(bytes)
}

/// Decodes a whole checkpoint value (an error, never a panic, on any bytes).
pub fn decode_checkpoint<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    crate::codec::decode(bytes)
}

/// The shape check of consumers of every partition: one cursor per configured partition.
pub fn check_partitions(cursors: &Cursors, partitions: u32) -> Result<(), String> {
    let found = cursors
        .keys()
        .filter(|&&s| s != crate::record::CATALOG_STREAM)
        .count();
    if found == partitions as usize {
        Ok(())
    } else {
        Err(format!("{found} partitions, the config has {partitions}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_chain_opens_after_a_full_checkpoint_and_closes_on_its_bounds() {
        let mut c = DeltaChain::default();
        assert!(
            !c.open(4),
            "nothing to continue: the next checkpoint is full"
        );
        c.written(Form::Full, 100, true);
        assert!(c.open(4) && c.fits(400, 4) && !c.fits(401, 4));
        assert_eq!(c.next_seq(), 1);
        c.written(Form::Delta, 150, true);
        c.written(Form::Delta, 150, true);
        assert_eq!((c.next_seq(), c.delta_bytes), (3, 300));
        assert!(c.fits(100, 4) && !c.fits(101, 4));
        c.written(Form::Delta, 10, true);
        c.written(Form::Delta, 10, true);
        assert!(!c.open(4), "at most 4 deltas");
        c.written(Form::Full, 50, true);
        assert_eq!(
            c,
            DeltaChain {
                full_bytes: 50,
                delta_bytes: 0,
                deltas: 0
            }
        );
        c.written(Form::Delta, 10, false);
        assert!(!c.open(4), "after an unknown outcome the next one is full");
    }

    #[test]
    fn a_delta_of_another_format_or_sequence_is_refused() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct D {
            format: u16,
            seq: u64,
        }
        let bytes = |format, seq| crate::codec::encode(&D { format, seq }).unwrap();
        assert!(decode_delta(&bytes(3, 2), 2, 3, |d: &D| d.seq).is_ok());
        let e = decode_delta(&bytes(2, 2), 2, 3, |d: &D| d.seq)
            .err()
            .unwrap();
        assert!(e.contains("format 2"), "{e}");
        let e = decode_delta(&bytes(3, 3), 2, 3, |d: &D| d.seq)
            .err()
            .unwrap();
        assert!(e.contains("missing"), "{e}");
        assert!(decode_delta(&[1, 2], 1, 3, |d: &D| d.seq).is_err());
    }
    use crate::faults::Faults;
    use crate::record::{Event, Payload};
    use crate::settings::Settings;
    use crate::store::{JournalBatch, Store};

    fn ev(i: u64) -> Payload {
        Payload::Event(Event {
            event_id: Some(format!("e{i}")),
            user: "u".into(),
            item: format!("i{i}"),
            kind: "view".into(),
            value: None,
            ts_ms: i as i64,
            request_id: None,
        })
    }

    fn ctx(dir: &std::path::Path, tweak: impl FnOnce(&mut Settings)) -> Arc<Ctx> {
        let (store, _) = Store::open(&dir.join("s.redb")).unwrap();
        let mut s = Settings::defaults("t");
        s.partitions = 2;
        tweak(&mut s);
        Arc::new(Ctx::new(s, store, Faults::default()))
    }

    /// Appends records of stream 0 at the given offsets (one batch per consecutive run),
    /// each keyed `key(offset)` and appended at `at(offset)`.
    fn put(ctx: &Ctx, offsets: &[u64], key: impl Fn(u64) -> u128, at: impl Fn(u64) -> i64) {
        for &o in offsets {
            let mut b = JournalBatch::new(0, o, at(o));
            b.push(key(o), &ev(o));
            ctx.store.append(&[b], &[], &[], 0, None).unwrap();
        }
    }

    /// Records what it applied; fails on `fail_at`.
    #[derive(Default)]
    struct Seen {
        offsets: Vec<u64>,
        fail_at: Option<u64>,
    }

    impl Apply for Seen {
        fn apply(&mut self, r: &Record) -> Result<(), ActorProcessingErr> {
            if self.fail_at == Some(r.offset) {
                return Err("refused".into());
            }
            self.offsets.push(r.offset);
            Ok(())
        }
    }

    async fn runtime(ctx: &Arc<Ctx>) -> ConsumerRuntime {
        ConsumerRuntime::load(ctx, "c-0", "c", [0]).await.unwrap()
    }

    #[tokio::test]
    async fn sparse_offsets_gaps_and_targets_beyond_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path(), |_| {});
        put(&ctx, &[1, 2, 5, 6, 10], |o| o as u128, |_| 1);
        let mut rt = runtime(&ctx).await;
        let mut seen = Seen::default();
        // Up to a target between records: stops there, and says the log has no more.
        let step = rt.catch_up(&ctx, 0, 8, 100, &mut seen).await.unwrap();
        assert_eq!((step.applied, step.done), (4, true));
        assert_eq!(seen.offsets, vec![1, 2, 5, 6]);
        // A target before the next stored record: nothing to do, and it ends.
        let step = rt.catch_up(&ctx, 0, 9, 100, &mut seen).await.unwrap();
        assert_eq!((step.applied, step.done, rt.applied(0)), (0, true, 6));
        // Up to the head: the next record, whatever its offset.
        let step = rt.catch_up(&ctx, 0, 10, 100, &mut seen).await.unwrap();
        assert_eq!((step.applied, rt.applied(0)), (1, 10));
        put(&ctx, &[12, 13], |o| o as u128, |_| 1);
        let step = rt.catch_up(&ctx, 0, 13, 100, &mut seen).await.unwrap();
        assert_eq!((step.applied, step.done), (2, true));
        assert_eq!(seen.offsets, vec![1, 2, 5, 6, 10, 12, 13]);
        // A target already reached changes nothing.
        let step = rt.catch_up(&ctx, 0, 2, 100, &mut seen).await.unwrap();
        assert_eq!((step.applied, step.done), (0, true));
        // Limits count records, not offsets.
        let mut again = runtime(&ctx).await;
        let step = again
            .catch_up(&ctx, 0, 100, 3, &mut Seen::default())
            .await
            .unwrap();
        assert_eq!((step.applied, step.done, again.applied(0)), (3, false, 5));
    }

    #[tokio::test]
    async fn records_lost_to_retention_stop_the_consumer() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path(), |_| {});
        put(&ctx, &[1, 2, 3, 4, 5, 6], |o| o as u128, |_| 1);
        let mut rt = runtime(&ctx).await;
        let mut seen = Seen::default();
        rt.catch_up(&ctx, 0, 2, 100, &mut seen).await.unwrap();
        ctx.store.truncate(0, 5).unwrap();
        let err = rt.catch_up(&ctx, 0, 6, 100, &mut seen).await.unwrap_err();
        assert!(err.downcast_ref::<Fatal>().is_some(), "{err}");
        assert!(err.to_string().contains("retention"), "{err}");
        assert_eq!(seen.offsets, vec![1, 2], "nothing skipped silently");
        // A consumer already past the cut is not affected.
        let mut ahead = runtime(&ctx).await;
        ahead.cursors.get_mut(&0).unwrap().applied = 4;
        ahead.catch_up(&ctx, 0, 6, 100, &mut seen).await.unwrap();
        assert_eq!(ahead.applied(0), 6);
    }

    #[tokio::test]
    async fn an_error_counts_against_its_record_until_it_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path(), |s| s.poison_max_attempts = 2);
        put(&ctx, &[1, 2, 3], |o| o as u128, |_| 1);
        for attempt in 1..=2 {
            // Each incarnation fails on record 2 and leaves it marked in flight; the
            // supervisor's hook counts it.
            let mut rt = runtime(&ctx).await;
            let mut seen = Seen {
                fail_at: Some(2),
                ..Default::default()
            };
            assert!(rt.catch_up(&ctx, 0, 3, 100, &mut seen).await.is_err());
            assert_eq!(ctx.consumers.in_flight("c-0"), Some((0, 2)));
            count_failure(&ctx, "c-0").await;
            let (p, _) = ctx.state.pointer("c-0").await.unwrap().unwrap();
            assert_eq!(p.failures, vec![(0, 2, attempt)]);
        }
        let mut rt = runtime(&ctx).await;
        let mut seen = Seen {
            fail_at: Some(2),
            ..Default::default()
        };
        rt.catch_up(&ctx, 0, 3, 100, &mut seen).await.unwrap();
        assert_eq!(seen.offsets, vec![1, 3]);
        assert_eq!((rt.dead_lettered, rt.applied(0)), (1, 3));
        assert_eq!(ctx.state.dead_letters().await.unwrap().len(), 1);
        let (p, _) = ctx.state.pointer("c-0").await.unwrap().unwrap();
        assert!(
            p.failures.is_empty(),
            "the count leaves with the dead letter"
        );
        assert!(ctx.consumers.in_flight("c-0").is_none());
    }

    #[tokio::test]
    async fn duplicates_in_the_log_are_applied_once_within_the_horizon() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path(), |s| {
            s.idempotency_window = std::time::Duration::from_secs(10);
            s.consumer_dedupe_keys = 100;
        });
        // Offsets 1..=4 carry the same key: 2 and 3 are within the horizon of 1, 4 is
        // past it. Offset 5 has no key (never a duplicate).
        let at = |o: u64| [0, 1_000, 5_000, 10_500, 12_000, 13_000][o as usize];
        put(&ctx, &[1, 2, 3, 4], |_| 42, at);
        put(&ctx, &[5], |_| 0, at);
        let mut rt = runtime(&ctx).await;
        let mut seen = Seen::default();
        rt.catch_up(&ctx, 0, 5, 100, &mut seen).await.unwrap();
        assert_eq!(seen.offsets, vec![1, 4, 5]);
        assert_eq!((rt.duplicates, rt.applied(0)), (2, 5));
        // The window travels with the cursor (checkpoints), so replay decides the same.
        let bytes = crate::codec::encode(&rt.cursors).unwrap();
        let mut restored = runtime(&ctx).await;
        restored
            .restore(crate::codec::decode(&bytes).unwrap())
            .unwrap();
        put(&ctx, &[6], |_| 42, |_| 14_000);
        let mut seen = Seen::default();
        restored.catch_up(&ctx, 0, 6, 100, &mut seen).await.unwrap();
        assert!(seen.offsets.is_empty(), "{:?}", seen.offsets);
    }

    #[tokio::test]
    async fn a_newer_claim_deposes_the_consumer_at_its_next_state_write() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path(), |_| {});
        put(&ctx, &[1, 2], |o| o as u128, |_| 1);
        let mut rt = runtime(&ctx).await;
        rt.catch_up(&ctx, 0, 2, 100, &mut Seen::default())
            .await
            .unwrap();
        rt.write_checkpoint(&ctx, Form::Full, b"one".to_vec())
            .await
            .unwrap();
        // A restart in the same process keeps the claim (same epoch).
        let epoch = ctx.state.pointer("c-0").await.unwrap().unwrap().0.epoch;
        let again = runtime(&ctx).await;
        assert_eq!(ctx.consumers.claims(), vec![("c-0".to_string(), epoch)]);
        drop(again);
        // Another owner (another process) claims the scope.
        let other = Registry::new("other", false);
        other.claim(&*ctx.state, "c-0").await.unwrap();
        let err = rt
            .write_checkpoint(&ctx, Form::Full, b"two".to_vec())
            .await
            .unwrap_err();
        assert!(err.downcast_ref::<Deposed>().is_some(), "{err}");
        let loaded = ctx.state.load("c-0").await.unwrap().unwrap();
        assert_eq!(loaded.base.as_deref(), Some(&b"one"[..]));
        assert_eq!(loaded.pointer.positions, vec![(0, 2)]);
        assert!(loaded.pointer.owner.starts_with("other#"));
        assert!(ctx.consumers.claims().is_empty(), "the claim is forgotten");
    }

    #[tokio::test]
    async fn a_checkpoint_an_older_build_kept_is_read_then_replaced() {
        #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Cp {
            format: u16,
            n: u64,
        }
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path(), |_| {});
        let old = crate::codec::encode(&Cp { format: 1, n: 7 }).unwrap();
        ctx.store.put_checkpoint("legacy", &old).unwrap();
        ctx.store.put_checkpoint("legacy/delta/1", b"d1").unwrap();
        ctx.store.put_checkpoint("legacy2", b"other").unwrap();
        let mut rt = runtime(&ctx).await;
        let (cp, deltas) = rt
            .load_checkpoint::<Cp, _>(&ctx, "legacy", 1, |_| Ok(()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((cp.n, deltas), (7, vec![b"d1".to_vec()]));
        // A delta through the state store keeps the old one (the base is still there).
        rt.write_checkpoint(&ctx, Form::Delta, vec![1])
            .await
            .unwrap();
        assert!(ctx.store.get_checkpoint("legacy").unwrap().is_some());
        // The first full one replaces it: the old checkpoint and its deltas are deleted,
        // a neighbour's name is not.
        let new = crate::codec::encode(&Cp { format: 1, n: 8 }).unwrap();
        rt.write_checkpoint(&ctx, Form::Full, new).await.unwrap();
        assert!(ctx.store.get_checkpoint("legacy").unwrap().is_none());
        assert!(ctx
            .store
            .get_checkpoint("legacy/delta/1")
            .unwrap()
            .is_none());
        assert!(ctx.store.get_checkpoint("legacy2").unwrap().is_some());
        let mut again = runtime(&ctx).await;
        let (cp, deltas) = again
            .load_checkpoint::<Cp, _>(&ctx, "legacy", 1, |_| Ok(()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((cp.n, deltas.len()), (8, 0));
    }

    #[tokio::test]
    async fn retention_follows_the_checkpoints_of_every_consumer_of_a_stream() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path(), |_| {});
        let state = &*ctx.state;
        assert_eq!(retainable(&ctx).await.unwrap().get(&0), None);
        let mut written = Vec::new();
        for c in consumers(&ctx.settings) {
            let mut claim = state.claim(&c.scope, "me").await.unwrap();
            let positions: Vec<(u32, u64)> =
                c.streams.iter().map(|&s| (s, 10 + s as u64)).collect();
            if c.scope == crate::names::ITEM_STATS {
                // Item stats is behind on stream 0.
                let behind = positions
                    .iter()
                    .map(|&(s, o)| (s, if s == 0 { 4 } else { o }))
                    .collect();
                state
                    .checkpoint(&mut claim, Form::Full, vec![1], behind)
                    .await
                    .unwrap();
            } else {
                state
                    .checkpoint(&mut claim, Form::Full, vec![1], positions)
                    .await
                    .unwrap();
            }
            written.push(c.scope);
        }
        assert_eq!(written.len(), 4, "catalog, item stats, two partitions");
        let r = retainable(&ctx).await.unwrap();
        assert_eq!(r.get(&0).copied(), Some(4));
        assert_eq!(r.get(&1).copied(), Some(11));
        assert_eq!(
            r.get(&CATALOG_STREAM).copied(),
            Some(10 + CATALOG_STREAM as u64)
        );
    }

    #[test]
    fn recent_keys_forget_by_time_and_by_count() {
        let mut w = RecentKeys::default();
        let h = 1000;
        assert!(!w.seen_or_insert(7, 10_000, h, 3));
        assert!(w.seen_or_insert(7, 10_500, h, 3), "within the horizon");
        assert!(!w.seen_or_insert(7, 11_001, h, 3), "past the horizon: new");
        // Count bound: the oldest key leaves first.
        for k in 1..=3u128 {
            assert!(!w.seen_or_insert(100 + k, 11_002, h, 3));
        }
        assert_eq!(w.len(), 3);
        assert!(!w.seen_or_insert(7, 11_003, h, 3), "pushed out by count");
        // Keys 0 and unknown times never dedupe.
        assert!(!w.seen_or_insert(0, 11_004, h, 3));
        assert!(!w.seen_or_insert(0, 11_004, h, 3));
        assert!(!w.seen_or_insert(9, 0, h, 3));
        assert!(!w.seen_or_insert(9, 0, h, 3));
        // Round trip keeps the decisions.
        let bytes = crate::codec::encode(&w).unwrap();
        let mut back: RecentKeys = decode_checkpoint(&bytes).unwrap();
        assert!(back.seen_or_insert(7, 11_005, h, 3));
    }

    #[test]
    fn recent_keys_round_trip_compactly() {
        let mut w = RecentKeys::default();
        for i in 0..1000u64 {
            let at = 1_700_000_000_000 + (i as i64) * 3 - if i % 7 == 0 { 50 } else { 0 };
            w.seen_or_insert(
                (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) as u128) | 1,
                at,
                1 << 40,
                10_000,
            );
        }
        let bytes = crate::codec::encode(&w).unwrap();
        assert!(bytes.len() < 1000 * 11, "{} bytes", bytes.len());
        let back: RecentKeys = crate::codec::decode(&bytes).unwrap();
        assert_eq!(back.order, w.order);
        assert_eq!(back.set, w.set);
    }

    #[test]
    fn checkpoint_format_is_read_from_the_prefix() {
        #[derive(Serialize)]
        struct Cp {
            format: u16,
            x: Vec<u64>,
        }
        let b = crate::codec::encode(&Cp {
            format: 300,
            x: vec![1, 2],
        })
        .unwrap();
        assert_eq!(checkpoint_format(&b).unwrap(), 300);
        assert!(checkpoint_format(&[]).is_err());
    }
}
