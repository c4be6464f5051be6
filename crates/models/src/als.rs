//! Implicit-feedback matrix factorisation (Hu, Koren, Volinsky 2008) trained by
//! alternating least squares with a few conjugate-gradient steps per row (Takács et al.),
//! plus the real-time fold-in of one user against fixed item factors.
//!
//! Input is a CSR matrix of interaction weights `w >= 0` (users x items). The confidence
//! of an observed pair is `c = 1 + alpha * w` and its preference is 1; unobserved pairs have
//! confidence 1 and preference 0. Each half-step minimises, for every row `u`,
//! `sum_i c_ui (p_ui - x_u . y_i)^2 + lambda_u |x_u|^2` with the other side fixed, where
//! `lambda_u = reg` or, with [`RegScaling::Count`] (ALS-WR), `reg * n_u`.
//! The work per row touches only its non-zeros plus one `k x k` Gram matrix `YtY`, so
//! nothing dense of size users x items is ever built.

use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::kernels::{Portable, Vector};
use crate::sparse::Csr;

/// How the regularisation of a row scales with its number of interactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegScaling {
    /// Same `reg` for every row (the classic formulation, as in `implicit`).
    None,
    /// `reg * n` where `n` is the row's number of interactions (ALS-WR, as in Spark).
    Count,
}

/// ALS hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlsParams {
    pub factors: usize,
    pub iterations: usize,
    pub reg: f32,
    pub alpha: f32,
    pub reg_scaling: RegScaling,
    /// Conjugate-gradient steps per row and half-iteration (warm-started).
    pub cg_steps: usize,
    pub seed: u64,
}

impl Default for AlsParams {
    fn default() -> Self {
        AlsParams {
            factors: 64,
            iterations: 15,
            reg: 0.05,
            alpha: 1.0,
            reg_scaling: RegScaling::Count,
            cg_steps: 3,
            seed: 42,
        }
    }
}

impl AlsParams {
    /// Rejects parameters that cannot train.
    pub fn validate(&self) -> Result<()> {
        if self.factors == 0 || self.factors > 1024 {
            return Err(ModelError::param("factors", "must be in 1..=1024"));
        }
        if !(self.reg >= 0.0 && self.reg.is_finite()) {
            return Err(ModelError::param("reg", "must be a finite number >= 0"));
        }
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return Err(ModelError::param("alpha", "must be a finite number >= 0"));
        }
        if self.cg_steps == 0 {
            return Err(ModelError::param("cg_steps", "must be >= 1"));
        }
        Ok(())
    }

    fn row_reg(&self, n: usize) -> f32 {
        match self.reg_scaling {
            RegScaling::None => self.reg,
            RegScaling::Count => self.reg * n.max(1) as f32,
        }
    }
}

/// A trained model: one row of factors per user and per item.
#[derive(Debug, Clone)]
pub struct AlsModel {
    pub params: AlsParams,
    pub user_factors: Array2<f32>,
    pub item_factors: Array2<f32>,
}

/// Gram matrix `Y^T Y` of a factor matrix (k x k).
pub fn gram(factors: ArrayView2<f32>) -> Array2<f32> {
    factors.t().dot(&factors)
}

fn random_factors(rows: usize, k: usize, rng: &mut rand::rngs::StdRng) -> Array2<f32> {
    // Small positive values, as is usual for implicit ALS: every dot product starts near 0.
    Array2::from_shape_simple_fn((rows, k), || rng.random::<f32>() * 0.01)
}

/// Trains ALS on `weights` (users x items). `on_iteration(iter, loss)` is called after
/// every full iteration (for progress); the loss is computed only when `track_loss` is
/// set (it costs about a half-iteration) and is NaN otherwise. Start vectors come from one generator in row order, so the result
/// depends on how rows were numbered; [`fit_keyed`] removes that dependence.
pub fn fit(
    weights: &Csr,
    params: &AlsParams,
    track_loss: bool,
    on_iteration: impl FnMut(usize, f64),
) -> Result<AlsModel> {
    params.validate()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(params.seed);
    let users = random_factors(weights.rows, params.factors, &mut rng);
    let items = random_factors(weights.cols, params.factors, &mut rng);
    fit_from(weights, params, users, items, track_loss, on_iteration)
}

/// A stable key of a user or item id for [`fit_keyed`].
pub fn row_key(id: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = rustc_hash::FxHasher::default();
    h.write(id.as_bytes());
    h.finish()
}

/// Start vectors drawn per row from a generator seeded by `seed` and the row's key.
fn keyed_factors(keys: &[u64], k: usize, seed: u64) -> Array2<f32> {
    let mut out = Array2::zeros((keys.len(), k));
    for (mut row, &key) in out.rows_mut().into_iter().zip(keys) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ key);
        row.iter_mut().for_each(|v| *v = rng.random::<f32>() * 0.01);
    }
    out
}

/// As [`fit`], but every row starts from a vector chosen by its key ([`row_key`] of its
/// id): the same data numbered in any order gives the same model up to rounding, so a
/// node (ids numbered as they arrive) and `troupe eval` (ids numbered as read) agree.
pub fn fit_keyed(
    weights: &Csr,
    params: &AlsParams,
    user_keys: &[u64],
    item_keys: &[u64],
) -> Result<AlsModel> {
    params.validate()?;
    if user_keys.len() != weights.rows || item_keys.len() != weights.cols {
        return Err(ModelError::param(
            "keys",
            format!(
                "{} user and {} item keys for a {} x {} matrix",
                user_keys.len(),
                item_keys.len(),
                weights.rows,
                weights.cols
            ),
        ));
    }
    let users = keyed_factors(user_keys, params.factors, params.seed);
    let items = keyed_factors(item_keys, params.factors, params.seed.rotate_left(32));
    fit_from(weights, params, users, items, false, |_, _| {})
}

fn fit_from(
    weights: &Csr,
    params: &AlsParams,
    mut users: Array2<f32>,
    mut items: Array2<f32>,
    track_loss: bool,
    mut on_iteration: impl FnMut(usize, f64),
) -> Result<AlsModel> {
    // Store alpha * w = c - 1, which is what the solver needs.
    let cui = weights.map_values(|w| params.alpha * w.max(0.0));
    let ciu = cui.transpose();
    for it in 0..params.iterations {
        solve_side(&mut users, items.view(), &cui, params);
        solve_side(&mut items, users.view(), &ciu, params);
        let l = if track_loss {
            loss(&cui, users.view(), items.view(), params)
        } else {
            f64::NAN
        };
        on_iteration(it, l);
    }
    Ok(AlsModel {
        params: params.clone(),
        user_factors: users,
        item_factors: items,
    })
}

/// One half-step: re-solves every row of `target` against `fixed`, in parallel.
/// `c1` holds `c - 1` per observed pair (rows of `target` x rows of `fixed`).
pub fn solve_side(target: &mut Array2<f32>, fixed: ArrayView2<f32>, c1: &Csr, params: &AlsParams) {
    let k = params.factors;
    let g = gram(fixed);
    let g = g.as_standard_layout();
    let g = g.as_slice().expect("standard layout");
    let fixed = fixed.as_standard_layout();
    let y = fixed.as_slice().expect("standard layout");
    let flat = target
        .as_slice_mut()
        .expect("factor matrices are standard layout");
    flat.par_chunks_mut(k).enumerate().for_each_init(
        || vec![0f32; 3 * k],
        |scratch, (u, x)| {
            let (idx, vals) = c1.row(u);
            if idx.is_empty() {
                x.iter_mut().for_each(|v| *v = 0.0);
                return;
            }
            let row = CgRow {
                g,
                y,
                k,
                idx,
                c1: vals,
                reg: params.row_reg(idx.len()),
                steps: params.cg_steps,
                tol: 1e-20,
            };
            cg_solve(&row, x, scratch);
        },
    );
}

/// One row's conjugate-gradient problem:
/// `(G + reg I + Y^T (C - I) Y) x = Y^T C p` over the row's observed columns.
struct CgRow<'a> {
    /// Gram matrix of the fixed side, row-major k x k.
    g: &'a [f32],
    /// Fixed-side factors, row-major.
    y: &'a [f32],
    k: usize,
    /// Observed columns and their `c - 1`.
    idx: &'a [u32],
    c1: &'a [f32],
    reg: f32,
    steps: usize,
    tol: f32,
}

/// Conjugate gradient on a [`CgRow`], warm-started at `x`. Generic over the vector kernels
/// so the AVX2 instance inlines them.
#[inline(always)]
fn cg_solve_with<V: Vector>(row: &CgRow<'_>, x: &mut [f32], scratch: &mut [f32]) {
    let CgRow {
        g,
        y,
        k,
        idx,
        c1,
        reg,
        steps,
        tol,
    } = *row;
    let (r, rest) = scratch.split_at_mut(k);
    let (p, ap) = rest.split_at_mut(k);
    // r = b - A x
    for i in 0..k {
        r[i] = -V::dot(&g[i * k..(i + 1) * k], x) - reg * x[i];
    }
    for (&j, &c) in idx.iter().zip(c1) {
        let yj = &y[j as usize * k..(j as usize + 1) * k];
        let s = V::dot(yj, x);
        V::axpy((1.0 + c) - c * s, yj, r);
    }
    p.copy_from_slice(r);
    let mut rs_old = V::dot(r, r);
    if rs_old < tol {
        return;
    }
    for _ in 0..steps {
        for i in 0..k {
            ap[i] = V::dot(&g[i * k..(i + 1) * k], p) + reg * p[i];
        }
        for (&j, &c) in idx.iter().zip(c1) {
            let yj = &y[j as usize * k..(j as usize + 1) * k];
            V::axpy(c * V::dot(yj, p), yj, ap);
        }
        let pap = V::dot(p, ap);
        if pap <= 0.0 || !pap.is_finite() {
            break;
        }
        let a = rs_old / pap;
        V::axpy(a, p, x);
        V::axpy(-a, ap, r);
        let rs_new = V::dot(r, r);
        if rs_new < tol {
            break;
        }
        let beta = rs_new / rs_old;
        for i in 0..k {
            p[i] = r[i] + beta * p[i];
        }
        rs_old = rs_new;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn cg_solve_avx2(row: &CgRow<'_>, x: &mut [f32], scratch: &mut [f32]) {
    cg_solve_with::<crate::kernels::avx2::Avx2>(row, x, scratch)
}

/// Conjugate gradient for one row, on the best kernels this CPU has.
fn cg_solve(row: &CgRow<'_>, x: &mut [f32], scratch: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx2() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        #[allow(unsafe_code)]
        return unsafe { cg_solve_avx2(row, x, scratch) };
    }
    cg_solve_with::<Portable>(row, x, scratch)
}

/// The training objective: `sum_{u,i} c_ui (p_ui - x_u.y_i)^2 + sum_u l_u|x_u|^2 + sum_i l_i|y_i|^2`,
/// computed without visiting unobserved pairs. `c1` holds `c - 1` (users x items).
pub fn loss(c1: &Csr, users: ArrayView2<f32>, items: ArrayView2<f32>, params: &AlsParams) -> f64 {
    let g = gram(items);
    let item_counts = {
        let mut n = vec![0usize; items.nrows()];
        for &j in &c1.indices {
            n[j as usize] += 1;
        }
        n
    };
    let user_part: f64 = (0..users.nrows())
        .into_par_iter()
        .map(|u| {
            let x = users.row(u);
            let xs = x
                .as_slice()
                .map(|s| s.to_vec())
                .unwrap_or_else(|| x.to_vec());
            // x^T G x covers every pair as if unobserved (c = 1, p = 0).
            let gx = g.dot(&x);
            let mut total = x.dot(&gx) as f64;
            let (idx, vals) = c1.row(u);
            for (&j, &c) in idx.iter().zip(vals) {
                let yj = items.row(j as usize);
                let s = yj.iter().zip(&xs).map(|(a, b)| a * b).sum::<f32>() as f64;
                // Replace the (0 - s)^2 term by c (1 - s)^2.
                total += (1.0 + c as f64) * (1.0 - s).powi(2) - s * s;
            }
            total
                + params.row_reg(idx.len()) as f64
                    * xs.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
        })
        .sum();
    let item_part: f64 = (0..items.nrows())
        .into_par_iter()
        .map(|i| {
            params.row_reg(item_counts[i]) as f64
                * items
                    .row(i)
                    .iter()
                    .map(|v| (*v as f64).powi(2))
                    .sum::<f64>()
        })
        .sum();
    user_part + item_part
}

/// Precomputed state for real-time fold-in against fixed item factors.
#[derive(Debug, Clone)]
pub struct FoldIn {
    params: AlsParams,
    /// `Y^T Y`, row-major k x k.
    gram: Vec<f32>,
}

impl FoldIn {
    /// Precomputes `YtY` for `item_factors` (do this once per model version).
    pub fn new(item_factors: ArrayView2<f32>, params: &AlsParams) -> Self {
        let g = gram(item_factors);
        FoldIn {
            params: params.clone(),
            gram: g.iter().copied().collect(),
        }
    }

    /// Solves one user's vector exactly (Cholesky) from their interactions
    /// `(item, weight)` against the fixed `item_factors`. Items out of range are ignored.
    /// Returns a zero vector for a user without interactions.
    pub fn solve(&self, item_factors: ArrayView2<f32>, interactions: &[(u32, f32)]) -> Vec<f32> {
        let k = self.params.factors;
        let items = item_factors.as_standard_layout();
        let y = items.as_slice().expect("standard layout");
        let n_items = item_factors.nrows();
        let valid: Vec<(u32, f32)> = interactions
            .iter()
            .copied()
            .filter(|(j, w)| (*j as usize) < n_items && w.is_finite())
            .collect();
        if valid.is_empty() {
            return vec![0.0; k];
        }
        let reg = self.params.row_reg(valid.len());
        let mut a: Vec<f32> = self.gram.clone();
        let mut b = vec![0f32; k];
        for i in 0..k {
            a[i * k + i] += reg;
        }
        accumulate_normal_equations(&mut a, &mut b, y, k, &valid, self.params.alpha);
        solve_spd(&a, &b, k).unwrap_or_else(|| vec![0.0; k])
    }
}

/// The first column of row `i` that kernels touch: rows of an upper triangle are updated
/// from the 8-aligned column at or before the diagonal, so every kernel call runs on whole
/// vectors (for k a multiple of 8). Entries left of the diagonal are scratch: written,
/// never read.
#[inline(always)]
fn aligned(i: usize) -> usize {
    i & !7
}

/// Solves `A x = b` for symmetric positive definite `A`, reading only its upper triangle
/// (row-major n x n, diagonal included): Cholesky `A = U^T U` in f32, one row of `U` at a
/// time (row i is A's row minus one rank-i update by the rows above, held in registers,
/// then scaled), then one step of iterative refinement, so the result is accurate to about
/// f32 precision even for moderately ill-conditioned systems. Every inner loop runs over
/// contiguous rows. Generic over the vector kernels.
#[inline(always)]
fn solve_spd_with<V: Vector>(a: &[f32], b: &[f32], n: usize) -> Option<Vec<f32>> {
    let mut u = a[..n * n].to_vec();
    let minus = vec![-1f32; n];
    for i in 0..n {
        let s = aligned(i);
        let (above, rest) = u.split_at_mut(i * n);
        let row = &mut rest[s..n];
        V::rank_update_row(row, i, s, above, n, &minus[..i]);
        let d = row[i - s];
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let inv = 1.0 / d.sqrt();
        row.iter_mut().for_each(|v| *v *= inv);
    }
    let substitute = |rhs: &[f32]| -> Vec<f32> {
        // U^T z = rhs, column by column of U^T (rows of U, contiguous).
        let mut z = rhs.to_vec();
        for m in 0..n {
            z[m] /= u[m * n + m];
            let zm = z[m];
            V::axpy(-zm, &u[m * n + m + 1..(m + 1) * n], &mut z[m + 1..]);
        }
        // U x = z.
        let mut x = z;
        for i in (0..n).rev() {
            let t = V::dot(&u[i * n + i + 1..(i + 1) * n], &x[i + 1..]);
            x[i] = (x[i] - t) / u[i * n + i];
        }
        x
    };
    let mut x = substitute(b);
    // One refinement step: x += A^-1 (b - A x), the residual from A's upper triangle.
    let mut ax = vec![0f32; n];
    for i in 0..n {
        ax[i] += V::dot(&a[i * n + i..(i + 1) * n], &x[i..]);
        let xi = x[i];
        V::axpy(xi, &a[i * n + i + 1..(i + 1) * n], &mut ax[i + 1..]);
    }
    let r: Vec<f32> = b.iter().zip(&ax).map(|(b, ax)| b - ax).collect();
    let dx = substitute(&r);
    for (xi, d) in x.iter_mut().zip(dx) {
        *xi += d;
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn solve_spd_avx2(a: &[f32], b: &[f32], n: usize) -> Option<Vec<f32>> {
    solve_spd_with::<crate::kernels::avx2::Avx2>(a, b, n)
}

/// Solves `A x = b` for symmetric positive definite `A` (row-major n x n, only the upper
/// triangle read) on the best kernels this CPU has. `None` if `A` is not positive
/// definite.
pub fn solve_spd(a: &[f32], b: &[f32], n: usize) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx2() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        #[allow(unsafe_code)]
        return unsafe { solve_spd_avx2(a, b, n) };
    }
    solve_spd_with::<Portable>(a, b, n)
}

/// Adds `sum_j c_j y_j y_j^T` to the upper triangle of `a` (see [`aligned`]) and
/// `sum_j (1 + c_j) y_j` to `b`, `c_j = alpha * w_j`: the rows `y_j` gathered once, then
/// one rank update per row of the triangle.
#[inline(always)]
fn normal_equations_with<V: Vector>(
    a: &mut [f32],
    b: &mut [f32],
    y: &[f32],
    k: usize,
    inter: &[(u32, f32)],
    alpha: f32,
) {
    let mut rows = Vec::with_capacity(inter.len() * k);
    let mut scale = Vec::with_capacity(inter.len());
    for &(j, w) in inter {
        let c = alpha * w.max(0.0);
        let yj = &y[j as usize * k..(j as usize + 1) * k];
        V::axpy(1.0 + c, yj, b);
        if c != 0.0 {
            rows.extend_from_slice(yj);
            scale.push(c);
        }
    }
    for (r, row) in a.chunks_exact_mut(k).enumerate() {
        let s = aligned(r);
        V::rank_update_row(&mut row[s..], r, s, &rows, k, &scale);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn normal_equations_avx2(
    a: &mut [f32],
    b: &mut [f32],
    y: &[f32],
    k: usize,
    inter: &[(u32, f32)],
    alpha: f32,
) {
    normal_equations_with::<crate::kernels::avx2::Avx2>(a, b, y, k, inter, alpha)
}

fn accumulate_normal_equations(
    a: &mut [f32],
    b: &mut [f32],
    y: &[f32],
    k: usize,
    inter: &[(u32, f32)],
    alpha: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx2() {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        #[allow(unsafe_code)]
        return unsafe { normal_equations_avx2(a, b, y, k, inter, alpha) };
    }
    normal_equations_with::<Portable>(a, b, y, k, inter, alpha)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topk;
    use rand::seq::SliceRandom;

    /// Users and items in 8 latent groups; each user likes every item of one or two
    /// groups. Returns (train triples, per-user held-out items).
    /// (train triples, held-out items per user)
    type Planted = (Vec<(u32, u32, f32)>, Vec<Vec<u32>>);

    fn planted(users: usize, items: usize, seed: u64) -> Planted {
        let groups = 8;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let item_group: Vec<usize> = (0..items).map(|i| i % groups).collect();
        let mut train = Vec::new();
        let mut test = Vec::new();
        for u in 0..users {
            let g1 = rng.random_range(0..groups);
            let g2 = if rng.random::<f32>() < 0.5 {
                Some(rng.random_range(0..groups))
            } else {
                None
            };
            let mut liked: Vec<u32> = (0..items)
                .filter(|&i| item_group[i] == g1 || Some(item_group[i]) == g2)
                .map(|i| i as u32)
                .collect();
            liked.shuffle(&mut rng);
            let (held, kept) = liked.split_at(10);
            test.push(held.to_vec());
            train.extend(kept.iter().map(|&i| (u as u32, i, 1.0)));
        }
        (train, test)
    }

    fn recall_at_10(
        mut model_scores: impl FnMut(usize) -> Vec<topk::Scored>,
        test: &[Vec<u32>],
    ) -> f64 {
        let mut total = 0.0;
        for (u, t) in test.iter().enumerate() {
            let rec = model_scores(u);
            let hits = rec.iter().filter(|s| t.contains(&s.item)).count();
            total += hits as f64 / t.len() as f64;
        }
        total / test.len() as f64
    }

    #[test]
    fn a_keyed_fit_does_not_depend_on_how_rows_are_numbered() {
        let (users, items) = (300, 200);
        let (train, _) = planted(users, items, 3);
        let params = AlsParams {
            factors: 8,
            iterations: 4,
            ..Default::default()
        };
        let ukeys: Vec<u64> = (0..users).map(|u| row_key(&format!("u{u}"))).collect();
        let ikeys: Vec<u64> = (0..items).map(|i| row_key(&format!("i{i}"))).collect();
        let a = fit_keyed(
            &Csr::from_triples(users, items, &train),
            &params,
            &ukeys,
            &ikeys,
        )
        .unwrap();
        // The same data with users and items numbered backwards.
        let (ru, ri) = (|u: u32| users as u32 - 1 - u, |i: u32| items as u32 - 1 - i);
        let flipped: Vec<(u32, u32, f32)> =
            train.iter().map(|&(u, i, w)| (ru(u), ri(i), w)).collect();
        let rev = |k: &[u64]| k.iter().rev().copied().collect::<Vec<_>>();
        let b = fit_keyed(
            &Csr::from_triples(users, items, &flipped),
            &params,
            &rev(&ukeys),
            &rev(&ikeys),
        )
        .unwrap();
        for i in 0..items {
            let (x, y) = (
                a.item_factors.row(i),
                b.item_factors.row(ri(i as u32) as usize),
            );
            for (p, q) in x.iter().zip(y) {
                assert!(
                    (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                    "item {i}: {p} vs {q}"
                );
            }
        }
        // Index-order starts differ, so the plain fit does depend on the numbering.
        let c = fit(
            &Csr::from_triples(users, items, &train),
            &params,
            false,
            |_, _| {},
        )
        .unwrap();
        assert!(c.item_factors != a.item_factors);
        assert!(fit_keyed(
            &Csr::from_triples(users, items, &train),
            &params,
            &ukeys[1..],
            &ikeys
        )
        .is_err());
    }

    #[test]
    fn recovers_planted_structure_and_loss_falls() {
        let (users, items) = (2000, 1000);
        let (train, test) = planted(users, items, 7);
        let m = Csr::from_triples(users, items, &train);
        let params = AlsParams {
            factors: 16,
            iterations: 8,
            reg: 0.1,
            ..Default::default()
        };
        let mut losses = Vec::new();
        let model = fit(&m, &params, true, |_, l| losses.push(l)).unwrap();
        for w in losses.windows(2) {
            assert!(w[1] < w[0], "loss rose: {losses:?}");
        }
        let mut scratch = Vec::new();
        let recall = recall_at_10(
            |u| {
                let q = model.user_factors.row(u).to_vec();
                let (seen, _) = m.row(u);
                topk::top_k_dense(
                    model.item_factors.view(),
                    &q,
                    10,
                    |i| seen.binary_search(&i).is_ok(),
                    &mut scratch,
                )
            },
            &test,
        );
        assert!(recall >= 0.8, "ALS recall@10 {recall}");

        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let random = recall_at_10(
            |u| {
                let scores: Vec<f32> = (0..items).map(|_| rng.random()).collect();
                let (seen, _) = m.row(u);
                topk::select(&scores, 10, |i| seen.binary_search(&i).is_ok())
            },
            &test,
        );
        assert!(random <= 0.05, "random recall@10 {random}");
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn fold_in_matches_dense_solve() {
        let (train, _) = planted(300, 200, 3);
        let m = Csr::from_triples(300, 200, &train);
        // A short history and a long one, both scalings, 12 factors (rows not whole
        // vectors: term-by-term kernels) and 64 (rows held in registers).
        let short: Vec<(u32, f32)> = vec![(3, 1.0), (17, 2.0), (40, 0.5), (41, 1.0), (199, 3.0)];
        let long: Vec<(u32, f32)> = (0..40u32).map(|i| (i * 5, 1.0 + (i % 3) as f32)).collect();
        let cases = [RegScaling::None, RegScaling::Count]
            .into_iter()
            .flat_map(|s| [(s, short.clone()), (s, long.clone())])
            .flat_map(|(s, i)| [(s, i.clone(), 12), (s, i, 64)]);
        for (scaling, inter, factors) in cases {
            let params = AlsParams {
                factors,
                iterations: 5,
                reg: 0.3,
                alpha: 4.0,
                reg_scaling: scaling,
                ..Default::default()
            };
            let model = fit(&m, &params, false, |_, _| {}).unwrap();
            let fold = FoldIn::new(model.item_factors.view(), &params);
            let got = fold.solve(model.item_factors.view(), &inter);
            // Independent dense solve in f64: A = Y^T C Y + reg I over *all* items.
            let k = params.factors;
            let n = 200;
            let mut a = vec![0f64; k * k];
            let mut b = vec![0f64; k];
            let reg = params.row_reg(inter.len()) as f64;
            for j in 0..n {
                let w = inter.iter().find(|(i, _)| *i as usize == j).map(|x| x.1);
                let c = 1.0 + params.alpha as f64 * w.unwrap_or(0.0) as f64;
                let p = if w.is_some() { 1.0 } else { 0.0 };
                let y = model.item_factors.row(j);
                for r in 0..k {
                    b[r] += c * p * y[r] as f64;
                    for s in 0..k {
                        a[r * k + s] += c * y[r] as f64 * y[s] as f64;
                    }
                }
            }
            for r in 0..k {
                a[r * k + r] += reg;
            }
            // Gaussian elimination with partial pivoting.
            let mut aug: Vec<Vec<f64>> = (0..k)
                .map(|r| {
                    let mut row = a[r * k..(r + 1) * k].to_vec();
                    row.push(b[r]);
                    row
                })
                .collect();
            for col in 0..k {
                let piv = (col..k)
                    .max_by(|&x, &y| aug[x][col].abs().total_cmp(&aug[y][col].abs()))
                    .unwrap();
                aug.swap(col, piv);
                for r in 0..k {
                    if r != col {
                        let f = aug[r][col] / aug[col][col];
                        for c in col..=k {
                            aug[r][c] -= f * aug[col][c];
                        }
                    }
                }
            }
            let exact: Vec<f64> = (0..k).map(|r| aug[r][k] / aug[r][r]).collect();
            let num: f64 = got
                .iter()
                .zip(&exact)
                .map(|(g, e)| (*g as f64 - e).powi(2))
                .sum::<f64>()
                .sqrt();
            let den: f64 = exact.iter().map(|e| e * e).sum::<f64>().sqrt();
            assert!(
                num / den <= 1e-3,
                "relative error {} ({scaling:?}, {} interactions)",
                num / den,
                inter.len()
            );
            // The same recommendations: top 10 of all items by either vector.
            let top = |v: &dyn Fn(usize) -> f64| {
                let mut ids: Vec<usize> = (0..n).collect();
                ids.sort_by(|&x, &y| v(y).total_cmp(&v(x)));
                ids.truncate(10);
                ids
            };
            let y = &model.item_factors;
            let score_f32 = |j: usize| (0..k).map(|r| got[r] as f64 * y[[j, r]] as f64).sum();
            let score_f64 = |j: usize| (0..k).map(|r| exact[r] * y[[j, r]] as f64).sum();
            assert_eq!(top(&score_f32), top(&score_f64), "{factors} factors");
        }
    }

    #[test]
    fn spd_solver_recovers_a_known_solution_reading_the_upper_triangle_only() {
        // Sizes below, at and past one register row (64), whole vectors or not.
        for n in [5usize, 13, 64, 128, 136] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let m: Vec<f32> = (0..n * n).map(|_| rng.random::<f32>() - 0.5).collect();
            let mut a = vec![0f32; n * n];
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] = (0..n).map(|r| m[r * n + i] * m[r * n + j]).sum::<f32>()
                        + if i == j { 0.05 } else { 0.0 };
                }
            }
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
            let b: Vec<f32> = (0..n)
                .map(|i| (0..n).map(|j| a[i * n + j] * x[j]).sum())
                .collect();
            // Below the diagonal: never read.
            for i in 0..n {
                for j in 0..i {
                    a[i * n + j] = f32::NAN;
                }
            }
            let norm: f32 = x.iter().map(|e| e * e).sum::<f32>().sqrt();
            let dispatched = solve_spd(&a, &b, n).unwrap();
            let portable = solve_spd_with::<Portable>(&a, &b, n).unwrap();
            for got in [dispatched, portable] {
                let err: f32 = got
                    .iter()
                    .zip(&x)
                    .map(|(g, e)| (g - e).powi(2))
                    .sum::<f32>()
                    .sqrt();
                assert!(err / norm < 2e-3, "n={n}: relative error {}", err / norm);
            }
            let mut not_pd = a.clone();
            not_pd[0] = -1.0;
            assert!(solve_spd(&not_pd, &b, n).is_none());
        }
    }

    #[test]
    fn rejects_bad_params_and_handles_empty_rows() {
        let m = Csr::from_triples(3, 3, &[(0, 0, 1.0)]);
        let bad = AlsParams {
            factors: 0,
            ..Default::default()
        };
        assert!(fit(&m, &bad, false, |_, _| {}).is_err());
        let bad = AlsParams {
            reg: f32::NAN,
            ..Default::default()
        };
        assert!(fit(&m, &bad, false, |_, _| {}).is_err());
        let model = fit(
            &m,
            &AlsParams {
                factors: 4,
                iterations: 2,
                ..Default::default()
            },
            false,
            |_, _| {},
        )
        .unwrap();
        assert!(model.user_factors.row(2).iter().all(|v| *v == 0.0));
        let fold = FoldIn::new(model.item_factors.view(), &model.params);
        assert_eq!(fold.solve(model.item_factors.view(), &[]), vec![0.0; 4]);
        assert_eq!(
            fold.solve(model.item_factors.view(), &[(99, 1.0)]),
            vec![0.0; 4]
        );
    }
}
