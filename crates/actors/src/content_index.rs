//! Item embeddings in one growing row-major matrix, indexed by item id, plus an inverted
//! index (per dimension: the rows with a non-zero value there) while the embeddings are
//! sparse, as the hashed-TF encoder's are. Scoring takes whichever path touches fewer
//! values; both are exact.

use ndarray::ArrayView2;
use troupe_models::dataset::IdMap;
use troupe_models::topk::{self, Scored};

/// Rows denser than this (fraction of non-zero values) turn the inverted index off for
/// good: dense sentence embeddings gain nothing from it and would double the memory.
const SPARSE_MAX_DENSITY: f32 = 0.25;

/// Embeddings of the catalogue's items for the content branch.
#[derive(Debug, Default)]
pub struct ContentIndex {
    pub encoder: String,
    dim: usize,
    ids: IdMap,
    data: Vec<f32>,
    /// Hash of the text each row was computed from (0: row empty or deleted).
    text_hash: Vec<u128>,
    /// Rows with an embedding.
    live: usize,
    /// Per dimension, `(row, value)` of every non-zero value; `None` once a dense row
    /// arrived.
    postings: Option<Vec<Vec<(u32, f32)>>>,
}

impl ContentIndex {
    pub fn new(dim: usize, encoder: String) -> Self {
        ContentIndex {
            encoder,
            dim,
            postings: Some(vec![Vec::new(); dim]),
            ..Default::default()
        }
    }

    /// Whether scoring can use the inverted index.
    pub fn sparse(&self) -> bool {
        self.postings.is_some()
    }

    /// Drops row `i`'s values from the inverted index.
    fn unpost(&mut self, i: usize) {
        let row = &self.data[i * self.dim..(i + 1) * self.dim];
        if let Some(postings) = self.postings.as_mut() {
            for (d, v) in row.iter().enumerate() {
                if *v != 0.0 {
                    let list = &mut postings[d];
                    if let Some(pos) = list.iter().position(|(r, _)| *r as usize == i) {
                        list.swap_remove(pos);
                    }
                }
            }
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Sets an item's embedding.
    pub fn set(&mut self, id: &str, text_hash: u128, v: &[f32]) {
        if v.len() != self.dim {
            return;
        }
        let i = self.ids.intern(id) as usize;
        if i >= self.text_hash.len() {
            self.text_hash.resize(i + 1, 0);
            self.data.resize((i + 1) * self.dim, 0.0);
        }
        if self.text_hash[i] == 0 {
            self.live += 1;
        } else {
            self.unpost(i);
        }
        self.text_hash[i] = text_hash;
        self.data[i * self.dim..(i + 1) * self.dim].copy_from_slice(v);
        let nnz = v.iter().filter(|x| **x != 0.0).count();
        if nnz as f32 > SPARSE_MAX_DENSITY * self.dim as f32 {
            self.postings = None;
        }
        if let Some(postings) = self.postings.as_mut() {
            for (d, x) in v.iter().enumerate() {
                if *x != 0.0 {
                    postings[d].push((i as u32, *x));
                }
            }
        }
    }

    /// Clears an item's embedding (deleted items never score).
    pub fn remove(&mut self, id: &str) {
        if let Some(i) = self.ids.get(id) {
            let i = i as usize;
            if self.text_hash[i] != 0 {
                self.live -= 1;
                self.unpost(i);
            }
            self.text_hash[i] = 0;
            self.data[i * self.dim..(i + 1) * self.dim].fill(0.0);
        }
    }

    /// Text hash an item's row was computed from.
    pub fn text_hash(&self, id: &str) -> Option<u128> {
        self.ids
            .get(id)
            .map(|i| self.text_hash[i as usize])
            .filter(|h| *h != 0)
    }

    pub fn index(&self, id: &str) -> Option<u32> {
        self.ids
            .get(id)
            .filter(|&i| self.text_hash[i as usize] != 0)
    }

    /// Whether row `i` holds an embedding (not empty, not deleted).
    pub fn live(&self, i: u32) -> bool {
        self.text_hash.get(i as usize).is_some_and(|h| *h != 0)
    }

    pub fn name(&self, i: u32) -> Option<&str> {
        self.ids.name(i)
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The matrix (rows = items by index; deleted rows are zero).
    pub fn matrix(&self) -> ArrayView2<'_, f32> {
        let rows = self.text_hash.len();
        ArrayView2::from_shape((rows, self.dim), &self.data[..rows * self.dim])
            .unwrap_or_else(|_| ArrayView2::from_shape((0, 0), &[]).expect("empty view"))
    }

    pub fn row(&self, id: &str) -> Option<&[f32]> {
        let i = self.index(id)? as usize;
        Some(&self.data[i * self.dim..(i + 1) * self.dim])
    }

    /// Exact top-`k` rows by dot product with `query` (cosine for unit rows), skipping
    /// `excluded` rows. Through the inverted index when the query's non-zero dimensions
    /// touch fewer values than a full scan would, else a dense scan.
    pub fn top_k(
        &self,
        query: &[f32],
        k: usize,
        excluded: impl Fn(u32) -> bool,
        scratch: &mut Vec<f32>,
    ) -> Vec<Scored> {
        let rows = self.text_hash.len();
        if let Some(postings) = &self.postings {
            let touched: usize = query
                .iter()
                .zip(postings)
                .filter(|(q, _)| **q != 0.0)
                .map(|(_, p)| p.len())
                .sum();
            if touched < rows * self.dim / 4 {
                scratch.clear();
                scratch.resize(rows, 0.0);
                for (q, list) in query.iter().zip(postings) {
                    if *q != 0.0 {
                        for &(r, v) in list {
                            scratch[r as usize] += q * v;
                        }
                    }
                }
                return topk::select(scratch, k, excluded);
            }
        }
        topk::top_k_dense(self.matrix(), query, k, excluded, scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replace_remove_keep_counts_and_rows() {
        let mut c = ContentIndex::new(2, "e".into());
        c.set("a", 1, &[1.0, 0.0]);
        c.set("b", 2, &[0.0, 1.0]);
        c.set("a", 3, &[0.5, 0.5]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.row("a"), Some(&[0.5, 0.5][..]));
        c.remove("a");
        c.remove("a");
        assert_eq!(c.len(), 1);
        assert_eq!(c.index("a"), None);
        assert_eq!(c.matrix().nrows(), 2);
        c.set("x", 4, &[1.0]);
        assert_eq!(c.len(), 1, "wrong width is ignored");
    }

    /// The inverted-index path and the dense scan agree on every query, through
    /// replacements and removals.
    #[test]
    fn sparse_and_dense_scoring_agree() {
        let dim = 64;
        let mut sparse = ContentIndex::new(dim, "e".into());
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let mut rows = Vec::new();
        for i in 0..300 {
            let mut v = vec![0f32; dim];
            for _ in 0..4 {
                v[next() % dim] = (next() % 100) as f32 / 100.0 - 0.3;
            }
            rows.push(v.clone());
            sparse.set(&format!("i{i}"), 1 + i as u128, &v);
        }
        // Replace some rows, remove others.
        for i in (0..300).step_by(7) {
            let mut v = vec![0f32; dim];
            v[next() % dim] = 1.0;
            rows[i] = v.clone();
            sparse.set(&format!("i{i}"), 1000 + i as u128, &v);
        }
        for i in (0..300).step_by(11) {
            sparse.remove(&format!("i{i}"));
        }
        assert!(sparse.sparse());
        for _ in 0..20 {
            let mut q = vec![0f32; dim];
            for _ in 0..3 {
                q[next() % dim] = 1.0;
            }
            let mut s1 = Vec::new();
            let via_index = sparse.top_k(&q, 10, |i| i % 5 == 0, &mut s1);
            let mut s2 = Vec::new();
            let dense = topk::top_k_dense(sparse.matrix(), &q, 10, |i| i % 5 == 0, &mut s2);
            assert_eq!(via_index.len(), dense.len());
            for (a, b) in via_index.iter().zip(&dense) {
                assert!((a.score - b.score).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        }
        // A dense row switches the index off; scoring still works.
        sparse.set("dense", 5000, &vec![0.1; dim]);
        assert!(!sparse.sparse());
        let mut s = Vec::new();
        assert_eq!(
            sparse.top_k(&vec![1.0; dim], 1, |_| false, &mut s)[0].item,
            sparse.index("dense").unwrap()
        );
    }
}
