//! Hashed TF-IDF text encoder: the default content model when no ONNX model is given.
//!
//! Tokens are lower-cased alphanumeric words and adjacent word pairs; each is hashed
//! (FxHash, fixed seed, so embeddings are stable across runs and machines) to one of `dim`
//! buckets with a sign bit, weighted by sublinear term frequency times inverse document
//! frequency fitted on the catalogue, and the vector is L2-normalised.

use std::hash::{Hash, Hasher};

use ndarray::Array2;

use super::TextEncoder;
use crate::error::{ModelError, Result};
use crate::kernels;

/// A fitted hashed TF-IDF encoder.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HashedTfidf {
    dim: usize,
    idf: Vec<f32>,
}

fn tokens(text: &str) -> Vec<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect();
    let mut out = words.clone();
    out.extend(words.windows(2).map(|w| format!("{} {}", w[0], w[1])));
    out
}

fn bucket(token: &str, dim: usize) -> (usize, f32) {
    let mut h = rustc_hash::FxHasher::default();
    token.hash(&mut h);
    let v = h.finish();
    (
        (v % dim as u64) as usize,
        if v >> 63 == 0 { 1.0 } else { -1.0 },
    )
}

impl HashedTfidf {
    /// An encoder with uniform IDF (hashed, sublinear TF only). A live catalogue grows,
    /// and fitted IDF would change every stored embedding; this form keeps an item's
    /// embedding a function of its text alone.
    pub fn uniform(dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(ModelError::param("dim", "must be >= 1"));
        }
        Ok(HashedTfidf {
            dim,
            idf: vec![1.0; dim],
        })
    }

    /// Fits document frequencies on `corpus`.
    pub fn fit(corpus: &[&str], dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(ModelError::param("dim", "must be >= 1"));
        }
        let mut df = vec![0u32; dim];
        let mut seen = vec![false; dim];
        for text in corpus {
            seen.iter_mut().for_each(|s| *s = false);
            for t in tokens(text) {
                let (b, _) = bucket(&t, dim);
                if !seen[b] {
                    seen[b] = true;
                    df[b] += 1;
                }
            }
        }
        let n = corpus.len() as f32;
        let idf = df
            .iter()
            .map(|&d| ((1.0 + n) / (1.0 + d as f32)).ln() + 1.0)
            .collect();
        Ok(HashedTfidf { dim, idf })
    }

    fn encode_one(&self, text: &str, out: &mut [f32]) {
        let mut counts: rustc_hash::FxHashMap<usize, (f32, f32)> = Default::default();
        for t in tokens(text) {
            let (b, sign) = bucket(&t, self.dim);
            let e = counts.entry(b).or_insert((0.0, 0.0));
            e.0 += sign;
            e.1 += 1.0;
        }
        for (b, (signed, n)) in counts {
            // Sublinear tf; the sign of the bucket's net count keeps collisions unbiased.
            let tf = 1.0 + n.ln();
            out[b] = signed.signum() * tf * self.idf[b];
        }
        kernels::l2_normalize(out);
    }
}

impl TextEncoder for HashedTfidf {
    fn name(&self) -> String {
        "tfidf".into()
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn encode(&self, texts: &[&str]) -> Result<Array2<f32>> {
        let mut out = Array2::zeros((texts.len(), self.dim));
        for (mut row, t) in out.rows_mut().into_iter().zip(texts) {
            if let Some(s) = row.as_slice_mut() {
                self.encode_one(t, s);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_texts_are_closer_than_unrelated_ones() {
        let corpus = [
            "red wooden toy train",
            "blue wooden toy car",
            "steel kitchen knife set",
            "kitchen knife block",
        ];
        let enc = HashedTfidf::fit(&corpus, 256).unwrap();
        let e = enc.encode(&corpus).unwrap();
        let cos = |a: usize, b: usize| e.row(a).dot(&e.row(b));
        assert!((cos(0, 0) - 1.0).abs() < 1e-5);
        assert!(cos(0, 1) > cos(0, 2));
        assert!(cos(2, 3) > cos(1, 3));
        // Deterministic and case-insensitive.
        let again = enc.encode(&["RED Wooden toy train"]).unwrap();
        assert!((again.row(0).dot(&e.row(0)) - 1.0).abs() < 1e-5);
        // Empty text is a zero vector, not NaN.
        let z = enc.encode(&[""]).unwrap();
        assert!(z.iter().all(|v| *v == 0.0));
        assert!(HashedTfidf::fit(&corpus, 0).is_err());
    }
}
