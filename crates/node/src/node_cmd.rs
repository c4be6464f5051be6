//! `troupe node --config cluster.toml`: one node — store, actors, HTTP API — until
//! SIGTERM/Ctrl-C (graceful: stop intake, commit, checkpoint, exit 0) or an escalation
//! at the root supervisor (unready, cause logged, exit 1).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use troupe_actors::Discard;

use anyhow::Context;
use troupe_actors::node::{self, NodeHandle};
use troupe_actors::Ctx;
use troupe_actors::Store;
use troupe_models::content::onnx::OnnxEncoder;
use troupe_models::content::tfidf::HashedTfidf;
use troupe_models::content::TextEncoder;

use crate::config::Config;
use crate::exit::CliError;
use crate::http::{self, HttpOptions};

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Configuration file (see the documented example `cluster.toml`).
    #[arg(long, default_value = "cluster.toml")]
    pub config: PathBuf,
    /// Validate the file (and the environment's overrides and cookie) and exit: 0 when
    /// it is usable, 2 with every problem otherwise.
    #[arg(long)]
    pub check_config: bool,
}

/// A booted node: actors running, HTTP listening.
pub struct Booted {
    pub handle: NodeHandle,
    pub addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    stop_http: tokio::sync::oneshot::Sender<()>,
}

/// A node whose log is a JetStream stream: connects, creates or checks the stream and
/// buckets, checks the cluster-wide constants, and follows the stream. Every step is
/// retried until `log.jetstream.connect_timeout_ms` (servers that are still electing
/// their leaders answer "no responders" or nothing at all), with short first attempts; a
/// configuration the stored data contradicts is refused at once.
async fn jetstream_ctx(cfg: &Config, store: Store) -> anyhow::Result<Ctx> {
    use troupe_actors::jetstream::{
        retry_until, JetStream, JetStreamLog, JetStreamState, StartError,
    };
    use troupe_actors::log::{Heads, Log, Tail};
    use troupe_actors::state::StateStore;
    let get = |k: &str| std::env::var(k).ok();
    let jc = cfg.jetstream_config(Some(&get));
    let url = jc.url.clone();
    let longest = jc.timeout;
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_millis(cfg.log.jetstream.connect_timeout_ms);
    let js = JetStream::connect_until(jc.clone(), deadline)
        .await
        .map_err(|e| anyhow::anyhow!("log.jetstream: {e}"))?;
    if !cfg.log.jetstream.monitor_urls.is_empty() {
        tokio::spawn(watch_sync(
            cfg.log.jetstream.monitor_urls.clone(),
            js.sync.clone(),
        ));
    }
    // Cluster-wide constants are stored once; a node configured otherwise refuses.
    let state = JetStreamState::new(js.clone());
    for (key, mine) in [
        ("const.partitions", cfg.journal.partitions.to_string()),
        ("const.layout", LOG_LAYOUT.to_string()),
    ] {
        let stored = retry_until(&format!("reading {key}"), deadline, longest, || async {
            state
                .constant(key, mine.clone().into_bytes())
                .await
                .map_err(|e| StartError::Transient(e.to_string()))
        })
        .await
        .map_err(|e| anyhow::anyhow!("log.jetstream: {e}"))?;
        let stored = String::from_utf8_lossy(&stored).to_string();
        if stored != mine {
            anyhow::bail!(
                "stream {} was created with {} = {stored}, this node is configured with {mine}; every node of a cluster must use the same value (the partition count is fixed for the life of the data)",
                jc.stream,
                key.trim_start_matches("const.")
            );
        }
    }
    let heads = Arc::new(Heads::new(cfg.journal.partitions));
    let tail = Arc::new(Tail::new(troupe_actors::TAIL_RECORDS));
    let faults = Arc::new(cfg.faults());
    let log = retry_until("opening the log", deadline, longest, || {
        let (js, heads, tail, faults) = (js.clone(), heads.clone(), tail.clone(), faults.clone());
        async move { Ok(JetStreamLog::open_with_faults(js, heads, tail, faults).await?) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("log.jetstream: {e}"))?;
    let log: Arc<dyn Log> = Arc::new(log);
    println!(
        "troupe log: jetstream {url} stream {} (server {}, replicas {})",
        jc.stream,
        js.server_version(),
        jc.replicas
    );
    Ok(Ctx::with_log(
        cfg.settings(),
        store,
        cfg.faults(),
        heads,
        tail,
        log,
        Arc::new(state),
    ))
}

/// Every minute, reads `/varz` of each server's monitoring endpoint and records whether
/// every one fsyncs each write before acknowledging it (`/v1/cluster` warns when one does
/// not, `troupe_log_sync_always` shows it).
async fn watch_sync(urls: Vec<String>, sync: troupe_actors::jetstream::SharedSync) {
    use troupe_actors::jetstream::SyncCheck;
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let urls = urls.clone();
        let docs = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(3)))
                .build()
                .into();
            urls.iter()
                .map(|u| {
                    let url = format!("{}/varz", u.trim_end_matches('/'));
                    let doc = agent
                        .get(&url)
                        .call()
                        .map_err(|e| e.to_string())
                        .and_then(|mut r| r.body_mut().read_to_string().map_err(|e| e.to_string()))
                        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()));
                    (u.clone(), doc)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let check = SyncCheck::from_varz(&docs);
        if let SyncCheck::Interval { servers } = &check {
            tracing::warn!(servers = %servers.join(", "), "these JetStream servers do not fsync every write before acknowledging it (sync_interval): a power failure can lose acknowledged records");
        }
        *sync.lock() = check;
    }
}

/// Version of the JetStream layout (subjects, buckets, record encoding) this build writes.
const LOG_LAYOUT: u32 = 1;

/// Loads, overrides from the environment and validates a config; every problem at once.
pub fn load_config(path: &std::path::Path) -> Result<Config, CliError> {
    let mut cfg = Config::load(path).map_err(CliError::input)?;
    cfg.apply_env(|k| std::env::var(k).ok());
    cfg.resolve_cookie()
        .map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let allowed = std::env::var("TROUPE_ALLOW_FAULTS").is_ok_and(|v| v == "1");
    let problems = cfg.validate(allowed);
    if !problems.is_empty() {
        return Err(CliError::input(format!(
            "{}: {}",
            path.display(),
            problems.join("; ")
        )));
    }
    Ok(cfg)
}

fn encoder(cfg: &Config) -> anyhow::Result<(Arc<dyn TextEncoder>, String)> {
    let s = &cfg.content;
    if s.onnx_model_dir.is_empty() {
        let e = HashedTfidf::uniform(s.tfidf_dim)?;
        Ok((Arc::new(e), format!("tf-hashed-{}", s.tfidf_dim)))
    } else {
        let dir = PathBuf::from(&s.onnx_model_dir);
        let e = OnnxEncoder::load(&dir, s.onnx_max_len)
            .with_context(|| format!("loading the content model in {}", dir.display()))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        Ok((Arc::new(e), format!("onnx-{name}-{}", s.onnx_max_len)))
    }
}

/// The HTTP layer's options from the config.
pub fn http_options(cfg: &Config) -> HttpOptions {
    let h = &cfg.http;
    let secret = |s: &crate::config::Secret| (!s.0.is_empty()).then(|| s.0.clone());
    HttpOptions {
        jetstream_dedupe: (cfg.log.backend == "jetstream").then_some((
            cfg.log.jetstream.duplicate_window_secs,
            cfg.journal.consumer_dedupe_keys,
        )),
        max_body_bytes: h.max_body_bytes,
        max_events_per_request: h.max_events_per_request,
        max_in_flight_reads: h.max_in_flight,
        max_in_flight_writes: h.max_in_flight_writes,
        auth_token: secret(&h.auth_token),
        read_token: secret(&h.read_token),
        public_reads: h.public_reads,
        request_timeout: Duration::from_millis(h.request_timeout_ms),
        body_timeout: Duration::from_millis(h.body_read_timeout_ms),
        header_timeout: Duration::from_millis(h.header_read_timeout_ms),
    }
}

/// Opens the store, starts the supervision tree and the HTTP server.
pub async fn boot(cfg: &Config) -> anyhow::Result<Booted> {
    std::fs::create_dir_all(&cfg.node.data_dir)
        .with_context(|| format!("creating {}", cfg.node.data_dir.display()))?;
    let path = cfg.node.data_dir.join("troupe.redb");
    let p = path.clone();
    let cache = cfg.journal.cache_mb.saturating_mul(1 << 20);
    let (store, report) =
        tokio::task::spawn_blocking(move || Store::open_with_cache(&p, cache)).await??;
    if report.repaired {
        tracing::warn!(path = %path.display(), "store was not closed cleanly; recovered to its last complete commit");
    }
    if report.torn_records_cut > 0 {
        tracing::warn!(
            records = report.torn_records_cut,
            "torn journal tail cut on start"
        );
    }
    println!(
        "troupe store {}: repaired={} torn_records_cut={}",
        path.display(),
        report.repaired,
        report.torn_records_cut
    );
    let (enc, enc_name) = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || encoder(&cfg)
    })
    .await??;
    let ctx = match cfg.log.backend.as_str() {
        "jetstream" => Arc::new(jetstream_ctx(cfg, store).await?),
        _ => Arc::new(Ctx::new(cfg.settings(), store, cfg.faults())),
    };
    let handle = node::start(ctx.clone(), enc, enc_name)
        .await
        .context("starting the actors")?;
    let listener = tokio::net::TcpListener::bind(&cfg.http.addr)
        .await
        .with_context(|| format!("binding {}", cfg.http.addr))?;
    let addr = listener.local_addr()?;
    let opts = http_options(cfg);
    let header_timeout = opts.header_timeout;
    let app = http::router(ctx, opts);
    let (stop_http, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        // A dropped sender also means stop.
        http::serve(listener, app, header_timeout, async {
            rx.await.discard();
        })
        .await;
    });
    Ok(Booted {
        handle,
        addr,
        server,
        stop_http,
    })
}

/// Graceful stop of a booted node; returns the problems met.
pub async fn stop(b: Booted) -> Vec<String> {
    let problems = node::shutdown(b.handle).await;
    b.stop_http.send(()).discard();
    if tokio::time::timeout(Duration::from_secs(10), b.server)
        .await
        .is_err()
    {
        tracing::warn!("http server did not stop within 10 s");
    }
    problems
}

/// Two TLS providers are linked in (ring for the NATS client, aws-lc through
/// ractor_cluster); rustls cannot pick one by itself, so ring is installed for the
/// process before anything builds a TLS configuration.
pub fn install_tls_provider() {
    // Already installed (a second boot in one process): nothing to do.
    rustls::crypto::ring::default_provider()
        .install_default()
        .discard();
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn terminate_signal() {
    let ctrl_c = async {
        // Without a Ctrl-C handler, SIGTERM still stops the node.
        tokio::signal::ctrl_c().await.discard();
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CliError::Internal(anyhow::Error::new(e).context("starting the async runtime"))
        })
}

/// Waits for a stop signal or an escalation; stops gracefully on a signal.
pub async fn serve_until_stopped(mut b: Booted) -> Result<(), CliError> {
    let outcome = tokio::select! {
        _ = terminate_signal() => None,
        _ = &mut b.handle.root_done => Some(b.handle.ctx.health.escalated().unwrap_or_else(|| "root supervisor stopped".into())),
    };
    match outcome {
        None => {
            tracing::info!("stop requested: draining, committing and checkpointing");
            // A stop that could not finish everything (a checkpoint the state store did
            // not take, a partition not released) loses nothing acknowledged: the log
            // holds every record, and the next start or owner replays what the last
            // checkpoint does not cover. It is said, and the exit is still clean.
            let problems = stop(b).await;
            if problems.is_empty() {
                tracing::info!("stopped cleanly");
            } else {
                tracing::warn!(
                    problems = %problems.join("; "),
                    "stopped; these steps could not be finished (nothing acknowledged is lost: the next start replays from the last checkpoint)"
                );
                eprintln!("troupe: stopped; unfinished: {}", problems.join("; "));
            }
            Ok(())
        }
        Some(reason) => {
            b.handle.ctx.health.escalate(reason.clone());
            tracing::error!(reason = %reason, "escalation reached the root supervisor; exiting");
            Err(CliError::Internal(anyhow::anyhow!("escalated: {reason}")))
        }
    }
}

pub fn run(args: NodeArgs, verbose: bool) -> Result<(), CliError> {
    let cfg = load_config(&args.config)?;
    if args.check_config {
        println!(
            "{}: valid (node {}, log {}, {})",
            args.config.display(),
            cfg.node.name,
            cfg.log.backend,
            if cfg.clustered() {
                match cfg.own_member() {
                    Some(m) => format!(
                        "cluster member at {} with {} configured member(s), others discovered",
                        m.cluster_addr,
                        cfg.cluster.members.len()
                    ),
                    None => format!("cluster of {} members", cfg.cluster.members.len()),
                }
            } else {
                "single node".to_string()
            }
        );
        return Ok(());
    }
    install_tls_provider();
    troupe_actors::limit_arenas();
    let rt = runtime()?;
    // The batch exporter runs on its own thread; the runtime only needs to exist.
    let _guard = rt.enter();
    let t = &cfg.telemetry;
    let otlp = (!t.otlp_endpoint.is_empty()).then(|| crate::telemetry::Otlp {
        endpoint: t.otlp_endpoint.clone(),
        service: t.service_name.clone(),
        instance: cfg.node.name.clone(),
        json: t.otlp_protocol == "http/json",
        sample_ratio: t.sample_ratio,
    });
    let exporting = otlp.is_some();
    let telemetry = crate::telemetry::init(crate::telemetry::default_level(verbose, false), otlp)
        .map_err(CliError::input)?;
    if exporting {
        tracing::info!(
            endpoint = %t.otlp_endpoint,
            protocol = %t.otlp_protocol,
            sample_ratio = t.sample_ratio,
            "exporting traces over OTLP/HTTP"
        );
    }
    if cfg.cluster.protocol != 0 {
        troupe_actors::proto::wire::speak_as(cfg.cluster.protocol).map_err(CliError::input)?;
        tracing::info!(
            protocol = cfg.cluster.protocol,
            newest = troupe_actors::proto::wire::PROTOCOL,
            "speaking an older cluster protocol (cluster.protocol)"
        );
    }
    let result = rt.block_on(async {
        let b = boot(&cfg).await.map_err(CliError::Internal)?;
        println!(
            "troupe node {} listening on http://{}",
            cfg.node.name, b.addr
        );
        serve_until_stopped(b).await
    });
    telemetry.shutdown();
    result
}
