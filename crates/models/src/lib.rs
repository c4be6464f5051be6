//! `troupe-models`: the pure, synchronous algorithms behind Troupe.
//!
//! Nothing here touches tokio, actors, HTTP, config files or the environment: every
//! function takes its inputs as arguments, so the actors crate can run them on blocking
//! threads and the evaluation CLI can run them offline.
//!
//! Map of the crate:
//! - [`data`]: streaming CSV readers for events and catalogues (gzip, column picking,
//!   errors naming file, line and field).
//! - [`dataset`]: string ids to dense indices, confidence weights per kind/value, splits.
//! - [`interest`]: a user's interactions per item, as ALS and the content profile read
//!   them (served and evaluated alike).
//! - [`sparse`]: CSR matrices (ALS never builds a dense users x items matrix).
//! - [`als`]: implicit ALS with conjugate gradient, loss, real-time fold-in.
//! - [`ease`]: EASE, a closed-form item-item model (dense fit, pruned rows for scoring).
//! - [`topk`]: exact top-k, single query and batched (GEMM).
//! - [`ann`]: approximate maximum-inner-product retrieval (HNSW graph, exact rescoring).
//! - [`content`]: text encoders (tract-onnx sentence model, hashed TF-IDF), user profiles.
//! - [`popularity`]: decayed popularity, global and per category.
//! - [`blend`]: normalisation, weighted blending with per-branch contributions, filters.
//! - [`metrics`], [`evaluate`]: the offline protocol (P/R/MAP/NDCG@K, coverage, tuning).
//! - [`pipeline`]: each branch's per-user step (interests to candidates), the one
//!   implementation `troupe eval` and the serving ranker both call.
//! - [`synth`]: synthetic data with latent clusters, streamed to disk.
//! - [`kernels`]: f32 SIMD kernels with run-time CPU dispatch.

pub mod als;
pub mod ann;
pub mod blend;
pub mod content;
pub mod data;
pub mod dataset;
pub mod ease;
pub mod error;
pub mod evaluate;
pub mod interest;
pub mod kernels;
pub mod metrics;
pub mod pipeline;
pub mod popularity;
pub mod sparse;
pub mod synth;
pub mod topk;

pub use error::{ModelError, Result};
