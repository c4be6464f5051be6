//! Ranking metrics at K, exactly as the project's evaluation protocol defines them.
//!
//! Per user, on the top-K list (train items already removed): P@K = hits / K,
//! R@K = hits / |T|, MAP@K = sum over hit positions of precision at that position divided by
//! min(K, |T|), NDCG@K = binary DCG / ideal DCG over min(K, |T|) positions with a
//! log2(rank + 1) discount. Averages run over users with at least one test item.

use rustc_hash::FxHashSet;

/// Metrics of one user or an average.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RankMetrics {
    pub precision: f64,
    pub recall: f64,
    pub map: f64,
    pub ndcg: f64,
}

/// Metrics of one ranked list against a non-empty relevant set.
pub fn user_metrics(ranked: &[u32], relevant: &FxHashSet<u32>, k: usize) -> RankMetrics {
    if relevant.is_empty() || k == 0 {
        return RankMetrics::default();
    }
    let mut hits = 0usize;
    let mut ap = 0.0;
    let mut dcg = 0.0;
    for (pos, item) in ranked.iter().take(k).enumerate() {
        if relevant.contains(item) {
            hits += 1;
            ap += hits as f64 / (pos + 1) as f64;
            dcg += 1.0 / ((pos + 2) as f64).log2();
        }
    }
    let ideal_n = k.min(relevant.len());
    let idcg: f64 = (0..ideal_n).map(|p| 1.0 / ((p + 2) as f64).log2()).sum();
    RankMetrics {
        precision: hits as f64 / k as f64,
        recall: hits as f64 / relevant.len() as f64,
        map: ap / ideal_n as f64,
        ndcg: dcg / idcg,
    }
}

/// Mean NDCG@k over users for every k in 1..=`kmax` (index k-1), in one pass per list:
/// the same definition as [`user_metrics`] at each k.
pub fn ndcg_curve<'a, 'b>(
    lists: impl Iterator<Item = &'a [u32]>,
    relevant: impl Iterator<Item = &'b FxHashSet<u32>>,
    kmax: usize,
) -> Vec<f64> {
    let discount: Vec<f64> = (0..kmax).map(|p| 1.0 / ((p + 2) as f64).log2()).collect();
    let mut sum = vec![0.0; kmax];
    let mut users = 0usize;
    for (list, rel) in lists.zip(relevant) {
        if rel.is_empty() {
            continue;
        }
        users += 1;
        let (mut dcg, mut idcg) = (0.0, 0.0);
        for (k, s) in sum.iter_mut().enumerate() {
            if list.get(k).is_some_and(|i| rel.contains(i)) {
                dcg += discount[k];
            }
            if k < rel.len() {
                idcg += discount[k];
            }
            *s += dcg / idcg;
        }
    }
    sum.iter().map(|s| s / users.max(1) as f64).collect()
}

/// Running average of [`RankMetrics`] plus catalogue coverage.
#[derive(Debug, Clone)]
pub struct MetricsAccumulator {
    sum: RankMetrics,
    users: usize,
    recommended: Vec<bool>,
}

impl MetricsAccumulator {
    /// `universe` = number of items in the coverage denominator.
    pub fn new(universe: usize) -> Self {
        MetricsAccumulator {
            sum: RankMetrics::default(),
            users: 0,
            recommended: vec![false; universe],
        }
    }

    /// Adds one user's list.
    pub fn add(&mut self, ranked: &[u32], relevant: &FxHashSet<u32>, k: usize) {
        let m = user_metrics(ranked, relevant, k);
        self.sum.precision += m.precision;
        self.sum.recall += m.recall;
        self.sum.map += m.map;
        self.sum.ndcg += m.ndcg;
        self.users += 1;
        for &i in ranked.iter().take(k) {
            if let Some(r) = self.recommended.get_mut(i as usize) {
                *r = true;
            }
        }
    }

    pub fn users(&self) -> usize {
        self.users
    }

    /// Mean metrics over the users added.
    pub fn mean(&self) -> RankMetrics {
        let n = self.users.max(1) as f64;
        RankMetrics {
            precision: self.sum.precision / n,
            recall: self.sum.recall / n,
            map: self.sum.map / n,
            ndcg: self.sum.ndcg / n,
        }
    }

    /// Share of the universe recommended to at least one user.
    pub fn coverage(&self) -> f64 {
        if self.recommended.is_empty() {
            return 0.0;
        }
        self.recommended.iter().filter(|r| **r).count() as f64 / self.recommended.len() as f64
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_ndcg_curve_is_ndcg_at_every_k() {
        let lists: Vec<Vec<u32>> = vec![vec![3, 1, 7, 9, 2], vec![5, 6], vec![1, 2, 3]];
        let rel: Vec<FxHashSet<u32>> = vec![
            [1, 2, 4].into_iter().collect(),
            [6].into_iter().collect(),
            FxHashSet::default(),
        ];
        let curve = ndcg_curve(lists.iter().map(Vec::as_slice), rel.iter(), 6);
        for k in 1..=6 {
            // Users with a relevant set only, as the accumulator counts them.
            let want = (user_metrics(&lists[0], &rel[0], k).ndcg
                + user_metrics(&lists[1], &rel[1], k).ndcg)
                / 2.0;
            assert!(
                (curve[k - 1] - want).abs() < 1e-12,
                "k={k}: {} vs {want}",
                curve[k - 1]
            );
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn set(v: &[u32]) -> FxHashSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn hand_computed_cases() {
        // Hits at positions 1 and 3 of a top-3 list, 4 relevant items.
        let m = user_metrics(&[10, 20, 30], &set(&[10, 30, 40, 50]), 3);
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.recall - 0.5).abs() < 1e-12);
        // AP = (1/1 + 2/3) / min(3, 4) = 5/9
        assert!((m.map - 5.0 / 9.0).abs() < 1e-12);
        // DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3) + 1/2
        let idcg = 1.0 + 1.0 / 3f64.log2() + 0.5;
        assert!((m.ndcg - 1.5 / idcg).abs() < 1e-12);

        // One relevant item at rank 2 of 10.
        let m = user_metrics(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &set(&[2]), 10);
        assert!((m.precision - 0.1).abs() < 1e-12);
        assert_eq!(m.recall, 1.0);
        assert!((m.map - 0.5).abs() < 1e-12);
        assert!((m.ndcg - 1.0 / 3f64.log2()).abs() < 1e-12);

        // A short list still divides precision by K.
        let m = user_metrics(&[7], &set(&[7]), 10);
        assert!((m.precision - 0.1).abs() < 1e-12);
        assert_eq!(m.ndcg, 1.0);
        assert_eq!(m.map, 1.0);

        // No hits.
        assert_eq!(user_metrics(&[1, 2], &set(&[3]), 2), RankMetrics::default());
    }

    #[test]
    fn coverage_counts_distinct_items() {
        let mut acc = MetricsAccumulator::new(10);
        acc.add(&[1, 2], &set(&[1]), 2);
        acc.add(&[2, 3], &set(&[9]), 2);
        assert_eq!(acc.users(), 2);
        assert!((acc.coverage() - 0.3).abs() < 1e-12);
        assert!((acc.mean().precision - 0.25).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn metrics_are_bounded_and_perfect_lists_score_one(
            ranked in prop::collection::vec(0u32..50, 0..20),
            relevant in prop::collection::hash_set(0u32..50, 1..15),
            k in 1usize..15,
        ) {
            let mut dedup = Vec::new();
            for r in ranked { if !dedup.contains(&r) { dedup.push(r); } }
            let rel: FxHashSet<u32> = relevant.iter().copied().collect();
            let m = user_metrics(&dedup, &rel, k);
            for v in [m.precision, m.recall, m.map, m.ndcg] {
                prop_assert!((0.0..=1.0 + 1e-12).contains(&v));
            }
            let mut perfect: Vec<u32> = relevant.iter().copied().collect();
            perfect.sort();
            let p = user_metrics(&perfect, &rel, k);
            prop_assert!((p.ndcg - 1.0).abs() < 1e-9);
            prop_assert!((p.map - 1.0).abs() < 1e-9);
        }
    }
}
