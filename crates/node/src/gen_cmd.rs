//! `troupe gen`: synthetic data to disk.

use std::fs::File;
use std::io::{BufWriter, Write};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use troupe_models::synth::{generate, SynthConfig, SynthStats};

use crate::cli::GenArgs;
use crate::exit::{CliError, CmdResult};

/// Generates into `a.out`; returns what was written.
pub fn generate_to_dir(a: &GenArgs) -> Result<SynthStats, CliError> {
    let cfg = SynthConfig {
        users: a.users,
        items: a.items,
        events: a.events,
        clusters: a.clusters,
        seed: a.seed,
        ..SynthConfig::default()
    };
    cfg.validate()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let items_path = a.out.join("items.csv");
    let events_path = a.out.join(if a.gzip {
        "events.csv.gz"
    } else {
        "events.csv"
    });
    let mut items = BufWriter::new(
        File::create(&items_path).with_context(|| format!("creating {}", items_path.display()))?,
    );
    let events_file = File::create(&events_path)
        .with_context(|| format!("creating {}", events_path.display()))?;
    let mut events: Box<dyn Write> = if a.gzip {
        Box::new(BufWriter::new(flate2_writer(events_file)))
    } else {
        Box::new(BufWriter::with_capacity(1 << 20, events_file))
    };
    let pb = ProgressBar::new(a.events);
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {human_pos}/{human_len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let stats = generate(&cfg, &mut items, &mut events, &mut |n| pb.set_position(n))?;
    events.flush().context("flushing events")?;
    drop(events);
    pb.finish_and_clear();
    Ok(stats)
}

fn flate2_writer(f: File) -> impl Write {
    troupe_models::data::gzip_writer(f)
}

pub fn run(a: GenArgs) -> CmdResult {
    let stats = generate_to_dir(&a)?;
    eprintln!(
        "wrote {} events for {} users and {} items to {}",
        stats.events,
        stats.users,
        stats.items,
        a.out.display()
    );
    Ok(())
}
