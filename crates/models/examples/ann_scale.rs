//! HNSW retrieval against exact search at catalogue scale, on generated factors:
//! build time, memory, recall@100 and per-query latency, exact and approximate, in one run.
//!
//! `cargo run --release -p troupe-models --example ann_scale -- 100000 1000000`
//! (arguments: item counts; env `ANN_SOURCE=als` (factors of ALS trained on generated
//! clustered interactions instead of generated factors),  `ANN_DIM` (64), `ANN_QUERIES` (300), `ANN_EF`, `ANN_EFS` (list), `ANN_EFC`, `ANN_M`, `ANN_RANGES`, `ANN_Q` (f32|f16), defaults
//! those of `AnnParams`).

use std::time::Instant;

use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use troupe_models::ann::{self, AnnParams, MipsIndex, SearchPath};
use troupe_models::topk;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident set size in bytes (Linux).
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Factors shaped like trained ones: items around a few hundred latent "genres", norms
/// spread like popularity (log-normal), users as mixtures of a few genres.
fn generate(items: usize, users: usize, dim: usize, seed: u64) -> (Array2<f32>, Array2<f32>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let genres: Vec<Vec<f32>> = (0..256)
        .map(|_| (0..dim).map(|_| normal.sample(&mut rng)).collect())
        .collect();
    let mut item_m = Array2::<f32>::zeros((items, dim));
    for mut row in item_m.rows_mut() {
        let g = &genres[rng.random_range(0..genres.len())];
        let norm = (normal.sample(&mut rng) * 0.5).exp();
        for (o, c) in row.iter_mut().zip(g) {
            *o = norm * (c + 0.7 * normal.sample(&mut rng)) / (dim as f32).sqrt();
        }
    }
    let mut user_m = Array2::<f32>::zeros((users, dim));
    for mut row in user_m.rows_mut() {
        for _ in 0..3 {
            let g = &genres[rng.random_range(0..genres.len())];
            let w: f32 = rng.random_range(0.2..1.0);
            for (o, c) in row.iter_mut().zip(g) {
                *o += w * c / (dim as f32).sqrt();
            }
        }
    }
    (item_m, user_m)
}

/// Factors from ALS trained on generated interactions: `users` users who each draw
/// `per_user` items from two of 100 latent clusters, item popularity Zipf(0.9) within a
/// cluster. Returns the item factors and the factors of `queries` users.
fn trained(
    items: usize,
    users: usize,
    per_user: usize,
    queries: usize,
    dim: usize,
) -> (Array2<f32>, Array2<f32>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let clusters = 100usize;
    let per_cluster = items.div_ceil(clusters);
    // Zipf CDF over ranks within a cluster.
    let weights: Vec<f64> = (1..=per_cluster)
        .map(|r| 1.0 / (r as f64).powf(0.9))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(per_cluster);
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let mut triples = Vec::with_capacity(users * per_user);
    for u in 0..users {
        let cs = [rng.random_range(0..clusters), rng.random_range(0..clusters)];
        for t in 0..per_user {
            let c = cs[if t % 4 == 3 { 1 } else { 0 }];
            let x: f64 = rng.random();
            let r = cdf.partition_point(|&p| p < x).min(per_cluster - 1);
            let item = (c * per_cluster + r).min(items - 1);
            triples.push((u as u32, item as u32, 1.0f32));
        }
    }
    let csr = troupe_models::sparse::Csr::from_triples(users, items, &triples);
    let params = troupe_models::als::AlsParams {
        factors: dim,
        iterations: 8,
        ..Default::default()
    };
    let t = Instant::now();
    let model = troupe_models::als::fit(&csr, &params, false, |_, _| {}).expect("als");
    eprintln!(
        "ALS on {} interactions: {:.1} s",
        triples.len(),
        t.elapsed().as_secs_f64()
    );
    let step = (users / queries).max(1);
    let q = model.user_factors.select(
        ndarray::Axis(0),
        &(0..users).step_by(step).take(queries).collect::<Vec<_>>(),
    );
    (model.item_factors, q)
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100_000]
    } else {
        sizes
    };
    let dim = env("ANN_DIM", 64);
    let queries = env("ANN_QUERIES", 300);
    let params = AnnParams {
        m: env("ANN_M", AnnParams::default().m),
        ef_search: env("ANN_EF", AnnParams::default().ef_search),
        ef_construction: env("ANN_EFC", AnnParams::default().ef_construction),
        norm_ranges: env("ANN_RANGES", AnnParams::default().norm_ranges),
        quantization: std::env::var("ANN_Q")
            .ok()
            .and_then(|q| q.parse().ok())
            .unwrap_or(AnnParams::default().quantization),
    };
    println!(
        "| items | dim | quant | bands (graphs) | M / ef_c / ef_s | build s | index MB (RSS) | index MB (USearch allocated) | recall@100 | recall@10 | exact p50 / p99 us | HNSW p50 / p99 us | speed-up p50 | fallbacks |"
    );
    println!("|---:|---:|:---|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &sizes {
        let source = std::env::var("ANN_SOURCE").unwrap_or_default();
        let (items, users) = if source == "als" {
            trained(
                n,
                env("ANN_USERS", 50_000),
                env("ANN_PER_USER", 40),
                queries,
                dim,
            )
        } else {
            generate(n, queries, dim, n as u64)
        };
        let before = rss();
        let mut index = MipsIndex::build(items.view(), &params).expect("index build");
        let after = rss();
        let efs: Vec<usize> = std::env::var("ANN_EFS")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_else(|| vec![params.ef_search]);
        for &ef in &efs {
            index.set_ef_search(ef);
            let mut scratch = Vec::new();
            let (mut t_exact, mut t_ann) = (Vec::new(), Vec::new());
            let (mut exact, mut approx) = (Vec::new(), Vec::new());
            let mut fallbacks = 0;
            for u in users.rows() {
                let q = u.to_vec();
                // Exclude a handful of "seen" items, as serving does.
                let seen = |i: u32| i % 997 == 3;
                let t = Instant::now();
                let e = topk::top_k_dense(items.view(), &q, 100, seen, &mut scratch);
                t_exact.push(t.elapsed().as_secs_f64() * 1e6);
                let t = Instant::now();
                let (a, path) = index.search(items.view(), &q, 100, seen, &mut scratch);
                t_ann.push(t.elapsed().as_secs_f64() * 1e6);
                if path == SearchPath::ExactFallback {
                    fallbacks += 1;
                }
                exact.push(e);
                approx.push(a);
            }
            let r100 = ann::recall(&exact, &approx);
            let e10: Vec<_> = exact
                .iter()
                .map(|v| v[..10.min(v.len())].to_vec())
                .collect();
            let a10: Vec<_> = approx
                .iter()
                .map(|v| v[..10.min(v.len())].to_vec())
                .collect();
            let r10 = ann::recall(&e10, &a10);
            let (e50, e99) = (pct(&mut t_exact, 0.5), pct(&mut t_exact, 0.99));
            let (a50, a99) = (pct(&mut t_ann, 0.5), pct(&mut t_ann, 0.99));
            println!(
            "| {n} | {dim} | {:?} | {} ({}) | {} / {} / {} | {:.1} | {:.0} | {:.0} | {r100:.4} | {r10:.4} | {e50:.0} / {e99:.0} | {a50:.0} / {a99:.0} | {:.1}x | {fallbacks} |",
            params.quantization,
            index.ranges().0,
            index.ranges().1,
            params.m,
            params.ef_construction,
            ef,
            index.build_seconds(),
            after.saturating_sub(before) as f64 / 1e6,
            index.memory_bytes() as f64 / 1e6,
            e50 / a50,
        );
        }
    }
}
