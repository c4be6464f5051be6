//! Small f32 vector kernels used by the hot loops (ALS solves, scoring).
//!
//! On x86-64 with AVX2 and FMA (checked once at run time) the kernels use 256-bit
//! intrinsics; elsewhere a portable version with eight independent partial sums runs. Hot
//! loops that call kernels many times per row (the ALS solver) are written once, generic
//! over [`Vector`], and instantiated inside a function compiled for AVX2+FMA, so the kernels
//! inline there without a dispatch per call.

const LANES: usize = 8;

/// The vector operations a hot loop needs.
pub trait Vector {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `y += alpha * x`.
    fn axpy(alpha: f32, x: &[f32], y: &mut [f32]);
    /// `row += sum_t (scale[t] * x_t[r]) * x_t[s..s + row.len()]`, where `x_t` is row `t`
    /// (`stride` floats) of `rows`: one row (`r`, from column `s`) of a symmetric
    /// rank-`scale.len()` update, with `row` held in registers across all terms.
    fn rank_update_row(
        row: &mut [f32],
        r: usize,
        s: usize,
        rows: &[f32],
        stride: usize,
        scale: &[f32],
    );
}

/// Portable implementation.
pub struct Portable;

impl Vector for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
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

    #[inline(always)]
    fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += alpha * xi;
        }
    }

    #[inline(always)]
    fn rank_update_row(
        row: &mut [f32],
        r: usize,
        s: usize,
        rows: &[f32],
        stride: usize,
        scale: &[f32],
    ) {
        for (&c, x) in scale.iter().zip(rows.chunks_exact(stride)) {
            let f = c * x[r];
            for (y, v) in row.iter_mut().zip(&x[s..]) {
                *y += f * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    //! AVX2 + FMA kernels. Callers must have checked [`available`].
    #![allow(unsafe_code)]
    use std::arch::x86_64::*;

    /// True when this CPU has AVX2 and FMA.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut i = 0;
        // SAFETY: every load reads 8 floats at offset i with i + 8 <= n (or 16 for the pair).
        unsafe {
            let mut s0 = _mm256_setzero_ps();
            let mut s1 = _mm256_setzero_ps();
            while i + 16 <= n {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    s0,
                );
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    s1,
                );
                i += 16;
            }
            if i + 8 <= n {
                s0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    s0,
                );
                i += 8;
            }
            let s = _mm256_add_ps(s0, s1);
            let lo = _mm256_castps256_ps128(s);
            let hi = _mm256_extractf128_ps(s, 1);
            let q = _mm_add_ps(lo, hi);
            let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
            let mut total = _mm_cvtss_f32(q);
            while i < n {
                total += a[i] * b[i];
                i += 1;
            }
            total
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let mut i = 0;
        // SAFETY: loads and stores stay within [0, n) of both slices.
        unsafe {
            let va = _mm256_set1_ps(alpha);
            while i + 8 <= n {
                let yv = _mm256_loadu_ps(y.as_ptr().add(i));
                let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), yv);
                _mm256_storeu_ps(y.as_mut_ptr().add(i), r);
                i += 8;
            }
        }
        while i < n {
            y[i] += alpha * x[i];
            i += 1;
        }
    }

    /// `row += sum_t (scale[t] * x_t[r]) * x_t[s..s + 8C]` with the row's `C` vectors in
    /// registers across every term (independent accumulators, so the FMAs pipeline).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rank_update_fixed<const C: usize>(
        row: &mut [f32],
        r: usize,
        s: usize,
        rows: &[f32],
        stride: usize,
        scale: &[f32],
    ) {
        assert!(row.len() >= 8 * C && s + 8 * C <= stride && r < stride);
        // SAFETY: every row of `rows` has `stride >= s + 8C` floats (asserted), and
        // `row` has at least 8C.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); C];
            for (c, x) in scale.iter().zip(rows.chunks_exact(stride)) {
                let f = _mm256_set1_ps(c * x[r]);
                let p = x.as_ptr().add(s);
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(f, _mm256_loadu_ps(p.add(8 * q)), *a);
                }
            }
            let out = row.as_mut_ptr();
            for (q, a) in acc.iter().enumerate() {
                let y = _mm256_loadu_ps(out.add(8 * q));
                _mm256_storeu_ps(out.add(8 * q), _mm256_add_ps(y, *a));
            }
        }
    }

    /// See [`super::Vector::rank_update_row`]: a row of whole vectors is updated in
    /// pieces of up to 64 floats, each held in registers; any other length term by term.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn rank_update_row(
        row: &mut [f32],
        r: usize,
        s: usize,
        rows: &[f32],
        stride: usize,
        scale: &[f32],
    ) {
        let len = row.len();
        // SAFETY: same CPU features as this function; the fixed kernel asserts lengths.
        unsafe {
            if len.is_multiple_of(8) && s + len <= stride && r < stride {
                for (p, piece) in row.chunks_mut(64).enumerate() {
                    let s = s + 64 * p;
                    match piece.len() / 8 {
                        1 => rank_update_fixed::<1>(piece, r, s, rows, stride, scale),
                        2 => rank_update_fixed::<2>(piece, r, s, rows, stride, scale),
                        3 => rank_update_fixed::<3>(piece, r, s, rows, stride, scale),
                        4 => rank_update_fixed::<4>(piece, r, s, rows, stride, scale),
                        5 => rank_update_fixed::<5>(piece, r, s, rows, stride, scale),
                        6 => rank_update_fixed::<6>(piece, r, s, rows, stride, scale),
                        7 => rank_update_fixed::<7>(piece, r, s, rows, stride, scale),
                        _ => rank_update_fixed::<8>(piece, r, s, rows, stride, scale),
                    }
                }
                return;
            }
            for (&c, x) in scale.iter().zip(rows.chunks_exact(stride)) {
                axpy(c * x[r], &x[s..], row);
            }
        }
    }

    /// [`super::Vector`] over these kernels; only instantiate inside a function compiled
    /// with `#[target_feature(enable = "avx2,fma")]`, after checking [`available`].
    pub struct Avx2;

    impl super::Vector for Avx2 {
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: the type is only used after `available()` returned true.
            unsafe { dot(a, b) }
        }

        #[inline(always)]
        fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
            // SAFETY: as above.
            unsafe { axpy(alpha, x, y) }
        }

        #[inline(always)]
        fn rank_update_row(
            row: &mut [f32],
            r: usize,
            s: usize,
            rows: &[f32],
            stride: usize,
            scale: &[f32],
        ) {
            // SAFETY: as above.
            unsafe { rank_update_row(row, r, s, rows, stride, scale) }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn score_rows(matrix: &[f32], dim: usize, query: &[f32], out: &mut [f32]) {
        for (row, o) in matrix.chunks_exact(dim).zip(out.iter_mut()) {
            // SAFETY: same CPU features as this function.
            *o = unsafe { dot(row, query) };
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum(a: &[f32]) -> f32 {
        let n = a.len();
        let mut i = 0;
        // SAFETY: loads stay within [0, n).
        unsafe {
            let mut s = [_mm256_setzero_ps(); 4];
            while i + 32 <= n {
                for (j, acc) in s.iter_mut().enumerate() {
                    *acc = _mm256_add_ps(*acc, _mm256_loadu_ps(a.as_ptr().add(i + 8 * j)));
                }
                i += 32;
            }
            let t = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), t);
            lanes.iter().sum::<f32>() + a[i..].iter().sum::<f32>()
        }
    }
}

/// True when the AVX2+FMA kernels can run here.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(avx2::available)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dot product of two equally long slices.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::dot(a, b) };
    }
    Portable::dot(a, b)
}

/// `y += alpha * x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::axpy(alpha, x, y) };
    }
    Portable::axpy(alpha, x, y)
}

/// Sum of all values: the streaming baseline the scoring kernel is compared with.
pub fn sum(a: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::sum(a) };
    }
    let mut acc = [0.0f32; LANES];
    let mut chunks = a.chunks_exact(LANES);
    for x in &mut chunks {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Scores every row of a row-major `rows x dim` matrix against `query`, writing one
/// score per row into `out` (which must hold `rows` values).
pub fn score_rows(matrix: &[f32], dim: usize, query: &[f32], out: &mut [f32]) {
    if dim == 0 {
        out.iter_mut().for_each(|o| *o = 0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::score_rows(matrix, dim, query, out) };
    }
    for (row, o) in matrix.chunks_exact(dim).zip(out.iter_mut()) {
        *o = Portable::dot(row, query);
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
    fn rank_update_matches_naive_loops() {
        // Row lengths of whole vectors (one piece, several pieces) and not, offsets.
        let shapes = [
            (64usize, 0usize, 64usize),
            (24, 40, 64),
            (128, 0, 128),
            (136, 8, 144),
            (13, 3, 16),
            (0, 0, 8),
        ];
        for (len, s, stride) in shapes {
            let terms = 7;
            let rows: Vec<f32> = (0..terms * stride)
                .map(|i| (i as f32 * 0.13).sin())
                .collect();
            let scale: Vec<f32> = (0..terms).map(|t| 0.5 - t as f32 * 0.1).collect();
            let r = stride - 1;
            let start: Vec<f32> = (0..len).map(|i| (i as f32 * 0.29).cos()).collect();
            let mut want = start.clone();
            for t in 0..terms {
                for (i, w) in want.iter_mut().enumerate() {
                    *w += scale[t] * rows[t * stride + r] * rows[t * stride + s + i];
                }
            }
            let mut portable = start.clone();
            Portable::rank_update_row(&mut portable, r, s, &rows, stride, &scale);
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                let mut fast = start.clone();
                // SAFETY: AVX2 and FMA detected.
                #[allow(unsafe_code)]
                unsafe {
                    avx2::rank_update_row(&mut fast, r, s, &rows, stride, &scale)
                };
                for (f, w) in fast.iter().zip(&want) {
                    assert!((f - w).abs() < 1e-4, "avx2 len={len} s={s}");
                }
            }
            for (p, w) in portable.iter().zip(&want) {
                assert!((p - w).abs() < 1e-4, "portable len={len} s={s}");
            }
        }
    }

    #[test]
    fn kernels_match_naive_loops() {
        for n in [0usize, 1, 7, 8, 9, 16, 31, 33, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            assert!((dot(&a, &b) - naive_dot(&a, &b)).abs() < 1e-4, "dot n={n}");
            assert!(
                (Portable::dot(&a, &b) - naive_dot(&a, &b)).abs() < 1e-4,
                "portable dot n={n}"
            );
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            let mut y2 = b.clone();
            Portable::axpy(0.5, &a, &mut y2);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
                assert!((y2[i] - y[i]).abs() < 1e-6);
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
