//! Small f32 vector kernels used by the hot loops (ALS solves, scoring).
//!
//! Each kernel is compiled twice, for plain x86-64 and for AVX2+FMA, and picks one at
//! run time (`multiversion`), so a release binary is portable and still uses 8-wide
//! lanes on this project's machines. Reductions keep eight independent partial sums so
//! the compiler can vectorise them without re-associating floating-point adds.

use multiversion::multiversion;

const LANES: usize = 8;

/// Dot product of two equally long slices.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha * x`.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Sum of all values: the streaming baseline the scoring kernel is compared with.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES * 4];
    let mut chunks = a.chunks_exact(LANES * 4);
    for x in &mut chunks {
        for l in 0..LANES * 4 {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Scores every row of a row-major `rows x dim` matrix against `query`, writing one
/// score per row into `out` (which must hold `rows` values).
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub fn score_rows(matrix: &[f32], dim: usize, query: &[f32], out: &mut [f32]) {
    debug_assert_eq!(query.len(), dim);
    if dim == 0 {
        out.iter_mut().for_each(|o| *o = 0.0);
        return;
    }
    for (row, o) in matrix.chunks_exact(dim).zip(out.iter_mut()) {
        let mut acc = [0.0f32; LANES];
        let mut cr = row.chunks_exact(LANES);
        let mut cq = query.chunks_exact(LANES);
        for (x, y) in (&mut cr).zip(&mut cq) {
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
        let mut tail = 0.0f32;
        for (x, y) in cr.remainder().iter().zip(cq.remainder()) {
            tail += x * y;
        }
        *o = acc.iter().sum::<f32>() + tail;
    }
}

/// Squared L2 norm.
pub fn norm2(a: &[f32]) -> f32 {
    dot(a, a)
}

/// Scales `a` to unit L2 norm in place; a zero vector stays zero.
pub fn l2_normalize(a: &mut [f32]) {
    let n = norm2(a).sqrt();
    if n > 0.0 {
        a.iter_mut().for_each(|v| *v /= n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum::<f64>() as f32
    }

    #[test]
    fn kernels_match_naive_loops() {
        for n in [0usize, 1, 7, 8, 9, 31, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            assert!((dot(&a, &b) - naive_dot(&a, &b)).abs() < 1e-4, "dot n={n}");
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
            let s: f32 = a.iter().sum();
            assert!((sum(&a) - s).abs() < 1e-3, "sum n={n}");
        }
    }

    #[test]
    fn score_rows_is_a_matrix_vector_product() {
        let dim = 13;
        let rows = 5;
        let m: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.3).sin()).collect();
        let q: Vec<f32> = (0..dim).map(|i| i as f32 * 0.1).collect();
        let mut out = vec![0.0; rows];
        score_rows(&m, dim, &q, &mut out);
        for r in 0..rows {
            let expect = naive_dot(&m[r * dim..(r + 1) * dim], &q);
            assert!((out[r] - expect).abs() < 1e-4);
        }
    }

    #[test]
    fn normalise_handles_zero() {
        let mut z = vec![0.0f32; 4];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 4]);
        let mut v = vec![3.0f32, 4.0];
        l2_normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }
}
