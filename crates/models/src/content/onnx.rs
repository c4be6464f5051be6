//! BERT-style sentence encoder run by tract-onnx, tokenised by the `tokenizers` crate.
//!
//! A model folder holds `model.onnx` (inputs `input_ids`, `attention_mask` and optionally
//! `token_type_ids`, all i64 `[batch, sequence]`; first output `[batch, sequence, dim]`) and
//! `tokenizer.json`. Embeddings are the mean of the token states under the attention mask,
//! L2-normalised (the sentence-transformers recipe for all-MiniLM-L6-v2).
//!
//! The tokenizer file's own padding and truncation are overridden: a batch is padded to its
//! longest member and every text is cut at `max_len` tokens. The optimised plan is built once
//! and shared by all threads (`Arc`); each call runs one inference on the calling thread.

use std::path::Path;
use std::sync::Arc;

use ndarray::Array2;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tract_onnx::prelude::*;

use super::TextEncoder;
use crate::error::{ModelError, Result};
use crate::kernels;

type Plan = Arc<TypedRunnableModel>;

#[derive(Debug, Clone, Copy, PartialEq)]
enum InputRole {
    Ids,
    Mask,
    TypeIds,
}

/// A sentence encoder loaded from a model folder.
pub struct OnnxEncoder {
    name: String,
    plan: Plan,
    tokenizer: Tokenizer,
    inputs: Vec<InputRole>,
    dim: usize,
    max_len: usize,
}

fn enc_err(what: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Encoder(format!("{what}: {e}"))
}

impl OnnxEncoder {
    /// Loads `dir/model.onnx` and `dir/tokenizer.json`; texts are cut at `max_len` tokens.
    pub fn load(dir: &Path, max_len: usize) -> Result<Self> {
        let model_path = dir.join("model.onnx");
        let tok_path = dir.join("tokenizer.json");
        for p in [&model_path, &tok_path] {
            if !p.is_file() {
                return Err(ModelError::Encoder(format!(
                    "{} not found (fetch a model with scripts/fetch-minilm.sh)",
                    p.display()
                )));
            }
        }
        if max_len < 2 {
            return Err(ModelError::param("max_len", "must be at least 2 tokens"));
        }
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| enc_err("tokenizer.json", e))?;
        let padding = match tokenizer.get_padding() {
            Some(p) => PaddingParams {
                strategy: PaddingStrategy::BatchLongest,
                pad_to_multiple_of: None,
                ..p.clone()
            },
            None => PaddingParams {
                strategy: PaddingStrategy::BatchLongest,
                ..Default::default()
            },
        };
        tokenizer.with_padding(Some(padding));
        let truncation = TruncationParams {
            max_length: max_len,
            ..tokenizer.get_truncation().cloned().unwrap_or_default()
        };
        tokenizer
            .with_truncation(Some(truncation))
            .map_err(|e| enc_err("truncation", e))?;

        let mut model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_path(&model_path)
            .map_err(|e| enc_err("model.onnx", e))?;
        let batch = model.sym("batch");
        let seq = model.sym("sequence");
        let mut inputs = Vec::new();
        let outlets = model
            .input_outlets()
            .map_err(|e| enc_err("inputs", e))?
            .to_vec();
        for (ix, outlet) in outlets.iter().enumerate() {
            let name = model.node(outlet.node).name.to_ascii_lowercase();
            let role = if name.contains("mask") {
                InputRole::Mask
            } else if name.contains("type") {
                InputRole::TypeIds
            } else if name.contains("ids") || name.contains("input") {
                InputRole::Ids
            } else {
                return Err(ModelError::Encoder(format!(
                    "unexpected model input `{name}`"
                )));
            };
            inputs.push(role);
            let fact: InferenceFact =
                i64::fact([TDim::from(batch.clone()), TDim::from(seq.clone())]).into();
            model = model
                .with_input_fact(ix, fact)
                .map_err(|e| enc_err("input fact", e))?;
        }
        if !inputs.contains(&InputRole::Ids) || !inputs.contains(&InputRole::Mask) {
            return Err(ModelError::Encoder(
                "model needs `input_ids` and `attention_mask` inputs".into(),
            ));
        }
        let typed = model.into_optimized().map_err(|e| enc_err("optimise", e))?;
        let out_fact = typed.output_fact(0).map_err(|e| enc_err("output", e))?;
        let dim = out_fact
            .shape
            .iter()
            .last()
            .and_then(|d| d.as_i64())
            .filter(|d| *d > 0)
            .ok_or_else(|| ModelError::Encoder("output width is not fixed".into()))?
            as usize;
        let plan = typed.into_runnable().map_err(|e| enc_err("plan", e))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(OnnxEncoder {
            name,
            plan,
            tokenizer,
            inputs,
            dim,
            max_len,
        })
    }

    /// Token ids of a text, after this encoder's truncation (used by tests and tools).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| enc_err("tokenize", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The configured maximum sequence length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

impl TextEncoder for OnnxEncoder {
    fn name(&self) -> String {
        format!("onnx:{}", self.name)
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn encode(&self, texts: &[&str]) -> Result<Array2<f32>> {
        if texts.is_empty() {
            return Ok(Array2::zeros((0, self.dim)));
        }
        let encs = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| enc_err("tokenize", e))?;
        let b = encs.len();
        let s = encs
            .iter()
            .map(|e| e.get_ids().len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut ids = Array2::<i64>::zeros((b, s));
        let mut mask = Array2::<i64>::zeros((b, s));
        let mut types = Array2::<i64>::zeros((b, s));
        for (r, e) in encs.iter().enumerate() {
            for (c, ((&id, &m), &t)) in e
                .get_ids()
                .iter()
                .zip(e.get_attention_mask())
                .zip(e.get_type_ids())
                .enumerate()
            {
                ids[[r, c]] = id as i64;
                mask[[r, c]] = m as i64;
                types[[r, c]] = t as i64;
            }
        }
        let feed: TVec<TValue> = self
            .inputs
            .iter()
            .map(|role| {
                let a = match role {
                    InputRole::Ids => &ids,
                    InputRole::Mask => &mask,
                    InputRole::TypeIds => &types,
                };
                Tensor::from(a.clone()).into_tvalue()
            })
            .collect();
        let out = self.plan.run(feed).map_err(|e| enc_err("inference", e))?;
        let hidden = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| enc_err("output type", e))?;
        if hidden.ndim() != 3 || hidden.shape()[0] != b || hidden.shape()[2] != self.dim {
            return Err(ModelError::Encoder(format!(
                "unexpected output shape {:?}",
                hidden.shape()
            )));
        }
        let mut emb = Array2::<f32>::zeros((b, self.dim));
        for r in 0..b {
            let mut row = vec![0f32; self.dim];
            let mut n = 0f32;
            for c in 0..hidden.shape()[1].min(s) {
                if mask[[r, c]] == 0 {
                    continue;
                }
                n += 1.0;
                for (d, v) in row.iter_mut().enumerate() {
                    *v += hidden[[r, c, d]];
                }
            }
            if n > 0.0 {
                row.iter_mut().for_each(|v| *v /= n);
            }
            kernels::l2_normalize(&mut row);
            emb.row_mut(r).assign(&ndarray::ArrayView1::from(&row));
        }
        Ok(emb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-bert")
    }

    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
        embedding: Vec<f32>,
    }

    #[derive(serde::Deserialize)]
    struct Expected {
        max_len: usize,
        dim: usize,
        cases: Vec<Case>,
    }

    fn expected() -> Expected {
        let s = std::fs::read_to_string(tiny_dir().join("expected.json")).unwrap();
        serde_json::from_str(&s).unwrap()
    }

    #[test]
    fn tiny_model_matches_independent_reference() {
        let exp = expected();
        let enc = OnnxEncoder::load(&tiny_dir(), exp.max_len).unwrap();
        assert_eq!(enc.dim(), exp.dim);
        assert_eq!(enc.name(), "onnx:tiny-bert");
        for c in &exp.cases {
            // The file pads to 128; our override pads a single text to its own length and
            // truncates at max_len.
            assert_eq!(enc.token_ids(&c.text).unwrap(), c.ids, "{}", c.text);
        }
        // One batch of different lengths: padding must not leak into the pooled vectors.
        let texts: Vec<&str> = exp.cases.iter().map(|c| c.text.as_str()).collect();
        let emb = enc.encode(&texts).unwrap();
        for (r, c) in exp.cases.iter().enumerate() {
            for (a, b) in emb.row(r).iter().zip(&c.embedding) {
                assert!((a - b).abs() < 1e-5, "{}: {a} vs {b}", c.text);
            }
        }
        // Batch of one gives the same vectors as the batch.
        let one = enc.encode(&texts[1..2]).unwrap();
        for (a, b) in one.row(0).iter().zip(emb.row(1).iter()) {
            assert!((a - b).abs() < 1e-6);
        }
        assert_eq!(enc.encode(&[]).unwrap().nrows(), 0);
    }

    #[test]
    fn clear_errors_for_missing_files() {
        let d = tempfile::tempdir().unwrap();
        let err = OnnxEncoder::load(d.path(), 16).err().unwrap().to_string();
        assert!(err.contains("model.onnx not found"), "{err}");
        std::fs::copy(
            tiny_dir().join("tokenizer.json"),
            d.path().join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(d.path().join("model.onnx"), b"not a model").unwrap();
        assert!(OnnxEncoder::load(d.path(), 16).is_err());
        assert!(OnnxEncoder::load(&tiny_dir(), 1).is_err());
    }
}
