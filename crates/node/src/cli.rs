//! Command-line definitions. The `eval` flags are a stable contract read by tools outside
//! this repository: keep names and defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "troupe",
    version,
    about = "Troupe: a real-time recommender made of supervised actors"
)]
pub struct Cli {
    /// Debug logging (or set TROUPE_LOG, e.g. TROUPE_LOG=troupe_models=debug).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// Worker threads for parallel work (default: one per core).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Offline evaluation of every model branch and the blended ensemble.
    Eval(Box<EvalArgs>),
    /// Write a synthetic data set (events.csv, items.csv) with latent structure.
    Gen(GenArgs),
    /// Fit ALS alone on pre-split files and time fit and recommend-for-all (benchmarks).
    FitAls(Box<EvalArgs>),
    /// Embed item texts with a content model; NDJSON `{id, text, embedding}` on stdout.
    Embed(EmbedArgs),
    /// One command on embedded defaults: generate data, train, evaluate, show recommendations.
    Demo(DemoArgs),
    /// Run one node: journal, features, models and the HTTP API.
    Node(crate::node_cmd::NodeArgs),
    /// Bulk-import events and items into a running node (resumable, idempotent).
    Load(Box<crate::load_cmd::LoadArgs>),
    /// Quality as served: load a train split into a live node over HTTP, retrain, ask for
    /// every test user's recommendations per branch and score them like `eval`.
    OnlineEval(Box<crate::online_eval::OnlineEvalArgs>),
    /// Draw a benchmark's ratio table (Troupe / peer) as an SVG bar chart; the `bench/`
    /// scripts call it with the table they print.
    PlotRatios(PlotRatiosArgs),
}

/// Column names for CSV inputs (default: picked by common header names).
#[derive(Debug, Clone, Default, Args)]
pub struct ColumnArgs {
    /// User id column of event files.
    #[arg(long)]
    pub user_col: Option<String>,
    /// Item id column (events and items).
    #[arg(long)]
    pub item_col: Option<String>,
    /// Value column (rating, quantity).
    #[arg(long)]
    pub value_col: Option<String>,
    /// Timestamp column (Unix seconds or RFC 3339).
    #[arg(long)]
    pub ts_col: Option<String>,
    /// Event kind column.
    #[arg(long)]
    pub kind_col: Option<String>,
    /// Item text column of the items file.
    #[arg(long)]
    pub text_col: Option<String>,
    /// Item category column of the items file (values split on `|` or `;`).
    #[arg(long)]
    pub category_col: Option<String>,
    /// Count and report malformed rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Random,
    Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NormArg {
    Rrf,
    Zscore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RegScalingArg {
    None,
    Count,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Pre-split train file (with --test).
    #[arg(long, requires = "test", conflicts_with_all = ["events", "split"])]
    pub train: Option<PathBuf>,
    /// Pre-split test file (with --train).
    #[arg(long, requires = "train")]
    pub test: Option<PathBuf>,
    /// One event file to split here (with --split).
    #[arg(long, requires = "split")]
    pub events: Option<PathBuf>,
    /// How to split --events per user.
    #[arg(long, value_enum)]
    pub split: Option<SplitArg>,
    /// Write the split to this folder (created) as train.csv and test.csv, readable by
    /// `--train/--test`, `troupe load` and `troupe online-eval` (with --events/--split).
    #[arg(long, requires = "split")]
    pub save_split: Option<PathBuf>,
    /// Fraction of each user's rows held out.
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f64,
    /// Seed for splits, initialisation and tuning.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Item catalogue (ids, text, categories).
    #[arg(long)]
    pub items: PathBuf,
    /// Optional tag file (MovieLens tags.csv); tags join the item text.
    #[arg(long)]
    pub tags: Option<PathBuf>,
    /// Drop rows whose value is below this before anything else.
    #[arg(long)]
    pub min_value: Option<f32>,
    /// List length K.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Search hyper-parameters and blend weights on a validation split of train.
    #[arg(long)]
    pub tune: bool,
    /// Tune only the decays and blend weights (ALS as given by the flags); implies --tune.
    #[arg(long)]
    pub tune_blend: bool,
    #[arg(long, default_value_t = 64)]
    pub factors: usize,
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
    #[arg(long, default_value_t = 0.05)]
    pub reg: f32,
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f32,
    /// Regularisation scaling: count = reg x the row's interaction count (ALS-WR, the
    /// default), none = the same reg for every row (implicit's objective).
    #[arg(long, value_enum, default_value_t = RegScalingArg::Count)]
    pub reg_scaling: RegScalingArg,
    /// Conjugate-gradient steps per row and half-iteration.
    #[arg(long, default_value_t = 3)]
    pub cg_steps: usize,
    /// Folder with model.onnx + tokenizer.json (default: hashed TF-IDF).
    #[arg(long)]
    pub content_model: Option<PathBuf>,
    /// Token limit per text for the ONNX encoder (the node's `content.onnx_max_len`).
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Texts per ONNX batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Width of the hashed TF encoder (the node's `content.tfidf_dim`).
    #[arg(long, default_value_t = 1024)]
    pub tfidf_dim: usize,
    /// Blend weights, e.g. `als=0.7,content=0.1,popularity=0.2` (default: the validated defaults).
    #[arg(long)]
    pub weights: Option<String>,
    /// Score normalisation before blending.
    #[arg(long, value_enum)]
    pub normalization: Option<NormArg>,
    /// Candidates each branch gives the blend.
    #[arg(long, default_value_t = 100)]
    pub candidates: usize,
    /// Popularity decay half-life in days (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub popularity_half_life_days: f64,
    /// Content profile decay half-life in days (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub content_half_life_days: f64,
    /// Item-item branch (EASE): regularisation added to the Gram matrix's diagonal.
    #[arg(long, default_value_t = 300.0)]
    pub ease_lambda: f32,
    /// Item-item branch: items fitted at most (the most interacted ones).
    #[arg(long, default_value_t = 10_000)]
    pub ease_max_items: usize,
    /// Item-item branch: weights kept per item for scoring.
    #[arg(long, default_value_t = 500)]
    pub ease_neighbours: usize,
    /// Item-item branch: incoming weights kept per item beyond --ease-max-items (each
    /// regressed on the fitted items; 0: those items are never scored).
    #[arg(long, default_value_t = 20)]
    pub ease_tail_neighbours: usize,
    /// How values become weights: binary (every positive 1), raw, log1p.
    #[arg(long, default_value = "binary")]
    pub value_transform: String,
    /// Per-kind weights, e.g. `view=1,click=2,purchase=8`.
    #[arg(long)]
    pub kind_weights: Option<String>,
    /// Kinds that only filter the item for the user (comma-separated).
    #[arg(long, default_value = "dislike")]
    pub negative_kinds: String,
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// Evaluate with a node's settings: ALS, event weights, blend, decays and the content
    /// encoder come from this config file (`cluster.toml`), exactly as the node reads
    /// them. The flags that set the same things are refused alongside it.
    #[arg(long, conflicts_with_all = [
        "factors", "iterations", "reg", "alpha", "reg_scaling", "cg_steps", "content_model",
        "max_len", "tfidf_dim", "weights", "normalization", "candidates",
        "popularity_half_life_days", "content_half_life_days", "value_transform",
        "kind_weights", "negative_kinds", "ease_lambda", "ease_max_items", "ease_neighbours", "ease_tail_neighbours",
    ])]
    pub config: Option<PathBuf>,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also draw NDCG@k for k = 1..50 of every branch and the ensemble as an SVG chart
    /// into this file (the curves are in the JSON report's `details.ndcg_curve`).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct GenArgs {
    /// Output folder (created); writes events.csv[.gz] and items.csv.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2_000)]
    pub users: usize,
    #[arg(long, default_value_t = 1_000)]
    pub items: usize,
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    #[arg(long, default_value_t = 12)]
    pub clusters: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Gzip the events file.
    #[arg(long)]
    pub gzip: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Work folder for data and the node's store (default: a fresh temporary folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Event file to load instead of generated data (same columns as `eval`).
    #[arg(long, requires = "items")]
    pub events: Option<PathBuf>,
    /// Item file to load with `--events`.
    #[arg(long)]
    pub items: Option<PathBuf>,
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// Generated data: users, items, events.
    #[arg(long, default_value_t = 2_000)]
    pub gen_users: usize,
    #[arg(long, default_value_t = 1_000)]
    pub gen_items: usize,
    #[arg(long, default_value_t = 100_000)]
    pub gen_events: u64,
    /// HTTP address of the demo node (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// How many users' recommendations to print.
    #[arg(long, default_value_t = 3)]
    pub show: usize,
    /// Stop after printing instead of serving until Ctrl-C.
    #[arg(long)]
    pub exit: bool,
    /// Node settings to start from (a `cluster.toml`); the demo still sets the node
    /// name, data folder and address.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Nodes to run: 1 is one embedded node in this process; 2-9 start a local cluster
    /// (a nats-server and that many node processes; needs nats-server on PATH).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
    pub nodes: u8,
}

#[derive(Debug, Clone, Args)]
pub struct EmbedArgs {
    /// Item catalogue.
    #[arg(long)]
    pub items: PathBuf,
    /// Folder with model.onnx + tokenizer.json (default: hashed TF-IDF fitted on the items).
    #[arg(long)]
    pub content_model: Option<PathBuf>,
    /// Only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub tfidf_dim: usize,
    /// Print only the throughput (embeddings per second) as JSON, not the vectors.
    #[arg(long)]
    pub throughput_only: bool,
    #[command(flatten)]
    pub columns: ColumnArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PlotRatiosArgs {
    /// JSON: {"title": "...", "rows": [{"label": "...", "ratio": 0.41}, ...]}.
    #[arg(long)]
    pub input: PathBuf,
    /// The SVG file to write.
    #[arg(long)]
    pub out: PathBuf,
}
