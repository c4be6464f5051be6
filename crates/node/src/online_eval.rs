//! `troupe online-eval`: quality as users are served. Loads a train split (and the items)
//! into a live node through its HTTP API, retrains, waits until the node has applied and
//! embedded everything, asks for every test user's recommendations once per branch
//! (request `weights`) and once with the configured blend, and scores the answers with the
//! metrics of `troupe eval`, printing the same JSON shape.
//!
//! A branch-only request whose answer carries `fallback` (the branch had no candidate for
//! that user) counts as an empty list: `troupe eval` scores a branch by its own list too.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::{json, Value};
use troupe_models::data::{Columns, EventReader};
use troupe_models::dataset::WeightConfig;
use troupe_models::metrics::MetricsAccumulator;

use crate::cli::ColumnArgs;
use crate::exit::{CliError, CmdResult};

#[derive(Debug, clap::Args)]
pub struct OnlineEvalArgs {
    /// Base URL of a running node, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub url: String,
    /// Train split (CSV): loaded into the node unless `--no-load`.
    #[arg(long)]
    pub train: PathBuf,
    /// Test split (CSV): its positive rows are what each user should be served.
    #[arg(long)]
    pub test: PathBuf,
    /// Item file (CSV) upserted before the train rows.
    #[arg(long)]
    pub items: Option<PathBuf>,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// Drop rows below this value, in train and test (as `troupe eval --min-value`).
    #[arg(long)]
    pub min_value: Option<f32>,
    /// The node's config file: its event weights decide which test rows are positive
    /// (default: the built-in weights, as `troupe eval` without flags).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// The node already holds the train split: skip loading and retraining.
    #[arg(long)]
    pub no_load: bool,
    /// Bearer token for write and admin routes.
    #[arg(long, env = "TROUPE_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Bearer token for reads, when the node requires one.
    #[arg(long, env = "TROUPE_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<String>,
    /// Concurrent recommendation requests.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Give up waiting for the node to apply everything after this long (seconds).
    #[arg(long, default_value_t = 900)]
    pub wait_secs: u64,
    /// Print the report as JSON (the shape of `troupe eval --json`).
    #[arg(long)]
    pub json: bool,
}

/// Request weights per reported model, in the report's order.
const MODELS: [(&str, Option<&str>); 5] = [
    ("popularity", Some("0,0,1,0")),
    ("als", Some("1,0,0,0")),
    ("content", Some("0,1,0,0")),
    ("item_item", Some("0,0,0,1")),
    ("ensemble", None),
];

struct Http {
    agent: ureq::Agent,
    base: String,
}

impl Http {
    fn get(&self, path: &str, token: Option<&str>) -> Result<Value, String> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut r = req.call().map_err(|e| format!("GET {path}: {e}"))?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        if status >= 300 {
            return Err(format!("GET {path}: HTTP {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("GET {path}: {e}"))
    }

    fn post(&self, path: &str, token: Option<&str>) -> Result<Value, String> {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut r = req.send_empty().map_err(|e| format!("POST {path}: {e}"))?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        if status >= 300 {
            return Err(format!("POST {path}: HTTP {status}: {text}"));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// Percent-encodes a path segment (user ids may hold any character).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Waits until every stream's applied offset reached its head, no item text waits for
/// its embedding, and (with `model`) the node serves at least that ALS version. In a
/// cluster a partition's applied offset is its owner's: each member's `/v1/cluster` is
/// read for the partitions it serves (the catalog is applied by every node).
fn wait_settled(
    http: &Http,
    token: Option<&str>,
    wait: Duration,
    model: Option<u64>,
) -> Result<(), CliError> {
    let deadline = Instant::now() + wait;
    let mut last = String::new();
    while Instant::now() < deadline {
        match settled(http, token, model) {
            Ok(None) => return Ok(()),
            Ok(Some(why)) => last = why,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(CliError::Internal(anyhow::anyhow!(
        "the node did not settle within {wait:?}: {last}"
    )))
}

/// `None` when settled, else what is still waited for.
fn settled(http: &Http, token: Option<&str>, model: Option<u64>) -> Result<Option<String>, String> {
    let v = http.get("/v1/cluster", token)?;
    let offsets = |doc: &Value, key: &str| -> FxHashMap<String, u64> {
        doc[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let stream = s["stream"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| s["stream"].to_string());
                Some((stream, s["offset"].as_u64()?))
            })
            .collect()
    };
    let heads = offsets(&v, "journal_heads");
    let mut applied = offsets(&v, "applied");
    if let Some(members) = v["cluster"]["members"].as_array() {
        // Partition streams: the applied offset of the member serving each.
        let mut owned: FxHashMap<String, u64> = FxHashMap::default();
        for m in members {
            let doc = if m["self"] == true {
                v.clone()
            } else {
                let Some(addr) = m["http_addr"].as_str() else {
                    continue;
                };
                let peer = Http {
                    agent: http.agent.clone(),
                    base: format!("http://{addr}"),
                };
                match peer.get("/v1/cluster", token) {
                    Ok(d) => d,
                    Err(_) => continue,
                }
            };
            for p in doc["cluster"]["partitions"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if p["state"] == "serving" {
                    if let (Some(n), Some(a)) =
                        (p["partition"].as_u64(), p["applied_offset"].as_u64())
                    {
                        owned.insert(n.to_string(), a);
                    }
                }
            }
        }
        for (s, a) in applied.iter_mut() {
            if s != "catalog" {
                *a = owned.get(s).copied().unwrap_or(0);
            }
        }
    }
    let caught_up = heads
        .iter()
        .all(|(s, h)| applied.get(s).is_some_and(|a| a >= h));
    // The answering node's item statistics (popularity) cover every head too: in a
    // cluster a member that does not lead takes them from the leader's published
    // checkpoints, a second or two behind.
    let stats_doc = v["actors"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["name"] == "item_stats")
        .map(|a| serde_json::json!({"applied": a["state"]["applied_offsets"]}))
        .unwrap_or_default();
    let stats = offsets(&stats_doc, "applied");
    let stats_caught_up = heads
        .iter()
        .all(|(s, h)| stats.get(s).is_some_and(|a| a >= h));
    let encoding = v["actors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["name"] == "content_encoder")
        .any(|a| {
            a["state"]["in_flight_batches"].as_u64().unwrap_or(0) > 0
                || a["state"]["deferred_items"].as_u64().unwrap_or(0) > 0
        });
    let serving = v["als_model_version"].as_u64().unwrap_or(0);
    let model_ok = model.is_none_or(|m| serving >= m);
    // A served model whose HNSW index is still being built answers by exact scans:
    // quality as served is measured once the index answers.
    let indexing =
        v["als_index"]["state"] == "building" || v["content_index"]["state"] == "building";
    if caught_up && stats_caught_up && !encoding && model_ok && !indexing && v["ready"] == true {
        return Ok(None);
    }
    Ok(Some(format!(
        "heads {heads:?}, applied {applied:?}, item statistics at {stats:?}, encoding {encoding}, als version {serving} (waiting for {model:?}), index building {indexing}"
    )))
}

/// Positive test items per user, by the given weights (as `troupe eval` decides them).
fn relevant(
    a: &OnlineEvalArgs,
    weights: &WeightConfig,
) -> Result<Vec<(String, FxHashSet<String>)>, CliError> {
    let reader = EventReader::open(&a.test, &Columns::from(&a.cols), a.cols.skip_bad_rows)?;
    let mut sets: FxHashMap<String, FxHashSet<String>> = FxHashMap::default();
    for ev in reader {
        let ev = ev?;
        if let (Some(min), Some(v)) = (a.min_value, ev.value) {
            if v < min {
                continue;
            }
        }
        let w = weights.weight(ev.kind.as_deref(), ev.value.unwrap_or(f32::NAN));
        if w.is_some_and(|x| x > 0.0) {
            sets.entry(ev.user).or_default().insert(ev.item);
        }
    }
    let mut out: Vec<_> = sets.into_iter().collect();
    out.sort_by(|x, y| x.0.cmp(&y.0));
    Ok(out)
}

pub fn run(a: OnlineEvalArgs) -> CmdResult {
    if a.k == 0 || a.k > 1000 {
        return Err(CliError::input("--k must be in 1..=1000"));
    }
    let weights = match &a.config {
        Some(p) => {
            let c = crate::config::Config::load(p).map_err(CliError::input)?;
            c.settings().weights
        }
        None => WeightConfig::default(),
    };
    let http = Http {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(3600)))
            .build()
            .into(),
        base: a.url.trim_end_matches('/').to_string(),
    };
    let token = a.token.as_deref();
    let read = a.read_token.as_deref().or(token);
    let started = Instant::now();
    let mut load_summary = Value::Null;
    let mut retrain = Value::Null;
    if !a.no_load {
        let load = crate::load_cmd::LoadArgs {
            events: Some(a.train.clone()),
            items: a.items.clone(),
            url: a.url.clone(),
            cols: a.cols.clone(),
            batch: 1000,
            default_kind: "view".into(),
            id_prefix: None,
            state: None,
            restart: false,
            retry_for_secs: 120,
            acked_log: None,
            token: a.token.clone(),
            limit: 0,
            min_value: a.min_value,
        };
        load_summary = crate::load_cmd::load(&load)?;
        wait_settled(&http, token, Duration::from_secs(a.wait_secs), None)?;
        retrain = http
            .post("/v1/admin/retrain", token)
            .map_err(|e| CliError::Internal(anyhow::anyhow!(e)))?;
    }
    // A cluster's nodes load the version the leader published on their own: the node
    // asked must serve it before it is scored.
    let published = retrain["serving_version"].as_u64().filter(|&v| v > 0);
    wait_settled(&http, token, Duration::from_secs(a.wait_secs), published)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let rel = relevant(&a, &weights)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.concurrency.max(1))
        .build()
        .map_err(|e| CliError::Internal(e.into()))?;
    let mut models = serde_json::Map::new();
    let mut details = serde_json::Map::new();
    let mut encoder = String::new();
    // On a terminal: one bar over every query (users x models), with rate and ETA.
    let pb = indicatif::ProgressBar::new((rel.len() * MODELS.len()) as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "querying {bar:30} {human_pos}/{human_len} ({per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for (name, w) in MODELS {
        pb.set_message(name);
        let t = Instant::now();
        let answers: Vec<Result<Value, String>> = pool.install(|| {
            rel.par_iter()
                .map(|(user, _)| {
                    let mut path = format!("/v1/recommendations/{}?k={}", segment(user), a.k);
                    if let Some(w) = w {
                        path.push_str(&format!("&weights={w}"));
                    }
                    let r = http.get(&path, read);
                    pb.inc(1);
                    r
                })
                .collect()
        });
        let seconds = t.elapsed().as_secs_f64();
        // Item ids become indices for the shared metrics code.
        let mut ids: FxHashMap<String, u32> = FxHashMap::default();
        let mut id = |s: &str| -> u32 {
            let n = ids.len() as u32;
            *ids.entry(s.to_string()).or_insert(n)
        };
        let mut scored: Vec<(Vec<u32>, FxHashSet<u32>)> = Vec::with_capacity(rel.len());
        let (mut stale, mut fallbacks, mut degraded) = (0u64, 0u64, 0u64);
        for ((_, relevant), ans) in rel.iter().zip(answers) {
            let v = ans.map_err(|e| CliError::Internal(anyhow::anyhow!(e)))?;
            stale += u64::from(v["stale"] == true);
            degraded += u64::from(v["degraded"] == true);
            if encoder.is_empty() {
                encoder = v["model_versions"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
            }
            let fell_back = w.is_some() && !v["fallback"].is_null();
            fallbacks += u64::from(fell_back);
            let list: Vec<u32> = if fell_back {
                Vec::new()
            } else {
                v["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x["item"].as_str())
                    .map(&mut id)
                    .collect()
            };
            let r: FxHashSet<u32> = relevant.iter().map(|s| id(s.as_str())).collect();
            scored.push((list, r));
        }
        let mut acc = MetricsAccumulator::new(ids.len());
        for (list, r) in &scored {
            acc.add(list, r, a.k);
        }
        let m = acc.mean();
        models.insert(
            name.to_string(),
            json!({
                "precision": m.precision,
                "recall": m.recall,
                "map": m.map,
                "ndcg": m.ndcg,
                "coverage": acc.coverage(),
                "fit_seconds": 0.0,
            }),
        );
        details.insert(
            name.to_string(),
            json!({
                "weights": w,
                "requests": rel.len(),
                "seconds": seconds,
                "stale": stale,
                "degraded": degraded,
                "fallbacks_counted_empty": fallbacks,
                "coverage_universe": "items in the answers and the test split",
            }),
        );
    }
    pb.finish_and_clear();
    let report = json!({
        "schema": 1,
        "k": a.k,
        "users": rel.len(),
        "encoder": encoder,
        "models": models,
        "details": {
            "served": true,
            "url": http.base,
            "load": load_summary,
            "retrain": retrain,
            "load_and_settle_seconds": load_seconds,
            "per_model": details,
        },
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "served answers of {} users, K = {}, encoder: {encoder}",
            rel.len(),
            a.k
        );
        println!(
            "{:<12} {:>9} {:>9} {:>9} {:>9}",
            "model", "P@K", "R@K", "MAP@K", "NDCG@K"
        );
        for (name, _) in MODELS {
            let m = &report["models"][name];
            println!(
                "{:<12} {:>9.4} {:>9.4} {:>9.4} {:>9.4}",
                name,
                m["precision"].as_f64().unwrap_or(0.0),
                m["recall"].as_f64().unwrap_or(0.0),
                m["map"].as_f64().unwrap_or(0.0),
                m["ndcg"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_encoded_as_one_segment() {
        assert_eq!(segment("u-1_a.b~"), "u-1_a.b~");
        assert_eq!(segment("a/b c?"), "a%2Fb%20c%3F");
        assert_eq!(segment("é"), "%C3%A9");
    }
}
