//! Item embeddings indexed by item id. While every embedding is sparse (as the
//! hashed-TF encoder's are) rows are stored as their non-zero values only, with an
//! inverted index (per dimension: the rows with a non-zero value there) that scores
//! exactly while touching only those values. The first dense row (a sentence encoder's)
//! turns the index into one row-major matrix for good, scored by a dense scan.
//!
//! Dense rows from `ranker.ann_min_items` live rows on get their candidates from HNSW
//! graphs ([`MipsIndex`]) built off the request path over the rows as they were at one
//! generation ([`build_ann`]). Every candidate is rescored exactly on its current row;
//! rows changed since the build are scored exactly besides the graphs, and removed rows
//! never score, so the catalogue's changes show at once; the graphs are rebuilt once
//! enough changes gathered. Sparse rows stay on the inverted index: on the generated
//! catalogue, graphs over their projection to 256 dimensions were slower than it and
//! found 0.28-0.71 of its top 100 (ADR 021).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ndarray::ArrayView2;
use parking_lot::RwLock;
use troupe_models::ann::{AnnParams, MipsIndex, SearchPath};
use troupe_models::content;
use troupe_models::dataset::IdMap;
use troupe_models::kernels;
use troupe_models::topk::{self, Scored, TopK};

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

/// Rows changed since a build that start the next one: this share of the live rows, and
/// at least [`REBUILD_MIN_CHANGES`].
const REBUILD_SHARE: f64 = 0.05;
const REBUILD_MIN_CHANGES: usize = 1_000;

/// Identities of indexes, so a build never swaps into an index that replaced its own.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// HNSW graphs over the rows as they were at generation `built_gen`.
#[derive(Debug)]
pub struct ContentAnn {
    index: MipsIndex,
    built_gen: u64,
}

impl ContentAnn {
    pub fn rows(&self) -> usize {
        self.index.rows()
    }

    pub fn build_seconds(&self) -> f64 {
        self.index.build_seconds()
    }

    pub fn memory_bytes(&self) -> usize {
        self.index.memory_bytes()
    }
}

/// Embeddings of the catalogue's items for the content branch.
#[derive(Debug)]
pub struct ContentIndex {
    pub encoder: String,
    id: u64,
    dim: usize,
    ids: IdMap,
    rows: Rows,
    /// Hash of the text each row was computed from (0: row empty or deleted).
    text_hash: Vec<u128>,
    /// Rows with an embedding.
    live: usize,
    /// Generation of the last change, overall and per row.
    gen: u64,
    stamp: Vec<u64>,
    /// `(generation, row)` of every row set since the graphs' generation (or since a
    /// build started), while there are graphs or one is being built.
    changes: Vec<(u64, u32)>,
    building: bool,
    ann: Option<Arc<ContentAnn>>,
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
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            dim,
            ids: IdMap::default(),
            rows: Rows::Sparse {
                rows: Vec::new(),
                postings: vec![Vec::new(); dim],
            },
            text_hash: Vec::new(),
            live: 0,
            gen: 0,
            stamp: Vec::new(),
            changes: Vec::new(),
            building: false,
            ann: None,
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
            self.stamp.resize(i + 1, 0);
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
        self.gen += 1;
        self.stamp[i] = self.gen;
        if self.building || self.ann.is_some() {
            self.changes.push((self.gen, i as u32));
        }
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
            self.gen += 1;
            self.stamp[i] = self.gen;
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

    /// Top-`k` rows by dot product with `query` (cosine for unit rows), skipping
    /// `excluded` rows, scored exactly: through the graphs while there are any (see the
    /// module doc), else exactly ([`ContentIndex::exact_top_k`]). The path taken comes
    /// back with them (`None`: no graphs).
    pub fn top_k(
        &self,
        query: &[f32],
        k: usize,
        excluded: impl Fn(u32) -> bool,
        scratch: &mut Vec<f32>,
    ) -> (Vec<Scored>, Option<SearchPath>) {
        let Some(ann) = self.ann.as_deref() else {
            return (self.exact_top_k(query, k, excluded, scratch), None);
        };
        if query.len() != self.dim {
            return (Vec::new(), None);
        }
        let changed = |i: u32| {
            self.stamp
                .get(i as usize)
                .is_some_and(|s| *s > ann.built_gen)
        };
        let (found, path) = ann.index.search_with(
            query,
            k,
            |i| changed(i) || !self.live(i) || excluded(i),
            |i| self.score(i, query),
            || self.exact_top_k(query, k, &excluded, scratch),
        );
        if path == SearchPath::ExactFallback {
            return (found, Some(path));
        }
        // Rows set since the build, each once (its latest change), scored exactly.
        let mut top = TopK::new(k);
        for s in &found {
            top.push(s.item, s.score);
        }
        for &(g, i) in &self.changes {
            if g > ann.built_gen && self.stamp[i as usize] == g && self.live(i) && !excluded(i) {
                top.push(i, self.score(i, query));
            }
        }
        (top.into_sorted(), Some(path))
    }

    /// Row `i`'s exact dot product with `query`.
    fn score(&self, i: u32, query: &[f32]) -> f32 {
        let i = i as usize;
        match &self.rows {
            Rows::Sparse { rows, .. } => rows
                .get(i)
                .map_or(0.0, |r| r.iter().map(|&(d, x)| x * query[d as usize]).sum()),
            Rows::Dense(data) => data
                .get(i * self.dim..(i + 1) * self.dim)
                .map_or(0.0, |r| kernels::dot(r, query)),
        }
    }

    /// Exact top-`k` rows by dot product with `query` (cosine for unit rows), skipping
    /// `excluded` rows: through the inverted index while rows are sparse (it touches only
    /// the non-zero values the query's dimensions meet), else a dense scan.
    pub fn exact_top_k(
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

    /// The graphs in use, if any.
    pub fn ann(&self) -> Option<&ContentAnn> {
        self.ann.as_deref()
    }

    /// `ready` (graphs answer), `building` (they are due or being built; exact scoring
    /// answers meanwhile) or `exact` (sparse rows, or fewer than `min_items`).
    pub fn ann_state(&self, min_items: usize) -> &'static str {
        if self.ann.is_some() {
            "ready"
        } else if self.building || (min_items > 0 && self.live >= min_items && !self.sparse()) {
            "building"
        } else {
            "exact"
        }
    }

    /// Generation of the last change (set or removed row).
    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// Rows set since the graphs' generation (scored exactly besides them).
    pub fn changed_since_build(&self) -> usize {
        self.ann.as_ref().map_or(0, |a| {
            self.changes
                .iter()
                .filter(|(g, _)| *g > a.built_gen)
                .count()
        })
    }

    /// Whether graphs should be built now: dense rows, at least `min_items` live ones
    /// (0: never) and no graphs yet, or enough rows changed since they were built; none
    /// being built. Below `min_items` the graphs are dropped.
    pub fn ann_due(&mut self, min_items: usize) -> bool {
        if min_items == 0 || self.live < min_items || self.sparse() {
            if !self.building {
                self.ann = None;
                self.changes = Vec::new();
            }
            return false;
        }
        if self.building {
            return false;
        }
        match &self.ann {
            None => true,
            Some(_) => {
                self.changes.len()
                    > REBUILD_MIN_CHANGES.max((self.live as f64 * REBUILD_SHARE) as usize)
            }
        }
    }

    /// Writes dense row `i` into `buf` (zeros for an empty row, or while rows are sparse).
    fn dense_row(&self, i: usize, buf: &mut [f32]) {
        match &self.rows {
            Rows::Dense(data) if buf.len() == self.dim => {
                match data.get(i * self.dim..(i + 1) * self.dim) {
                    Some(r) => buf.copy_from_slice(r),
                    None => buf.fill(0.0),
                }
            }
            _ => buf.fill(0.0),
        }
    }
}

/// Builds graphs over the rows of the index behind `lock` as they are now and swaps them
/// in, holding the lock only to read one row at a time and to swap (writers go on
/// meanwhile; rows they change are scored exactly until the next build). Returns the
/// graphs swapped in, or `None` when the index was replaced meanwhile.
pub fn build_ann(
    lock: &RwLock<ContentIndex>,
    params: &AnnParams,
) -> Result<Option<Arc<ContentAnn>>, String> {
    let (id, rows, dim, gen) = {
        let mut c = lock.write();
        if c.building || c.sparse() {
            return Ok(None);
        }
        c.building = true;
        (c.id, c.text_hash.len(), c.dim, c.gen)
    };
    let built = MipsIndex::build_with(rows, dim, params, |i, buf| {
        let c = lock.read();
        if c.id == id {
            c.dense_row(i as usize, buf);
        } else {
            buf.fill(0.0);
        }
    });
    let mut c = lock.write();
    if c.id != id {
        return Ok(None);
    }
    c.building = false;
    let index = built?;
    let ann = Arc::new(ContentAnn {
        index,
        built_gen: gen,
    });
    c.changes.retain(|(g, _)| *g > gen);
    c.ann = Some(ann.clone());
    Ok(Some(ann))
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
            let via_index = sparse.top_k(&q, 10, |i| i % 5 == 0, &mut s1).0;
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
            sparse.top_k(&vec![1.0; dim], 1, |_| false, &mut s).0[0].item,
            sparse.index("dense").unwrap()
        );
    }

    /// Unit rows of `n` items over `dim` dimensions, in topics of their own words.
    fn topical_rows(n: usize, dim: usize, nnz: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        let topics = 30;
        let vocab = 60;
        (0..n)
            .map(|i| {
                let t = i % topics;
                let mut v = vec![0f32; dim];
                for j in 0..nnz {
                    let d = if j < nnz - 2 {
                        (t * vocab + next() % vocab) % dim
                    } else {
                        next() % dim
                    };
                    v[d] += 0.2 + (next() % 1000) as f32 / 1000.0;
                }
                kernels::l2_normalize(&mut v);
                v
            })
            .collect()
    }

    /// Share of the approximate answer that is as good as the exact k-th (ties do not
    /// count against it).
    fn recall(exact: &[Scored], approx: &[Scored]) -> f64 {
        let Some(kth) = exact.last() else {
            return 1.0;
        };
        let good = approx
            .iter()
            .filter(|s| s.score >= kth.score - 1e-5)
            .count();
        good as f64 / exact.len() as f64
    }

    fn graphs_follow_exact_search(rows: Vec<Vec<f32>>) {
        let n = rows.len();
        let dim = rows[0].len();
        let lock = RwLock::new(ContentIndex::new(dim, "e".into()));
        for (i, r) in rows.iter().enumerate() {
            lock.write().set(&format!("i{i}"), 1 + i as u128, r);
        }
        assert!(!lock.write().ann_due(n + 1), "below the threshold");
        assert!(lock.write().ann_due(n));
        let params = AnnParams {
            m: 16,
            ef_construction: 64,
            ef_search: 64,
            ..AnnParams::default()
        };
        let ann = build_ann(&lock, &params).unwrap().unwrap();
        assert_eq!(ann.rows(), n);
        assert!(!lock.write().ann_due(n), "just built");
        let c = lock.read();
        let k = 20;
        let mut scratch = Vec::new();
        let mut total = 0.0;
        let queries = 40;
        for q in 0..queries {
            let touched: Vec<(u32, f32, i64)> = (0..4)
                .map(|j| ((q * 7 + j * 30) as u32 % n as u32, 1.0, 0))
                .collect();
            let profile = c.user_profile(&touched, 1e9).unwrap();
            let seen: Vec<u32> = touched.iter().map(|t| t.0).collect();
            let excluded = |i: u32| seen.contains(&i);
            let exact = c.exact_top_k(&profile, k, excluded, &mut scratch);
            let (approx, path) = c.top_k(&profile, k, excluded, &mut scratch);
            assert_eq!(path, Some(SearchPath::Graph));
            assert_eq!(approx.len(), k);
            assert!(approx.iter().all(|s| !excluded(s.item)));
            for s in &approx {
                assert!(
                    (s.score - c.score(s.item, &profile)).abs() < 1e-5,
                    "exact scores"
                );
            }
            total += recall(&exact, &approx);
        }
        let r = total / queries as f64;
        assert!(r >= 0.9, "recall@{k} {r}");
        let profile = c.user_profile(&[(5, 1.0, 0), (35, 1.0, 0)], 1e9).unwrap();
        drop(c);
        // A new row, the query itself, is found at once, without a rebuild; a removed
        // row never comes back; a replaced row scores on its new values.
        lock.write().set(
            "new",
            99_999,
            &profile
                .iter()
                .map(|x| x / kernels::norm2(&profile).sqrt())
                .collect::<Vec<_>>(),
        );
        let first = {
            let c = lock.read();
            let (top, _) = c.top_k(&profile, k, |_| false, &mut scratch);
            assert_eq!(c.name(top[0].item), Some("new"));
            assert_eq!(
                top.iter().filter(|s| c.name(s.item) == Some("new")).count(),
                1
            );
            c.name(top[1].item).unwrap().to_string()
        };
        lock.write().remove(&first);
        lock.write().set("new", 100_000, &rows[(n / 2) | 1]);
        let c = lock.read();
        let (top, _) = c.top_k(&profile, k, |_| false, &mut scratch);
        assert!(top.iter().all(|s| c.name(s.item) != Some(first.as_str())));
        let new = c.index("new").unwrap();
        if let Some(s) = top.iter().find(|s| s.item == new) {
            assert!((s.score - c.score(new, &profile)).abs() < 1e-5);
        }
        // Heavy filters still return k eligible rows.
        let (few, _) = c.top_k(&profile, k, |i| i % 25 != 0, &mut scratch);
        assert_eq!(few.len(), k);
        assert!(few.iter().all(|s| s.item % 25 == 0));
        drop(c);
        // Enough changes call for a rebuild; one that starts with the index replaced
        // swaps nothing in.
        for i in 0..REBUILD_MIN_CHANGES.max(n / 20) + 1 {
            lock.write().set(
                &format!("i{}", i % n),
                200_000 + i as u128,
                &rows[(i + 1) % n],
            );
        }
        assert!(lock.write().ann_due(n));
        let again = build_ann(&lock, &params).unwrap().unwrap();
        assert!(lock.read().changes.is_empty());
        assert_eq!(again.rows(), n + 1);
    }

    #[test]
    fn dense_rows_are_searched_through_graphs_that_see_changes_at_once() {
        graphs_follow_exact_search(topical_rows(3_000, 48, 30, 5));
    }

    #[test]
    fn sparse_rows_stay_on_the_inverted_index() {
        let lock = RwLock::new(ContentIndex::new(1024, "e".into()));
        for (i, r) in topical_rows(600, 1024, 14, 11).iter().enumerate() {
            lock.write().set(&format!("i{i}"), 1 + i as u128, r);
        }
        assert!(lock.read().sparse());
        assert!(!lock.write().ann_due(1));
        assert!(build_ann(&lock, &AnnParams::default()).unwrap().is_none());
        let c = lock.read();
        let q = c.row("i3").unwrap();
        let (top, path) = c.top_k(&q, 5, |_| false, &mut Vec::new());
        assert_eq!(path, None);
        assert_eq!(c.name(top[0].item), Some("i3"));
    }
}
