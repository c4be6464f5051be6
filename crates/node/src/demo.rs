//! `troupe demo`: the one-command tour on embedded defaults. Starts one node in a work
//! folder, loads data (generated, or `--events/--items`) through the journal, trains ALS,
//! prints a few users' recommendations with each branch's share, and keeps serving at
//! the printed URL until Ctrl-C.

use std::time::{Duration, Instant};

use troupe_actors::handles;
use troupe_actors::log::AppendEntry;
use troupe_actors::node;
use troupe_actors::proto::api::RecommendRequest;
use troupe_actors::record::{partition_of, Event, Item, Payload, CATALOG_STREAM};
use troupe_actors::AlsTrainerMsg;
use troupe_actors::Ctx;
use troupe_actors::RankerMsg;
use troupe_models::data::{read_items, Columns, EventReader};

use crate::cli::{DemoArgs, GenArgs};
use crate::config::Config;
use crate::exit::{CliError, CmdResult};
use crate::node_cmd;

const BATCH: usize = 2_000;

fn internal(e: impl std::fmt::Display) -> CliError {
    CliError::Internal(anyhow::anyhow!("{e}"))
}

async fn append_all(ctx: &Ctx, entries: Vec<(u32, Payload)>) -> Result<(), CliError> {
    for chunk in entries.chunks(BATCH) {
        let chunk = chunk
            .iter()
            .map(|(s, p)| AppendEntry::new(*s, p.clone()))
            .collect();
        node::append(ctx, chunk, Duration::from_secs(60))
            .await
            .map_err(internal)?;
    }
    Ok(())
}

/// The demo's input: `--events/--items`, or a generated data set written to `dir`.
pub fn data_files(
    a: &DemoArgs,
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf), CliError> {
    match (&a.events, &a.items) {
        (Some(e), Some(i)) => Ok((e.clone(), i.clone())),
        _ => {
            let gen = GenArgs {
                out: dir.to_path_buf(),
                users: a.gen_users,
                items: a.gen_items,
                events: a.gen_events,
                clusters: 12,
                seed: 42,
                gzip: false,
            };
            crate::gen_cmd::generate_to_dir(&gen)?;
            Ok((dir.join("events.csv"), dir.join("items.csv")))
        }
    }
}

pub fn run(a: DemoArgs) -> CmdResult {
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("troupe-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| internal(format!("creating {}: {e}", dir.display())))?;
    let (events_path, items_path) = data_files(&a, &dir)?;
    let cols = Columns::from(&a.columns);
    let (items, _) = read_items(&items_path, &cols, a.columns.skip_bad_rows)?;
    let mut events = Vec::new();
    for ev in EventReader::open(&events_path, &cols, a.columns.skip_bad_rows)? {
        events.push(ev?);
    }
    let mut cfg = match &a.config {
        Some(path) => Config::load(path).map_err(CliError::input)?,
        None => Config::default(),
    };
    cfg.node.name = "demo".into();
    cfg.node.data_dir = dir.join("node");
    cfg.http.addr = a.addr.clone();
    // The demo trains once, explicitly, after loading; retrains follow new events.
    cfg.als.retrain_every_events = (events.len() as u64 / 2).max(10_000);
    let problems = cfg.validate(false);
    if !problems.is_empty() {
        return Err(CliError::input(problems.join("; ")));
    }
    let started = Instant::now();
    let rt = node_cmd::runtime()?;
    rt.block_on(async move {
        let booted = node_cmd::boot(&cfg).await.map_err(CliError::Internal)?;
        let url = format!("http://{}", booted.addr);
        let p = cfg.journal.partitions;
        let catalog: Vec<(u32, Payload)> = items
            .iter()
            .map(|i| {
                (
                    CATALOG_STREAM,
                    Payload::ItemUpsert(Item {
                        id: i.id.clone(),
                        text: i.text.clone(),
                        categories: i.categories.clone(),
                        ..Default::default()
                    }),
                )
            })
            .collect();
        append_all(&booted.handle.ctx, catalog).await?;
        let n_events = events.len();
        let name = events_path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let entries: Vec<(u32, Payload)> = events
            .into_iter()
            .enumerate()
            .map(|(row, e)| {
                let ev = Event {
                    event_id: Some(format!("{name}-{row}")),
                    user: e.user,
                    item: e.item,
                    kind: e.kind.unwrap_or_else(|| "view".into()),
                    value: e.value,
                    ts_ms: e.ts * 1000,
                    request_id: None,
                };
                (partition_of(&ev.user, p), Payload::Event(ev))
            })
            .collect();
        let users: Vec<String> = {
            let mut seen = std::collections::BTreeSet::new();
            entries
                .iter()
                .filter_map(|(_, pl)| match pl {
                    Payload::Event(e) if seen.insert(e.user.clone()) => Some(e.user.clone()),
                    _ => None,
                })
                .take(a.show)
                .collect()
        };
        append_all(&booted.handle.ctx, entries).await?;
        println!("loaded {} items and {n_events} events through the journal in {:.1}s", items.len(), started.elapsed().as_secs_f64());
        let report = handles::als_trainer().call(Duration::from_secs(3600), AlsTrainerMsg::Retrain).await.map_err(internal)?;
        println!(
            "trained ALS v{}: {} users x {} items, {} interactions, validation NDCG@10 {:.4} ({} held-out users) in {:.1}s",
            report.model_version, report.users, report.items, report.interactions, report.candidate_ndcg, report.validation_users, report.train_ms as f64 / 1000.0
        );
        // Item embeddings are computed off the request path; wait for them (bounded).
        let deadline = Instant::now() + Duration::from_secs(120);
        while booted.handle.ctx.content.read().len() < items.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let texts: std::collections::HashMap<&str, &str> = items.iter().map(|i| (i.id.as_str(), i.text.as_str())).collect();
        for user in users {
            let req = RecommendRequest {
                user: user.clone(),
                k: 5,
                request_id: format!("demo-{user}"),
                ..Default::default()
            };
            let r = handles::ranker().call(Duration::from_secs(10), |port| RankerMsg::Recommend(req, port)).await.map_err(internal)?;
            println!("\nuser {user} (applied offset {}, degraded {}):", r.applied_offset, r.degraded);
            for it in &r.items {
                let shares: Vec<String> = troupe_actors::proto::api::Branch::ALL
                    .iter()
                    .map(|b| format!("{} {:>3.0}%", b.name(), it.share(*b) * 100.0))
                    .collect();
                println!(
                    "  {:<8} score {:.4}  {}  [{}] {}",
                    it.item,
                    it.score,
                    shares.join(" "),
                    it.categories.join(","),
                    texts.get(it.item.as_str()).unwrap_or(&"")
                );
            }
        }
        println!("\nserving at {url} (store in {})", cfg.node.data_dir.display());
        println!("  curl '{url}/v1/recommendations/<user>?k=10&explain=true'");
        println!("  curl -X POST {url}/v1/events -d '[{{\"user\":\"u1\",\"item\":\"i1\",\"kind\":\"purchase\"}}]'");
        println!("  curl {url}/v1/cluster ; curl {url}/metrics");
        if a.exit {
            let problems = node_cmd::stop(booted).await;
            if !problems.is_empty() {
                return Err(internal(problems.join("; ")));
            }
            return Ok(());
        }
        println!("Ctrl-C to stop");
        node_cmd::serve_until_stopped(booted).await
    })
}
