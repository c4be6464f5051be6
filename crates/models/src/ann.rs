//! Approximate maximum-inner-product retrieval over item vectors (ALS factors, dense
//! content embeddings) through HNSW graphs (USearch, a maintained C++ library with Rust
//! bindings), organised by norm range.
//!
//! Inner product is not a metric, and the two usual ways round that fail on factors
//! whose norms vary as much as popularity does (measured on 100k items, see
//! `examples/ann_scale.rs` and ADR 016): a graph built on the inner product itself
//! (ip-NSW) links every item to the few largest ones and leaves the rest hard to reach
//! (recall@100 0.46 on trained factors), and one reduction to cosine for all items
//! (an extra dimension `sqrt(M^2 - |y|^2)` puts every item on a sphere) packs the
//! many small items around one pole (recall@100 0.27-0.32).
//!
//! So the items are split by norm into bands whose largest norm is at most 1.3 times
//! their smallest (at most `norm_ranges` bands; the last holds every smaller item), and
//! each band of 256 items or more gets its own graph with the reduction made with that range's own largest norm `M_b`:
//! `x = [y / M_b, sqrt(1 - |y|^2 / M_b^2)]`, query `[q / |q|, 0]`, cosine distance, whose
//! order within the range is the inner product's. A search walks the ranges from the
//! largest norms down, keeps the best `k` exact scores, and stops as soon as the next
//! range cannot beat them (no item there scores above `M_b |q|`).
//!
//! The graphs only propose candidates: every candidate is rescored with the exact inner
//! product on the caller's f32 item matrix, so scores (and the blend built on them) are
//! the ones exact search gives; only which items are found can differ (recall). Vectors
//! in the graphs may be stored as f16 (`quantization`), halving their memory and the
//! bandwidth a search reads.

use std::time::Instant;

use ndarray::ArrayView2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::kernels;
use crate::topk::{self, Scored, TopK};

/// How vectors are stored in the graphs (scores are always recomputed in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    F32,
    F16,
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Quantization::F32),
            "f16" => Ok(Quantization::F16),
            other => Err(format!("quantization `{other}`: expected f32 or f16")),
        }
    }
}

/// HNSW parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnnParams {
    /// Links per node (connectivity).
    pub m: usize,
    /// Candidate list width while inserting.
    pub ef_construction: usize,
    /// Candidate list width while searching, per range (raised to the number asked).
    pub ef_search: usize,
    /// Ranges of equal size by norm, one graph each.
    pub norm_ranges: usize,
    pub quantization: Quantization,
}

impl Default for AnnParams {
    fn default() -> Self {
        AnnParams {
            m: 32,
            ef_construction: 200,
            ef_search: 128,
            norm_ranges: 32,
            quantization: Quantization::F16,
        }
    }
}

impl AnnParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=128).contains(&self.m) {
            return Err(format!("m = {} must be within 2..=128", self.m));
        }
        if !(8..=4096).contains(&self.ef_construction) {
            return Err(format!(
                "ef_construction = {} must be within 8..=4096",
                self.ef_construction
            ));
        }
        if !(8..=10_000).contains(&self.ef_search) {
            return Err(format!(
                "ef_search = {} must be within 8..=10000",
                self.ef_search
            ));
        }
        if !(1..=64).contains(&self.norm_ranges) {
            return Err(format!(
                "norm_ranges = {} must be within 1..=64",
                self.norm_ranges
            ));
        }
        Ok(())
    }
}

/// What a search did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum SearchPath {
    /// The graphs found enough eligible items.
    #[default]
    Graph,
    /// The graphs found fewer than asked (or could not search): an exact scan answered.
    ExactFallback,
}

impl SearchPath {
    pub fn as_str(self) -> &'static str {
        match self {
            SearchPath::Graph => "graph",
            SearchPath::ExactFallback => "exact_fallback",
        }
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("hnsw index: {what}: {e}")
}

/// Concurrent searches one graph serves (USearch keeps a search context per slot); a
/// search that finds every slot taken is answered by an exact scan.
const SEARCH_SLOTS: usize = 16;

/// Ranges smaller than this are scanned exactly instead of searched in a graph.
const MIN_GRAPH_ROWS: usize = 256;

/// Largest over smallest norm within one range: the reduction's extra coordinate stays
/// below `sqrt(1 - 1 / NORM_BAND^2)` (0.64), so items keep their angular spread.
const NORM_BAND: f32 = 1.3;

/// One norm range: its rows (global row numbers), largest norm, and graph (absent for a
/// range small enough to scan).
struct Range {
    rows: Vec<u32>,
    max_norm: f32,
    graph: Option<Index>,
}

/// HNSW graphs over the rows of an item matrix, by norm range, for maximum inner product.
pub struct MipsIndex {
    ranges: Vec<Range>,
    rows: usize,
    dim: usize,
    params: AnnParams,
    build_seconds: f64,
}

impl std::fmt::Debug for MipsIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MipsIndex")
            .field("rows", &self.rows)
            .field("dim", &self.dim)
            .field("params", &self.params)
            .field("build_seconds", &self.build_seconds)
            .finish()
    }
}

impl MipsIndex {
    /// Builds the graphs over every row of `items` (rows x dim), inserting in parallel on
    /// the rayon pool. Keys are row numbers.
    pub fn build(items: ArrayView2<f32>, params: &AnnParams) -> Result<MipsIndex, String> {
        let (rows, dim) = items.dim();
        Self::build_with(rows, dim, params, |i, buf| {
            for (b, v) in buf.iter_mut().zip(items.row(i as usize)) {
                *b = *v;
            }
        })
    }

    /// Builds the graphs over `rows` vectors of `dim` values that `row(i, buf)` writes
    /// into `buf` (called from several threads, twice per row: once for its norm, once
    /// to insert it). For vectors held in another form than one matrix (sparse rows, or
    /// their projection to fewer dimensions).
    pub fn build_with(
        rows: usize,
        dim: usize,
        params: &AnnParams,
        row: impl Fn(u32, &mut [f32]) + Sync,
    ) -> Result<MipsIndex, String> {
        params.validate()?;
        let start = Instant::now();
        let norms: Vec<f32> = (0..rows as u32)
            .into_par_iter()
            .map_init(
                || vec![0.0f32; dim],
                |buf, i| {
                    row(i, buf);
                    kernels::norm2(buf).sqrt()
                },
            )
            .collect();
        let mut order: Vec<u32> = (0..rows as u32).collect();
        // Largest norms first; ties by row for a deterministic split.
        order.sort_by(|&a, &b| {
            norms[b as usize]
                .total_cmp(&norms[a as usize])
                .then(a.cmp(&b))
        });
        // Bands of norm at most NORM_BAND wide (largest / smallest), so that no graph
        // holds items whose reduction crowds them round its pole; the last range holds
        // every smaller item (the bound usually skips it).
        let mut ranges = Vec::new();
        let mut next = 0usize;
        while next < order.len() {
            let max_norm = norms[order[next] as usize];
            let end = if ranges.len() + 1 >= params.norm_ranges || max_norm <= 0.0 {
                order.len()
            } else {
                let floor = max_norm / NORM_BAND;
                next + order[next..].partition_point(|&i| norms[i as usize] >= floor)
            };
            let chunk = &order[next..end.max(next + 1)];
            let graph = if chunk.len() >= MIN_GRAPH_ROWS && max_norm > 0.0 {
                Some(Self::graph(dim, &row, chunk, max_norm, params)?)
            } else {
                None
            };
            ranges.push(Range {
                rows: chunk.to_vec(),
                max_norm,
                graph,
            });
            next += chunk.len();
        }
        Ok(MipsIndex {
            ranges,
            rows,
            dim,
            params: params.clone(),
            build_seconds: start.elapsed().as_secs_f64(),
        })
    }

    fn graph(
        dim: usize,
        row: &(impl Fn(u32, &mut [f32]) + Sync),
        rows: &[u32],
        max_norm: f32,
        params: &AnnParams,
    ) -> Result<Index, String> {
        let graph = Index::new(&IndexOptions {
            dimensions: dim + 1,
            metric: MetricKind::Cos,
            quantization: match params.quantization {
                Quantization::F32 => ScalarKind::F32,
                Quantization::F16 => ScalarKind::F16,
            },
            connectivity: params.m,
            expansion_add: params.ef_construction,
            expansion_search: params.ef_search,
            multi: false,
        })
        .map_err(|e| err("create", e))?;
        let threads = rayon::current_num_threads().max(SEARCH_SLOTS);
        graph
            .reserve_capacity_and_threads(rows.len(), threads)
            .map_err(|e| err("reserve", e))?;
        let inv = 1.0 / max_norm;
        rows.par_iter()
            .try_for_each_init(
                || vec![0.0f32; dim + 1],
                |buf, &i| {
                    row(i, &mut buf[..dim]);
                    let mut n2 = 0.0f32;
                    for b in buf[..dim].iter_mut() {
                        *b *= inv;
                        n2 += *b * *b;
                    }
                    buf[dim] = (1.0 - n2).max(0.0).sqrt();
                    graph.add(i as u64, buf.as_slice())
                },
            )
            .map_err(|e| err("add", e))?;
        Ok(graph)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn params(&self) -> &AnnParams {
        &self.params
    }

    /// Changes the search width (benchmarks sweep it on built graphs).
    pub fn set_ef_search(&mut self, ef: usize) {
        self.params.ef_search = ef;
        for r in &self.ranges {
            if let Some(g) = &r.graph {
                g.change_expansion_search(ef);
            }
        }
    }

    /// Norm ranges, and how many of them have a graph (the others are scanned).
    pub fn ranges(&self) -> (usize, usize) {
        let graphs = self.ranges.iter().filter(|r| r.graph.is_some()).count();
        (self.ranges.len(), graphs)
    }

    pub fn build_seconds(&self) -> f64 {
        self.build_seconds
    }

    /// Bytes the graphs hold (links and stored vectors, allocated from USearch's arenas,
    /// not the arenas' reserve), plus the range row lists.
    pub fn memory_bytes(&self) -> usize {
        self.ranges
            .iter()
            .map(|r| {
                r.rows.len() * 4
                    + r.graph.as_ref().map_or(0, |g| {
                        let m = g.memory_stats();
                        m.graph_allocated + m.vectors_allocated
                    })
            })
            .sum()
    }

    /// The best `k` rows of `items` by inner product with `query`, skipping rows for
    /// which `excluded` is true, best first, scored exactly. `items` must be the matrix
    /// the index was built on. Each range's graph is asked for `ef_search` (at least
    /// `k`) candidates, from the largest norms down, until a range's largest possible
    /// score cannot enter the best `k`. When the graphs found fewer than `k` eligible
    /// rows (heavy filters), an exact scan answers, so fewer than `k` come back only when
    /// fewer than `k` rows are eligible.
    pub fn search(
        &self,
        items: ArrayView2<f32>,
        query: &[f32],
        k: usize,
        excluded: impl Fn(u32) -> bool,
        scratch: &mut Vec<f32>,
    ) -> (Vec<Scored>, SearchPath) {
        let exact = |scratch: &mut Vec<f32>| topk::top_k_dense(items, query, k, &excluded, scratch);
        if items.dim() != (self.rows, self.dim) {
            return (exact(scratch), SearchPath::ExactFallback);
        }
        let Some(flat) = items.as_slice() else {
            return (exact(scratch), SearchPath::ExactFallback);
        };
        let dim = self.dim;
        self.search_with(
            query,
            k,
            &excluded,
            |i| {
                let i = i as usize;
                kernels::dot(&flat[i * dim..(i + 1) * dim], query)
            },
            || exact(scratch),
        )
    }

    /// [`MipsIndex::search`] over vectors held elsewhere: `query` is in the graphs' space
    /// (the form `row` had at build), `score(i)` is row `i`'s exact score (on the rows
    /// as they are now), and `exact()` the exact scan answering when the graphs cannot.
    pub fn search_with(
        &self,
        query: &[f32],
        k: usize,
        excluded: impl Fn(u32) -> bool,
        score: impl Fn(u32) -> f32,
        exact: impl FnOnce() -> Vec<Scored>,
    ) -> (Vec<Scored>, SearchPath) {
        if k == 0 || self.rows == 0 {
            return (Vec::new(), SearchPath::Graph);
        }
        let exact = || (exact(), SearchPath::ExactFallback);
        let qn = kernels::norm2(query).sqrt();
        // A zero query ranks every item equal: the exact scan's order (lowest rows
        // first) is the deterministic answer.
        if query.len() != self.dim || qn == 0.0 || !qn.is_finite() {
            return exact();
        }
        let mut q: Vec<f32> = query.iter().map(|v| v / qn).collect();
        q.push(0.0);
        let mut top = TopK::new(k);
        let mut seen = 0usize;
        for r in &self.ranges {
            if let Some(t) = top.threshold() {
                if t >= r.max_norm * qn {
                    break;
                }
            }
            match &r.graph {
                None => {
                    for &i in &r.rows {
                        if !excluded(i) {
                            top.push(i, score(i));
                            seen += 1;
                        }
                    }
                }
                Some(g) => {
                    let eligible = |key: u64| (key as usize) < self.rows && !excluded(key as u32);
                    let want = k.max(self.params.ef_search).min(r.rows.len());
                    let Ok(found) = g.search(&q, want) else {
                        return exact();
                    };
                    let mut keys: Vec<u64> = found
                        .keys
                        .iter()
                        .copied()
                        .filter(|&key| eligible(key))
                        .collect();
                    // Most of the nearest excluded (a user's seen items are usually their
                    // best-scoring ones): walk the graph again keeping only eligible
                    // items, so this range still yields its best k eligible ones.
                    if keys.len() < k && found.keys.len() == want && want < r.rows.len() {
                        match g.filtered_search(&q, k, eligible) {
                            Ok(m) if m.keys.len() > keys.len() => keys = m.keys,
                            Ok(_) => {}
                            Err(_) => return exact(),
                        }
                    }
                    for key in keys {
                        let i = key as u32;
                        top.push(i, score(i));
                        seen += 1;
                    }
                }
            }
        }
        if seen < k {
            return exact();
        }
        (top.into_sorted(), SearchPath::Graph)
    }
}

/// Recall@k of approximate answers against exact ones: the share of exact top-k items
/// the approximate top-k holds, averaged over queries.
pub fn recall(exact: &[Vec<Scored>], approx: &[Vec<Scored>]) -> f64 {
    let mut sum = 0.0;
    let mut n = 0usize;
    for (e, a) in exact.iter().zip(approx) {
        if e.is_empty() {
            continue;
        }
        let hit = e
            .iter()
            .filter(|x| a.iter().any(|y| y.item == x.item))
            .count();
        sum += hit as f64 / e.len() as f64;
        n += 1;
    }
    if n == 0 {
        1.0
    } else {
        sum / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};

    /// Item vectors with cluster structure and varied norms, like trained factors.
    fn factors(rows: usize, dim: usize, seed: u64) -> Array2<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..20)
            .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        Array2::from_shape_fn((rows, dim), |(i, j)| {
            let c = &centres[i % centres.len()];
            let scale = 0.3 + (i % 7) as f32 * 0.2;
            scale * (c[j] + 0.5 * (((i * 31 + j * 17) as f32).sin()))
        })
    }

    #[test]
    fn recall_at_100_against_exact_search_is_high() {
        let items = factors(5_000, 32, 1);
        let index = MipsIndex::build(items.view(), &AnnParams::default()).unwrap();
        let queries = factors(200, 32, 2);
        let mut s = Vec::new();
        let mut exact = Vec::new();
        let mut approx = Vec::new();
        for q in queries.rows() {
            let q = q.to_vec();
            exact.push(topk::top_k_dense(items.view(), &q, 100, |_| false, &mut s));
            approx.push(index.search(items.view(), &q, 100, |_| false, &mut s).0);
        }
        let r = recall(&exact, &approx);
        assert!(r >= 0.95, "recall@100 {r}");
        // Scores are exact inner products.
        let a = &approx[0][0];
        let want: f32 = items
            .row(a.item as usize)
            .iter()
            .zip(queries.row(0))
            .map(|(x, y)| x * y)
            .sum();
        assert!((a.score - want).abs() < 1e-4);
    }

    #[test]
    fn exclusions_hold_and_k_eligible_items_always_come_back() {
        let items = factors(2_000, 16, 3);
        let index = MipsIndex::build(items.view(), &AnnParams::default()).unwrap();
        let q = factors(1, 16, 4).row(0).to_vec();
        let mut s = Vec::new();
        // Most items excluded: only every 97th is eligible (21 items).
        let (top, _) = index.search(items.view(), &q, 10, |i| i % 97 != 0, &mut s);
        assert_eq!(top.len(), 10);
        assert!(top.iter().all(|x| x.item % 97 == 0));
        // Fewer eligible than asked: every eligible item, no more.
        let (top, _) = index.search(items.view(), &q, 50, |i| i % 97 != 0, &mut s);
        assert_eq!(top.len(), 21);
        // Ordered best first, no duplicates.
        assert!(top.windows(2).all(|w| w[0].score >= w[1].score));
        let mut ids: Vec<u32> = top.iter().map(|x| x.item).collect();
        ids.dedup();
        assert_eq!(ids.len(), 21);
        // Nothing eligible.
        assert!(index
            .search(items.view(), &q, 5, |_| true, &mut s)
            .0
            .is_empty());
        // A zero query answers exactly (every score 0, lowest ids first).
        let (top, path) = index.search(items.view(), &[0.0; 16], 3, |_| false, &mut s);
        assert_eq!(path, SearchPath::ExactFallback);
        assert_eq!(
            top.iter().map(|x| x.item).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn the_best_items_excluded_still_leave_the_best_eligible_ones() {
        // As serving excludes a user's seen items, which are usually their best scored.
        let items = factors(20_000, 32, 5);
        let index = MipsIndex::build(items.view(), &AnnParams::default()).unwrap();
        assert!(index.ranges().1 >= 1, "{:?}", index.ranges());
        let queries = factors(50, 32, 6);
        let mut s = Vec::new();
        let (mut exact, mut approx) = (Vec::new(), Vec::new());
        for q in queries.rows() {
            let q = q.to_vec();
            let best: std::collections::HashSet<u32> =
                topk::top_k_dense(items.view(), &q, 300, |_| false, &mut s)
                    .iter()
                    .map(|x| x.item)
                    .collect();
            let ex = |i: u32| best.contains(&i);
            exact.push(topk::top_k_dense(items.view(), &q, 100, ex, &mut s));
            let (a, _) = index.search(items.view(), &q, 100, ex, &mut s);
            assert!(a.iter().all(|x| !best.contains(&x.item)));
            assert_eq!(a.len(), 100);
            approx.push(a);
        }
        let r = recall(&exact, &approx);
        assert!(r >= 0.95, "recall@100 with the best 300 excluded: {r}");
    }

    #[test]
    fn tiny_and_empty_matrices_work() {
        let empty = Array2::<f32>::zeros((0, 4));
        let index = MipsIndex::build(empty.view(), &AnnParams::default()).unwrap();
        let mut s = Vec::new();
        assert!(index
            .search(empty.view(), &[1.0; 4], 3, |_| false, &mut s)
            .0
            .is_empty());
        let one = Array2::from_shape_vec((1, 2), vec![1.0, 2.0]).unwrap();
        let index = MipsIndex::build(one.view(), &AnnParams::default()).unwrap();
        let (top, _) = index.search(one.view(), &[1.0, 1.0], 3, |_| false, &mut s);
        assert_eq!(top.len(), 1);
        assert!((top[0].score - 3.0).abs() < 1e-6);
        assert!(AnnParams::default().validate().is_ok());
        assert!(AnnParams {
            m: 1,
            ..AnnParams::default()
        }
        .validate()
        .is_err());
    }
}
