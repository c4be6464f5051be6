//! The model plane's record: which ALS model versions exist, which one every node serves,
//! and who may publish the next one.
//!
//! One record, `model.als` (JSON, in the state store's records), and one blob per kept
//! version in the object store. Versions are issued by the record's compare-and-set, so
//! a version number is never issued twice; a blob is named by its version *and* the
//! publishing leader's epoch (`models/als/<version>-e<epoch>`), so a deposed leader that
//! writes a blob before its refused publish never overwrites the blob a record names.
//!
//! **Fencing.** The trainer leader writes the record under its lease epoch
//! ([`crate::cluster::leader`]): it first *claims* the record (raises `epoch` to its own by
//! compare-and-set), then publishes. A write that conflicts is retried only when the
//! record read again still carries the writer's epoch and leader (a rollback by another
//! node, or the writer's own write whose answer was lost); a higher epoch refuses it.
//!
//! **Serving.** `serve` is the version every node serves: the newest published, or an
//! older kept one after a rollback (any node may write that). Nodes watch the record,
//! load the blob, check its hash and swap it in; they follow `serve` and nothing else, so
//! no node goes back to an older version except by rollback.

use serde::{Deserialize, Serialize};

use crate::state::{now_ms, StateError, StateStore};

/// The model record's key.
pub const MODEL_KEY: &str = "model.als";
/// Prefix of the model blobs.
pub const MODEL_PREFIX: &str = "models/als/";
/// Version of [`ModelRecord`] written by this build.
pub const MODEL_RECORD_FORMAT: u16 = 1;

/// One published model version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub version: u64,
    pub blob: String,
    /// [`content_hash`] of the blob's bytes, hex.
    pub hash: String,
    pub bytes: u64,
    /// The leader and its epoch that published it.
    pub leader: String,
    pub epoch: u64,
    /// Log positions (per stream) the training set covered.
    pub positions: Vec<(u32, u64)>,
    pub validation_ndcg: f64,
    pub interactions: u64,
    pub users: u32,
    pub items: u32,
    pub train_ms: u64,
    pub published_ms: i64,
}

/// The record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub format: u16,
    /// The epoch of the leader that last claimed the record.
    pub epoch: u64,
    pub leader: String,
    /// The newest version issued (0: none).
    pub latest: u64,
    /// The version every node serves (0: none).
    pub serve: u64,
    /// Kept versions, oldest first.
    pub snapshots: Vec<SnapshotMeta>,
    /// The last rollback: `(from, to, by node)`.
    pub rolled_back: Option<(u64, u64, String)>,
    pub written_ms: i64,
}

impl ModelRecord {
    pub fn get(&self, version: u64) -> Option<&SnapshotMeta> {
        self.snapshots.iter().find(|s| s.version == version)
    }

    /// The snapshot every node should serve.
    pub fn serving(&self) -> Option<&SnapshotMeta> {
        self.get(self.serve)
    }
}

/// Hash of a blob's bytes as stored in [`SnapshotMeta::hash`].
pub fn content_hash(bytes: &[u8]) -> String {
    format!("{:032x}", crate::record::hash128(&[bytes]))
}

/// The blob name of `version` published under `epoch`.
pub fn blob_name(version: u64, epoch: u64) -> String {
    format!("{MODEL_PREFIX}{version:020}-e{epoch}")
}

/// Why a write of the record did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A leader of a higher epoch claimed the record: this node no longer publishes.
    #[error("fenced: the model record was claimed by {leader} (epoch {epoch})")]
    Fenced { leader: String, epoch: u64 },
    #[error("{0}")]
    Refused(String),
    /// The snapshot is named by the record already (an own write whose answer was lost).
    #[error("already published")]
    Published,
    #[error(transparent)]
    Store(#[from] StateError),
}

/// The record and its revision.
pub async fn read(state: &dyn StateStore) -> Result<Option<(ModelRecord, u64)>, StateError> {
    let Some(v) = state.get(MODEL_KEY).await? else {
        return Ok(None);
    };
    let rec: ModelRecord = serde_json::from_slice(&v.value).map_err(|e| {
        StateError::Unavailable(format!("the model record {MODEL_KEY} does not decode: {e}"))
    })?;
    Ok(Some((rec, v.revision)))
}

/// Applies `change` to the record by compare-and-set, re-reading after a conflict.
/// `change` answers the record to write, or an error that stops the update. At most a
/// few rounds (the record changes rarely).
async fn update(
    state: &dyn StateStore,
    mut change: impl FnMut(Option<&ModelRecord>) -> Result<ModelRecord, RecordError>,
) -> Result<(ModelRecord, u64), RecordError> {
    for _ in 0..8 {
        let current = read(state).await?;
        let mut next = change(current.as_ref().map(|(r, _)| r))?;
        next.format = MODEL_RECORD_FORMAT;
        next.written_ms = now_ms();
        let bytes = serde_json::to_vec(&next)
            .map_err(|e| RecordError::Refused(format!("model record: {e}")))?;
        match state
            .compare_and_set(MODEL_KEY, bytes, current.as_ref().map(|(_, r)| *r))
            .await
        {
            Ok(rev) => return Ok((next, rev)),
            Err(StateError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(RecordError::Store(StateError::Unavailable(
        "the model record kept changing".into(),
    )))
}

/// Claims the record for the leader `me` of `epoch` (a no-op when it already carries
/// them). Refused when a higher epoch claimed it.
pub async fn claim(
    state: &dyn StateStore,
    me: &str,
    epoch: u64,
) -> Result<ModelRecord, RecordError> {
    update(state, |cur| {
        let mut next = cur.cloned().unwrap_or_default();
        if next.epoch > epoch {
            return Err(RecordError::Fenced {
                leader: next.leader,
                epoch: next.epoch,
            });
        }
        next.epoch = epoch;
        next.leader = me.to_string();
        Ok(next)
    })
    .await
    .map(|(r, _)| r)
}

/// Publishes `meta` (its blob already written) as the newest version and the one to
/// serve, keeping the newest `keep` versions (and the one served). Returns the record
/// written and the blobs it no longer names (for the caller to delete).
pub async fn publish(
    state: &dyn StateStore,
    me: &str,
    epoch: u64,
    meta: SnapshotMeta,
    keep: usize,
) -> Result<(ModelRecord, Vec<String>), RecordError> {
    let mut dropped = Vec::new();
    let written = update(state, |cur| {
        let mut next = cur.cloned().unwrap_or_default();
        if next.epoch != epoch || next.leader != me {
            return Err(RecordError::Fenced {
                leader: next.leader,
                epoch: next.epoch,
            });
        }
        if next.snapshots.iter().any(|s| s.blob == meta.blob) {
            // This leader's own write whose answer was lost: already published.
            return Err(RecordError::Published);
        }
        if meta.version != next.latest + 1 {
            return Err(RecordError::Refused(format!(
                "version {} is not the next one (the record's newest is {})",
                meta.version, next.latest
            )));
        }
        next.latest = meta.version;
        next.serve = meta.version;
        next.snapshots.push(meta.clone());
        dropped.clear();
        let keep = keep.max(1);
        while next.snapshots.len() > keep {
            let old = next.snapshots.remove(0);
            dropped.push(old.blob);
        }
        Ok(next)
    })
    .await;
    match written {
        Ok((rec, _)) => Ok((rec, dropped)),
        // Committed by the write whose answer was lost: the record as it is now (what
        // that write dropped is left to the next publish's pruning).
        Err(RecordError::Published) => match read(state).await? {
            Some((rec, _)) => Ok((rec, Vec::new())),
            None => Err(RecordError::Refused("the model record vanished".into())),
        },
        Err(e) => Err(e),
    }
}

/// Rolls the cluster back one version: `serve` becomes the newest kept version older
/// than the one served now. Any node may write it.
pub async fn rollback(state: &dyn StateStore, by: &str) -> Result<ModelRecord, RecordError> {
    update(state, |cur| {
        let cur = cur.ok_or_else(|| RecordError::Refused("no model is published".into()))?;
        if cur.serve == 0 {
            return Err(RecordError::Refused("no model is being served".into()));
        }
        let prev = cur
            .snapshots
            .iter()
            .filter(|s| s.version < cur.serve)
            .map(|s| s.version)
            .max()
            .ok_or_else(|| RecordError::Refused("no older model version is kept".into()))?;
        let mut next = cur.clone();
        next.rolled_back = Some((cur.serve, prev, by.to_string()));
        next.serve = prev;
        Ok(next)
    })
    .await
    .map(|(r, _)| r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::embedded::EmbeddedState;

    fn meta(version: u64, epoch: u64) -> SnapshotMeta {
        SnapshotMeta {
            version,
            blob: blob_name(version, epoch),
            epoch,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn versions_are_issued_once_and_a_deposed_leader_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = crate::store::Store::open(&dir.path().join("s.redb")).unwrap();
        let state = EmbeddedState::new(store);
        let s: &dyn StateStore = &state;
        claim(s, "a", 1).await.unwrap();
        let (r, dropped) = publish(s, "a", 1, meta(1, 1), 2).await.unwrap();
        assert_eq!((r.latest, r.serve, dropped.len()), (1, 1, 0));
        // b takes over with epoch 2: a's next publish is refused.
        claim(s, "b", 2).await.unwrap();
        let refused = publish(s, "a", 1, meta(2, 1), 2).await;
        assert!(
            matches!(refused, Err(RecordError::Fenced { epoch: 2, .. })),
            "{refused:?}"
        );
        assert!(matches!(
            claim(s, "a", 1).await,
            Err(RecordError::Fenced { .. })
        ));
        let (r, _) = publish(s, "b", 2, meta(2, 2), 2).await.unwrap();
        assert_eq!((r.latest, r.serve), (2, 2));
        // The same snapshot again (a retry after a lost answer) changes nothing; another
        // blob under the same version is not the next one.
        let (again, _) = publish(s, "b", 2, meta(2, 2), 2).await.unwrap();
        assert_eq!((again.latest, again.snapshots.len()), (2, 2));
        let other = SnapshotMeta {
            blob: "models/als/other".into(),
            ..meta(2, 2)
        };
        assert!(matches!(
            publish(s, "b", 2, other, 2).await,
            Err(RecordError::Refused(_))
        ));
        let (r, dropped) = publish(s, "b", 2, meta(3, 2), 2).await.unwrap();
        assert_eq!(dropped, vec![blob_name(1, 1)]);
        assert_eq!(
            r.snapshots.iter().map(|m| m.version).collect::<Vec<_>>(),
            vec![2, 3]
        );
        // Rollback by any node; the next publish serves the new version again.
        let r = rollback(s, "c").await.unwrap();
        assert_eq!((r.serve, r.latest), (2, 3));
        assert!(matches!(
            rollback(s, "c").await,
            Err(RecordError::Refused(_))
        ));
        let (r, _) = publish(s, "b", 2, meta(4, 2), 2).await.unwrap();
        assert_eq!((r.serve, r.latest), (4, 4));
    }

    #[test]
    fn blob_names_sort_by_version_and_name_the_epoch() {
        assert!(blob_name(9, 3) < blob_name(10, 1));
        assert!(blob_name(1, 2).ends_with("-e2"));
        assert_ne!(content_hash(b"a"), content_hash(b"b"));
    }
}
