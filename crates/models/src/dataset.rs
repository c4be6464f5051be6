//! Interned interaction data: string ids mapped to dense `u32` indices, event kinds,
//! per-kind confidence weights, and per-user train/test splits.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::data::{Event, ItemRecord};
use crate::error::{ModelError, Result};

/// Maps external string ids to dense indices, in first-seen order.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct IdMap {
    index: FxHashMap<String, u32>,
    names: Vec<String>,
}

impl IdMap {
    /// Index of `id`, inserting it if new.
    pub fn intern(&mut self, id: &str) -> u32 {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let i = self.names.len() as u32;
        self.index.insert(id.to_string(), i);
        self.names.push(id.to_string());
        i
    }

    /// The map whose index `i` names `names[i]` (the first of repeated names keeps its
    /// index; a repeat is an error, since indices must stay dense and distinct).
    pub fn from_names(names: Vec<String>) -> std::result::Result<Self, String> {
        let mut index = FxHashMap::with_capacity_and_hasher(names.len(), Default::default());
        for (i, n) in names.iter().enumerate() {
            if index.insert(n.clone(), i as u32).is_some() {
                return Err(format!("id {n:?} is listed twice"));
            }
        }
        Ok(IdMap { index, names })
    }

    /// Every id, by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn get(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    pub fn name(&self, i: u32) -> Option<&str> {
        self.names.get(i as usize).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// [`crate::als::row_key`] of every id, by index: what [`crate::als::fit_keyed`] takes.
    pub fn row_keys(&self) -> Vec<u64> {
        self.names.iter().map(|n| crate::als::row_key(n)).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Kind index meaning "the file had no kind column".
pub const NO_KIND: u16 = u16::MAX;

/// One interned interaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    pub user: u32,
    pub item: u32,
    pub kind: u16,
    /// NaN when the file had no value column.
    pub value: f32,
    pub ts: i64,
}

/// How a raw value (rating, quantity) becomes part of the confidence weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueTransform {
    /// Every positive counts 1, whatever its value.
    Binary,
    /// The value itself (clamped at 0).
    Raw,
    /// `ln(1 + value)`: tames quantities of 1 vs 500.
    Log1p,
}

impl std::str::FromStr for ValueTransform {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "binary" => Ok(ValueTransform::Binary),
            "raw" => Ok(ValueTransform::Raw),
            "log1p" => Ok(ValueTransform::Log1p),
            _ => Err(format!(
                "unknown value transform `{s}` (binary, raw, log1p)"
            )),
        }
    }
}

/// Confidence weights: `w = kind_weight(kind) * transform(value)`; kinds listed as
/// negative (e.g. `dislike`) carry no confidence and only filter the item for the user.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WeightConfig {
    pub kind_weights: FxHashMap<String, f32>,
    pub default_weight: f32,
    pub transform: ValueTransform,
    pub negative_kinds: FxHashSet<String>,
}

impl Default for WeightConfig {
    fn default() -> Self {
        WeightConfig {
            kind_weights: [
                ("view", 1.0),
                ("click", 2.0),
                ("add_to_cart", 4.0),
                ("purchase", 8.0),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            default_weight: 1.0,
            transform: ValueTransform::Binary,
            negative_kinds: ["dislike".to_string()].into_iter().collect(),
        }
    }
}

impl WeightConfig {
    /// Parses `view=1,purchase=8` into kind weights.
    pub fn parse_kind_weights(s: &str) -> std::result::Result<FxHashMap<String, f32>, String> {
        let mut out = FxHashMap::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not kind=weight"))?;
            let w: f32 = v
                .trim()
                .parse()
                .map_err(|_| format!("weight `{v}` of kind `{k}` is not a number"))?;
            if !(w.is_finite() && w >= 0.0) {
                return Err(format!("weight of kind `{k}` must be >= 0"));
            }
            out.insert(k.trim().to_ascii_lowercase(), w);
        }
        Ok(out)
    }

    /// Confidence weight of an event; `None` for negative kinds.
    pub fn weight(&self, kind: Option<&str>, value: f32) -> Option<f32> {
        if let Some(k) = kind {
            if self.negative_kinds.contains(k) {
                return None;
            }
        }
        let base = kind
            .and_then(|k| self.kind_weights.get(k).copied())
            .unwrap_or(self.default_weight);
        let v = if value.is_nan() { 1.0 } else { value.max(0.0) };
        let t = match self.transform {
            ValueTransform::Binary => 1.0,
            ValueTransform::Raw => v,
            ValueTransform::Log1p => v.ln_1p(),
        };
        Some(base * t)
    }
}

/// Interned data: id maps, the catalogue by item index, and tags.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub users: IdMap,
    pub items: IdMap,
    pub kinds: IdMap,
    /// Catalogue entry per item index; items seen only in events get an empty record.
    pub catalog: Vec<ItemRecord>,
    pub tags: FxHashMap<u32, Vec<String>>,
}

impl Dataset {
    /// Adds catalogue records (a later record for the same id replaces the earlier one).
    pub fn add_items(&mut self, records: Vec<ItemRecord>) {
        for r in records {
            let i = self.items.intern(&r.id) as usize;
            if self.catalog.len() <= i {
                self.catalog.resize(i + 1, ItemRecord::default());
            }
            self.catalog[i] = r;
        }
    }

    /// Attaches tags keyed by external item id (unknown items are ignored).
    pub fn add_tags(&mut self, tags: FxHashMap<String, Vec<String>>) {
        for (id, t) in tags {
            if let Some(i) = self.items.get(&id) {
                self.tags.entry(i).or_default().extend(t);
            }
        }
    }

    /// Interns one event.
    pub fn intern(&mut self, ev: &Event) -> Interaction {
        let user = self.users.intern(&ev.user);
        let item = self.items.intern(&ev.item);
        if self.catalog.len() <= item as usize {
            self.catalog
                .resize(item as usize + 1, ItemRecord::default());
            self.catalog[item as usize].id = ev.item.clone();
        }
        let kind = match &ev.kind {
            Some(k) => self.kinds.intern(k).min(NO_KIND as u32 - 1) as u16,
            None => NO_KIND,
        };
        Interaction {
            user,
            item,
            kind,
            value: ev.value.unwrap_or(f32::NAN),
            ts: ev.ts,
        }
    }

    /// Name of a kind index.
    pub fn kind_name(&self, kind: u16) -> Option<&str> {
        if kind == NO_KIND {
            None
        } else {
            self.kinds.name(kind as u32)
        }
    }

    /// Content text of every item (empty for items without text).
    pub fn item_texts(&self) -> Vec<String> {
        (0..self.items.len())
            .map(|i| match self.catalog.get(i) {
                Some(r) if !r.text.is_empty() || !r.categories.is_empty() => {
                    let tags = self.tags.get(&(i as u32)).map(Vec::as_slice).unwrap_or(&[]);
                    r.content_text(tags)
                }
                _ => String::new(),
            })
            .collect()
    }
}

/// How to carve a per-user holdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitKind {
    /// A random `fraction` of each user's rows (seeded).
    Random,
    /// The latest `fraction` of each user's rows by time.
    Time,
}

/// Splits rows per user: each user with `n` rows gives `floor(fraction * n + 0.5)` to the
/// holdout. Deterministic for a seed. Returns `(train, holdout)`.
pub fn split_per_user(
    rows: &[Interaction],
    fraction: f64,
    kind: SplitKind,
    seed: u64,
) -> Result<(Vec<Interaction>, Vec<Interaction>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(ModelError::param("holdout", "must be in [0, 1)"));
    }
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| (rows[i].user, i));
    let mut train = Vec::with_capacity(rows.len());
    let mut test = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let user = rows[order[start]].user;
        let mut end = start;
        while end < order.len() && rows[order[end]].user == user {
            end += 1;
        }
        let group = &mut order[start..end];
        let n_test = (fraction * group.len() as f64 + 0.5).floor() as usize;
        match kind {
            SplitKind::Random => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(
                    seed ^ (user as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                group.shuffle(&mut rng);
                // Holdout is the first n_test of the shuffle; keep file order inside each part.
                let (h, t) = group.split_at_mut(n_test);
                h.sort_unstable();
                t.sort_unstable();
                test.extend(h.iter().map(|&i| rows[i]));
                train.extend(t.iter().map(|&i| rows[i]));
            }
            SplitKind::Time => {
                group.sort_by_key(|&i| (rows[i].ts, i));
                let cut = group.len() - n_test;
                train.extend(group[..cut].iter().map(|&i| rows[i]));
                test.extend(group[cut..].iter().map(|&i| rows[i]));
            }
        }
        start = end;
    }
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n_users: u32, per_user: u32) -> Vec<Interaction> {
        let mut v = Vec::new();
        for u in 0..n_users {
            for j in 0..per_user {
                v.push(Interaction {
                    user: u,
                    item: j,
                    kind: NO_KIND,
                    value: f32::NAN,
                    ts: (per_user - j) as i64,
                });
            }
        }
        v
    }

    #[test]
    fn holdout_sizes_follow_the_protocol() {
        let r = rows(3, 7);
        let (train, test) = split_per_user(&r, 0.2, SplitKind::Random, 42).unwrap();
        // floor(0.2 * 7 + 0.5) = 1 per user
        assert_eq!(test.len(), 3);
        assert_eq!(train.len() + test.len(), r.len());
        let again = split_per_user(&r, 0.2, SplitKind::Random, 42).unwrap();
        let key = |v: &[Interaction]| v.iter().map(|x| (x.user, x.item)).collect::<Vec<_>>();
        assert_eq!(key(&again.1), key(&test));
        let other = split_per_user(&r, 0.2, SplitKind::Random, 7).unwrap();
        assert_eq!(other.0.len(), train.len());
    }

    #[test]
    fn time_split_takes_latest_rows() {
        let r = rows(2, 10);
        let (train, test) = split_per_user(&r, 0.3, SplitKind::Time, 0).unwrap();
        assert_eq!(test.len(), 6);
        for u in 0..2 {
            let max_train = train
                .iter()
                .filter(|x| x.user == u)
                .map(|x| x.ts)
                .max()
                .unwrap();
            let min_test = test
                .iter()
                .filter(|x| x.user == u)
                .map(|x| x.ts)
                .min()
                .unwrap();
            assert!(min_test >= max_train);
        }
        assert!(split_per_user(&r, 1.5, SplitKind::Time, 0).is_err());
    }

    #[test]
    fn weights_by_kind_value_and_negative_kinds() {
        let mut w = WeightConfig::default();
        assert_eq!(w.weight(Some("purchase"), f32::NAN), Some(8.0));
        assert_eq!(w.weight(Some("dislike"), 1.0), None);
        assert_eq!(w.weight(None, 5.0), Some(1.0));
        w.transform = ValueTransform::Log1p;
        assert!((w.weight(None, 9.0).unwrap() - 10f32.ln()).abs() < 1e-6);
        let kw = WeightConfig::parse_kind_weights("view=1, Buy=3").unwrap();
        assert_eq!(kw["buy"], 3.0);
        assert!(WeightConfig::parse_kind_weights("view").is_err());
        assert!(WeightConfig::parse_kind_weights("view=-1").is_err());
    }

    #[test]
    fn interning_is_dense_and_stable() {
        let mut d = Dataset::default();
        d.add_items(vec![ItemRecord {
            id: "b".into(),
            text: "B".into(),
            categories: vec![],
        }]);
        let ev = Event {
            user: "u".into(),
            item: "a".into(),
            kind: Some("view".into()),
            value: None,
            ts: 3,
        };
        let x = d.intern(&ev);
        assert_eq!((x.user, x.item), (0, 1));
        assert_eq!(d.kind_name(x.kind), Some("view"));
        assert_eq!(d.item_texts(), vec!["B".to_string(), String::new()]);
    }
}
