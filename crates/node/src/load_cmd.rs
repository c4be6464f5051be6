//! `troupe load`: bulk import of an event file (and optionally an item file) into a
//! running node, in batches, with a progress bar. Every event gets a stable id
//! (`<prefix>-<row>`), so a retried batch is deduplicated by the node; progress is saved
//! to a state file after every acked batch, so an interrupted load resumes where the
//! node last acknowledged.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use troupe_models::data::{read_items, Columns, EventReader};

use crate::cli::ColumnArgs;
use crate::exit::CliError;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Event file (CSV, optionally gzipped), same columns as `eval`.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Item file (CSV) to upsert before the events.
    #[arg(long)]
    pub items: Option<PathBuf>,
    /// Base URL of a node, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub url: String,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Event kind when the file has no kind column.
    #[arg(long, default_value = "view")]
    pub default_kind: String,
    /// Prefix of generated event ids (default: the event file's name).
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// Progress file for resuming. Default: one file per (node store, URL, input file)
    /// under `$TROUPE_STATE_DIR`, else `$XDG_STATE_HOME/troupe/load`, else
    /// `~/.local/state/troupe/load`. A state file written for another target or another
    /// input is ignored (with a message): a fresh node always receives every row.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Ignore any saved progress and send every row (the node drops rows it already
    /// acknowledged within its idempotency window, by event id).
    #[arg(long)]
    pub restart: bool,
    /// Give up on a batch after retrying this long (seconds).
    #[arg(long, default_value_t = 120)]
    pub retry_for_secs: u64,
    /// Append the id of every acknowledged event to this file (one per line).
    #[arg(long)]
    pub acked_log: Option<PathBuf>,
    /// Bearer token for the write routes.
    #[arg(long, env = "TROUPE_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Stop after this many events (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: u64,
    /// Skip rows whose value is below this (as `troupe eval --min-value`).
    #[arg(long)]
    pub min_value: Option<f32>,
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    retry_for: Duration,
}

enum Outcome {
    Ok(Value),
    /// The node refused the content (4xx): retrying will not help.
    Refused(u16, String),
}

impl Client {
    fn get(&self, path: &str) -> anyhow::Result<Outcome> {
        self.send("GET", path, "", "")
    }

    fn post(&self, path: &str, content_type: &str, body: &str) -> anyhow::Result<Outcome> {
        self.send("POST", path, content_type, body)
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            let url = format!("{}{path}", self.base);
            let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
            let sent = if method == "GET" {
                let mut req = self.agent.get(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            } else {
                let mut req = self.agent.post(&url).header("Content-Type", content_type);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send(body)
            };
            let err = match sent {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    if status < 300 {
                        return Ok(Outcome::Ok(
                            serde_json::from_str(&text).unwrap_or(Value::Null),
                        ));
                    }
                    if (400..500).contains(&status) && status != 408 && status != 429 {
                        return Ok(Outcome::Refused(status, text));
                    }
                    format!("HTTP {status}: {text}")
                }
                Err(e) => e.to_string(),
            };
            if started.elapsed() > self.retry_for {
                anyhow::bail!("giving up after {:?}: {err}", self.retry_for);
            }
            tracing::debug!(error = %err, "retrying the same batch");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

/// What a load's progress belongs to: the node's store (a fresh data directory has a new
/// one), the URL it was reached at, and the input file's identity.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct LoadKey {
    url: String,
    node: String,
    store_id: String,
    /// Canonical path, size, modification time and a hash of the first MiB.
    input: String,
}

impl LoadKey {
    fn digest(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        format!(
            "{:032x}",
            troupe_actors::record::hash128(&[text.as_bytes()])
        )
    }
}

/// The input file's identity: canonical path, size, modification time and a hash of its
/// first MiB (a rewritten file of the same size and time still differs there).
fn input_identity(path: &std::path::Path) -> Result<String, CliError> {
    use std::io::Read;
    let canon = std::fs::canonicalize(path)
        .map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let meta = std::fs::metadata(&canon)
        .map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut head = Vec::with_capacity(1 << 20);
    std::fs::File::open(&canon)
        .and_then(|f| f.take(1 << 20).read_to_end(&mut head))
        .map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let h = troupe_actors::record::hash128(&[head.as_slice()]);
    Ok(format!(
        "{} size={} modified_ns={modified} head={h:032x}",
        canon.display(),
        meta.len()
    ))
}

/// Where progress files go by default.
fn state_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("TROUPE_STATE_DIR") {
        return d.join("load");
    }
    if let Some(d) = env("XDG_STATE_HOME") {
        return d.join("troupe").join("load");
    }
    match env("HOME") {
        Some(h) => h.join(".local/state/troupe/load"),
        None => std::env::temp_dir().join("troupe-state").join("load"),
    }
}

/// Saved progress: rows of the input the target acknowledged, in order.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LoadState {
    key: LoadKey,
    id_prefix: String,
    acked_rows: u64,
}

/// Rows to skip, with the reason printed when there are any.
fn resume_from(path: &std::path::Path, key: &LoadKey, prefix: &str) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    match serde_json::from_str::<LoadState>(&text) {
        Ok(st) if st.key == *key && st.id_prefix == prefix => {
            eprintln!(
                "resuming after row {}: node {} (store {}) acknowledged rows 1..={} of this file in an earlier run (progress in {}; --restart sends every row again)",
                st.acked_rows, key.node, key.store_id, st.acked_rows, path.display()
            );
            st.acked_rows
        }
        Ok(st) => {
            let why = if st.key.store_id != key.store_id || st.key.url != key.url {
                format!(
                    "it is for node {} (store {}) at {}",
                    st.key.node, st.key.store_id, st.key.url
                )
            } else if st.key.input != key.input {
                "the input file changed since".to_string()
            } else {
                format!("it used event ids {}-<row>", st.id_prefix)
            };
            eprintln!(
                "ignoring progress file {}: {why}; sending every row",
                path.display()
            );
            0
        }
        Err(e) => {
            eprintln!(
                "ignoring unreadable progress file {}: {e}; sending every row",
                path.display()
            );
            0
        }
    }
}

pub fn run(args: LoadArgs) -> Result<(), CliError> {
    let summary = load(&args)?;
    println!("{summary}");
    Ok(())
}

/// Loads what `args` names; returns the summary `run` prints.
pub fn load(args: &LoadArgs) -> Result<Value, CliError> {
    if args.events.is_none() && args.items.is_none() {
        return Err(CliError::input(
            "nothing to load: give --events and/or --items",
        ));
    }
    if args.batch == 0 || args.batch > 100_000 {
        return Err(CliError::input("--batch must be in 1..=100000"));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let client = Client {
        agent,
        base: args.url.trim_end_matches('/').to_string(),
        token: args.token.clone(),
        retry_for: Duration::from_secs(args.retry_for_secs),
    };
    let cols = Columns::from(&args.cols);
    if let Some(items_path) = &args.items {
        let (items, skipped) = read_items(items_path, &cols, args.cols.skip_bad_rows)?;
        let pb = ProgressBar::new(items.len() as u64);
        pb.set_style(
            ProgressStyle::with_template("items {bar:30} {pos}/{len} ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        for chunk in items.chunks(args.batch) {
            let body: Vec<Value> = chunk
                .iter()
                .map(|i| json!({"id": i.id, "text": i.text, "categories": i.categories}))
                .collect();
            match client
                .post(
                    "/v1/items",
                    "application/json",
                    &Value::Array(body).to_string(),
                )
                .map_err(CliError::Internal)?
            {
                Outcome::Ok(_) => {}
                Outcome::Refused(s, t) => {
                    return Err(CliError::input(format!(
                        "{}: node refused items (HTTP {s}): {t}",
                        items_path.display()
                    )))
                }
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish();
        eprintln!(
            "items: {} upserted, {} rows skipped",
            items.len(),
            skipped.skipped
        );
    }
    let Some(events_path) = &args.events else {
        return Ok(json!({"acked": 0, "duplicates": 0, "resumed_after_row": 0, "rows": 0}));
    };
    let prefix = args.id_prefix.clone().unwrap_or_else(|| {
        events_path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "events".into())
    });
    let health = match client.get("/healthz").map_err(CliError::Internal)? {
        Outcome::Ok(v) => v,
        Outcome::Refused(s, t) => {
            return Err(CliError::input(format!(
                "{}: the node refused /healthz (HTTP {s}): {t}",
                client.base
            )))
        }
    };
    let key = LoadKey {
        url: client.base.clone(),
        node: health["node"].as_str().unwrap_or_default().to_string(),
        store_id: health["store_id"].as_str().unwrap_or_default().to_string(),
        input: input_identity(events_path)?,
    };
    if key.store_id.is_empty() {
        eprintln!("the node does not report a store identity: progress is keyed by its URL only");
    }
    let state = match &args.state {
        Some(p) => p.clone(),
        None => state_dir().join(format!("{}.json", key.digest())),
    };
    if let Some(dir) = state.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::input(format!("progress directory {}: {e}", dir.display())))?;
    }
    let resume = if args.restart {
        0
    } else {
        resume_from(&state, &key, &prefix)
    };
    let mut acked_log = match &args.acked_log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))
                .map_err(CliError::Internal)?,
        ),
        None => None,
    };
    let mut reader = EventReader::open(events_path, &cols, args.cols.skip_bad_rows)?;
    // On a terminal: a bar over the file's bytes (compressed bytes for gzip), so the rate
    // and ETA hold for any input; the message counts rows acknowledged.
    let size = std::fs::metadata(events_path).map_or(0, |m| m.len());
    let pb = ProgressBar::new(size);
    pb.set_style(
        ProgressStyle::with_template(
            "events {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if resume > 0 {
        pb.set_message(format!("resuming after row {resume}"));
    }
    let mut batch: Vec<(u64, String, Value)> = Vec::with_capacity(args.batch);
    let (mut acked, mut dups) = (0u64, 0u64);
    let mut row = 0u64;
    let mut flush = |batch: &mut Vec<(u64, String, Value)>,
                     acked: &mut u64,
                     dups: &mut u64|
     -> Result<(), CliError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut body = String::new();
        for (_, _, v) in batch.iter() {
            body.push_str(&v.to_string());
            body.push('\n');
        }
        let reply = match client
            .post("/v1/events", "application/x-ndjson", &body)
            .map_err(CliError::Internal)?
        {
            Outcome::Ok(v) => v,
            Outcome::Refused(s, t) => {
                let first = batch.first().map_or(0, |b| b.0 + 1);
                return Err(CliError::input(format!(
                    "{}: rows {first}..{}: node refused the batch (HTTP {s}): {t}",
                    events_path.display(),
                    first + batch.len() as u64 - 1
                )));
            }
        };
        let d = reply["duplicates"].as_u64().unwrap_or(0);
        *dups += d;
        *acked += batch.len() as u64 - d;
        if let Some(f) = acked_log.as_mut() {
            let mut s = String::new();
            for (_, id, _) in batch.iter() {
                s.push_str(id);
                s.push('\n');
            }
            f.write_all(s.as_bytes())
                .and_then(|_| f.flush())
                .map_err(|e| CliError::Internal(e.into()))?;
        }
        let last = batch.last().map_or(0, |b| b.0 + 1);
        let tmp = state.with_extension("tmp");
        let saved = LoadState {
            key: key.clone(),
            id_prefix: prefix.clone(),
            acked_rows: last,
        };
        std::fs::write(&tmp, serde_json::to_string(&saved).unwrap_or_default())
            .and_then(|_| std::fs::rename(&tmp, &state))
            .map_err(|e| {
                CliError::Internal(anyhow::Error::new(e).context("saving load progress"))
            })?;
        pb.set_message(format!("{last} rows acknowledged"));
        batch.clear();
        Ok(())
    };
    while let Some(ev) = reader.next() {
        let ev = ev?;
        pb.set_position(reader.bytes_read());
        let r = row;
        row += 1;
        if r < resume {
            continue;
        }
        if args.limit > 0 && r >= args.limit {
            break;
        }
        if let (Some(min), Some(v)) = (args.min_value, ev.value) {
            if v < min {
                continue;
            }
        }
        let id = format!("{prefix}-{r}");
        let mut v = json!({
            "event_id": id,
            "user": ev.user,
            "item": ev.item,
            "kind": ev.kind.unwrap_or_else(|| args.default_kind.clone()),
        });
        if let Some(x) = ev.value {
            v["value"] = json!(x);
        }
        if ev.ts > 0 {
            v["ts"] = json!(ev.ts * 1000);
        }
        batch.push((r, id, v));
        if batch.len() >= args.batch {
            flush(&mut batch, &mut acked, &mut dups)?;
        }
    }
    flush(&mut batch, &mut acked, &mut dups)?;
    pb.finish();
    eprintln!(
        "events: {acked} acked, {dups} duplicates (already acked), {resume} rows skipped as acknowledged in an earlier run"
    );
    Ok(
        json!({"acked": acked, "duplicates": dups, "resumed_after_row": resume, "rows": row, "state": state.display().to_string()}),
    )
}
