//! `troupe-node`: the `troupe` command line and the node (config, HTTP API, signals).
//!
//! This is the only crate that parses the CLI, reads files named by the user, installs
//! logging and decides exit codes. Modules:
//! - [`cli`]: argument definitions (clap).
//! - [`eval_cmd`]: `troupe eval`, the offline evaluation, printing one JSON object.
//! - [`eval_cmd`] also serves `troupe embed` (item texts to vectors).
//! - [`gen_cmd`]: `troupe gen`, synthetic data to disk.
//! - [`demo`]: `troupe demo`, the README's one-command run on embedded defaults.
//! - [`exit`]: error classification into exit codes.
//! - [`config`]: `cluster.toml` (defaults, validation, env overrides, secrets).
//! - [`node_cmd`]: `troupe node` (store, actors, HTTP, graceful stop).
//! - [`http`]: the axum API under `/v1` and the probes, on a hyper server with header and
//!   body timeouts and separate read and write admission.
//! - [`limits`]: the limit of every API field (enforced by the request layer,
//!   `troupe_actors::api`, stated by `openapi`).
//! - [`openapi`]: the OpenAPI 3.1 document, built from the node's own limits.
//! - [`load_cmd`]: `troupe load` (bulk import, resumable).

pub mod cli;
pub mod config;
pub mod demo;
pub mod demo_cluster;
pub mod eval_cmd;
pub mod exit;
pub mod gen_cmd;
pub mod http;
pub use troupe_actors::api::limits;
pub mod load_cmd;
pub mod node_cmd;
pub mod online_eval;
pub mod openapi;
pub mod plot;
pub mod telemetry;

use std::process::ExitCode;

use clap::Parser;

/// Parses the command line, runs the command, and maps errors to exit codes
/// (0 ok, 1 internal error, 2 bad arguments or input).
pub fn run() -> ExitCode {
    let args = cli::Cli::parse();
    // `troupe node` installs logging itself, once its config names the OTLP endpoint.
    let node_logs = matches!(args.command, cli::Command::Node(_));
    // The demo prints results on stdout: its progress lines stay out of the way unless -v.
    let quiet = matches!(args.command, cli::Command::Demo(_));
    if !node_logs {
        // Only fails for an invalid OTLP endpoint, and none is given here.
        telemetry::init(telemetry::default_level(args.verbose, quiet), None).ok();
    }
    if let Some(n) = args.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: cannot set {n} threads: {e}");
            return ExitCode::from(1);
        }
    }
    let result = match args.command {
        cli::Command::Eval(a) => eval_cmd::run(a),
        cli::Command::Gen(a) => gen_cmd::run(a),
        cli::Command::Demo(a) if a.nodes > 1 => {
            let n = a.nodes as usize;
            demo_cluster::run(a, n)
        }
        cli::Command::Demo(a) => demo::run(a),
        cli::Command::Embed(a) => eval_cmd::embed(a),
        cli::Command::FitAls(a) => eval_cmd::fit_als(a),
        cli::Command::Node(a) => node_cmd::run(a, args.verbose),
        cli::Command::Load(a) => load_cmd::run(*a),
        cli::Command::OnlineEval(a) => online_eval::run(*a),
        cli::Command::PlotRatios(a) => plot::ratios_cmd(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message().replace('\n', " "));
            ExitCode::from(e.code())
        }
    }
}
