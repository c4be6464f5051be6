//! `troupe demo`: the one-command tour on embedded defaults. Generates a synthetic data set
//! in a work folder, evaluates every branch on a time split, trains on everything and prints
//! a few users' recommendations with each branch's share.

use std::time::Instant;

use std::collections::HashSet;
use tracing::info;
use troupe_models::als;
use troupe_models::blend::Filters;
use troupe_models::dataset::{Dataset, WeightConfig};
use troupe_models::evaluate::BlendSettings;
use troupe_models::popularity::Popularity;
use troupe_models::recommender::Recommender;
use troupe_models::sparse::Csr;

use crate::cli::{ColumnArgs, DemoArgs, EvalArgs, GenArgs, SplitArg};
use crate::exit::{CliError, CmdResult};

pub fn run(a: DemoArgs) -> CmdResult {
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile_dir()?;
            tmp.clone()
        }
    };
    let started = Instant::now();
    let gen = GenArgs {
        out: dir.clone(),
        users: a.users,
        items: a.items,
        events: a.events,
        clusters: 12,
        seed: 42,
        gzip: false,
    };
    let stats = crate::gen_cmd::generate_to_dir(&gen)?;
    info!(dir = %dir.display(), events = stats.events, "generated synthetic data");

    let eval = EvalArgs {
        train: None,
        test: None,
        events: Some(dir.join("events.csv")),
        split: Some(SplitArg::Time),
        holdout: 0.2,
        seed: 42,
        items: dir.join("items.csv"),
        tags: None,
        min_value: None,
        k: 10,
        tune: false,
        tune_blend: false,
        factors: 64,
        iterations: 15,
        reg: 0.05,
        alpha: 1.0,
        reg_scaling: crate::cli::RegScalingArg::Count,
        cg_steps: 3,
        content_model: None,
        max_len: 64,
        batch: 32,
        tfidf_dim: 512,
        weights: None,
        normalization: None,
        candidates: 100,
        popularity_half_life_days: 0.0,
        content_half_life_days: 0.0,
        value_transform: "binary".into(),
        kind_weights: None,
        negative_kinds: "dislike".into(),
        columns: ColumnArgs::default(),
        json: false,
    };
    println!("== offline evaluation (time split, last 20% of each user's events) ==");
    let report = crate::eval_cmd::evaluate(&eval)?;
    let m = &report.models;
    for (name, x) in [
        ("popularity", &m.popularity),
        ("als", &m.als),
        ("content", &m.content),
        ("ensemble", &m.ensemble),
    ] {
        println!(
            "{name:<11} NDCG@10 {:.4}  P@10 {:.4}  coverage {:.3}  fit {:.2}s",
            x.ndcg, x.precision, x.coverage, x.fit_seconds
        );
    }

    println!("\n== recommendations from a model trained on all events ==");
    let mut data = Dataset::default();
    let (items, _) =
        troupe_models::data::read_items(&dir.join("items.csv"), &Default::default(), false)?;
    data.add_items(items);
    let rows = crate::eval_cmd::load_events(
        &dir.join("events.csv"),
        &ColumnArgs::default(),
        None,
        &mut data,
    )?;
    let weights = WeightConfig::default();
    let mut history: Vec<Vec<(u32, f32, i64)>> = vec![Vec::new(); data.users.len()];
    let mut pop = Popularity::new(data.items.len(), 30.0 * 86_400.0);
    let mut now = 0;
    for r in &rows {
        if let Some(w) = weights.weight(data.kind_name(r.kind), r.value) {
            history[r.user as usize].push((r.item, w, r.ts));
            pop.add(r.item, w as f64, r.ts);
        }
        now = now.max(r.ts);
    }
    let triples: Vec<(u32, u32, f32)> = history
        .iter()
        .enumerate()
        .flat_map(|(u, h)| h.iter().map(move |&(i, w, _)| (u as u32, i, w)))
        .collect();
    let matrix = Csr::from_triples(data.users.len(), data.items.len(), &triples);
    let model = als::fit(&matrix, &als::AlsParams::default(), false, |_, _| {})?;
    let emb = crate::eval_cmd::embed_items(&data, None, 64, 32, 512)?.embeddings;
    let rec = Recommender::new(model, emb, pop, BlendSettings::default(), 0.0);
    for u in 0..a.show.min(data.users.len()) as u32 {
        let h = &history[u as usize];
        let seen: HashSet<u32> = h.iter().map(|x| x.0).collect();
        let seen_f = |i: u32| seen.contains(&i);
        let never = |_: u32| false;
        let filters = Filters {
            seen: &seen_f,
            hidden: &never,
            in_category: None,
            exclude: &[],
        };
        let ans = rec.recommend(h, now, 5, &filters);
        println!(
            "user {} ({} events):",
            data.users.name(u).unwrap_or("?"),
            h.len()
        );
        for b in &ans.items {
            let rec_item = &data.catalog[b.item as usize];
            let s = b.shares();
            println!(
                "  {:<7} score {:.3}  als {:>3.0}% content {:>3.0}% popularity {:>3.0}%  [{}] {}",
                rec_item.id,
                b.score,
                s[0] * 100.0,
                s[1] * 100.0,
                s[2] * 100.0,
                rec_item.categories.join(","),
                rec_item.text
            );
        }
    }
    println!(
        "\ndata in {} ({:.1}s in all)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf, CliError> {
    let base = std::env::temp_dir().join(format!("troupe-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base)
        .map_err(|e| CliError::Internal(anyhow::anyhow!("creating {}: {e}", base.display())))?;
    Ok(base)
}
