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
}

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
        })
    }

    /// Writes `next` as the scope's pointer if `claim` still holds it; on success the
    /// claim carries the new pointer and revision, otherwise [`StateError::Fenced`].
    async fn fenced_write(&self, claim: &mut Claim, mut next: Pointer) -> Result<(), StateError> {
        next.format = POINTER_FORMAT;
        next.written_ms = now_ms();
        let key = pointer_key(&claim.scope);
        match self
            .compare_and_set(&key, encode_pointer(&next), Some(claim.revision))
            .await
        {
            Ok(rev) => {
                claim.pointer = next;
                claim.revision = rev;
                Ok(())
            }
            Err(StateError::Conflict { .. }) => {
                let (owner, epoch) = match self.pointer(&claim.scope).await {
                    Ok(Some((p, _))) => (p.owner, p.epoch),
                    _ => ("an unknown owner".to_string(), 0),
                };
                Err(StateError::Fenced {
                    scope: claim.scope.clone(),
                    owner,
                    epoch,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Writes a checkpoint of the scope covering `positions`: the bytes to a fresh blob,
    /// then the pointer (fenced). A full checkpoint replaces the base and the deltas,
    /// whose blobs are then deleted; a delta is appended to the list.
    async fn checkpoint(
        &self,
        claim: &mut Claim,
        form: Form,
        bytes: Vec<u8>,
        positions: Vec<(u32, u64)>,
    ) -> Result<(), StateError> {
        let name = fresh_name("cp", claim);
        self.put_blob(&name, bytes).await?;
        let mut next = claim.pointer.clone();
        let superseded = match form {
            Form::Full => {
                let mut old: Vec<String> = next.base.take().into_iter().collect();
                old.append(&mut next.deltas);
                next.base = Some(name.clone());
                old
            }
            Form::Delta => {
                next.deltas.push(name.clone());
                Vec::new()
            }
        };
        next.positions = positions;
        if let Err(e) = self.fenced_write(claim, next).await {
            // Never referenced: nobody reads it.
            self.delete_blob(&name).await.discard();
            return Err(e);
        }
        for old in superseded {
            if let Err(e) = self.delete_blob(&old).await {
                tracing::warn!(blob = %old, error = %e, "superseded checkpoint blob not deleted");
            }
        }
        Ok(())
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
        let mut next = claim.pointer.clone();
        let n = match next
            .failures
            .iter_mut()
            .find(|(s, o, _)| (*s, *o) == (stream, offset))
        {
            Some(f) => {
                f.2 += 1;
                f.2
            }
            None => {
                next.failures.push((stream, offset, 1));
                1
            }
        };
        self.fenced_write(claim, next).await?;
        Ok(n)
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
        let name = fresh_name("dead", claim);
        self.put_blob(&name, doc).await?;
        let mut next = claim.pointer.clone();
        next.failures
            .retain(|&(s, o, _)| (s, o) != (stream, offset));
        next.dead_letters.push(name.clone());
        if let Err(e) = self.fenced_write(claim, next).await {
            self.delete_blob(&name).await.discard();
            return Err(e);
        }
        Ok(())
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
    /// caller gets the stored value back to compare with its own.
    async fn constant(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>, StateError> {
        match self.compare_and_set(key, value.clone(), None).await {
            Ok(_) => Ok(value),
            Err(StateError::Conflict { .. }) => match self.get(key).await? {
                Some(v) => Ok(v.value),
                None => Err(StateError::Failed(format!(
                    "constant {key} exists and does not at once"
                ))),
            },
            Err(e) => Err(e),
        }
    }
}
