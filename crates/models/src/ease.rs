//! EASE (Steck, "Embarrassingly Shallow Autoencoders", 2019): a closed-form item-item
//! model. With `X` the users x items weight matrix and `P = (XᵀX + λI)⁻¹`, the item-item
//! matrix is `B = I - P · diag(1 / diag(P))` with its diagonal set to zero; a user's
//! scores are their weighted item row times `B`. Nothing is folded in: a new event
//! changes the user's row, and with it the next answer, at once.
//!
//! The fit is dense over at most `max_items` items (the most interacted ones; the Gram
//! matrix, its Cholesky factor and the inverse are `max_items²` f32 each, see
//! [`EaseParams::fit_bytes`]). What is kept for scoring is each item's `neighbours`
//! weights largest in magnitude (a sparse row per item), so serving memory grows with
//! items x neighbours, not items². Items outside the fitted set neither score nor
//! contribute (the other branches cover the long tail).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt;
use faer::{Mat, Par};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::sparse::Csr;
use crate::topk::{Scored, TopK};

/// Hyper-parameters of the item-item branch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EaseParams {
    /// L2 regularisation added to the Gram matrix's diagonal.
    pub lambda: f32,
    /// Items fitted at most (the most interacted ones).
    pub max_items: usize,
    /// Weights kept per item for scoring (the largest in magnitude).
    pub neighbours: usize,
    /// Items beyond `max_items` (the tail): each is regressed on the fitted items and
    /// keeps this many incoming weights, so it can be recommended (0: the tail is never
    /// scored).
    pub tail_neighbours: usize,
}

impl Default for EaseParams {
    fn default() -> Self {
        EaseParams {
            lambda: 300.0,
            max_items: 10_000,
            neighbours: 500,
            tail_neighbours: 20,
        }
    }
}

impl EaseParams {
    /// Peak bytes of the dense fit over `items` items: the Gram matrix (then its Cholesky
    /// factor in place), the inverse and the inverse's scratch, f32 each.
    pub fn fit_bytes(items: usize) -> usize {
        3 * items * items * std::mem::size_of::<f32>()
    }

    fn check(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda > 0.0) {
            return Err(ModelError::param(
                "ease.lambda",
                "must be a finite number > 0",
            ));
        }
        if self.max_items == 0 {
            return Err(ModelError::param("ease.max_items", "must be >= 1"));
        }
        if self.neighbours == 0 {
            return Err(ModelError::param("ease.neighbours", "must be >= 1"));
        }
        Ok(())
    }
}

/// A fitted item-item model: per item (by the training matrix's column index), its kept
/// neighbours and weights, largest magnitude first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EaseModel {
    pub params: EaseParams,
    /// `rows.indptr[i]..rows.indptr[i + 1]`: item `i`'s neighbours (`indices`) and the
    /// weight each gets from `i` (`data`). Items outside the fitted set have none.
    pub rows: Csr,
    /// Items the dense fit covered.
    pub fitted_items: usize,
    /// Items beyond the fitted ones that got incoming weights (the tail).
    pub tail_items: usize,
}

/// Fits EASE on `x` (users x items weights, as ALS trains on).
pub fn fit(x: &Csr, params: &EaseParams) -> Result<EaseModel> {
    params.check()?;
    let n_items = x.cols;
    // The fitted items: the `max_items` most interacted, in index order.
    let mut counts = vec![0u32; n_items];
    for &i in &x.indices {
        counts[i as usize] += 1;
    }
    let mut by_count: Vec<u32> = (0..n_items as u32)
        .filter(|&i| counts[i as usize] > 0)
        .collect();
    by_count.sort_by_key(|&i| (std::cmp::Reverse(counts[i as usize]), i));
    by_count.truncate(params.max_items);
    by_count.sort_unstable();
    let fitted = by_count;
    let m = fitted.len();
    if m == 0 {
        return Ok(EaseModel {
            params: params.clone(),
            rows: Csr {
                rows: n_items,
                cols: n_items,
                indptr: vec![0; n_items + 1],
                ..Default::default()
            },
            fitted_items: 0,
            tail_items: 0,
        });
    }
    let mut slot = vec![u32::MAX; n_items];
    for (s, &i) in fitted.iter().enumerate() {
        slot[i as usize] = s as u32;
    }
    let par = Par::rayon(0);
    // Gram matrix over the fitted items (its lower triangle, all the factorisation
    // reads), from each user's pairs of items: the work is the sum of the users' squared
    // item counts, not users x items².
    let mut g = Mat::<f32>::zeros(m, m);
    let mut row: Vec<(usize, f32)> = Vec::new();
    for u in 0..x.rows {
        row.clear();
        for p in x.indptr[u]..x.indptr[u + 1] {
            let s = slot[x.indices[p] as usize];
            if s != u32::MAX {
                row.push((s as usize, x.data[p]));
            }
        }
        for (a, &(i, wi)) in row.iter().enumerate() {
            for &(j, wj) in &row[..=a] {
                let (hi, lo) = if i >= j { (i, j) } else { (j, i) };
                g[(hi, lo)] += wi * wj;
            }
        }
    }
    for i in 0..m {
        g[(i, i)] += params.lambda;
    }
    let mut mem = MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f32>(
        m,
        par,
        Default::default(),
    ));
    llt::factor::cholesky_in_place(
        g.as_mut(),
        Default::default(),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| ModelError::Empty(format!("the Gram matrix is not positive definite: {e:?}")))?;
    drop(mem);
    let mut p = Mat::<f32>::zeros(m, m);
    {
        let mut mem = MemBuffer::new(llt::inverse::inverse_scratch::<f32>(m, par));
        // Fills the lower triangle of the (symmetric) inverse.
        llt::inverse::inverse(p.as_mut(), g.as_ref(), par, MemStack::new(&mut mem));
    }
    drop(g);
    let at = |i: usize, j: usize| if i >= j { p[(i, j)] } else { p[(j, i)] };
    let diag: Vec<f32> = (0..m).map(|j| p[(j, j)]).collect();
    // Row i of B: B[i][j] = -P[i][j] / P[j][j] (j != i); its weights largest in
    // magnitude (negative ones too: they push items down).
    let keep = params.neighbours.min(m.saturating_sub(1)).max(1);
    let weight = |i: usize, j: usize| -at(i, j) / diag[j];
    let kept: Vec<Vec<(u32, f32)>> = (0..m)
        .into_par_iter()
        .map(|i| {
            let w = |j: usize| if j == i { 0.0 } else { weight(i, j) };
            largest_weights(m, keep, &w)
                .into_iter()
                .map(|(j, v)| (fitted[j as usize], v))
                .collect()
        })
        .collect();
    let (extra, tail_items) = tail_weights(
        x,
        &slot,
        &counts,
        &mut p,
        params.tail_neighbours,
        (m / 16).max(1),
    );
    drop(p);
    let mut indptr = Vec::with_capacity(n_items + 1);
    let mut indices = Vec::new();
    let mut data = Vec::new();
    indptr.push(0);
    for &s in &slot {
        if s != u32::MAX {
            for &(j, w) in kept[s as usize].iter().chain(&extra[s as usize]) {
                indices.push(j);
                data.push(w);
            }
        }
        indptr.push(indices.len());
    }
    Ok(EaseModel {
        params: params.clone(),
        rows: Csr {
            rows: n_items,
            cols: n_items,
            indptr,
            indices,
            data,
        },
        fitted_items: m,
        tail_items,
    })
}

/// The `keep` weights largest in magnitude among `w(0..m)` (zero and non-finite ones
/// never), as (index, weight), largest first: what a row or a tail column keeps.
fn largest_weights(m: usize, keep: usize, w: &dyn Fn(usize) -> f32) -> Vec<(u32, f32)> {
    let mut top = TopK::new(keep);
    for i in 0..m {
        let v = w(i);
        if v != 0.0 && v.is_finite() {
            top.push(i as u32, v.abs());
        }
    }
    top.into_sorted()
        .into_iter()
        .map(|s| (s.item, w(s.item as usize)))
        .collect()
}

/// The tail: items with interactions outside the fitted set. Item `j` of the tail is
/// regressed on the fitted items with the same ridge (`b_j = P Xfᵀ x_j`, `P` the fitted
/// inverse, made symmetric here), which is what EASE's column for `j` would be were `j`
/// left out of the inputs. Its `keep` weights largest in magnitude go into the rows of
/// those fitted items. A tail item co-occurring with fewer than `sparse_below` fitted
/// items takes one column of `P` per co-occurring item; the others go through dense GEMMs
/// over blocks of tail items (`m x m` times `m x block`). Returns, per fitted slot, the
/// (tail item, weight) pairs it gains, and the number of tail items.
fn tail_weights(
    x: &Csr,
    slot: &[u32],
    counts: &[u32],
    p: &mut Mat<f32>,
    keep: usize,
    sparse_below: usize,
) -> (Vec<Vec<(u32, f32)>>, usize) {
    let m = p.nrows();
    let mut extra: Vec<Vec<(u32, f32)>> = vec![Vec::new(); m];
    let tail: Vec<u32> = (0..slot.len() as u32)
        .filter(|&i| counts[i as usize] > 0 && slot[i as usize] == u32::MAX)
        .collect();
    if keep == 0 || tail.is_empty() {
        return (extra, 0);
    }
    // The inverse's upper triangle from its lower one.
    for j in 0..m {
        for i in 0..j {
            p[(i, j)] = p[(j, i)];
        }
    }
    let mut pos = vec![u32::MAX; slot.len()];
    for (t, &j) in tail.iter().enumerate() {
        pos[j as usize] = t as u32;
    }
    // Each tail item's users and weights.
    let mut cols: Vec<Vec<(u32, f32)>> = vec![Vec::new(); tail.len()];
    for u in 0..x.rows {
        for q in x.indptr[u]..x.indptr[u + 1] {
            let t = pos[x.indices[q] as usize];
            if t != u32::MAX {
                cols[t as usize].push((u as u32, x.data[q]));
            }
        }
    }
    // Xfᵀ x_j of one tail item, sparse: (fitted slot, value).
    let gram_col = |col: &[(u32, f32)], acc: &mut Vec<f32>, marked: &mut Vec<usize>| {
        marked.clear();
        for &(u, wj) in col {
            let u = u as usize;
            for q in x.indptr[u]..x.indptr[u + 1] {
                let s = slot[x.indices[q] as usize];
                let v = wj * x.data[q];
                if s != u32::MAX && v != 0.0 {
                    let s = s as usize;
                    if acc[s] == 0.0 {
                        marked.push(s);
                    }
                    acc[s] += v;
                }
            }
        }
        let g: Vec<(usize, f32)> = marked.iter().map(|&s| (s, acc[s])).collect();
        for &s in marked.iter() {
            acc[s] = 0.0;
        }
        g
    };
    let best = |b: &dyn Fn(usize) -> f32| largest_weights(m, keep, b);
    // A tail item that co-occurs with few fitted items: `b = Σ_k P[:, k] g_k` (one
    // contiguous column per co-occurring item). One that co-occurs with many: batched
    // into a dense GEMM with the others (`P x G`, 1,024 columns at a time).
    const BLOCK: usize = 1024;
    let p = &*p;
    let mut lists: Vec<Vec<(u32, f32)>> = vec![Vec::new(); tail.len()];
    let mut dense: Vec<(usize, Vec<(usize, f32)>)> = Vec::new();
    for chunk in (0..tail.len()).collect::<Vec<_>>().chunks(BLOCK * 4) {
        let gs: Vec<(usize, Vec<(usize, f32)>)> = chunk
            .par_iter()
            .map_init(
                || (vec![0f32; m], Vec::new()),
                |(acc, marked), &t| (t, gram_col(&cols[t], acc, marked)),
            )
            .collect();
        let sparse: Vec<(usize, Vec<(u32, f32)>)> = gs
            .par_iter()
            .filter(|(_, g)| g.len() < sparse_below)
            .map_init(
                || vec![0f32; m],
                |b, (t, g)| {
                    b.fill(0.0);
                    for &(k, gk) in g {
                        let col = p.col(k);
                        for (bi, pk) in b.iter_mut().zip(col.iter()) {
                            *bi += pk * gk;
                        }
                    }
                    (*t, best(&|i| b[i]))
                },
            )
            .collect();
        for (t, l) in sparse {
            lists[t] = l;
        }
        dense.extend(gs.into_iter().filter(|(_, g)| g.len() >= sparse_below));
        while dense.len() >= BLOCK {
            let block: Vec<_> = dense.drain(..BLOCK).collect();
            for (t, l) in gemm_block(p, &block, &best) {
                lists[t] = l;
            }
        }
    }
    if !dense.is_empty() {
        for (t, l) in gemm_block(p, &dense, &best) {
            lists[t] = l;
        }
    }
    for (t, list) in lists.into_iter().enumerate() {
        for (s, w) in list {
            extra[s as usize].push((tail[t], w));
        }
    }
    (extra, tail.len())
}

/// `P x G` for a block of tail items' dense Gram columns; each column's best weights.
#[allow(clippy::type_complexity)]
fn gemm_block(
    p: &Mat<f32>,
    block: &[(usize, Vec<(usize, f32)>)],
    best: &(dyn Fn(&dyn Fn(usize) -> f32) -> Vec<(u32, f32)> + Sync),
) -> Vec<(usize, Vec<(u32, f32)>)> {
    let mut g = Mat::<f32>::zeros(p.nrows(), block.len());
    for (c, (_, col)) in block.iter().enumerate() {
        for &(k, v) in col {
            g[(k, c)] = v;
        }
    }
    let r = p.as_ref() * g.as_ref();
    drop(g);
    block
        .par_iter()
        .enumerate()
        .map(|(c, (t, _))| (*t, best(&|i| r[(i, c)])))
        .collect()
}

impl EaseModel {
    /// Checks a model read from elsewhere (a snapshot) against `items`, the size of the
    /// catalogue it scores: shapes, monotone row pointers, column indices in range and
    /// finite weights, so scoring can never index out of bounds.
    pub fn check(&self, items: usize) -> std::result::Result<(), String> {
        let r = &self.rows;
        if r.rows != items || r.cols != items || r.indptr.len() != items + 1 {
            return Err(format!(
                "item-item rows are {} x {} with {} row pointers; the model has {items} items",
                r.rows,
                r.cols,
                r.indptr.len()
            ));
        }
        if r.indptr.first() != Some(&0)
            || r.indptr.windows(2).any(|w| w[0] > w[1])
            || r.indptr.last() != Some(&r.indices.len())
            || r.indices.len() != r.data.len()
        {
            return Err("item-item row pointers are inconsistent".into());
        }
        if r.indices.iter().any(|&j| j as usize >= items) {
            return Err("item-item rows name an item out of range".into());
        }
        if !r.data.iter().all(|x| x.is_finite()) {
            return Err("item-item rows with non-finite weights".into());
        }
        Ok(())
    }

    /// Bytes the kept rows take.
    pub fn memory_bytes(&self) -> usize {
        self.rows.indptr.len() * std::mem::size_of::<usize>()
            + self.rows.indices.len() * std::mem::size_of::<u32>()
            + self.rows.data.len() * std::mem::size_of::<f32>()
    }

    /// Adds the scores of a user whose items and weights are `items` into `scores`
    /// (one slot per item of the model; items unknown to it are skipped).
    pub fn score_into(&self, items: &[(u32, f32)], scores: &mut [f32]) {
        let r = &self.rows;
        for &(i, w) in items {
            let i = i as usize;
            if i + 1 >= r.indptr.len() {
                continue;
            }
            for p in r.indptr[i]..r.indptr[i + 1] {
                if let Some(s) = scores.get_mut(r.indices[p] as usize) {
                    *s += w * r.data[p];
                }
            }
        }
    }

    /// The user's best `k` items by score (only items with a positive score; an item
    /// `excluded` says yes to never comes back).
    pub fn top_k(
        &self,
        items: &[(u32, f32)],
        k: usize,
        excluded: impl Fn(u32) -> bool,
    ) -> Vec<Scored> {
        let mut scores = vec![0f32; self.rows.rows];
        self.score_into(items, &mut scores);
        let mut top = TopK::new(k);
        for (j, &s) in scores.iter().enumerate() {
            if s > 0.0 && !excluded(j as u32) {
                top.push(j as u32, s);
            }
        }
        top.into_sorted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Users in two groups that each take the items of their group (0-9, 10-19); the
    /// model points from an item to the others of its group.
    fn grouped() -> Csr {
        let mut t = Vec::new();
        for u in 0..200u32 {
            let base = if u % 2 == 0 { 0 } else { 10 };
            for k in 0..5u32 {
                t.push((u, base + (u / 2 + k * 3) % 10, 1.0));
            }
        }
        Csr::from_triples(200, 20, &t)
    }

    #[test]
    fn recommends_within_the_users_group() {
        let m = fit(
            &grouped(),
            &EaseParams {
                lambda: 10.0,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(m.fitted_items, 20);
        let user = [(1u32, 1.0f32), (2, 1.0)];
        let top = m.top_k(&user, 5, |i| i == 1 || i == 2);
        assert_eq!(top.len(), 5);
        assert!(top.iter().all(|s| s.item < 10), "{top:?}");
        let other = m.top_k(&[(15, 1.0)], 3, |i| i == 15);
        assert!(
            other.iter().all(|s| (10..20).contains(&s.item)),
            "{other:?}"
        );
    }

    /// Against the closed form computed naively in f64 on a small matrix.
    #[test]
    fn matches_the_closed_form() {
        let x = grouped();
        let lambda = 5.0f64;
        let n = x.cols;
        let mut g = vec![vec![0f64; n]; n];
        for u in 0..x.rows {
            let row: Vec<(usize, f64)> = (x.indptr[u]..x.indptr[u + 1])
                .map(|p| (x.indices[p] as usize, x.data[p] as f64))
                .collect();
            for &(i, a) in &row {
                for &(j, b) in &row {
                    g[i][j] += a * b;
                }
            }
        }
        for (i, r) in g.iter_mut().enumerate() {
            r[i] += lambda;
        }
        // Gauss-Jordan inverse.
        let mut a = g.clone();
        let mut inv: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
            .collect();
        for c in 0..n {
            let piv = a[c][c];
            for j in 0..n {
                a[c][j] /= piv;
                inv[c][j] /= piv;
            }
            for r in 0..n {
                if r != c {
                    let f = a[r][c];
                    for j in 0..n {
                        a[r][j] -= f * a[c][j];
                        inv[r][j] -= f * inv[c][j];
                    }
                }
            }
        }
        let m = fit(
            &x,
            &EaseParams {
                lambda: lambda as f32,
                max_items: 100,
                neighbours: 100,
                tail_neighbours: 0,
            },
        )
        .unwrap();
        for i in 0..n {
            for p in m.rows.indptr[i]..m.rows.indptr[i + 1] {
                let j = m.rows.indices[p] as usize;
                let want = -inv[i][j] / inv[j][j];
                assert!(
                    (m.rows.data[p] as f64 - want).abs() < 1e-4,
                    "B[{i}][{j}] = {} want {want}",
                    m.rows.data[p]
                );
            }
            // Every weight is kept (neighbours >= items).
            let nonzero = (0..n).filter(|&j| j != i && inv[i][j].abs() > 1e-9).count();
            assert!(
                m.rows.indptr[i + 1] - m.rows.indptr[i] >= nonzero,
                "row {i}"
            );
        }
    }

    #[test]
    fn keeps_the_most_interacted_items_and_the_given_neighbours() {
        let m = fit(
            &grouped(),
            &EaseParams {
                lambda: 10.0,
                max_items: 10,
                neighbours: 3,
                tail_neighbours: 0,
            },
        )
        .unwrap();
        assert_eq!((m.fitted_items, m.tail_items), (10, 0));
        let rows_with = (0..20)
            .filter(|&i| m.rows.indptr[i + 1] > m.rows.indptr[i])
            .count();
        assert!(rows_with <= 10);
        assert!((0..20).all(|i| m.rows.indptr[i + 1] - m.rows.indptr[i] <= 3));
        assert!(fit(
            &grouped(),
            &EaseParams {
                lambda: 0.0,
                ..Default::default()
            }
        )
        .is_err());
        let empty = fit(&Csr::from_triples(3, 4, &[]), &EaseParams::default()).unwrap();
        assert!(empty.top_k(&[(1, 1.0)], 5, |_| false).is_empty());
    }

    /// Items beyond `max_items` are reached through the tail regression: with only the
    /// 10 most interacted items fitted, a user of group 0 is shown tail items of group 0
    /// and never of group 1, and each tail item keeps at most `tail_neighbours` weights.
    #[test]
    fn tail_items_are_recommended_from_the_fitted_ones() {
        // Group 0: items 0-9 (often) and 20-29 (rarely); group 1: 10-19 and 30-39.
        let mut t = Vec::new();
        for u in 0..200u32 {
            let g = u % 2;
            for k in 0..5u32 {
                t.push((u, g * 10 + (u / 2 + k * 3) % 10, 1.0));
            }
            if u % 4 < 2 {
                t.push((u, 20 + g * 10 + (u / 4) % 10, 1.0));
            }
        }
        let x = Csr::from_triples(200, 40, &t);
        let p = EaseParams {
            lambda: 10.0,
            max_items: 20,
            neighbours: 20,
            tail_neighbours: 4,
        };
        let m = fit(&x, &p).unwrap();
        assert_eq!((m.fitted_items, m.tail_items), (20, 20));
        // Each tail item appears in at most 4 rows.
        for j in 20..40u32 {
            assert!(m.rows.indices.iter().filter(|&&i| i == j).count() <= 4);
        }
        let top = m.top_k(&[(1, 1.0), (2, 1.0), (4, 1.0)], 40, |i| i < 20);
        assert!(!top.is_empty());
        assert!(top.iter().all(|s| (20..30).contains(&s.item)), "{top:?}");
        // The per-column path and the GEMM path give the same weights.
        let slot: Vec<u32> = (0..40u32)
            .map(|i| if i < 20 { i } else { u32::MAX })
            .collect();
        let mut counts = vec![0u32; 40];
        for &i in &x.indices {
            counts[i as usize] += 1;
        }
        let mut g = Mat::<f32>::zeros(20, 20);
        for u in 0..x.rows {
            for a in x.indptr[u]..x.indptr[u + 1] {
                for b in x.indptr[u]..x.indptr[u + 1] {
                    let (i, j) = (x.indices[a] as usize, x.indices[b] as usize);
                    if i < 20 && j < 20 {
                        g[(i, j)] += x.data[a] * x.data[b];
                    }
                }
            }
        }
        let mut inv = Mat::<f32>::zeros(20, 20);
        for i in 0..20 {
            g[(i, i)] += 10.0;
        }
        // Lower triangle of the inverse, as the fit leaves it (Gauss-Jordan in f64).
        let mut a: Vec<Vec<f64>> = (0..20)
            .map(|i| (0..20).map(|j| g[(i, j)] as f64).collect())
            .collect();
        let mut e: Vec<Vec<f64>> = (0..20)
            .map(|i| (0..20).map(|j| f64::from(u8::from(i == j))).collect())
            .collect();
        for c in 0..20 {
            let piv = a[c][c];
            for j in 0..20 {
                a[c][j] /= piv;
                e[c][j] /= piv;
            }
            for r in 0..20 {
                if r != c {
                    let f = a[r][c];
                    for j in 0..20 {
                        a[r][j] -= f * a[c][j];
                        e[r][j] -= f * e[c][j];
                    }
                }
            }
        }
        for i in 0..20 {
            for j in 0..=i {
                inv[(i, j)] = e[i][j] as f32;
            }
        }
        let (by_column, n1) = tail_weights(&x, &slot, &counts, &mut inv.clone(), 4, usize::MAX);
        let (by_gemm, n2) = tail_weights(&x, &slot, &counts, &mut inv.clone(), 4, 0);
        assert_eq!((n1, n2), (20, 20));
        for (a, b) in by_column.iter().zip(&by_gemm) {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert_eq!(x.0, y.0);
                assert!((x.1 - y.1).abs() < 1e-5, "{x:?} {y:?}");
            }
        }
        assert!(by_column.iter().map(Vec::len).sum::<usize>() > 0);
        // Off: no tail item is ever scored.
        let off = fit(
            &x,
            &EaseParams {
                tail_neighbours: 0,
                ..p
            },
        )
        .unwrap();
        assert!(off.rows.indices.iter().all(|&i| i < 20));
    }
}
