//! The content branch's HNSW graphs against its exact scoring at catalogue scale, on the
//! generated catalogue the demo and the serving benchmark use (hashed TF, 1,024
//! dimensions, as the node encodes it): build time, memory, recall@k of user profiles
//! and per-query latency, exact and through the graphs, in one run. Hashed-TF rows are
//! sparse and get no graphs (ADR 021); only their exact figures are printed.
//!
//! `cargo run --release -p troupe-actors --example content_ann_scale -- 100000 1000000`
//! (arguments: item counts; env `ANN_QUERIES` (200), `ANN_K` (100, the ranker's
//! candidates), `ANN_EF` (search width), `ANN_M`, `ANN_EFC`; defaults those of
//! `AnnParams`). `ANN_DENSE=384` stands in for a sentence encoder: each hashed-TF row is
//! mapped to that many dense dimensions (a fixed Gaussian projection, normalised), so
//! the rows are dense as a sentence model's are and the graphs hold them as they are.

use std::collections::HashMap;
use std::time::Instant;

use ndarray::Array2;
use parking_lot::RwLock;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use troupe_actors::content_index::{build_ann, ContentIndex};
use troupe_models::ann::{AnnParams, SearchPath};
use troupe_models::content::{tfidf::HashedTfidf, TextEncoder};
use troupe_models::kernels;
use troupe_models::synth::{self, SynthConfig};
use troupe_models::topk::Scored;

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

/// Share of the exact top-k the approximate answer matches in score (ties at the k-th
/// score count as found: which of equal items comes back is arbitrary).
fn recall(exact: &[Scored], approx: &[Scored]) -> f64 {
    let Some(kth) = exact.last() else {
        return 1.0;
    };
    let good = approx
        .iter()
        .filter(|s| s.score >= kth.score - 1e-5)
        .count();
    good.min(exact.len()) as f64 / exact.len() as f64
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
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
    let queries = env("ANN_QUERIES", 200);
    let k = env("ANN_K", 100);
    let d = AnnParams::default();
    let params = AnnParams {
        m: env("ANN_M", d.m),
        ef_construction: env("ANN_EFC", d.ef_construction),
        ef_search: env("ANN_EF", d.ef_search),
        ..d
    };
    println!(
        "threads {} | k {k} | m {} ef_construction {} ef_search {} | {:?}",
        rayon::current_num_threads(),
        params.m,
        params.ef_construction,
        params.ef_search,
        params.quantization
    );
    println!("items | build s | graphs MB | rss MB | recall@{k} | exact p50/p99 ms | graph p50/p99 ms | speed-up | fallbacks");
    for n in sizes {
        let cfg = SynthConfig {
            items: n,
            users: 2_000,
            events: 60_000,
            clusters: 12,
            ..SynthConfig::default()
        };
        let (mut items, mut events) = (Vec::new(), Vec::new());
        synth::generate(&cfg, &mut items, &mut events, &mut |_| {}).expect("generate");
        let items = String::from_utf8(items).expect("utf-8");
        let texts: Vec<(String, String)> = items
            .lines()
            .skip(1)
            .filter_map(|l| {
                let (id, rest) = l.split_once(',')?;
                let (text, _) = rest.rsplit_once(',')?;
                Some((id.to_string(), text.trim_matches('"').to_string()))
            })
            .collect();
        let enc = HashedTfidf::uniform(1024).expect("encoder");
        let dense = env("ANN_DENSE", 0);
        let gauss = (dense > 0).then(|| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let normal = Normal::new(0.0f32, 1.0).expect("normal");
            Array2::from_shape_fn((enc.dim(), dense), |_| normal.sample(&mut rng))
        });
        let dim = if dense > 0 { dense } else { enc.dim() };
        let lock = RwLock::new(ContentIndex::new(dim, "tfidf".into()));
        for chunk in texts.chunks(4096) {
            let refs: Vec<&str> = chunk.iter().map(|(_, t)| t.as_str()).collect();
            let mut m = enc.encode(&refs).expect("encode");
            if let Some(g) = &gauss {
                m = m.dot(g);
                for mut r in m.rows_mut() {
                    kernels::l2_normalize(r.as_slice_mut().expect("row"));
                }
            }
            let mut c = lock.write();
            for ((id, _), row) in chunk.iter().zip(m.rows()) {
                c.set(id, 1, row.as_slice().expect("row"));
            }
        }
        // Users: their first 20 items of the generated events.
        let events = String::from_utf8(events).expect("utf-8");
        let mut by_user: HashMap<&str, Vec<&str>> = HashMap::new();
        for l in events.lines().skip(1) {
            let mut f = l.split(',');
            if let (Some(u), Some(i)) = (f.next(), f.next()) {
                let v = by_user.entry(u).or_default();
                if v.len() < 20 {
                    v.push(i);
                }
            }
        }
        let mut users: Vec<Vec<&str>> = by_user.into_values().filter(|v| v.len() >= 3).collect();
        users.sort();
        users.truncate(queries);

        let before = rss();
        // Sparse rows get no graphs (ADR 021): then only the exact figures are printed.
        let ann = build_ann(&lock, &params).expect("build");
        let grown = rss().saturating_sub(before);
        let c = lock.read();
        let (mut exact_ms, mut graph_ms, mut fresh_ms) = (Vec::new(), Vec::new(), Vec::new());
        let (mut total, mut fallbacks) = (0.0, 0);
        let mut scratch = Vec::new();
        for u in &users {
            let touched: Vec<(u32, f32, i64)> = u
                .iter()
                .filter_map(|i| c.index(i).map(|r| (r, 1.0, 0)))
                .collect();
            let Some(profile) = c.user_profile(&touched, 1e9) else {
                continue;
            };
            let seen: Vec<u32> = touched.iter().map(|t| t.0).collect();
            let excluded = |i: u32| !c.live(i) || seen.contains(&i);
            let t = Instant::now();
            let exact = c.exact_top_k(&profile, k, excluded, &mut scratch);
            exact_ms.push(t.elapsed().as_secs_f64() * 1e3);
            // As a request does it: a score buffer of its own.
            let t = Instant::now();
            let again = c.exact_top_k(&profile, k, excluded, &mut Vec::new());
            fresh_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(again.len(), exact.len());
            let t = Instant::now();
            let (approx, path) = c.top_k(&profile, k, excluded, &mut scratch);
            graph_ms.push(t.elapsed().as_secs_f64() * 1e3);
            if path != Some(SearchPath::Graph) {
                fallbacks += 1;
            }
            total += recall(&exact, &approx);
        }
        let q = exact_ms.len().max(1);
        let (e50, g50) = (pct(&mut exact_ms, 0.5), pct(&mut graph_ms, 0.5));
        let Some(ann) = ann else {
            println!(
                "{n} | sparse rows: no graphs | - | - | - | {:.2}/{:.2} (fresh buffer {:.2}/{:.2}) | - | - | -",
                e50,
                pct(&mut exact_ms, 0.99),
                pct(&mut fresh_ms, 0.5),
                pct(&mut fresh_ms, 0.99)
            );
            continue;
        };
        println!(
            "{n} | {:.1} | {:.0} | +{:.0} | {:.3} | {:.2}/{:.2} (fresh buffer {:.2}/{:.2}) | {:.2}/{:.2} | {:.1}x | {fallbacks}/{q}",
            ann.build_seconds(),
            ann.memory_bytes() as f64 / (1 << 20) as f64,
            grown as f64 / (1 << 20) as f64,
            total / q as f64,
            e50,
            pct(&mut exact_ms, 0.99),
            pct(&mut fresh_ms, 0.5),
            pct(&mut fresh_ms, 0.99),
            g50,
            pct(&mut graph_ms, 0.99),
            e50 / g50.max(1e-9),
        );
    }
}
