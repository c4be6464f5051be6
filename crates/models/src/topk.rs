//! Exact top-k selection over dense scores, for one user or a batch (GEMM).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ndarray::{ArrayView2, Axis};
use rayon::prelude::*;

use crate::kernels;

/// A scored item. Ordered by score, then by lower index first, so results are deterministic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub item: u32,
    pub score: f32,
}

/// Heap entry ordered so that the *worst* candidate is on top of a max-heap.
#[derive(Clone, Copy, PartialEq)]
struct Worst(Scored);

impl Eq for Worst {}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        // "Greater" = worse: lower score, or equal score and higher index.
        other
            .0
            .score
            .total_cmp(&self.0.score)
            .then_with(|| self.0.item.cmp(&other.0.item))
    }
}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Bounded collector of the best `k` scored items.
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Offers one candidate. NaN scores are ignored.
    #[inline]
    pub fn push(&mut self, item: u32, score: f32) {
        if self.k == 0 || score.is_nan() {
            return;
        }
        let cand = Worst(Scored { item, score });
        if self.heap.len() < self.k {
            self.heap.push(cand);
        } else if let Some(top) = self.heap.peek() {
            if cand < *top {
                self.heap.pop();
                self.heap.push(cand);
            }
        }
    }

    /// The smallest score that can still enter, if the collector is full.
    #[inline]
    pub fn threshold(&self) -> Option<f32> {
        if self.heap.len() < self.k {
            None
        } else {
            self.heap.peek().map(|w| w.0.score)
        }
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<Scored> {
        let mut v: Vec<Scored> = self.heap.into_iter().map(|w| w.0).collect();
        v.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
        v
    }
}

/// Best `k` of `scores` (index = item), skipping items for which `excluded` is true.
pub fn select(scores: &[f32], k: usize, excluded: impl Fn(u32) -> bool) -> Vec<Scored> {
    let mut top = TopK::new(k);
    for (i, &s) in scores.iter().enumerate() {
        // Indices ascend, so a score equal to the threshold loses the tie-break too:
        // `excluded` (often a lookup) runs only for items that would enter.
        if let Some(t) = top.threshold() {
            if s <= t {
                continue;
            }
        }
        if !excluded(i as u32) {
            top.push(i as u32, s);
        }
    }
    top.into_sorted()
}

/// Exact top-k for one query vector against a row-major `items x dim` matrix.
/// `scratch` is reused between calls to avoid an allocation per request.
pub fn top_k_dense(
    items: ArrayView2<f32>,
    query: &[f32],
    k: usize,
    excluded: impl Fn(u32) -> bool,
    scratch: &mut Vec<f32>,
) -> Vec<Scored> {
    let n = items.nrows();
    scratch.resize(n, 0.0);
    match items.as_slice() {
        Some(flat) => kernels::score_rows(flat, items.ncols(), query, scratch),
        None => {
            for (row, o) in items.axis_iter(Axis(0)).zip(scratch.iter_mut()) {
                *o = row.iter().zip(query).map(|(a, b)| a * b).sum();
            }
        }
    }
    select(scratch, k, excluded)
}

/// Exact top-k for many query rows at once: scores are computed block by block with a
/// matrix product (GEMM) and selected in parallel. `excluded(row, item)` filters per row.
pub fn top_k_batch(
    items: ArrayView2<f32>,
    queries: ArrayView2<f32>,
    k: usize,
    excluded: impl Fn(usize, u32) -> bool + Sync,
) -> Vec<Vec<Scored>> {
    const BLOCK: usize = 64;
    let n_items = items.nrows().max(1);
    // Keep a block's score matrix around 8 MB.
    let block = (2_000_000 / n_items).clamp(1, BLOCK);
    let item_t = items.t();
    let starts: Vec<usize> = (0..queries.nrows()).step_by(block).collect();
    starts
        .par_iter()
        .flat_map_iter(|&start| {
            let end = (start + block).min(queries.nrows());
            let q = queries.slice(ndarray::s![start..end, ..]);
            let scores = q.dot(&item_t);
            (0..end - start)
                .map(|r| {
                    let row = scores.row(r);
                    let flat = row
                        .as_slice()
                        .map(|s| s.to_vec())
                        .unwrap_or_else(|| row.to_vec());
                    select(&flat, k, |i| excluded(start + r, i))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn select_orders_and_breaks_ties_by_index() {
        let s = [0.5, 0.9, 0.9, 0.1, f32::NAN, 0.7];
        let r = select(&s, 3, |_| false);
        let items: Vec<u32> = r.iter().map(|x| x.item).collect();
        assert_eq!(items, vec![1, 2, 5]);
        let r = select(&s, 3, |i| i == 1);
        let items: Vec<u32> = r.iter().map(|x| x.item).collect();
        assert_eq!(items, vec![2, 5, 0]);
        assert!(select(&s, 0, |_| false).is_empty());
        assert_eq!(select(&s, 10, |_| false).len(), 5);
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn batch_matches_single() {
        let items = Array2::from_shape_fn((300, 7), |(i, j)| ((i * 7 + j) as f32 * 0.37).sin());
        let users = Array2::from_shape_fn((70, 7), |(i, j)| ((i * 3 + j) as f32 * 0.11).cos());
        let batch = top_k_batch(items.view(), users.view(), 5, |u, i| {
            (u + i as usize).is_multiple_of(5)
        });
        let mut scratch = Vec::new();
        for u in 0..70 {
            let q = users.row(u).to_vec();
            let single = top_k_dense(
                items.view(),
                &q,
                5,
                |i| (u + i as usize).is_multiple_of(5),
                &mut scratch,
            );
            let a: Vec<u32> = single.iter().map(|s| s.item).collect();
            let b: Vec<u32> = batch[u].iter().map(|s| s.item).collect();
            assert_eq!(a, b, "user {u}");
        }
    }
}
