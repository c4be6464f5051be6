//! Content model: item texts to unit-length embeddings, user profiles from the items a
//! user touched, and cosine scoring that also covers items nobody has touched yet.
//!
//! Two encoders implement [`TextEncoder`]: [`onnx::OnnxEncoder`] (a BERT-style sentence
//! model run by tract, e.g. all-MiniLM-L6-v2) and [`tfidf::HashedTfidf`] (the default when
//! no model is configured).

pub mod onnx;
pub mod tfidf;

use ndarray::{Array2, ArrayView2};

use crate::error::Result;
use crate::kernels;
use crate::topk::{self, Scored};

/// Turns texts into L2-normalised embeddings, one row per text.
pub trait TextEncoder: Send + Sync {
    /// A short name for reports, e.g. `tfidf` or `onnx:all-MiniLM-L6-v2`.
    fn name(&self) -> String;
    /// Embedding width.
    fn dim(&self) -> usize;
    /// Encodes a batch of texts.
    fn encode(&self, texts: &[&str]) -> Result<Array2<f32>>;

    /// Encodes many texts in batches of `batch`, calling `progress(done)` after each.
    fn encode_all(
        &self,
        texts: &[&str],
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Array2<f32>> {
        let mut out = Array2::zeros((texts.len(), self.dim()));
        let batch = batch.max(1);
        for (b, chunk) in texts.chunks(batch).enumerate() {
            let emb = self.encode(chunk)?;
            out.slice_mut(ndarray::s![b * batch..b * batch + chunk.len(), ..])
                .assign(&emb);
            progress(b * batch + chunk.len());
        }
        Ok(out)
    }
}

/// Exponential decay weight for an event `age_seconds` old with the given half-life.
/// A non-positive half-life means no decay.
pub fn decay(age_seconds: f64, half_life_seconds: f64) -> f64 {
    if half_life_seconds <= 0.0 {
        return 1.0;
    }
    (-(age_seconds.max(0.0)) * std::f64::consts::LN_2 / half_life_seconds).exp()
}

/// Builds a user profile: the time-decayed, weighted mean of the embeddings of the items
/// the user touched, L2-normalised. `touched` holds `(item, weight, timestamp)`. Ages are
/// measured from the user's own latest touch, not from a global clock, so a user who comes
/// back after a long absence still has a profile (their last interests, at full weight).
/// Returns `None` when nothing usable was touched.
pub fn user_profile(
    embeddings: ArrayView2<f32>,
    touched: &[(u32, f32, i64)],
    half_life_seconds: f64,
) -> Option<Vec<f32>> {
    user_profile_with(
        embeddings.ncols(),
        embeddings.nrows(),
        touched,
        half_life_seconds,
        |row, wt, acc| {
            let e = embeddings.row(row);
            match e.as_slice() {
                Some(s) => kernels::axpy(wt, s, acc),
                None => acc.iter_mut().zip(e.iter()).for_each(|(a, v)| *a += wt * v),
            }
        },
    )
}

/// [`user_profile`] over embeddings stored any way: `add(row, weight, acc)` adds `weight`
/// times row `row` (of `rows`, each `dim` wide) to `acc`.
pub fn user_profile_with(
    dim: usize,
    rows: usize,
    touched: &[(u32, f32, i64)],
    half_life_seconds: f64,
    add: impl Fn(usize, f32, &mut [f32]),
) -> Option<Vec<f32>> {
    let now = touched
        .iter()
        .filter(|&&(item, w, _)| (item as usize) < rows && w > 0.0)
        .map(|&(_, _, ts)| ts)
        .max()?;
    let mut acc = vec![0f32; dim];
    let mut any = false;
    for &(item, w, ts) in touched {
        let row = item as usize;
        if row >= rows {
            continue;
        }
        let wt = w as f64 * decay((now - ts) as f64, half_life_seconds);
        if wt <= 0.0 || !wt.is_finite() {
            continue;
        }
        add(row, wt as f32, &mut acc);
        any = true;
    }
    if !any {
        return None;
    }
    kernels::l2_normalize(&mut acc);
    if kernels::norm2(&acc) == 0.0 {
        return None;
    }
    Some(acc)
}

/// Cosine top-k of `profile` against unit-length item `embeddings`.
pub fn score_profile(
    embeddings: ArrayView2<f32>,
    profile: &[f32],
    k: usize,
    excluded: impl Fn(u32) -> bool,
    scratch: &mut Vec<f32>,
) -> Vec<Scored> {
    topk::top_k_dense(embeddings, profile, k, excluded, scratch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn a_returning_user_keeps_a_profile_however_old_their_events() {
        let e = array![[1.0f32, 0.0], [0.0, 1.0]];
        // Every touch is far older than ten half-lives of any clock: ages count from the
        // user's own latest touch, so the profile is the same as if they were fresh.
        let old = user_profile(e.view(), &[(0, 1.0, 1_000), (1, 1.0, 990)], 10.0).unwrap();
        let shifted =
            user_profile(e.view(), &[(0, 1.0, 901_000), (1, 1.0, 900_990)], 10.0).unwrap();
        assert!(old.iter().zip(&shifted).all(|(a, b)| (a - b).abs() < 1e-6));
        assert!(old[0] > old[1] && old[1] > 0.0);
    }

    #[test]
    fn profile_is_decayed_weighted_mean() {
        let e = array![[1.0f32, 0.0], [0.0, 1.0], [0.6, 0.8]];
        // Item 0 touched now, item 1 one half-life ago with double weight: equal pull.
        let p = user_profile(e.view(), &[(0, 1.0, 100), (1, 2.0, 90)], 10.0).unwrap();
        assert!((p[0] - p[1]).abs() < 1e-6);
        assert!((kernels::norm2(&p) - 1.0).abs() < 1e-5);
        assert!(user_profile(e.view(), &[(9, 1.0, 0)], 0.0).is_none());
        assert!(user_profile(e.view(), &[], 0.0).is_none());
        let mut s = Vec::new();
        let top = score_profile(e.view(), &p, 2, |i| i == 0, &mut s);
        assert_eq!(top[0].item, 2);
    }

    #[test]
    fn decay_halves_each_half_life() {
        assert!((decay(10.0, 10.0) - 0.5).abs() < 1e-12);
        assert_eq!(decay(10.0, 0.0), 1.0);
        assert_eq!(decay(-5.0, 10.0), 1.0);
    }
}
