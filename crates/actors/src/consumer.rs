//! Applying journal records by offset: gap filling from the store, poison-record
//! handling (dead letters after K counted failures) and fault hooks. Shared by every
//! actor that consumes the journal.

use std::sync::Arc;

use ractor::ActorProcessingErr;
use rustc_hash::FxHashMap;

use crate::ctx::Ctx;
use crate::faults;
use crate::record::Record;

/// Records read from the store per catch-up step.
const CATCH_UP_CHUNK: usize = 4096;

/// Per-consumer bookkeeping for applying records.
pub struct Applier {
    /// Registered name (`user_features-3`); failure counts are kept under it.
    pub name: String,
    /// Actor kind used for fault targets (`user_features`).
    pub kind: &'static str,
    failures: FxHashMap<(u32, u64), u32>,
    pub dead_lettered: u64,
}

impl Applier {
    /// Loads the consumer's durable failure counts.
    pub async fn load(
        ctx: &Arc<Ctx>,
        name: &str,
        kind: &'static str,
    ) -> Result<Applier, ActorProcessingErr> {
        let store = ctx.store.clone();
        let n = name.to_string();
        let failures = tokio::task::spawn_blocking(move || store.failures(&n)).await??;
        Ok(Applier {
            name: name.to_string(),
            kind,
            failures: failures.into_iter().collect(),
            dead_lettered: 0,
        })
    }

    /// Applies `records` of `stream` after `*applied`, first reading any gap before them
    /// from the store. `f` applies one record.
    pub async fn apply(
        &mut self,
        ctx: &Arc<Ctx>,
        stream: u32,
        applied: &mut u64,
        records: Vec<Record>,
        f: &mut (dyn FnMut(Record) + Send),
    ) -> Result<u64, ActorProcessingErr> {
        let mut n = 0;
        if let Some(first) = records.iter().map(|r| r.offset).find(|&o| o > *applied) {
            if first > *applied + 1 {
                n += self.catch_up(ctx, stream, applied, first - 1, f).await?;
            }
        }
        for r in records {
            if r.offset == *applied + 1 {
                self.one(ctx, r, applied, f).await?;
                n += 1;
            }
        }
        ctx.clear_in_flight(&self.name);
        Ok(n)
    }

    /// Reads and applies records of `stream` from the store up to `upto` (inclusive).
    pub async fn catch_up(
        &mut self,
        ctx: &Arc<Ctx>,
        stream: u32,
        applied: &mut u64,
        upto: u64,
        f: &mut (dyn FnMut(Record) + Send),
    ) -> Result<u64, ActorProcessingErr> {
        let mut n = 0;
        while *applied < upto {
            let store = ctx.store.clone();
            let from = *applied + 1;
            let chunk =
                tokio::task::spawn_blocking(move || store.read(stream, from, CATCH_UP_CHUNK))
                    .await??;
            if chunk.is_empty() {
                break;
            }
            for r in chunk {
                if r.offset > upto {
                    break;
                }
                // Retention may have removed records a stale checkpoint pointed before.
                if r.offset > *applied + 1 {
                    tracing::warn!(consumer = %self.name, stream, from = *applied + 1, to = r.offset - 1, "records missing from the journal (retention); skipping");
                    *applied = r.offset - 1;
                }
                self.one(ctx, r, applied, f).await?;
                n += 1;
            }
        }
        ctx.clear_in_flight(&self.name);
        Ok(n)
    }

    /// The records of `stream` to apply next, in offset order, each past its checks
    /// (poison accounting, fault hook): those of a notification (after any gap before
    /// them, read from the store), or with none, everything up to `upto` read from the
    /// store. `*applied` moves past them; the count result comes back beside them so a
    /// caller applies what passed before it reports a failure.
    pub async fn next_batch(
        &mut self,
        ctx: &Arc<Ctx>,
        stream: u32,
        applied: &mut u64,
        records: Vec<Record>,
        upto: u64,
    ) -> (Vec<Record>, Result<u64, ActorProcessingErr>) {
        let mut out = Vec::new();
        let mut f = |r: Record| out.push(r);
        let result = if records.is_empty() {
            self.catch_up(ctx, stream, applied, upto, &mut f).await
        } else {
            self.apply(ctx, stream, applied, records, &mut f).await
        };
        (out, result)
    }

    async fn one(
        &mut self,
        ctx: &Arc<Ctx>,
        r: Record,
        applied: &mut u64,
        f: &mut (dyn FnMut(Record) + Send),
    ) -> Result<(), ActorProcessingErr> {
        let attempts = self
            .failures
            .get(&(r.stream, r.offset))
            .copied()
            .unwrap_or(0);
        if attempts >= ctx.settings.poison_max_attempts {
            let doc = serde_json::json!({
                "consumer": self.name,
                "stream": r.stream,
                "offset": r.offset,
                "attempts": attempts,
                "record": format!("{:?}", r.payload),
            });
            let store = ctx.store.clone();
            let (name, s, o) = (self.name.clone(), r.stream, r.offset);
            tokio::task::spawn_blocking(move || {
                store.dead_letter(&name, s, o, doc.to_string().as_bytes())
            })
            .await??;
            tracing::warn!(consumer = %self.name, stream = r.stream, offset = r.offset, attempts, "record moved to dead letters");
            ctx.metrics.dead_letters.inc();
            self.failures.remove(&(r.stream, r.offset));
            self.dead_lettered += 1;
            *applied = r.offset;
            return Ok(());
        }
        ctx.set_in_flight(&self.name, r.stream, r.offset);
        faults::apply(&ctx.faults, self.kind, &r).await?;
        let offset = r.offset;
        f(r);
        *applied = offset;
        Ok(())
    }
}

/// Applies checked records one by one, each marked in flight while `f` runs, so a panic
/// in `f` is counted against the record that caused it.
pub fn apply_marked<'r>(
    ctx: &Ctx,
    consumer: &str,
    records: impl IntoIterator<Item = &'r Record>,
    mut f: impl FnMut(&Record),
) {
    for r in records {
        ctx.set_in_flight(consumer, r.stream, r.offset);
        f(r);
    }
    ctx.clear_in_flight(consumer);
}

/// The supervisors' failure hook: counts a failure against the record the failed
/// consumer was applying, durably and outside the failed actor.
pub fn count_failure(ctx: &Ctx, child: &str) {
    let in_flight = ctx.in_flight.lock().remove(child);
    ctx.metrics
        .actor_restarts
        .get_or_create(&crate::metrics::label("actor", child))
        .inc();
    if let Some((s, o)) = in_flight {
        match ctx.store.count_failure(child, s, o) {
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
}

/// Writes a consumer's checkpoint (state and offsets in one value, so one store write).
/// The state is encoded from borrowed fields (no copy of it), then written off the async
/// runtime.
pub async fn save_checkpoint<T>(
    ctx: &Arc<Ctx>,
    name: String,
    cp: &T,
) -> Result<(), ActorProcessingErr>
where
    T: serde::Serialize,
{
    let bytes = bincode::serde::encode_to_vec(cp, bincode::config::standard())?;
    write_checkpoint(ctx, name, bytes).await
}

/// Writes encoded checkpoint bytes off the async runtime.
pub async fn write_checkpoint(
    ctx: &Arc<Ctx>,
    name: String,
    bytes: Vec<u8>,
) -> Result<(), ActorProcessingErr> {
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || store.put_checkpoint(&name, &bytes)).await??;
    Ok(())
}

/// The usual checkpoint check: a known format and, for consumers of every partition, one
/// offset per configured partition (`streams`: found, configured).
pub fn check_checkpoint(
    format: u16,
    expected: u16,
    streams: Option<(usize, usize)>,
) -> Result<(), String> {
    if format != expected {
        return Err(format!("format {format}, this build reads {expected}"));
    }
    match streams {
        Some((found, configured)) if found != configured => {
            Err(format!("{found} partitions, the config has {configured}"))
        }
        _ => Ok(()),
    }
}

/// Reads a consumer's checkpoint; `check` refuses an unknown format or a shape that does
/// not fit the configuration, with a reason.
pub async fn load_checkpoint<T, F>(
    ctx: &Arc<Ctx>,
    name: String,
    check: F,
) -> Result<Option<T>, ActorProcessingErr>
where
    T: serde::de::DeserializeOwned + Send + 'static,
    F: FnOnce(&T) -> Result<(), String> + Send + 'static,
{
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || -> Result<Option<T>, ActorProcessingErr> {
        let Some(bytes) = store.get_checkpoint(&name)? else {
            return Ok(None);
        };
        let (cp, _): (T, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                .map_err(|e| format!("checkpoint {name} does not decode: {e}"))?;
        check(&cp).map_err(|e| format!("checkpoint {name}: {e}"))?;
        Ok(Some(cp))
    })
    .await?
}
