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
    /// Progress file for resuming (default: `<events>.load-state.json`).
    #[arg(long)]
    pub state: Option<PathBuf>,
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
    fn post(&self, path: &str, content_type: &str, body: &str) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            let mut req = self
                .agent
                .post(format!("{}{path}", self.base))
                .header("Content-Type", content_type);
            if let Some(t) = &self.token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let err = match req.send(body) {
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

fn state_path(args: &LoadArgs, events: &std::path::Path) -> PathBuf {
    args.state.clone().unwrap_or_else(|| {
        let mut p = events.as_os_str().to_owned();
        p.push(".load-state.json");
        PathBuf::from(p)
    })
}

pub fn run(args: LoadArgs) -> Result<(), CliError> {
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
        return Ok(());
    };
    let state = state_path(&args, events_path);
    let resume: u64 = std::fs::read_to_string(&state)
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v["acked_rows"].as_u64())
        .unwrap_or(0);
    let prefix = args.id_prefix.clone().unwrap_or_else(|| {
        events_path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "events".into())
    });
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
    let reader = EventReader::open(events_path, &cols, args.cols.skip_bad_rows)?;
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} events {human_pos} ({per_sec}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
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
        std::fs::write(
            &tmp,
            json!({"acked_rows": last, "id_prefix": prefix}).to_string(),
        )
        .and_then(|_| std::fs::rename(&tmp, &state))
        .map_err(|e| CliError::Internal(anyhow::Error::new(e).context("saving load progress")))?;
        pb.set_position(last);
        batch.clear();
        Ok(())
    };
    for ev in reader {
        let ev = ev?;
        let r = row;
        row += 1;
        if r < resume {
            continue;
        }
        if args.limit > 0 && r >= args.limit {
            break;
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
        "events: {acked} acked, {dups} duplicates (already acked), resumed after row {resume}"
    );
    println!(
        "{}",
        json!({"acked": acked, "duplicates": dups, "resumed_after_row": resume, "rows": row})
    );
    Ok(())
}
