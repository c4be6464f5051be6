//! Real `nats-server` processes for tests: free loopback ports, a temporary store
//! directory, JetStream on; stopped by process id (SIGKILL) on drop.
//!
//! Tests that need a server call [`NatsServer::start`]: where `nats-server` is not
//! installed it returns `None` after printing why (the test then skips), unless
//! `TROUPE_REQUIRE_NATS=1` (set by `.ci/run`), which makes a missing server a failure.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::{free_port, wait_until};

/// The server binary: `TROUPE_NATS_SERVER`, else `nats-server` on PATH or in /usr/sbin.
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TROUPE_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// True when the tests must fail rather than skip without a server.
pub fn nats_required() -> bool {
    std::env::var("TROUPE_REQUIRE_NATS").is_ok_and(|v| v == "1")
}

/// One JetStream server on loopback.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub monitor_port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// A config file (cluster members); `None`: flags only.
    conf: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a server (see the module docs for when this returns `None`).
    pub fn start() -> Option<NatsServer> {
        let Some(bin) = nats_server_bin() else {
            assert!(
                !nats_required(),
                "TROUPE_REQUIRE_NATS=1 but nats-server is not installed (apt-get install nats-server)"
            );
            eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server); TROUPE_REQUIRE_NATS=1 makes this a failure");
            return None;
        };
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            monitor_port: free_port(),
            dir: tempfile::tempdir().expect("temporary directory"),
            bin,
            conf: None,
        };
        s.spawn();
        Some(s)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the process (again, after [`NatsServer::kill9`]) on the same ports and store
    /// directory, and waits until JetStream answers its health check.
    pub fn spawn(&mut self) {
        self.launch();
        self.wait_healthy();
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log file");
        let mut cmd = Command::new(&self.bin);
        match &self.conf {
            Some(conf) => {
                cmd.arg("-c").arg(conf);
            }
            None => {
                cmd.args(["-js", "-a", "127.0.0.1"])
                    .args(["-p", &self.port.to_string()])
                    .args(["-m", &self.monitor_port.to_string()])
                    .arg("-sd")
                    .arg(self.dir.path().join("store"));
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
    }

    fn wait_healthy(&self) {
        let health = format!("http://127.0.0.1:{}/healthz", self.monitor_port);
        wait_until(60, "nats-server healthy", || {
            ureq::get(&health).call().is_ok_and(|r| r.status() == 200)
        });
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Three JetStream servers on loopback forming one cluster (routes between all of them),
/// each with its own ports and store directory; stopped by process id on drop.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three servers and waits until JetStream reports a meta leader (see
    /// [`NatsServer::start`] for when this returns `None`).
    pub fn start() -> Option<NatsCluster> {
        let bin = match nats_server_bin() {
            Some(b) => b,
            None => {
                assert!(
                    !nats_required(),
                    "TROUPE_REQUIRE_NATS=1 but nats-server is not installed"
                );
                eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
                return None;
            }
        };
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut servers = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let dir = tempfile::tempdir().expect("temporary directory");
            let port = free_port();
            let monitor_port = free_port();
            let conf = dir.path().join("server.conf");
            std::fs::write(
                &conf,
                format!(
                    "server_name: s{i}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n\
                     jetstream {{ store_dir: \"{}\", max_mem_store: 256MB, max_file_store: 2GB }}\n\
                     cluster {{ name: troupe-test, listen: 127.0.0.1:{route}, routes: [{route_list}] }}\n",
                    dir.path().join("store").display()
                ),
            )
            .expect("server config");
            servers.push(NatsServer {
                child: None,
                port,
                monitor_port,
                dir,
                bin: bin.clone(),
                conf: Some(conf),
            });
        }
        for s in &mut servers {
            s.launch();
        }
        let cluster = NatsCluster { servers };
        for s in &cluster.servers {
            s.wait_healthy();
        }
        Some(cluster)
    }

    /// Every server's client URL, comma-separated (what a node's `url` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the server that leads `stream` (from the monitoring endpoints of the
    /// running servers), if one does now.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        self.servers.iter().enumerate().find_map(|(i, s)| {
            s.child.as_ref()?;
            let url = format!("http://127.0.0.1:{}/jsz?streams=true", s.monitor_port);
            let text = ureq::get(&url)
                .call()
                .ok()?
                .body_mut()
                .read_to_string()
                .ok()?;
            let body: serde_json::Value = serde_json::from_str(&text).ok()?;
            let leads = body["account_details"].as_array()?.iter().any(|a| {
                a["stream_detail"].as_array().is_some_and(|ss| {
                    ss.iter()
                        .any(|x| x["name"] == stream && x["cluster"]["leader"] == format!("s{i}"))
                })
            });
            leads.then_some(i)
        })
    }
}
