//! Synthetic interaction data with real structure, for tests, demos and benchmarks.
//!
//! Items belong to latent taste clusters and have power-law popularity; users have
//! power-law activity and one or two favourite clusters; item texts are drawn from
//! per-cluster vocabularies, so the content model has real signal. Output is CSV streamed in
//! chunks (users are generated in parallel, written in order), so 1M users x 100k items x 50M
//! events never sit in memory. Deterministic for a seed. Events are grouped by user and
//! time-ordered within each user.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// Generator settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthConfig {
    pub users: usize,
    pub items: usize,
    /// Approximate total number of events.
    pub events: u64,
    pub clusters: usize,
    /// Zipf exponent of item popularity.
    pub item_skew: f64,
    /// Zipf exponent of user activity.
    pub user_skew: f64,
    pub seed: u64,
    /// First timestamp (Unix seconds) and span of the data in days.
    pub start_ts: i64,
    pub span_days: i64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            users: 2_000,
            items: 1_000,
            events: 100_000,
            clusters: 12,
            item_skew: 0.9,
            user_skew: 0.7,
            seed: 42,
            start_ts: 1_600_000_000,
            span_days: 180,
        }
    }
}

impl SynthConfig {
    pub fn validate(&self) -> Result<()> {
        if self.users == 0 || self.items == 0 || self.clusters == 0 || self.events == 0 {
            return Err(ModelError::param(
                "users/items/events/clusters",
                "must all be >= 1",
            ));
        }
        if self.clusters > self.items {
            return Err(ModelError::param("clusters", "cannot exceed items"));
        }
        if self.users > u32::MAX as usize || self.items > u32::MAX as usize {
            return Err(ModelError::param("users/items", "must fit in u32"));
        }
        Ok(())
    }
}

/// What was written.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SynthStats {
    pub users: usize,
    pub items: usize,
    pub events: u64,
}

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ra", "te", "su", "no", "vi", "da", "pe", "zu", "ko", "ba", "ri", "fo", "ne",
    "ta", "gu", "le", "mo",
];

fn word(rng: &mut impl Rng) -> String {
    let n = rng.random_range(2..4);
    (0..n)
        .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
        .collect()
}

struct Model {
    item_cluster: Vec<u32>,
    /// Per cluster: items and cumulative popularity weights.
    cluster_items: Vec<(Vec<u32>, Vec<f64>)>,
    global_cum: Vec<f64>,
    cluster_vocab: Vec<Vec<String>>,
    shared_vocab: Vec<String>,
}

fn sample(cum: &[f64], rng: &mut impl Rng) -> usize {
    let total = cum.last().copied().unwrap_or(0.0);
    let x = rng.random::<f64>() * total;
    cum.partition_point(|&c| c <= x)
        .min(cum.len().saturating_sub(1))
}

fn build(cfg: &SynthConfig) -> Model {
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let item_cluster: Vec<u32> = (0..cfg.items)
        .map(|i| {
            if i < cfg.clusters {
                i as u32
            } else {
                rng.random_range(0..cfg.clusters as u32)
            }
        })
        .collect();
    // Popularity rank is a random permutation so clusters mix popular and niche items.
    let mut ranks: Vec<usize> = (0..cfg.items).collect();
    rand::seq::SliceRandom::shuffle(ranks.as_mut_slice(), &mut rng);
    let weight: Vec<f64> = ranks
        .iter()
        .map(|&r| 1.0 / ((r + 1) as f64).powf(cfg.item_skew))
        .collect();
    let mut cluster_items: Vec<(Vec<u32>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); cfg.clusters];
    for (i, &c) in item_cluster.iter().enumerate() {
        let (items, cum) = &mut cluster_items[c as usize];
        let prev = cum.last().copied().unwrap_or(0.0);
        items.push(i as u32);
        cum.push(prev + weight[i]);
    }
    let mut acc = 0.0;
    let global_cum = weight
        .iter()
        .map(|w| {
            acc += w;
            acc
        })
        .collect();
    let cluster_vocab = (0..cfg.clusters)
        .map(|_| (0..30).map(|_| word(&mut rng)).collect())
        .collect();
    let shared_vocab = (0..150).map(|_| word(&mut rng)).collect();
    Model {
        item_cluster,
        cluster_items,
        global_cum,
        cluster_vocab,
        shared_vocab,
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes the catalogue (`item,text,category`) and the events
/// (`user,item,kind,value,ts`). `progress(events_so_far)` is called after each chunk.
pub fn generate(
    cfg: &SynthConfig,
    items_out: &mut dyn Write,
    events_out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<SynthStats> {
    cfg.validate()?;
    let io = |source| ModelError::Io {
        path: "synthetic output".into(),
        source,
    };
    let model = build(cfg);
    writeln!(items_out, "item,text,category").map_err(io)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0xabcdef);
    for i in 0..cfg.items {
        let c = model.item_cluster[i] as usize;
        let mut words: Vec<&str> = (0..4)
            .map(|_| model.cluster_vocab[c][rng.random_range(0..30)].as_str())
            .collect();
        words.extend(
            (0..2).map(|_| {
                model.shared_vocab[rng.random_range(0..model.shared_vocab.len())].as_str()
            }),
        );
        writeln!(items_out, "i{i},{},c{c}", csv_field(&words.join(" "))).map_err(io)?;
    }

    // User activity: Zipf weights over a seeded permutation of users.
    let user_w: Vec<f64> = (0..cfg.users)
        .map(|u| 1.0 / ((u + 1) as f64).powf(cfg.user_skew))
        .collect();
    let total_w: f64 = user_w.iter().sum();
    writeln!(events_out, "user,item,kind,value,ts").map_err(io)?;
    const CHUNK: usize = 2048;
    let chunks: Vec<usize> = (0..cfg.users).step_by(CHUNK).collect();
    let mut written = 0u64;
    let span = cfg.span_days.max(1) * 86_400;
    for window in chunks.chunks(rayon::current_num_threads().max(1) * 2) {
        let bufs: Vec<(String, u64)> = window
            .par_iter()
            .map(|&start| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(
                    cfg.seed
                        .wrapping_mul(0x9E37_79B9)
                        .wrapping_add(start as u64),
                );
                let mut s = String::new();
                let mut n = 0u64;
                for u in start..(start + CHUNK).min(cfg.users) {
                    // A seeded shuffle of activity: user u takes the weight of a pseudo-random rank.
                    let rank = (u as u64).wrapping_mul(2_654_435_761) as usize % cfg.users;
                    let count =
                        ((cfg.events as f64 * user_w[rank] / total_w).round() as u64).max(1);
                    let primary = rng.random_range(0..cfg.clusters);
                    let secondary = if rng.random::<f64>() < 0.35 {
                        rng.random_range(0..cfg.clusters)
                    } else {
                        primary
                    };
                    let t0 = cfg.start_ts + rng.random_range(0..span);
                    let mut ts = t0;
                    for _ in 0..count {
                        let r = rng.random::<f64>();
                        let item = if r < 0.9 {
                            let c = if r < 0.65 { primary } else { secondary };
                            let (items, cum) = &model.cluster_items[c];
                            items[sample(cum, &mut rng)]
                        } else {
                            sample(&model.global_cum, &mut rng) as u32
                        };
                        let k = rng.random::<f64>();
                        let (kind, value) = if k < 0.70 {
                            ("view", 1)
                        } else if k < 0.85 {
                            ("click", 1)
                        } else if k < 0.95 {
                            ("add_to_cart", 1)
                        } else {
                            ("purchase", rng.random_range(1..6))
                        };
                        ts += rng.random_range(1..3_600);
                        s.push_str(&format!("u{u},i{item},{kind},{value},{ts}\n"));
                        n += 1;
                    }
                }
                (s, n)
            })
            .collect();
        for (s, n) in bufs {
            events_out.write_all(s.as_bytes()).map_err(io)?;
            written += n;
        }
        progress(written);
    }
    events_out.flush().map_err(io)?;
    items_out.flush().map_err(io)?;
    Ok(SynthStats {
        users: cfg.users,
        items: cfg.items,
        events: written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_items, Columns, EventReader};

    #[test]
    fn deterministic_and_readable() {
        let cfg = SynthConfig {
            users: 300,
            items: 120,
            events: 5_000,
            clusters: 6,
            ..Default::default()
        };
        let run = || {
            let (mut i, mut e) = (Vec::new(), Vec::new());
            let stats = generate(&cfg, &mut i, &mut e, &mut |_| {}).unwrap();
            (i, e, stats)
        };
        let (i1, e1, s1) = run();
        let (i2, e2, _) = run();
        assert_eq!(i1, i2);
        assert_eq!(e1, e2);
        assert!(s1.events >= 4_000 && s1.events <= 6_000, "{}", s1.events);

        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("items.csv"), &i1).unwrap();
        std::fs::write(d.path().join("events.csv"), &e1).unwrap();
        let (items, _) =
            read_items(&d.path().join("items.csv"), &Columns::default(), false).unwrap();
        assert_eq!(items.len(), 120);
        assert!(items[0].categories[0].starts_with('c'));
        let evs: Vec<_> =
            EventReader::open(&d.path().join("events.csv"), &Columns::default(), false)
                .unwrap()
                .collect::<crate::error::Result<_>>()
                .unwrap();
        assert_eq!(evs.len() as u64, s1.events);
        // Popularity is skewed: the top 10% of items take well over 10% of events.
        let mut counts = std::collections::HashMap::<String, usize>::new();
        for e in &evs {
            *counts.entry(e.item.clone()).or_default() += 1;
        }
        let mut c: Vec<usize> = counts.values().copied().collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        let top: usize = c.iter().take(12).sum();
        assert!(top as f64 > 0.2 * evs.len() as f64);
    }
}
