//! Item embeddings indexed by item id. While every embedding is sparse (as the
//! hashed-TF encoder's are) rows are stored as their non-zero values only, with an
//! inverted index (per dimension: the rows with a non-zero value there) that scores
//! exactly while touching only those values. The first dense row (a sentence encoder's)
//! turns the index into one row-major matrix for good, scored by a dense scan.

use ndarray::ArrayView2;
use troupe_models::content;
use troupe_models::dataset::IdMap;
use troupe_models::topk::{self, Scored};

/// Rows denser than this (fraction of non-zero values) switch the index to dense rows
/// for good: dense sentence embeddings gain nothing from sparse storage.
const SPARSE_MAX_DENSITY: f32 = 0.25;

/// How the rows are held.
#[derive(Debug)]
enum Rows {
    /// Each row's `(dimension, value)` non-zeros, and per dimension `(row, value)`.
    Sparse {
        rows: Vec<Box<[(u32, f32)]>>,
        postings: Vec<Vec<(u32, f32)>>,
    },
    /// One row-major matrix.
    Dense(Vec<f32>),
}

/// Embeddings of the catalogue's items for the content branch.
#[derive(Debug)]
pub struct ContentIndex {
    pub encoder: String,
    dim: usize,
    ids: IdMap,
    rows: Rows,
    /// Hash of the text each row was computed from (0: row empty or deleted).
    text_hash: Vec<u128>,
    /// Rows with an embedding.
    live: usize,
}

impl Default for ContentIndex {
    fn default() -> Self {
        ContentIndex::new(0, String::new())
    }
}

impl ContentIndex {
    pub fn new(dim: usize, encoder: String) -> Self {
        ContentIndex {
            encoder,
            dim,
            ids: IdMap::default(),
            rows: Rows::Sparse {
                rows: Vec::new(),
                postings: vec![Vec::new(); dim],
            },
            text_hash: Vec::new(),
            live: 0,
        }
    }

    /// Whether rows are sparse (scored through the inverted index).
    pub fn sparse(&self) -> bool {
        matches!(self.rows, Rows::Sparse { .. })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Switches to dense rows (the sparse ones copied into the matrix).
    fn densify(&mut self) {
        if let Rows::Sparse { rows, .. } = &self.rows {
            let mut data = vec![0f32; self.text_hash.len() * self.dim];
            for (i, r) in rows.iter().enumerate() {
                for &(d, v) in r.iter() {
                    data[i * self.dim + d as usize] = v;
                }
            }
            self.rows = Rows::Dense(data);
        }
    }

    /// Clears row `i` (its values and postings).
    fn clear(&mut self, i: usize) {
        match &mut self.rows {
            Rows::Sparse { rows, postings } => {
                for &(d, _) in rows[i].iter() {
                    let list = &mut postings[d as usize];
                    if let Some(pos) = list.iter().position(|(r, _)| *r as usize == i) {
                        list.swap_remove(pos);
                    }
                }
                rows[i] = Box::default();
            }
            Rows::Dense(data) => data[i * self.dim..(i + 1) * self.dim].fill(0.0),
        }
    }

    /// Sets an item's embedding.
    pub fn set(&mut self, id: &str, text_hash: u128, v: &[f32]) {
        if v.len() != self.dim {
            return;
        }
        let i = self.ids.intern(id) as usize;
        if i >= self.text_hash.len() {
            self.text_hash.resize(i + 1, 0);
            match &mut self.rows {
                Rows::Sparse { rows, .. } => rows.resize_with(i + 1, Box::default),
                Rows::Dense(data) => data.resize((i + 1) * self.dim, 0.0),
            }
        }
        if self.text_hash[i] == 0 {
            self.live += 1;
        } else {
            self.clear(i);
        }
        self.text_hash[i] = text_hash;
        let nnz = v.iter().filter(|x| **x != 0.0).count();
        if nnz as f32 > SPARSE_MAX_DENSITY * self.dim as f32 {
            self.densify();
        }
        match &mut self.rows {
            Rows::Sparse { rows, postings } => {
                let row: Box<[(u32, f32)]> = v
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| **x != 0.0)
                    .map(|(d, x)| (d as u32, *x))
                    .collect();
                for &(d, x) in row.iter() {
                    postings[d as usize].push((i as u32, x));
                }
                rows[i] = row;
            }
            Rows::Dense(data) => data[i * self.dim..(i + 1) * self.dim].copy_from_slice(v),
        }
    }

    /// Clears an item's embedding (deleted items never score).
    pub fn remove(&mut self, id: &str) {
        if let Some(i) = self.ids.get(id) {
            let i = i as usize;
            if self.text_hash[i] != 0 {
                self.live -= 1;
                self.clear(i);
            }
            self.text_hash[i] = 0;
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

    /// An item's embedding (a copy, dense).
    pub fn row(&self, id: &str) -> Option<Vec<f32>> {
        let i = self.index(id)? as usize;
        Some(match &self.rows {
            Rows::Sparse { rows, .. } => {
                let mut v = vec![0f32; self.dim];
                for &(d, x) in rows[i].iter() {
                    v[d as usize] = x;
                }
                v
            }
            Rows::Dense(data) => data[i * self.dim..(i + 1) * self.dim].to_vec(),
        })
    }

    /// The content profile of a user who touched `(row, weight, ts seconds)`
    /// ([`content::user_profile`]).
    pub fn user_profile(&self, touched: &[(u32, f32, i64)], half_life: f64) -> Option<Vec<f32>> {
        let n = self.text_hash.len();
        match &self.rows {
            Rows::Sparse { rows, .. } => {
                content::user_profile_with(self.dim, n, touched, half_life, |r, w, acc| {
                    for &(d, x) in rows[r].iter() {
                        acc[d as usize] += w * x;
                    }
                })
            }
            Rows::Dense(data) => {
                let m = ArrayView2::from_shape((n, self.dim), &data[..n * self.dim]).ok()?;
                content::user_profile(m, touched, half_life)
            }
        }
    }

    /// Heap bytes of the embeddings (rows and postings).
    pub fn heap_bytes(&self) -> usize {
        let pair = std::mem::size_of::<(u32, f32)>();
        match &self.rows {
            Rows::Sparse { rows, postings } => {
                rows.iter().map(|r| r.len() * pair).sum::<usize>()
                    + rows.capacity() * std::mem::size_of::<Box<[(u32, f32)]>>()
                    + postings.iter().map(|p| p.capacity() * pair).sum::<usize>()
            }
            Rows::Dense(data) => data.capacity() * 4,
        }
    }

    /// Exact top-`k` rows by dot product with `query` (cosine for unit rows), skipping
    /// `excluded` rows: through the inverted index while rows are sparse (it touches only
    /// the non-zero values the query's dimensions meet), else a dense scan.
    pub fn top_k(
        &self,
        query: &[f32],
        k: usize,
        excluded: impl Fn(u32) -> bool,
        scratch: &mut Vec<f32>,
    ) -> Vec<Scored> {
        let n = self.text_hash.len();
        match &self.rows {
            Rows::Sparse { postings, .. } => {
                scratch.clear();
                scratch.resize(n, 0.0);
                for (q, list) in query.iter().zip(postings) {
                    if *q != 0.0 {
                        for &(r, v) in list {
                            scratch[r as usize] += q * v;
                        }
                    }
                }
                topk::select(scratch, k, excluded)
            }
            Rows::Dense(data) => match ArrayView2::from_shape((n, self.dim), &data[..n * self.dim])
            {
                Ok(m) => topk::top_k_dense(m, query, k, excluded, scratch),
                Err(_) => Vec::new(),
            },
        }
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
        assert_eq!(c.row("a"), Some(vec![0.5, 0.5]));
        c.remove("a");
        c.remove("a");
        assert_eq!(c.len(), 1);
        assert_eq!(c.index("a"), None);
        assert_eq!(c.row("b"), Some(vec![0.0, 1.0]));
        c.set("x", 4, &[1.0]);
        assert_eq!(c.len(), 1, "wrong width is ignored");
    }

    fn data_of(c: &ContentIndex, n: usize, dim: usize) -> Vec<f32> {
        (0..n)
            .flat_map(|i| c.row(&format!("i{i}")).unwrap_or_else(|| vec![0.0; dim]))
            .collect()
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
            let mut data = Vec::new();
            for i in 0..300 {
                data.extend(
                    sparse
                        .row(&format!("i{i}"))
                        .unwrap_or_else(|| vec![0.0; dim]),
                );
            }
            let m = ArrayView2::from_shape((300, dim), &data).unwrap();
            let dense = topk::top_k_dense(m, &q, 10, |i| i % 5 == 0, &mut s2);
            assert_eq!(via_index.len(), dense.len());
            for (a, b) in via_index.iter().zip(&dense) {
                assert!((a.score - b.score).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        }
        // Profiles agree with the dense computation.
        let touched = [(3u32, 1.0f32, 10i64), (8, 2.0, 20), (40, 0.5, 5)];
        let m = ArrayView2::from_shape((300, dim), &data_of(&sparse, 300, dim))
            .unwrap()
            .to_owned();
        let want = content::user_profile(m.view(), &touched, 100.0).unwrap();
        let got = sparse.user_profile(&touched, 100.0).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6);
        }
        // A dense row switches to dense rows; scoring and rows still work.
        let before = sparse.row("i3");
        sparse.set("dense", 5000, &vec![0.1; dim]);
        assert!(!sparse.sparse());
        assert_eq!(sparse.row("i3"), before);
        let again = sparse.user_profile(&touched, 100.0).unwrap();
        for (a, b) in again.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6);
        }
        let mut s = Vec::new();
        assert_eq!(
            sparse.top_k(&vec![1.0; dim], 1, |_| false, &mut s)[0].item,
            sparse.index("dense").unwrap()
        );
    }
}
