//! Real `nats-server` processes for tests: free loopback ports, a temporary store
//! directory, JetStream on, every server from a config file that fsyncs every write
//! (`sync_interval: always`, the setting the project recommends); stopped by process id
//! (SIGKILL) on drop.
//!
//! Tests that need a server call [`NatsServer::start`] or [`NatsCluster::start`]: where
//! `nats-server` is not installed they return `None` after printing why (the test then
//! skips), unless `TROUPE_REQUIRE_NATS=1` (set by `.ci/run`), which makes a missing
//! server a failure. The server is `TROUPE_NATS_SERVER`, else the first `nats-server` on
//! `PATH`; `.ci/run` and `scripts/install-nats-server.sh` install the pinned release.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::proxy::Proxy;
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

/// `(major, minor, patch)` that `bin --version` reports (`nats-server: v2.15.1`).
pub fn server_version(bin: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.trim().rsplit(' ').next()?.trim_start_matches('v');
    let mut it = v.split(['.', '-']).map(|x| x.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// The server binary and its version, or `None` (after saying why) when there is none.
fn locate() -> Option<(PathBuf, (u32, u32, u32))> {
    let Some(bin) = nats_server_bin() else {
        assert!(
            !nats_required(),
            "TROUPE_REQUIRE_NATS=1 but nats-server is not installed (scripts/install-nats-server.sh)"
        );
        eprintln!("SKIPPED: nats-server is not installed (scripts/install-nats-server.sh); TROUPE_REQUIRE_NATS=1 makes this a failure");
        return None;
    };
    let version = server_version(&bin)
        .unwrap_or_else(|| panic!("{} does not report a version", bin.display()));
    Some((bin, version))
}

/// One JetStream server on loopback.
pub struct NatsServer {
    child: Option<Child>,
    pub name: String,
    pub port: u16,
    pub monitor_port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    conf: PathBuf,
    pub version: (u32, u32, u32),
}

impl NatsServer {
    /// Starts one server (see the module docs for when this returns `None`).
    pub fn start() -> Option<NatsServer> {
        let (bin, version) = locate()?;
        let mut s = NatsServer::configured("s0", bin, version, "", true);
        s.spawn();
        Some(s)
    }

    /// A server with the release's default durability (writes flushed to disk on an
    /// interval, not before each acknowledgement), for tests of the warning about it.
    pub fn start_with_interval_sync() -> Option<NatsServer> {
        let (bin, version) = locate()?;
        let mut s = NatsServer::configured("s0", bin, version, "", false);
        s.spawn();
        Some(s)
    }

    /// A server on free ports with its config written (`cluster`: its cluster block, if
    /// any); not started.
    fn configured(
        name: &str,
        bin: PathBuf,
        version: (u32, u32, u32),
        cluster: &str,
        sync_always: bool,
    ) -> NatsServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (port, monitor_port) = (free_port(), free_port());
        let conf = dir.path().join("server.conf");
        // `sync_interval` arrived in 2.10; a 2.9 server refuses the key.
        let sync = if sync_always && version >= (2, 10, 0) {
            "sync_interval: always, "
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n\
                 jetstream {{ store_dir: \"{}\", {sync}max_mem_store: 256MB, max_file_store: 2GB }}\n{cluster}",
                dir.path().join("store").display()
            ),
        )
        .expect("server config");
        NatsServer {
            child: None,
            name: name.to_string(),
            port,
            monitor_port,
            dir,
            bin,
            conf,
            version,
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The monitoring endpoint's base URL.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// Starts the process (again, after [`NatsServer::kill9`]) on the same ports and store
    /// directory, and waits until JetStream answers its health check.
    pub fn spawn(&mut self) {
        self.launch();
        self.wait_healthy();
    }

    /// Starts the process without waiting for it.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log file");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
    }

    /// Waits until the server's health check passes (JetStream enabled and, in a
    /// cluster, current with its meta leader).
    pub fn wait_healthy(&self) {
        let health = format!("{}/healthz", self.monitor_url());
        wait_until(60, "nats-server healthy", || {
            ureq::get(&health).call().is_ok_and(|r| r.status() == 200)
        });
    }

    /// True while the process runs (started and not killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// SIGTERM (lame-duck free, a clean stop) and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .ok()?;
        c.wait().ok().and_then(|s| s.code())
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The JSON of a monitoring endpoint (`/varz`, `/jsz?streams=true`, ...).
    pub fn monitor(&self, path: &str) -> Option<serde_json::Value> {
        let text = ureq::get(format!("{}{path}", self.monitor_url()))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        serde_json::from_str(&text).ok()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Three JetStream servers on loopback forming one cluster (routes between all of them),
/// each with its own ports and store directory; stopped by process id on drop. With
/// [`NatsCluster::start_with_route_proxies`], every route from one server to another
/// goes through its own [`Proxy`], so a test can cut the link between two servers.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    /// `route_proxies[i][j]`: the proxy server `i` dials to reach server `j` (`None` on
    /// the diagonal, and everywhere without route proxies).
    route_proxies: Vec<Vec<Option<Proxy>>>,
}

impl NatsCluster {
    /// One server alone, in the shape of a cluster (tests that run on either).
    pub fn one() -> Option<NatsCluster> {
        Some(NatsCluster {
            servers: vec![NatsServer::start()?],
            route_proxies: Vec::new(),
        })
    }

    /// Starts three servers and waits until each is healthy (see [`NatsServer::start`]
    /// for when this returns `None`).
    pub fn start() -> Option<NatsCluster> {
        let c = Self::build(false)?;
        c.wait_healthy();
        Some(c)
    }

    /// Starts three servers and returns at once (they are still electing their leaders).
    pub fn launch() -> Option<NatsCluster> {
        Self::build(false)
    }

    /// Like [`NatsCluster::start`], with every route through a proxy ([`NatsCluster::cut`]).
    pub fn start_with_route_proxies() -> Option<NatsCluster> {
        let c = Self::build(true)?;
        c.wait_healthy();
        Some(c)
    }

    /// Waits until every running server passes its health check.
    pub fn wait_healthy(&self) {
        for s in self.servers.iter().filter(|s| s.running()) {
            s.wait_healthy();
        }
    }

    fn build(proxied: bool) -> Option<NatsCluster> {
        let (bin, version) = locate()?;
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        // Proxy i -> j forwards to server j's route port.
        let route_proxies: Vec<Vec<Option<Proxy>>> = (0..3)
            .map(|i| {
                (0..3)
                    .map(|j| {
                        (proxied && i != j).then(|| {
                            Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], routes[j])))
                        })
                    })
                    .collect()
            })
            .collect();
        let mut servers = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let list: Vec<String> = (0..3)
                .map(|j| match &route_proxies[i][j] {
                    Some(p) => format!("\"nats-route://{}\"", p.addr()),
                    None if proxied => String::new(),
                    None => format!("\"nats-route://127.0.0.1:{}\"", routes[j]),
                })
                .filter(|s| !s.is_empty())
                .collect();
            // Through proxies, servers must not learn each other's real route ports
            // (they would dial them directly, around the proxy): each advertises a port
            // nothing listens on, so only the configured (proxied) routes connect.
            let advertise = if proxied {
                format!("advertise: \"127.0.0.1:{}\", ", free_port())
            } else {
                String::new()
            };
            // no_advertise: clients are not told the other servers' addresses, so a
            // client given proxied addresses cannot reconnect around its proxies.
            let cluster = format!(
                "cluster {{ name: troupe-test, listen: 127.0.0.1:{route}, no_advertise: true, {advertise}routes: [{}] }}\n",
                list.join(", ")
            );
            servers.push(NatsServer::configured(
                &format!("s{i}"),
                bin.clone(),
                version,
                &cluster,
                true,
            ));
        }
        for s in &mut servers {
            s.launch();
        }
        Some(NatsCluster {
            servers,
            route_proxies,
        })
    }

    /// Every server's client URL, comma-separated (what a node's `url` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Cuts both routes between servers `i` and `j` (connections closed, new ones
    /// refused) until [`NatsCluster::heal`]. Needs route proxies.
    pub fn cut(&self, i: usize, j: usize) {
        for (a, b) in [(i, j), (j, i)] {
            self.route_proxies[a][b]
                .as_ref()
                .expect("started with route proxies")
                .cut();
        }
    }

    /// A proxy in front of each server's client port (for a node whose every link to
    /// the servers a test cuts), and the URL list through them.
    pub fn client_proxies(&self) -> (Vec<Proxy>, String) {
        let proxies: Vec<Proxy> = self
            .servers
            .iter()
            .map(|s| Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], s.port))))
            .collect();
        let urls = proxies
            .iter()
            .map(|p| format!("nats://{}", p.addr()))
            .collect::<Vec<_>>()
            .join(",");
        (proxies, urls)
    }

    /// Restores every route cut by [`NatsCluster::cut`].
    pub fn heal(&self) {
        for p in self.route_proxies.iter().flatten().flatten() {
            p.heal();
        }
    }

    /// The index of the server that leads `stream` (from the monitoring endpoints of the
    /// running servers), if one does now.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        self.servers.iter().enumerate().find_map(|(i, s)| {
            if !s.running() {
                return None;
            }
            let body = s.monitor("/jsz?streams=true")?;
            let leads = body["account_details"].as_array()?.iter().any(|a| {
                a["stream_detail"].as_array().is_some_and(|ss| {
                    ss.iter()
                        .any(|x| x["name"] == stream && x["cluster"]["leader"] == s.name)
                })
            });
            leads.then_some(i)
        })
    }

    /// True when `stream` has a leader that reports every other running server as a
    /// current replica (the cluster is whole again after a restart). Only the leader's
    /// report counts: a follower does not know how current the other followers are.
    pub fn stream_whole(&self, stream: &str) -> bool {
        let running: Vec<&str> = self
            .servers
            .iter()
            .filter(|s| s.running())
            .map(|s| s.name.as_str())
            .collect();
        self.servers.iter().filter(|s| s.running()).any(|s| {
            let Some(body) = s.monitor("/jsz?streams=true") else {
                return false;
            };
            let Some(accounts) = body["account_details"].as_array() else {
                return false;
            };
            accounts.iter().any(|a| {
                a["stream_detail"].as_array().is_some_and(|ss| {
                    ss.iter().any(|x| {
                        let c = &x["cluster"];
                        let replicas = c["replicas"].as_array().cloned().unwrap_or_default();
                        x["name"] == stream
                            && c["leader"] == s.name
                            && running.iter().filter(|n| **n != s.name).all(|n| {
                                replicas
                                    .iter()
                                    .any(|r| r["name"] == *n && r["current"] == true)
                            })
                    })
                })
            })
        })
    }
}
