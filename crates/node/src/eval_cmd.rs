//! `troupe eval`: load data, split if asked, fit every branch, print the report.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array2;
use rayon::prelude::*;
use tracing::{info, warn};
use troupe_models::als::{AlsParams, RegScaling};
use troupe_models::blend::Normalization;
use troupe_models::content::onnx::OnnxEncoder;
use troupe_models::content::tfidf::HashedTfidf;
use troupe_models::content::TextEncoder;
use troupe_models::data::{read_items, read_tags, write_events, Columns, Event, EventReader};
use troupe_models::dataset::{split_per_user, Dataset, Interaction, SplitKind, WeightConfig};
use troupe_models::evaluate::{BlendSettings, EvalConfig, EvalReport, Evaluation, NB};

use crate::cli::{ColumnArgs, EmbedArgs, EvalArgs, NormArg, RegScalingArg, SplitArg};
use crate::exit::{CliError, CmdResult};

impl From<&ColumnArgs> for Columns {
    fn from(c: &ColumnArgs) -> Self {
        Columns {
            user: c.user_col.clone(),
            item: c.item_col.clone(),
            value: c.value_col.clone(),
            ts: c.ts_col.clone(),
            kind: c.kind_col.clone(),
            text: c.text_col.clone(),
            category: c.category_col.clone(),
        }
    }
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {human_pos} rows ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Streams an event file into `data`, dropping rows below `min_value` first.
pub fn load_events(
    path: &Path,
    cols: &ColumnArgs,
    min_value: Option<f32>,
    data: &mut Dataset,
) -> Result<Vec<Interaction>, CliError> {
    let mut reader = EventReader::open(path, &Columns::from(cols), cols.skip_bad_rows)?;
    let pb = spinner(&format!("reading {}", path.display()));
    let mut out = Vec::new();
    let mut dropped = 0u64;
    for (n, ev) in reader.by_ref().enumerate() {
        let ev = ev?;
        if n % 65_536 == 0 {
            pb.set_position(n as u64);
        }
        if let (Some(min), Some(v)) = (min_value, ev.value) {
            if v < min {
                dropped += 1;
                continue;
            }
        }
        out.push(data.intern(&ev));
    }
    pb.finish_and_clear();
    let skipped = reader.skipped();
    if skipped.skipped > 0 {
        warn!(file = %path.display(), skipped = skipped.skipped, examples = ?skipped.examples, "skipped malformed rows");
    }
    info!(file = %path.display(), rows = out.len(), below_min_value = dropped, "events loaded");
    Ok(out)
}

/// Item embeddings with how long building the encoder and encoding took.
pub struct Embedded {
    pub embeddings: Array2<f32>,
    pub encoder: String,
    pub load_seconds: f64,
    pub encode_seconds: f64,
}

/// Builds the configured encoder and embeds every item that has text.
pub fn embed_items(
    data: &Dataset,
    model_dir: Option<&Path>,
    max_len: usize,
    batch: usize,
    tfidf_dim: usize,
) -> Result<Embedded, CliError> {
    let texts = data.item_texts();
    let with_text: Vec<usize> = (0..texts.len()).filter(|&i| !texts[i].is_empty()).collect();
    let refs: Vec<&str> = with_text.iter().map(|&i| texts[i].as_str()).collect();
    let started = Instant::now();
    let encoder: Box<dyn TextEncoder> = match model_dir {
        Some(dir) => Box::new(
            OnnxEncoder::load(dir, max_len)
                .map_err(|e| CliError::input(format!("--content-model {}: {e}", dir.display())))?,
        ),
        // The node's encoder (uniform IDF: an item's embedding depends on its text alone),
        // so served and evaluated content scores are the same function.
        None => Box::new(HashedTfidf::uniform(tfidf_dim)?),
    };
    let name = encoder.name();
    let load_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    info!(encoder = %name, texts = refs.len(), "embedding item texts");
    let pb = ProgressBar::new(refs.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} texts ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // Batches run in parallel; each inference is single-threaded.
    let chunks: Vec<&[&str]> = refs.chunks(batch.max(1)).collect();
    let parts: Vec<Array2<f32>> = chunks
        .par_iter()
        .map(|c| {
            let r = encoder.encode(c);
            pb.inc(c.len() as u64);
            r
        })
        .collect::<Result<_, _>>()
        .map_err(|e| CliError::Internal(anyhow::Error::new(e)))?;
    pb.finish_and_clear();
    let mut emb = Array2::<f32>::zeros((texts.len(), encoder.dim()));
    let mut row = 0;
    for part in parts {
        for r in part.rows() {
            emb.row_mut(with_text[row]).assign(&r);
            row += 1;
        }
    }
    Ok(Embedded {
        embeddings: emb,
        encoder: name,
        load_seconds,
        encode_seconds: started.elapsed().as_secs_f64(),
    })
}

fn parse_weights(s: &str) -> Result<[f32; NB], CliError> {
    let mut w = [0f32; NB];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| CliError::input(format!("--weights: `{part}` is not branch=weight")))?;
        let v: f32 = v
            .trim()
            .parse()
            .map_err(|_| CliError::input(format!("--weights: `{v}` is not a number")))?;
        if !(v.is_finite() && v >= 0.0) {
            return Err(CliError::input(format!(
                "--weights: weight of `{k}` must be >= 0"
            )));
        }
        let idx = match k.trim() {
            "als" => 0,
            "content" => 1,
            "popularity" | "pop" => 2,
            "item_item" => 3,
            other => {
                return Err(CliError::input(format!(
                    "--weights: unknown branch `{other}` (als, content, popularity, item_item)"
                )))
            }
        };
        w[idx] = v;
    }
    if w.iter().sum::<f32>() <= 0.0 {
        return Err(CliError::input(
            "--weights: at least one weight must be positive",
        ));
    }
    Ok(w)
}

/// The content encoder an evaluation uses.
pub struct EncoderChoice {
    pub model_dir: Option<PathBuf>,
    pub max_len: usize,
    pub tfidf_dim: usize,
}

/// The encoder from the flags, or from the node config given with `--config`.
pub fn encoder_from_args(a: &EvalArgs) -> Result<EncoderChoice, CliError> {
    match &a.config {
        Some(path) => {
            let s = node_settings(path)?;
            Ok(EncoderChoice {
                model_dir: s.content.onnx_model_dir.clone(),
                max_len: s.content.onnx_max_len,
                tfidf_dim: s.content.tfidf_dim,
            })
        }
        None => Ok(EncoderChoice {
            model_dir: a.content_model.clone(),
            max_len: a.max_len,
            tfidf_dim: a.tfidf_dim,
        }),
    }
}

fn node_settings(path: &Path) -> Result<troupe_actors::settings::Settings, CliError> {
    let c = crate::config::Config::load(path).map_err(CliError::input)?;
    let problems = c.validate(false);
    if !problems.is_empty() {
        return Err(CliError::input(format!(
            "{}: {}",
            path.display(),
            problems.join("; ")
        )));
    }
    Ok(c.settings())
}

/// Turns the CLI flags into an evaluation config (validating everything first).
pub fn config_from_args(a: &EvalArgs) -> Result<EvalConfig, CliError> {
    if a.k == 0 || a.k > 1000 {
        return Err(CliError::input("--k must be in 1..=1000"));
    }
    if !(0.0..1.0).contains(&a.holdout) || a.holdout == 0.0 {
        return Err(CliError::input("--holdout must be in (0, 1)"));
    }
    if let Some(path) = &a.config {
        // The node's settings, read by the node's own code.
        let s = node_settings(path)?;
        let days = |d: std::time::Duration| d.as_secs_f64() / 86_400.0;
        let als = AlsParams {
            seed: a.seed,
            ..s.als.params.clone()
        };
        als.validate()?;
        let blend = BlendSettings {
            weights: s.ranker.weights,
            normalization: s.ranker.normalization,
            candidates: s.ranker.candidates.max(a.k),
        };
        let decays = (
            days(s.popularity_half_life),
            days(s.content.profile_half_life),
        );
        let mut cfg = eval_config(a, als, s.weights.clone(), blend, decays);
        cfg.ease = s.als.item_item.clone();
        return Ok(cfg);
    }
    let mut weights = WeightConfig {
        transform: a
            .value_transform
            .parse()
            .map_err(|e: String| CliError::input(format!("--value-transform: {e}")))?,
        negative_kinds: a
            .negative_kinds
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect(),
        ..WeightConfig::default()
    };
    if let Some(kw) = &a.kind_weights {
        weights.kind_weights = WeightConfig::parse_kind_weights(kw)
            .map_err(|e| CliError::input(format!("--kind-weights: {e}")))?;
    }
    let mut blend = BlendSettings {
        candidates: a.candidates.max(a.k),
        ..BlendSettings::default()
    };
    if let Some(w) = &a.weights {
        blend.weights = parse_weights(w)?;
    }
    match a.normalization {
        Some(NormArg::Rrf) => blend.normalization = Normalization::default(),
        Some(NormArg::Zscore) => blend.normalization = Normalization::ZScore,
        None => {}
    }
    let als = AlsParams {
        factors: a.factors,
        iterations: a.iterations,
        reg: a.reg,
        alpha: a.alpha,
        reg_scaling: match a.reg_scaling {
            RegScalingArg::None => RegScaling::None,
            RegScalingArg::Count => RegScaling::Count,
        },
        cg_steps: a.cg_steps,
        seed: a.seed,
    };
    als.validate()?;
    let decays = (a.popularity_half_life_days, a.content_half_life_days);
    Ok(eval_config(a, als, weights, blend, decays))
}

/// The evaluation config from the model settings (flags or a node config) and the
/// flags that only the evaluation has (k, tuning, split, seed). `decays` are the
/// popularity and content half-lives in days.
fn eval_config(
    a: &EvalArgs,
    als: AlsParams,
    weights: WeightConfig,
    blend: BlendSettings,
    decays: (f64, f64),
) -> EvalConfig {
    EvalConfig {
        k: a.k,
        als,
        weights,
        blend,
        popularity_half_life_days: decays.0,
        content_half_life_days: decays.1,
        tune: a.tune || a.tune_blend,
        tune_blend_only: a.tune_blend,
        validation_fraction: a.holdout,
        validation_split: match a.split {
            Some(SplitArg::Time) => SplitKind::Time,
            _ => SplitKind::Random,
        },
        seed: a.seed,
        curve_to: if a.plot.is_some() { PLOT_K } else { 0 },
        ease: troupe_models::ease::EaseParams {
            lambda: a.ease_lambda,
            max_items: a.ease_max_items,
            neighbours: a.ease_neighbours,
            tail_neighbours: a.ease_tail_neighbours,
        },
    }
}

/// NDCG@k is drawn for k = 1..PLOT_K.
const PLOT_K: usize = 50;

/// Loaded, interned and split data.
struct Loaded {
    data: Dataset,
    train: Vec<Interaction>,
    test: Vec<Interaction>,
}

/// Kind index -> kind name, detached from the dataset so it can cross threads.
fn kind_names(data: &Dataset) -> impl Fn(u16) -> Option<String> + Sync {
    let kinds: Vec<String> = (0..data.kinds.len() as u32)
        .map(|k| data.kinds.name(k).unwrap_or_default().to_string())
        .collect();
    move |k: u16| kinds.get(k as usize).cloned()
}

/// Writes a split as `train.csv` and `test.csv` under `dir`, with the original ids.
fn save_split(
    dir: &Path,
    data: &Dataset,
    train: &[Interaction],
    test: &[Interaction],
) -> Result<(), CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::input(format!("cannot create {}: {e}", dir.display())))?;
    let event = |x: &Interaction| Event {
        user: data.users.name(x.user).unwrap_or_default().to_string(),
        item: data.items.name(x.item).unwrap_or_default().to_string(),
        kind: data.kind_name(x.kind).map(str::to_string),
        value: (!x.value.is_nan()).then_some(x.value),
        ts: x.ts,
    };
    for (name, rows) in [("train.csv", train), ("test.csv", test)] {
        let events: Vec<Event> = rows.iter().map(event).collect();
        write_events(&dir.join(name), &events)?;
    }
    info!(dir = %dir.display(), train = train.len(), test = test.len(), "split saved");
    Ok(())
}

fn load(a: &EvalArgs) -> Result<Loaded, CliError> {
    let mut data = Dataset::default();
    let cols = Columns::from(&a.columns);
    let (items, skipped) = read_items(&a.items, &cols, a.columns.skip_bad_rows)?;
    if skipped.skipped > 0 {
        warn!(file = %a.items.display(), skipped = skipped.skipped, "skipped malformed item rows");
    }
    data.add_items(items);
    let (train, test) = match (&a.train, &a.test, &a.events, a.split) {
        (Some(tr), Some(te), None, None) => {
            let train = load_events(tr, &a.columns, a.min_value, &mut data)?;
            let test = load_events(te, &a.columns, a.min_value, &mut data)?;
            (train, test)
        }
        (None, None, Some(ev), Some(split)) => {
            let rows = load_events(ev, &a.columns, a.min_value, &mut data)?;
            let kind = match split {
                SplitArg::Random => SplitKind::Random,
                SplitArg::Time => SplitKind::Time,
            };
            let (train, test) = split_per_user(&rows, a.holdout, kind, a.seed)?;
            if let Some(dir) = &a.save_split {
                save_split(dir, &data, &train, &test)?;
            }
            (train, test)
        }
        _ => {
            return Err(CliError::input(
                "give either --train and --test, or --events with --split",
            ))
        }
    };
    if train.is_empty() {
        return Err(CliError::input("no train rows (after --min-value)"));
    }
    if let Some(t) = &a.tags {
        let (tags, _) = read_tags(t, a.columns.skip_bad_rows)?;
        data.add_tags(tags);
    }
    Ok(Loaded { data, train, test })
}

/// Loads the data named by the flags and runs the evaluation.
pub fn evaluate(a: &EvalArgs) -> Result<EvalReport, CliError> {
    let cfg = config_from_args(a)?;
    let Loaded { data, train, test } = load(a)?;
    let kind_name = kind_names(&data);
    let enc = encoder_from_args(a)?;
    let e = embed_items(
        &data,
        enc.model_dir.as_deref(),
        enc.max_len,
        a.batch,
        enc.tfidf_dim,
    )?;
    let (user_keys, item_keys) = (data.users.row_keys(), data.items.row_keys());
    // `--tune`: a bar over the configurations tried (drawn on a terminal only).
    let tune_bar = ProgressBar::new(0);
    tune_bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let ev = Evaluation {
        user_keys: &user_keys,
        item_keys: &item_keys,
        train: &train,
        test: &test,
        kind_name: &kind_name,
        embeddings: e.embeddings.view(),
        encoder_name: e.encoder.clone(),
        embed_seconds: e.load_seconds + e.encode_seconds,
        progress: &|phase, done, total| {
            if done == 0 {
                tune_bar.set_length(total);
                tune_bar.set_message(phase.to_string());
                tune_bar.reset();
            }
            tune_bar.set_position(done);
            if done == total {
                tune_bar.finish_and_clear();
            }
        },
    };
    Ok(ev.run(&cfg, |m| info!("{m}"))?)
}

fn print_table(r: &EvalReport) {
    println!(
        "users evaluated: {}   K = {}   encoder: {}",
        r.users, r.k, r.encoder
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "model", "P@K", "R@K", "MAP@K", "NDCG@K", "coverage", "fit s"
    );
    let m = &r.models;
    for (name, x) in [
        ("popularity", &m.popularity),
        ("als", &m.als),
        ("content", &m.content),
        ("item_item", &m.item_item),
        ("ensemble", &m.ensemble),
    ] {
        println!(
            "{:<12} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>9.2}",
            name, x.precision, x.recall, x.map, x.ndcg, x.coverage, x.fit_seconds
        );
    }
}

/// `troupe embed`: vectors of the first `--limit` items, or only the throughput.
pub fn embed(a: EmbedArgs) -> CmdResult {
    let (mut items, _) = read_items(
        &a.items,
        &Columns::from(&a.columns),
        a.columns.skip_bad_rows,
    )?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    let mut data = Dataset::default();
    data.add_items(items);
    let Embedded {
        embeddings: emb,
        encoder: name,
        load_seconds,
        encode_seconds: secs,
    } = embed_items(
        &data,
        a.content_model.as_deref(),
        a.max_len,
        a.batch,
        a.tfidf_dim,
    )?;
    let texts = data.item_texts();
    let n = texts.iter().filter(|t| !t.is_empty()).count();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let io = |e: std::io::Error| CliError::Internal(e.into());
    if a.throughput_only {
        let v = serde_json::json!({"encoder": name, "texts": n, "seconds": secs, "load_seconds": load_seconds, "per_second": n as f64 / secs.max(1e-9), "threads": rayon::current_num_threads(), "batch": a.batch});
        writeln!(out, "{v}").map_err(io)?;
        return Ok(());
    }
    for (i, t) in texts.iter().enumerate() {
        let v = serde_json::json!({"id": data.items.name(i as u32), "text": t, "embedding": emb.row(i).to_vec()});
        writeln!(out, "{v}").map_err(io)?;
    }
    info!(encoder = %name, texts = n, seconds = secs, "embedded");
    Ok(())
}

/// `troupe fit-als`: ALS alone, with fit and recommend-for-all timed separately.
pub fn fit_als(a: Box<EvalArgs>) -> CmdResult {
    let cfg = config_from_args(&a)?;
    let loaded = load(&a)?;
    let kind_name = kind_names(&loaded.data);
    // A bar over the ALS iterations (drawn on a terminal only).
    let bar = ProgressBar::new(cfg.als.iterations as u64);
    bar.set_style(
        ProgressStyle::with_template("ALS {bar:30} {pos}/{len} iterations ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let r = troupe_models::evaluate::evaluate_als(
        loaded.data.users.len(),
        loaded.data.items.len(),
        &loaded.train,
        &loaded.test,
        &kind_name,
        &cfg.weights,
        &cfg.als,
        cfg.k,
        &|done, _| bar.set_position(done as u64),
    );
    bar.finish_and_clear();
    let r = r?;
    let s = serde_json::to_string(&r).map_err(|e| CliError::Internal(e.into()))?;
    println!("{s}");
    Ok(())
}

pub fn run(a: Box<EvalArgs>) -> CmdResult {
    let report = evaluate(&a)?;
    if let Some(path) = &a.plot {
        let curves = &report.details["ndcg_curve"];
        let series: Vec<(String, Vec<f64>)> =
            ["ensemble", "als", "content", "popularity", "item_item"]
                .iter()
                .filter_map(|m| {
                    let v: Vec<f64> = curves[m]
                        .as_array()?
                        .iter()
                        .filter_map(|x| x.as_f64())
                        .collect();
                    Some((m.to_string(), v))
                })
                .collect();
        let title = format!("NDCG@k, {} test users", report.users);
        crate::plot::curves(path, &title, "k", "NDCG@k", &series)
            .map_err(|e| CliError::input(format!("--plot {}: {e}", path.display())))?;
        if !a.json {
            println!("NDCG@k for k = 1..{PLOT_K} drawn in {}", path.display());
        }
    }
    if a.json {
        let s = serde_json::to_string(&report).map_err(|e| CliError::Internal(e.into()))?;
        println!("{s}");
    } else {
        print_table(&report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_flag() {
        assert_eq!(
            parse_weights("als=1,content=0.5").unwrap(),
            [1.0, 0.5, 0.0, 0.0]
        );
        assert_eq!(
            parse_weights("item_item=0.6,popularity=0.4").unwrap(),
            [0.0, 0.0, 0.4, 0.6]
        );
        assert!(parse_weights("als=x").is_err());
        assert!(parse_weights("foo=1").is_err());
        assert!(parse_weights("als=0").is_err());
    }
}
