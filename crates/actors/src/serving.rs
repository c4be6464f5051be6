//! Read-mostly serving views published by actors: the catalogue and the ALS model.

use std::collections::BTreeMap;

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use ndarray::Array2;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use troupe_models::als::{AlsParams, FoldIn};
use troupe_models::ann::{AnnParams, MipsIndex};
use troupe_models::dataset::IdMap;
use troupe_models::ease::EaseModel;

use crate::record::Item;

/// The catalogue as the ranker sees it.
#[derive(Debug, Default)]
pub struct CatalogView {
    pub items: FxHashMap<String, Item>,
    /// Items known only from events (no catalogue entry yet).
    pub placeholders: FxHashSet<String>,
    /// Deleted items (filtered everywhere until upserted again).
    pub deleted: FxHashSet<String>,
    /// Catalogue stream offset applied.
    pub applied: u64,
    /// Ids of items with the hidden flag (kept by `upsert`/`delete`/`set_items`, so the
    /// per-candidate check is a lookup in a usually empty set).
    hidden_ids: FxHashSet<String>,
}

impl CatalogView {
    /// Hidden or deleted items never show.
    pub fn hidden(&self, id: &str) -> bool {
        (!self.deleted.is_empty() && self.deleted.contains(id))
            || (!self.hidden_ids.is_empty() && self.hidden_ids.contains(id))
    }

    pub fn upsert(&mut self, item: Item) {
        self.deleted.remove(&item.id);
        self.placeholders.remove(&item.id);
        if item.hidden {
            self.hidden_ids.insert(item.id.clone());
        } else {
            self.hidden_ids.remove(&item.id);
        }
        self.items.insert(item.id.clone(), item);
    }

    pub fn delete(&mut self, id: &str) {
        self.items.remove(id);
        self.hidden_ids.remove(id);
        self.deleted.insert(id.to_string());
    }

    /// Replaces every item (loading a checkpoint).
    pub fn set_items(&mut self, items: FxHashMap<String, Item>) {
        self.hidden_ids = items
            .values()
            .filter(|i| i.hidden)
            .map(|i| i.id.clone())
            .collect();
        self.items = items;
    }

    pub fn in_category(&self, id: &str, category: &str) -> bool {
        self.items
            .get(id)
            .is_some_and(|i| i.categories.iter().any(|c| c == category))
    }
}

/// A trained ALS model as served: item factors with their ids and the fold-in state.
pub struct AlsServing {
    pub version: u64,
    pub items: IdMap,
    pub item_factors: Array2<f32>,
    pub fold_in: FoldIn,
    pub params: AlsParams,
    pub validation_ndcg: f64,
    pub trained_at_ms: i64,
    pub interactions: u64,
    /// The latest event time (ms) among the interactions it was trained on: a held-out
    /// interaction later than this is one the model has not seen.
    pub max_event_ts: i64,
    /// HNSW index over `item_factors`, built off the request path after the model is
    /// served (see [`AlsServing::build_index`]); exact scans answer until it is there.
    pub ann: ArcSwapOption<MipsIndex>,
    /// The item-item branch (EASE) trained on the same interactions, over the same item
    /// indices; `None` in snapshots written before it existed.
    pub item_item: Option<EaseModel>,
}

/// Key of [`AlsServing::max_event_ts`] in a snapshot's `extra`.
const MAX_EVENT_TS: &str = "max_event_ts";

/// On-disk form of a model version (format 2: with the item-item branch).
#[derive(Serialize, Deserialize)]
pub struct AlsSnapshot {
    pub format: u16,
    pub version: u64,
    pub items: Vec<String>,
    pub factors: usize,
    pub data: Vec<f32>,
    pub params: AlsParams,
    pub validation_ndcg: f64,
    pub trained_at_ms: i64,
    pub interactions: u64,
    pub extra: BTreeMap<String, String>,
    pub item_item: Option<EaseModel>,
}

/// Format 1 of [`AlsSnapshot`]: the same fields but the item-item branch (read only).
#[derive(Serialize, Deserialize)]
struct AlsSnapshotV1 {
    format: u16,
    version: u64,
    items: Vec<String>,
    factors: usize,
    data: Vec<f32>,
    params: AlsParams,
    validation_ndcg: f64,
    trained_at_ms: i64,
    interactions: u64,
    extra: BTreeMap<String, String>,
}

/// Version of [`AlsSnapshot`] written by this build.
pub const ALS_SNAPSHOT_FORMAT: u16 = 2;

impl AlsSnapshot {
    /// Decodes a snapshot of format 2, or of format 1 (no item-item branch).
    pub fn decode(bytes: &[u8]) -> Result<AlsSnapshot, String> {
        match crate::codec::decode::<AlsSnapshot>(bytes) {
            Ok(s) if s.format == ALS_SNAPSHOT_FORMAT => Ok(s),
            first => {
                let v1: AlsSnapshotV1 = crate::codec::decode(bytes).map_err(|e| match &first {
                    Err(f) => f.clone(),
                    Ok(_) => e,
                })?;
                if v1.format != 1 {
                    return Err(format!(
                        "unknown ALS snapshot format {} (this build reads 1 and {ALS_SNAPSHOT_FORMAT})",
                        v1.format
                    ));
                }
                Ok(AlsSnapshot {
                    format: 1,
                    version: v1.version,
                    items: v1.items,
                    factors: v1.factors,
                    data: v1.data,
                    params: v1.params,
                    validation_ndcg: v1.validation_ndcg,
                    trained_at_ms: v1.trained_at_ms,
                    interactions: v1.interactions,
                    extra: v1.extra,
                    item_item: None,
                })
            }
        }
    }
}

impl AlsServing {
    pub fn to_snapshot(&self) -> AlsSnapshot {
        AlsSnapshot {
            format: ALS_SNAPSHOT_FORMAT,
            version: self.version,
            items: (0..self.items.len() as u32)
                .filter_map(|i| self.items.name(i).map(str::to_string))
                .collect(),
            factors: self.item_factors.ncols(),
            data: self.item_factors.iter().copied().collect(),
            params: self.params.clone(),
            validation_ndcg: self.validation_ndcg,
            trained_at_ms: self.trained_at_ms,
            interactions: self.interactions,
            extra: BTreeMap::from([(MAX_EVENT_TS.to_string(), self.max_event_ts.to_string())]),
            item_item: self.item_item.clone(),
        }
    }

    pub fn from_snapshot(s: AlsSnapshot) -> Result<AlsServing, String> {
        if s.format != ALS_SNAPSHOT_FORMAT && s.format != 1 {
            return Err(format!(
                "unknown ALS snapshot format {} (this build reads 1 and {ALS_SNAPSHOT_FORMAT})",
                s.format
            ));
        }
        if s.factors == 0 || s.factors != s.params.factors || s.factors > 4096 {
            return Err(format!(
                "ALS snapshot with {} factors, its parameters say {}",
                s.factors, s.params.factors
            ));
        }
        if !s.data.iter().all(|x| x.is_finite()) {
            return Err("ALS snapshot with non-finite factors".into());
        }
        let n = s.items.len();
        let factors = Array2::from_shape_vec((n, s.factors), s.data).map_err(|e| e.to_string())?;
        let mut items = IdMap::default();
        for i in &s.items {
            if items.get(i).is_some() {
                return Err(format!("ALS snapshot lists item `{i}` twice"));
            }
            items.intern(i);
        }
        if let Some(m) = &s.item_item {
            m.check(n)?;
        }
        let fold_in = FoldIn::new(factors.view(), &s.params);
        Ok(AlsServing {
            version: s.version,
            items,
            item_factors: factors,
            fold_in,
            params: s.params,
            validation_ndcg: s.validation_ndcg,
            trained_at_ms: s.trained_at_ms,
            max_event_ts: s
                .extra
                .get(MAX_EVENT_TS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(i64::MAX),
            interactions: s.interactions,
            ann: ArcSwapOption::empty(),
            item_item: s.item_item,
        })
    }

    /// Whether this model's catalogue is large enough for the HNSW index
    /// (`min_items` = 0: never).
    pub fn wants_index(&self, min_items: usize) -> bool {
        min_items > 0 && self.item_factors.nrows() >= min_items
    }

    /// Builds the HNSW index over the item factors (blocking, parallel on the rayon pool)
    /// and swaps it in; requests use it from their next search.
    pub fn build_index(&self, params: &AnnParams) -> Result<Arc<MipsIndex>, String> {
        let index = Arc::new(MipsIndex::build(self.item_factors.view(), params)?);
        self.ann.store(Some(index.clone()));
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn snapshot_round_trips_and_a_wrong_shape_is_refused() {
        let mut snap = AlsSnapshot {
            format: ALS_SNAPSHOT_FORMAT,
            version: 3,
            items: vec!["a".into(), "b".into()],
            factors: 2,
            data: vec![1.0, 0.0, 0.0, 1.0],
            params: AlsParams {
                factors: 2,
                ..AlsParams::default()
            },
            validation_ndcg: 0.5,
            trained_at_ms: 1,
            interactions: 2,
            extra: BTreeMap::new(),
            item_item: Some(EaseModel {
                rows: troupe_models::sparse::Csr::from_triples(2, 2, &[(0, 1, 0.5), (1, 0, 0.5)]),
                fitted_items: 2,
                ..Default::default()
            }),
        };
        let bytes = crate::codec::encode(&snap).unwrap();
        let back = AlsServing::from_snapshot(AlsSnapshot::decode(&bytes).unwrap()).unwrap();
        assert_eq!((back.version, back.items.get("b")), (3, Some(1)));
        assert_eq!(back.item_item.as_ref().map(|m| m.fitted_items), Some(2));
        // A format-1 snapshot (no item-item branch) still loads.
        let v1 = AlsSnapshotV1 {
            format: 1,
            version: 2,
            items: snap.items.clone(),
            factors: 2,
            data: snap.data.clone(),
            params: snap.params.clone(),
            validation_ndcg: 0.5,
            trained_at_ms: 1,
            interactions: 2,
            extra: BTreeMap::new(),
        };
        let old = AlsSnapshot::decode(&crate::codec::encode(&v1).unwrap()).unwrap();
        let old = AlsServing::from_snapshot(old).unwrap();
        assert_eq!((old.version, old.item_item.is_none()), (2, true));
        // Item-item rows that name an item the model does not have are refused.
        let mut bad = AlsSnapshot::decode(&bytes).unwrap();
        if let Some(m) = bad.item_item.as_mut() {
            m.rows.indices[0] = 7;
        }
        assert!(AlsServing::from_snapshot(bad).is_err());
        snap.data.pop();
        assert!(AlsServing::from_snapshot(snap).is_err());
    }

    proptest! {
        #[test]
        fn snapshot_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(s) = AlsSnapshot::decode(&bytes) {
                drop(AlsServing::from_snapshot(s));
            }
        }
    }
}
