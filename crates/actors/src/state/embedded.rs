//! The embedded state store: the primitives of [`StateStore`] over the node's redb file
//! (tables `state_records` and `state_blobs`, see `store.rs`). Every write is one redb
//! transaction (one fsync); a compare-and-set reads and writes in the same transaction,
//! and redb admits one writer at a time, so it is atomic.

use async_trait::async_trait;

use super::{StateError, StateStore, Versioned};
use crate::store::{Store, StoreError};

/// The state store of one node without a shared backend.
#[derive(Clone)]
pub struct EmbeddedState {
    store: Store,
}

impl EmbeddedState {
    pub fn new(store: Store) -> Self {
        EmbeddedState { store }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StateError> {
    crate::store::off_runtime(f)
        .await
        .map_err(StateError::Failed)
}

#[async_trait]
impl StateStore for EmbeddedState {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    /// A checkpoint of the store's own table (a build before the state store): the
    /// base under `name`, its deltas under `name/`.
    async fn legacy_checkpoint(
        &self,
        name: &str,
    ) -> Result<Option<(Vec<u8>, Vec<Vec<u8>>)>, StateError> {
        let (s, old) = (self.store.clone(), name.to_string());
        blocking(move || {
            let Some(base) = s.get_checkpoint(&old)? else {
                return Ok(None);
            };
            let mut deltas = Vec::new();
            for n in s.checkpoints_under(&format!("{old}/"))? {
                deltas.extend(s.get_checkpoint(&n)?);
            }
            Ok(Some((base, deltas)))
        })
        .await
    }

    async fn legacy_dead_letters(&self) -> Result<Vec<Vec<u8>>, StateError> {
        let s = self.store.clone();
        blocking(move || s.dead_letters()).await
    }

    async fn legacy_model_versions(&self) -> Result<Vec<u64>, StateError> {
        let s = self.store.clone();
        blocking(move || s.model_versions()).await
    }

    async fn legacy_model(&self, version: u64) -> Result<Option<Vec<u8>>, StateError> {
        let s = self.store.clone();
        blocking(move || s.get_model(version)).await
    }

    /// The node's own cache table, read in one transaction.
    async fn cache_get(&self, ns: &str, keys: &[u128]) -> Result<Vec<Option<Vec<u8>>>, StateError> {
        let (s, n, k) = (self.store.clone(), ns.to_string(), keys.to_vec());
        blocking(move || s.cache_get(&n, &k)).await
    }

    /// One transaction without an fsync (a lost entry is recomputed).
    async fn cache_put(&self, ns: &str, entries: Vec<(u128, Vec<u8>)>) -> Result<(), StateError> {
        let (s, n) = (self.store.clone(), ns.to_string());
        blocking(move || s.cache_put(&n, &entries)).await
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StateError> {
        let (s, k) = (self.store.clone(), key.to_string());
        let found = blocking(move || s.state_get(&k)).await?;
        Ok(found.map(|(value, revision)| Versioned { value, revision }))
    }

    async fn compare_and_set(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, StateError> {
        let (s, k) = (self.store.clone(), key.to_string());
        match blocking(move || s.state_write(&k, &value, Some(expected))).await? {
            Ok(rev) => Ok(rev),
            Err(found) => Err(StateError::Conflict {
                key: key.to_string(),
                found,
            }),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StateError> {
        let (s, k) = (self.store.clone(), key.to_string());
        match blocking(move || s.state_write(&k, &value, None)).await? {
            Ok(rev) => Ok(rev),
            Err(found) => Err(StateError::Conflict {
                key: key.to_string(),
                found,
            }),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        let (s, k) = (self.store.clone(), key.to_string());
        blocking(move || s.state_delete(&k)).await
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let (s, p) = (self.store.clone(), prefix.to_string());
        blocking(move || s.state_keys(&p)).await
    }

    async fn put_blob(&self, name: &str, bytes: Vec<u8>) -> Result<(), StateError> {
        let (s, n) = (self.store.clone(), name.to_string());
        blocking(move || s.blob_put(&n, &bytes)).await
    }

    async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let (s, n) = (self.store.clone(), name.to_string());
        blocking(move || s.blob_get(&n)).await
    }

    async fn delete_blob(&self, name: &str) -> Result<(), StateError> {
        let (s, n) = (self.store.clone(), name.to_string());
        blocking(move || s.blob_delete(&n)).await
    }

    async fn blob_names(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let (s, p) = (self.store.clone(), prefix.to_string());
        blocking(move || s.blob_names(&p)).await
    }
}
