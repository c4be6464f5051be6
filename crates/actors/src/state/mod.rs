//! The node's state behind one seam: the [`StateStore`] trait.
//!
//! A backend offers two primitives: small **records** with revisions and a
//! compare-and-set (a redb table, or a JetStream Key-Value bucket), and **blobs** of any
//! size written whole under a name (a redb table, or a JetStream Object Store bucket).
//! Everything else is written once, here, on top of them, so both backends fence alike:
//!
//! - **Scopes and claims.** A scope is what one owner writes: a partition's features
//!   (`user_features-3`), a singleton (`item_stats`, `catalog`, `als_trainer`). Its state
//!   hangs off one [`Pointer`] record `{epoch, owner, checkpoint blobs, positions, failure
//!   counts, dead letters}`. An owner [`claims`](StateStore::claim) the scope by a
//!   compare-and-set that raises the epoch.
//! - **Fencing.** Every write of a scope (checkpoint, failure count, dead letter) is a
//!   compare-and-set of the pointer on the revision the owner last wrote or read. After
//!   a newer claim the old owner's revision is stale, so its next write is refused with
//!   [`StateError::Fenced`], even before the new owner wrote anything.
//! - **Atomic replace.** A checkpoint's bytes go to a blob under a fresh name first; the
//!   pointer CAS publishes it. A reader follows the pointer, so it never sees a
//!   half-written checkpoint; a blob whose pointer write was refused is deleted (or, after
//!   a crash between the two, left unreferenced and never read).
//! - **Incremental checkpoints.** A delta blob is appended to the pointer's list; a full
//!   checkpoint replaces the base and empties the list in one CAS; superseded blobs are
//!   deleted afterwards.

pub mod embedded;

use crate::Discard;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Why a state operation did not succeed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum StateError {
    /// The backend cannot be reached now (transient).
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
    /// A compare-and-set found another revision (`None`: the record is absent).
    #[error("record {key} changed (revision now {found:?})")]
    Conflict { key: String, found: Option<u64> },
    /// A newer owner claimed the scope: this owner may not write it any more.
    #[error("scope {scope} was claimed by {owner} at epoch {epoch}; this owner is deposed")]
    Fenced {
        scope: String,
        owner: String,
        epoch: u64,
    },
    #[error("state store failure: {0}")]
    Failed(String),
}

/// A record's value and its revision (revisions of a key only grow).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: u64,
}

impl Versioned {
    /// The value read as a JSON record (`None` when it is not one: a record of another
    /// shape or version is treated as absent by its readers).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_slice(&self.value).ok()
    }
}

/// One record seen by [`StateStore::watch_records`]: its latest value, or `None` when
/// it was deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchedRecord {
    pub key: String,
    pub value: Option<Versioned>,
}

/// Format of the pointer record this build writes.
pub const POINTER_FORMAT: u16 = 1;

/// The one record a scope's state hangs off (JSON, so an operator can read it with any
/// NATS or redb tool).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pointer {
    pub format: u16,
    /// Raised by every claim.
    pub epoch: u64,
    /// Who claimed the scope last (a node name).
    pub owner: String,
    /// The blob of the last full checkpoint.
    pub base: Option<String>,
    /// Delta blobs written since `base`, oldest first.
    pub deltas: Vec<String>,
    /// The positions the checkpoint (base plus deltas) covers, per stream: retention
    /// keeps every record after the lowest of these over all scopes.
    pub positions: Vec<(u32, u64)>,
    /// Failures counted against records: `(stream, offset, count)`.
    pub failures: Vec<(u32, u64, u32)>,
    /// Dead-letter blobs of this scope.
    pub dead_letters: Vec<String>,
    /// Wall-clock time of the last write, ms since the epoch (display only).
    pub written_ms: i64,
}

/// A checkpoint's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Replaces the whole state.
    Full,
    /// Continues the base and the deltas before it.
    Delta,
}

/// An owner's hold on a scope: the pointer as last written or read, and its revision.
#[derive(Debug, Clone)]
pub struct Claim {
    pub scope: String,
    pub pointer: Pointer,
    revision: u64,
    /// Blobs whose pointer write had an unknown outcome (the store did not answer): the
    /// pointer may name them, so they are never deleted blindly; each is deleted after
    /// a later write of this claim succeeds without naming it.
    uncertain: Vec<String>,
}

impl Claim {
    pub fn epoch(&self) -> u64 {
        self.pointer.epoch
    }
    pub fn owner(&self) -> &str {
        &self.pointer.owner
    }
    pub fn revision(&self) -> u64 {
        self.revision
    }
    /// Blobs written under an unknown outcome and not yet resolved.
    pub fn uncertain(&self) -> &[String] {
        &self.uncertain
    }
}

/// A change of a scope's pointer, applied to the pointer the writer holds (or, after an
/// own write of unknown outcome turned out committed, to that one). `None`: the change
/// does not apply to that pointer.
pub type PointerChange<'a> = &'a (dyn Fn(&Pointer) -> Option<Pointer> + Send + Sync);

/// Why a delta was not appended: an earlier write of this claim whose answer was lost
/// committed after all, so the delta chain is not the one the writer continued.
pub const DELTA_CHAIN_MOVED: &str =
    "an earlier checkpoint write of unknown outcome was committed; the next checkpoint must be a full one";

/// A scope's checkpoint as stored: the pointer, the base's bytes and the deltas' bytes
/// in order.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub pointer: Pointer,
    pub revision: u64,
    pub base: Option<Vec<u8>>,
    pub deltas: Vec<Vec<u8>>,
}

/// A dead letter as listed: its scope and the document the consumer wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub scope: String,
    pub name: String,
    pub doc: Vec<u8>,
}

/// The record key of a scope's pointer.
/// The record key of a cache entry: the namespace hashed (any text may name one; keys
/// allow few characters), then the entry's key.
pub fn cache_key(ns: &str, key: u128) -> String {
    let h = crate::record::hash128(&[b"cache", ns.as_bytes()]) as u64;
    format!("cache.{h:016x}.{key:032x}")
}

pub fn pointer_key(scope: &str) -> String {
    format!("scope.{scope}")
}

/// Wall-clock time, ms since the Unix epoch (display fields of records).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A name no other blob has: the scope, the writer's epoch and the pointer revision it
/// writes over, and a process-wide counter with the time (two processes of one epoch
/// cannot both pass the pointer CAS, but their blobs must not overwrite each other).
fn fresh_name(kind: &str, claim: &Claim) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{kind}/{}/e{}-r{}-{t:x}-{n}",
        claim.scope, claim.pointer.epoch, claim.revision
    )
}

fn decode_pointer(scope: &str, bytes: &[u8]) -> Result<Pointer, StateError> {
    let p: Pointer = serde_json::from_slice(bytes).map_err(|e| {
        StateError::Failed(format!("pointer of scope {scope} does not decode: {e}"))
    })?;
    if p.format > POINTER_FORMAT {
        return Err(StateError::Failed(format!(
            "pointer of scope {scope} has format {}, newer than this build's {POINTER_FORMAT}",
            p.format
        )));
    }
    Ok(p)
}

fn encode_pointer(p: &Pointer) -> Vec<u8> {
    serde_json::to_vec(p).unwrap_or_default()
}

/// Durable state: records with compare-and-set, blobs, and the fenced scope operations
/// built on them (provided methods; backends implement only the primitives).
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The backend's name (`embedded`, `jetstream`).
    fn backend(&self) -> &'static str;

    // ---- primitives -------------------------------------------------------------

    /// A record and its revision.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StateError>;
    /// Writes a record only if its revision is `expected` (`None`: only if absent);
    /// returns the new revision, or [`StateError::Conflict`].
    async fn compare_and_set(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, StateError>;
    /// Writes a record whatever it holds; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StateError>;
    async fn delete(&self, key: &str) -> Result<(), StateError>;
    /// Keys starting with `prefix`, sorted.
    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StateError>;
    /// Writes a blob whole. Readers see the old bytes, the new bytes, or (for a name
    /// never written before) nothing; never part of either.
    async fn put_blob(&self, name: &str, bytes: Vec<u8>) -> Result<(), StateError>;
    async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StateError>;
    async fn delete_blob(&self, name: &str) -> Result<(), StateError>;
    /// Names of the blobs starting with `prefix`, sorted.
    async fn blob_names(&self, prefix: &str) -> Result<Vec<String>, StateError>;

    /// Drops the connection to the backend and connects again (another server of a
    /// cluster, when the one it holds is cut off from the others); a no-op for a local
    /// backend.
    async fn reconnect(&self) {}

    // ---- what an older build of this backend left -------------------------------
    // Read once, when nothing newer exists; only the embedded store had older layouts.

    /// The checkpoint (base, deltas) an older build wrote for consumer `name`.
    async fn legacy_checkpoint(
        &self,
        _name: &str,
    ) -> Result<Option<(Vec<u8>, Vec<Vec<u8>>)>, StateError> {
        Ok(None)
    }

    /// Dead letters an older build kept in a table of its own.
    async fn legacy_dead_letters(&self) -> Result<Vec<Vec<u8>>, StateError> {
        Ok(Vec::new())
    }

    /// Model versions an older build kept in a table of its own.
    async fn legacy_model_versions(&self) -> Result<Vec<u64>, StateError> {
        Ok(Vec::new())
    }

    /// One model an older build kept in a table of its own.
    async fn legacy_model(&self, _version: u64) -> Result<Option<Vec<u8>>, StateError> {
        Ok(None)
    }

    /// A notification for every change of `key` from now on (a KV watch on JetStream);
    /// `None` when the backend cannot watch (one node: the writer is the reader, and
    /// callers read again on their own schedule). The channel closes when the watch ends.
    async fn watch(
        &self,
        _key: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<u64>>, StateError> {
        Ok(None)
    }

    /// Every record whose key matches one of `patterns` (NATS subject patterns: `a.>`
    /// for a prefix, or a whole key), first the latest of each as the watch starts, then
    /// every change in the order the store applied them (a KV watch on JetStream);
    /// `None` when the backend cannot watch. The channel closes when the watch ends.
    async fn watch_records(
        &self,
        _patterns: &[&str],
    ) -> Result<Option<tokio::sync::mpsc::Receiver<WatchedRecord>>, StateError> {
        Ok(None)
    }

    // ---- cache (neither fenced nor durable: a lost entry is recomputed) -------------

    /// Cached values of `keys` in namespace `ns` (`None`: not cached).
    async fn cache_get(&self, ns: &str, keys: &[u128]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        let mut out = Vec::with_capacity(keys.len());
        for &k in keys {
            out.push(self.get(&cache_key(ns, k)).await?.map(|v| v.value));
        }
        Ok(out)
    }

    /// Stores cache values (last writer wins; every writer of a key writes the same
    /// value, as the cache holds a pure function of the key).
    async fn cache_put(&self, ns: &str, entries: Vec<(u128, Vec<u8>)>) -> Result<(), StateError> {
        for (k, v) in entries {
            self.put(&cache_key(ns, k), v).await?;
        }
        Ok(())
    }

    // ---- scopes (written once for every backend) ----------------------------------

    /// A scope's pointer and its revision.
    async fn pointer(&self, scope: &str) -> Result<Option<(Pointer, u64)>, StateError> {
        match self.get(&pointer_key(scope)).await? {
            None => Ok(None),
            Some(v) => Ok(Some((decode_pointer(scope, &v.value)?, v.revision))),
        }
    }

    /// Claims `scope` for `owner`: raises the epoch by a compare-and-set on the pointer,
    /// keeping its checkpoint, positions, failure counts and dead letters. Refused with
    /// [`StateError::Conflict`] when another claim or write raced this one.
    async fn claim(&self, scope: &str, owner: &str) -> Result<Claim, StateError> {
        let (mut pointer, expected) = match self.pointer(scope).await? {
            Some((p, rev)) => (p, Some(rev)),
            None => (Pointer::default(), None),
        };
        pointer.format = POINTER_FORMAT;
        pointer.epoch += 1;
        pointer.owner = owner.to_string();
        pointer.written_ms = now_ms();
        let revision = self
            .compare_and_set(&pointer_key(scope), encode_pointer(&pointer), expected)
            .await?;
        Ok(Claim {
            scope: scope.to_string(),
            pointer,
            revision,
            uncertain: Vec::new(),
        })
    }

    /// Changes the scope's pointer if `claim` still holds it: `change` applied to the
    /// pointer the claim holds, written by compare-and-set. On success the claim carries
    /// the new pointer and revision, and the pointer it replaced is returned.
    ///
    /// A compare-and-set whose answer was lost may have been written: the next write then
    /// finds a newer revision. The pointer is read again (from the store's leader), and
    /// if it carries this claim's owner and epoch it is this claim's own write (nobody
    /// else writes under them): it is adopted and `change` is applied to it. Any other
    /// owner or epoch is [`StateError::Fenced`]. An unanswered write is
    /// [`StateError::Unavailable`]: its outcome is unknown.
    async fn fenced_update(
        &self,
        claim: &mut Claim,
        change: PointerChange<'_>,
    ) -> Result<Pointer, StateError> {
        let key = pointer_key(&claim.scope);
        for _ in 0..4 {
            let Some(mut next) = change(&claim.pointer) else {
                return Err(StateError::Unavailable(DELTA_CHAIN_MOVED.to_string()));
            };
            next.format = POINTER_FORMAT;
            next.written_ms = now_ms();
            match self
                .compare_and_set(&key, encode_pointer(&next), Some(claim.revision))
                .await
            {
                Ok(rev) => {
                    let prev = std::mem::replace(&mut claim.pointer, next);
                    claim.revision = rev;
                    return Ok(prev);
                }
                Err(StateError::Conflict { .. }) => match self.pointer(&claim.scope).await? {
                    Some((p, rev))
                        if p.owner == claim.pointer.owner && p.epoch == claim.pointer.epoch =>
                    {
                        if rev <= claim.revision {
                            return Err(StateError::Unavailable(format!(
                                "pointer of scope {} read at revision {rev}, not newer than this owner's {}",
                                claim.scope, claim.revision
                            )));
                        }
                        tracing::info!(scope = %claim.scope, revision = rev, "an own pointer write of unknown outcome was committed; adopted");
                        claim.pointer = p;
                        claim.revision = rev;
                    }
                    Some((p, _)) => {
                        return Err(StateError::Fenced {
                            scope: claim.scope.clone(),
                            owner: p.owner,
                            epoch: p.epoch,
                        })
                    }
                    None => {
                        return Err(StateError::Fenced {
                            scope: claim.scope.clone(),
                            owner: "nobody (the pointer was deleted)".to_string(),
                            epoch: 0,
                        })
                    }
                },
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Unavailable(format!(
            "pointer of scope {} kept changing under this owner",
            claim.scope
        )))
    }

    /// Deletes the blobs this claim wrote under an unknown outcome that its pointer does
    /// not name (called after a successful pointer write).
    async fn resolve_uncertain(&self, claim: &mut Claim) {
        let p = &claim.pointer;
        let unnamed: Vec<String> = std::mem::take(&mut claim.uncertain)
            .into_iter()
            .filter(|b| {
                p.base.as_ref() != Some(b) && !p.deltas.contains(b) && !p.dead_letters.contains(b)
            })
            .collect();
        // A named one is the pointer's now: superseded and deleted like any other.
        for b in unnamed {
            if let Err(e) = self.delete_blob(&b).await {
                tracing::warn!(blob = %b, error = %e, "blob of an unknown-outcome write not deleted");
            }
        }
    }

    /// Writes a checkpoint of the scope covering `positions`: the bytes to a fresh blob,
    /// then the pointer (fenced). A full checkpoint replaces the base and the deltas,
    /// whose blobs are then deleted; a delta is appended to the list, and only to the
    /// list the writer continued (see [`DELTA_CHAIN_MOVED`]).
    ///
    /// A blob is deleted only when no pointer can name it: after a refused write, or
    /// once superseded. After an unknown outcome it is kept (the pointer may name it) and
    /// deleted by a later successful write that does not name it.
    async fn checkpoint(
        &self,
        claim: &mut Claim,
        form: Form,
        bytes: Vec<u8>,
        positions: Vec<(u32, u64)>,
    ) -> Result<(), StateError> {
        let name = fresh_name("cp", claim);
        self.put_blob(&name, bytes).await?;
        let chain = (claim.pointer.base.clone(), claim.pointer.deltas.clone());
        let change = |p: &Pointer| {
            let mut next = p.clone();
            match form {
                Form::Full => {
                    next.base = Some(name.clone());
                    next.deltas.clear();
                }
                Form::Delta => {
                    if (&p.base, &p.deltas) != (&chain.0, &chain.1) {
                        return None;
                    }
                    next.deltas.push(name.clone());
                }
            }
            next.positions = positions.clone();
            Some(next)
        };
        match self.fenced_update(claim, &change).await {
            Ok(prev) => {
                if form == Form::Full {
                    let superseded = prev.base.into_iter().chain(prev.deltas);
                    for old in superseded {
                        if let Err(e) = self.delete_blob(&old).await {
                            tracing::warn!(blob = %old, error = %e, "superseded checkpoint blob not deleted");
                        }
                    }
                }
                self.resolve_uncertain(claim).await;
                Ok(())
            }
            Err(StateError::Unavailable(why)) if why == DELTA_CHAIN_MOVED => {
                // Refused before any write: nobody names it.
                self.delete_blob(&name).await.discard();
                Err(StateError::Unavailable(why))
            }
            Err(e @ StateError::Unavailable(_)) => {
                // The pointer may now name the new blob, or still the ones a full
                // checkpoint would have replaced: all are kept until a later write says.
                claim.uncertain.push(name);
                if form == Form::Full {
                    let p = &claim.pointer;
                    let old: Vec<String> = p.base.iter().chain(&p.deltas).cloned().collect();
                    claim.uncertain.extend(old);
                }
                Err(e)
            }
            Err(e) => {
                // A definite refusal: never referenced, nobody reads it.
                self.delete_blob(&name).await.discard();
                Err(e)
            }
        }
    }

    /// The scope's checkpoint: its pointer and the bytes of the base and every delta.
    /// A pointer that moves while the blobs are read (a newer full checkpoint deleted
    /// the ones it replaced) is read again.
    async fn load(&self, scope: &str) -> Result<Option<Loaded>, StateError> {
        let mut last_missing = String::new();
        for _ in 0..5 {
            let Some((pointer, revision)) = self.pointer(scope).await? else {
                return Ok(None);
            };
            let mut missing = None;
            let base = match &pointer.base {
                None => None,
                Some(b) => match self.get_blob(b).await? {
                    Some(bytes) => Some(bytes),
                    None => {
                        missing = Some(b.clone());
                        None
                    }
                },
            };
            let mut deltas = Vec::with_capacity(pointer.deltas.len());
            if missing.is_none() {
                for d in &pointer.deltas {
                    match self.get_blob(d).await? {
                        Some(bytes) => deltas.push(bytes),
                        None => {
                            missing = Some(d.clone());
                            break;
                        }
                    }
                }
            }
            match missing {
                None => {
                    return Ok(Some(Loaded {
                        pointer,
                        revision,
                        base,
                        deltas,
                    }))
                }
                Some(m) => last_missing = m,
            }
        }
        Err(StateError::Failed(format!(
            "checkpoint of scope {scope} names blob {last_missing}, which does not exist"
        )))
    }

    /// Counts one more failure against record `stream/offset` (fenced); the new count.
    async fn count_failure(
        &self,
        claim: &mut Claim,
        stream: u32,
        offset: u64,
    ) -> Result<u32, StateError> {
        let change = |p: &Pointer| {
            let mut next = p.clone();
            match next
                .failures
                .iter_mut()
                .find(|(s, o, _)| (*s, *o) == (stream, offset))
            {
                Some(f) => f.2 += 1,
                None => next.failures.push((stream, offset, 1)),
            }
            Some(next)
        };
        self.fenced_update(claim, &change).await?;
        self.resolve_uncertain(claim).await;
        Ok(claim
            .pointer
            .failures
            .iter()
            .find(|(s, o, _)| (*s, *o) == (stream, offset))
            .map_or(0, |f| f.2))
    }

    /// Moves record `stream/offset` to the scope's dead letters with `doc` (fenced): the
    /// document goes to a fresh blob, the pointer lists it and drops the failure count.
    async fn dead_letter(
        &self,
        claim: &mut Claim,
        stream: u32,
        offset: u64,
        doc: Vec<u8>,
    ) -> Result<(), StateError> {
        // The record is named in the blob's name, so a dead letter whose answer was lost
        // is recognised when the owner tries again (one dead letter per record).
        let tag = format!("@{stream}-{offset}");
        let name = format!("{}{tag}", fresh_name("dead", claim));
        self.put_blob(&name, doc).await?;
        let change = |p: &Pointer| {
            let mut next = p.clone();
            next.failures
                .retain(|&(s, o, _)| (s, o) != (stream, offset));
            if !next.dead_letters.iter().any(|d| d.ends_with(&tag)) {
                next.dead_letters.push(name.clone());
            }
            Some(next)
        };
        match self.fenced_update(claim, &change).await {
            Ok(_) => {
                if !claim.pointer.dead_letters.contains(&name) {
                    self.delete_blob(&name).await.discard();
                }
                self.resolve_uncertain(claim).await;
                Ok(())
            }
            Err(e @ StateError::Unavailable(_)) => {
                claim.uncertain.push(name);
                Err(e)
            }
            Err(e) => {
                self.delete_blob(&name).await.discard();
                Err(e)
            }
        }
    }

    /// Every scope's dead letters, in scope order then the order they were written.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StateError> {
        let mut out = Vec::new();
        for key in self.keys("scope.").await? {
            let scope = key.trim_start_matches("scope.").to_string();
            let Some((p, _)) = self.pointer(&scope).await? else {
                continue;
            };
            for name in p.dead_letters {
                if let Some(doc) = self.get_blob(&name).await? {
                    out.push(DeadLetter {
                        scope: scope.clone(),
                        name,
                        doc,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Stores a cluster-wide constant once: the first writer's value stays, and a later
    /// caller gets the stored value back to compare with its own. An unavailable backend
    /// (a bucket whose replicas are still electing a leader) is asked again for a moment:
    /// creating a record only if it is absent, then reading it, is safe to repeat.
    async fn constant(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>, StateError> {
        let mut pause = std::time::Duration::from_millis(50);
        let mut tries = 0;
        loop {
            tries += 1;
            let r = match self.compare_and_set(key, value.clone(), None).await {
                Ok(_) => Ok(value.clone()),
                Err(StateError::Conflict { .. }) => match self.get(key).await {
                    Ok(Some(v)) => Ok(v.value),
                    Ok(None) => Err(StateError::Failed(format!(
                        "constant {key} exists and does not at once"
                    ))),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match r {
                Err(StateError::Unavailable(_)) if tries < 6 => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A state store whose next `lose` compare-and-sets are committed but answered as
    /// unreachable (a leader election that times the answer out after the write).
    struct LosingAnswers {
        inner: embedded::EmbeddedState,
        lose: AtomicU32,
    }

    #[async_trait]
    impl StateStore for LosingAnswers {
        fn backend(&self) -> &'static str {
            "test"
        }
        async fn get(&self, key: &str) -> Result<Option<Versioned>, StateError> {
            self.inner.get(key).await
        }
        async fn compare_and_set(
            &self,
            key: &str,
            value: Vec<u8>,
            expected: Option<u64>,
        ) -> Result<u64, StateError> {
            let r = self.inner.compare_and_set(key, value, expected).await;
            let armed = self
                .lose
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            match r {
                Ok(_) if armed => Err(StateError::Unavailable("answer lost".into())),
                r => r,
            }
        }
        async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StateError> {
            self.inner.put(key, value).await
        }
        async fn delete(&self, key: &str) -> Result<(), StateError> {
            self.inner.delete(key).await
        }
        async fn keys(&self, prefix: &str) -> Result<Vec<String>, StateError> {
            self.inner.keys(prefix).await
        }
        async fn put_blob(&self, name: &str, bytes: Vec<u8>) -> Result<(), StateError> {
            self.inner.put_blob(name, bytes).await
        }
        async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
            self.inner.get_blob(name).await
        }
        async fn delete_blob(&self, name: &str) -> Result<(), StateError> {
            self.inner.delete_blob(name).await
        }
        async fn blob_names(&self, prefix: &str) -> Result<Vec<String>, StateError> {
            self.inner.blob_names(prefix).await
        }
    }

    fn losing(dir: &std::path::Path) -> LosingAnswers {
        let (store, _) = crate::store::Store::open(&dir.join("s.redb")).unwrap();
        LosingAnswers {
            inner: embedded::EmbeddedState::new(store),
            lose: AtomicU32::new(0),
        }
    }

    async fn base_of(s: &LosingAnswers, scope: &str) -> Vec<u8> {
        s.load(scope).await.unwrap().unwrap().base.unwrap()
    }

    #[tokio::test]
    async fn a_checkpoint_committed_without_an_answer_is_adopted_not_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let s = losing(dir.path());
        let mut claim = s.claim("p-0", "me#1").await.unwrap();
        s.checkpoint(&mut claim, Form::Full, b"one".to_vec(), vec![(0, 1)])
            .await
            .unwrap();
        // Written, but the answer is lost: the blob the pointer now names must survive.
        s.lose.store(1, Ordering::SeqCst);
        let err = s
            .checkpoint(&mut claim, Form::Full, b"two".to_vec(), vec![(0, 2)])
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Unavailable(_)), "{err}");
        assert_eq!(
            claim.uncertain().len(),
            2,
            "the new blob and the base it replaced"
        );
        assert_eq!(base_of(&s, "p-0").await, b"two", "the load works");
        // The owner's next checkpoint adopts its own write and goes on (not fenced).
        s.checkpoint(&mut claim, Form::Full, b"three".to_vec(), vec![(0, 3)])
            .await
            .unwrap();
        let loaded = s.load("p-0").await.unwrap().unwrap();
        assert_eq!(loaded.base.as_deref(), Some(&b"three"[..]));
        assert_eq!(loaded.pointer.positions, vec![(0, 3)]);
        assert!(claim.uncertain().is_empty());
        // Nothing is left behind: one blob, the one the pointer names.
        assert_eq!(s.blob_names("cp/p-0/").await.unwrap().len(), 1);
        // Failure counts and dead letters go on as well.
        s.lose.store(1, Ordering::SeqCst);
        assert!(s.count_failure(&mut claim, 0, 9).await.is_err());
        assert_eq!(s.count_failure(&mut claim, 0, 9).await.unwrap(), 2);
        s.lose.store(1, Ordering::SeqCst);
        assert!(s
            .dead_letter(&mut claim, 0, 9, b"doc".to_vec())
            .await
            .is_err());
        s.dead_letter(&mut claim, 0, 9, b"doc".to_vec())
            .await
            .unwrap();
        assert_eq!(s.dead_letters().await.unwrap().len(), 1, "one per record");
        assert_eq!(s.blob_names("dead/").await.unwrap().len(), 1);
        assert!(s
            .pointer("p-0")
            .await
            .unwrap()
            .unwrap()
            .0
            .failures
            .is_empty());
    }

    #[tokio::test]
    async fn a_delta_after_an_unknown_outcome_asks_for_a_full_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = losing(dir.path());
        let mut claim = s.claim("p-0", "me#1").await.unwrap();
        s.checkpoint(&mut claim, Form::Full, b"base".to_vec(), vec![(0, 1)])
            .await
            .unwrap();
        s.lose.store(1, Ordering::SeqCst);
        assert!(s
            .checkpoint(&mut claim, Form::Delta, b"d1".to_vec(), vec![(0, 2)])
            .await
            .is_err());
        // d1 was written: the writer, not knowing it, would repeat its changes in the next
        // delta. That delta is refused (never appended twice), nothing is deleted that the
        // pointer names, and loads keep working.
        let err = s
            .checkpoint(&mut claim, Form::Delta, b"d1+d2".to_vec(), vec![(0, 3)])
            .await
            .unwrap_err();
        assert_eq!(err, StateError::Unavailable(DELTA_CHAIN_MOVED.to_string()));
        let loaded = s.load("p-0").await.unwrap().unwrap();
        assert_eq!(loaded.deltas, vec![b"d1".to_vec()]);
        // The full checkpoint that follows replaces the chain.
        s.checkpoint(&mut claim, Form::Full, b"full".to_vec(), vec![(0, 3)])
            .await
            .unwrap();
        let loaded = s.load("p-0").await.unwrap().unwrap();
        assert_eq!(
            (loaded.base.as_deref(), loaded.deltas.len()),
            (Some(&b"full"[..]), 0)
        );
        assert_eq!(s.blob_names("cp/p-0/").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn another_owner_still_fences() {
        let dir = tempfile::tempdir().unwrap();
        let s = losing(dir.path());
        let mut old = s.claim("p-0", "old#1").await.unwrap();
        let _new = s.claim("p-0", "new#2").await.unwrap();
        let err = s
            .checkpoint(&mut old, Form::Full, b"x".to_vec(), vec![(0, 1)])
            .await
            .unwrap_err();
        assert!(
            matches!(err, StateError::Fenced { ref owner, epoch: 2, .. } if owner == "new#2"),
            "{err}"
        );
        assert!(
            s.blob_names("cp/").await.unwrap().is_empty(),
            "refused blob deleted"
        );
    }
}
