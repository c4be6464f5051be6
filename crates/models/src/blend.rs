//! Blending per-branch candidate lists into one ranked list.
//!
//! Each branch (ALS, content, popularity, ...) proposes its own top-N. Scores are put on a
//! common scale by a [`Normalization`], multiplied by the branch weight and summed. Every
//! returned item carries each branch's contribution, so the caller can show how much of
//! the item's score came from which model. Filters run before ranking, so a filtered item
//! never takes a slot.

use rustc_hash::FxHashMap;

use crate::topk::Scored;

/// How raw branch scores become comparable.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Normalization {
    /// Reciprocal-rank fusion: a candidate at 1-based rank `r` gets `1 / (k0 + r)`.
    Rrf { k0: f32 },
    /// z-score within the branch's list, shifted so its lowest candidate gets 0 (the value
    /// of an item the branch did not propose).
    ZScore,
}

impl Default for Normalization {
    fn default() -> Self {
        Normalization::Rrf { k0: 60.0 }
    }
}

/// One branch's candidates, best first, with its blend weight.
#[derive(Debug, Clone)]
pub struct BranchList<'a> {
    pub weight: f32,
    pub items: &'a [Scored],
}

/// A blended result.
#[derive(Debug, Clone, PartialEq)]
pub struct Blended {
    pub item: u32,
    pub score: f32,
    /// Weighted, normalised contribution of each branch (same order as the input lists).
    pub contributions: Vec<f32>,
}

impl Blended {
    /// Each branch's share of this item's score (sums to 1 when the score is positive).
    pub fn shares(&self) -> Vec<f32> {
        let total: f32 = self.contributions.iter().sum();
        self.contributions
            .iter()
            .map(|c| if total > 0.0 { c / total } else { 0.0 })
            .collect()
    }
}

/// Normalised values for one list (same order as `items`).
pub fn normalise(items: &[Scored], norm: Normalization) -> Vec<f32> {
    match norm {
        Normalization::Rrf { k0 } => (0..items.len())
            .map(|r| 1.0 / (k0 + r as f32 + 1.0))
            .collect(),
        Normalization::ZScore => {
            let n = items.len() as f64;
            if n == 0.0 {
                return Vec::new();
            }
            let mean = items.iter().map(|s| s.score as f64).sum::<f64>() / n;
            let var = items
                .iter()
                .map(|s| (s.score as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            let sd = if var > 0.0 { var.sqrt() } else { 1.0 };
            let z: Vec<f64> = items.iter().map(|s| (s.score as f64 - mean) / sd).collect();
            let min = z.iter().copied().fold(f64::INFINITY, f64::min);
            z.iter().map(|v| (v - min) as f32).collect()
        }
    }
}

/// Blends `lists` into the best `k`, skipping items for which `allowed` is false.
/// Weights must be >= 0; a branch with weight 0 contributes nothing.
pub fn blend(
    lists: &[BranchList<'_>],
    norm: Normalization,
    k: usize,
    allowed: impl Fn(u32) -> bool,
) -> Vec<Blended> {
    let nb = lists.len();
    let total: usize = lists.iter().map(|l| l.items.len()).sum();
    // Item -> slot; contributions in one flat buffer (`nb` per slot).
    let mut slot: FxHashMap<u32, usize> =
        FxHashMap::with_capacity_and_hasher(total, Default::default());
    let mut items: Vec<u32> = Vec::with_capacity(total);
    let mut contrib: Vec<f32> = Vec::with_capacity(total * nb);
    for (b, list) in lists.iter().enumerate() {
        let w = if list.weight.is_finite() {
            list.weight.max(0.0)
        } else {
            0.0
        };
        for (s, v) in list.items.iter().zip(normalise(list.items, norm)) {
            if !allowed(s.item) {
                continue;
            }
            let j = *slot.entry(s.item).or_insert_with(|| {
                items.push(s.item);
                contrib.resize(contrib.len() + nb, 0.0);
                items.len() - 1
            });
            let c = &mut contrib[j * nb + b];
            *c = c.max(w * v);
        }
    }
    let row = |j: usize| &contrib[j * nb..(j + 1) * nb];
    let mut order: Vec<(f32, u32, usize)> = (0..items.len())
        .map(|j| (row(j).iter().sum(), items[j], j))
        .collect();
    let better =
        |a: &(f32, u32, usize), b: &(f32, u32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if order.len() > k {
        order.select_nth_unstable_by(k, better);
        order.truncate(k);
    }
    order.sort_by(better);
    order
        .into_iter()
        .map(|(score, item, j)| Blended {
            item,
            score,
            contributions: row(j).to_vec(),
        })
        .collect()
}

/// What a request may filter out. Every test is a closure so callers can back it with
/// whatever structure they keep (sets, bitmaps, catalogue flags).
pub struct Filters<'a> {
    /// Items the user has already seen (per the configured kinds).
    pub seen: &'a dyn Fn(u32) -> bool,
    /// Hidden or deleted catalogue items.
    pub hidden: &'a dyn Fn(u32) -> bool,
    /// When set, only items of the requested category pass.
    pub in_category: Option<&'a dyn Fn(u32) -> bool>,
    /// The request's explicit exclude list.
    pub exclude: &'a [u32],
}

impl Filters<'_> {
    /// True when `item` may be shown.
    pub fn allows(&self, item: u32) -> bool {
        !(self.seen)(item)
            && !(self.hidden)(item)
            && self.in_category.is_none_or(|f| f(item))
            && !self.exclude.contains(&item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(v: &[(u32, f32)]) -> Vec<Scored> {
        v.iter()
            .map(|&(item, score)| Scored { item, score })
            .collect()
    }

    #[test]
    fn rrf_and_shares() {
        let a = list(&[(1, 9.0), (2, 5.0)]);
        let b = list(&[(2, 0.3), (3, 0.2)]);
        let r = blend(
            &[
                BranchList {
                    weight: 1.0,
                    items: &a,
                },
                BranchList {
                    weight: 1.0,
                    items: &b,
                },
            ],
            Normalization::Rrf { k0: 0.0 },
            10,
            |_| true,
        );
        // item 2: 1/2 + 1/1 = 1.5; item 1: 1; item 3: 0.5
        assert_eq!(r.iter().map(|x| x.item).collect::<Vec<_>>(), vec![2, 1, 3]);
        assert!((r[0].score - 1.5).abs() < 1e-6);
        let sh = r[0].shares();
        assert!((sh[0] - 1.0 / 3.0).abs() < 1e-6 && (sh[1] - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn filters_compose() {
        let seen = |i: u32| i == 1;
        let hidden = |i: u32| i == 2;
        let cat = |i: u32| i < 10;
        let f = Filters {
            seen: &seen,
            hidden: &hidden,
            in_category: Some(&cat),
            exclude: &[3],
        };
        let ok: Vec<u32> = (0..12).filter(|&i| f.allows(i)).collect();
        assert_eq!(ok, vec![0, 4, 5, 6, 7, 8, 9]);
    }

    fn arb_list() -> impl Strategy<Value = Vec<Scored>> {
        prop::collection::btree_map(0u32..40, -5.0f32..5.0, 0..20).prop_map(|m| {
            let mut v: Vec<Scored> = m
                .into_iter()
                .map(|(item, score)| Scored { item, score })
                .collect();
            v.sort_by(|a, b| b.score.total_cmp(&a.score));
            v
        })
    }

    fn arb_norm() -> impl Strategy<Value = Normalization> {
        prop_oneof![
            Just(Normalization::ZScore),
            (0.0f32..100.0).prop_map(|k0| Normalization::Rrf { k0 })
        ]
    }

    proptest! {
        #[test]
        fn blend_invariants(a in arb_list(), b in arb_list(), c in arb_list(),
                            w in prop::array::uniform3(0.0f32..3.0), k in 0usize..30,
                            norm in arb_norm(), banned in 0u32..40) {
            let lists = [BranchList { weight: w[0], items: &a }, BranchList { weight: w[1], items: &b }, BranchList { weight: w[2], items: &c }];
            let r = blend(&lists, norm, k, |i| i != banned);
            prop_assert!(r.len() <= k);
            let mut seen = std::collections::HashSet::new();
            for x in &r {
                prop_assert!(x.item != banned);
                prop_assert!(seen.insert(x.item));
                let sum: f32 = x.contributions.iter().sum();
                prop_assert!((sum - x.score).abs() <= 1e-4 * (1.0 + x.score.abs()));
                for (bi, cval) in x.contributions.iter().enumerate() {
                    prop_assert!(*cval >= 0.0);
                    // A branch that did not propose the item, or has weight 0, contributes 0.
                    if w[bi] == 0.0 || !lists[bi].items.iter().any(|s| s.item == x.item) {
                        prop_assert_eq!(*cval, 0.0);
                    }
                }
            }
            for p in r.windows(2) {
                prop_assert!(p[0].score >= p[1].score);
            }
            // Scaling every weight by the same positive factor keeps the ranking.
            let scaled = [BranchList { weight: w[0] * 2.5, items: &a }, BranchList { weight: w[1] * 2.5, items: &b }, BranchList { weight: w[2] * 2.5, items: &c }];
            let r2 = blend(&scaled, norm, k, |i| i != banned);
            let s1: Vec<f32> = r.iter().map(|x| x.score * 2.5).collect();
            let s2: Vec<f32> = r2.iter().map(|x| x.score).collect();
            prop_assert_eq!(s1.len(), s2.len());
            for (x, y) in s1.iter().zip(&s2) {
                prop_assert!((x - y).abs() <= 1e-3 * (1.0 + y.abs()));
            }
        }

        #[test]
        fn single_branch_keeps_its_order(a in arb_list(), norm in arb_norm()) {
            let r = blend(&[BranchList { weight: 1.0, items: &a }], norm, a.len(), |_| true);
            // Same items; ranking follows the branch (ties in normalised value may reorder).
            let vals = normalise(&a, norm);
            for x in &r {
                let pos = a.iter().position(|s| s.item == x.item).unwrap();
                prop_assert!((vals[pos] - x.score).abs() < 1e-5);
            }
            prop_assert_eq!(r.len(), a.len());
        }
    }
}
