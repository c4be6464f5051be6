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
        assert!(self.child.is_none(), "server already running");
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log file");
        let child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        let health = format!("http://127.0.0.1:{}/healthz", self.monitor_port);
        wait_until(30, "nats-server healthy", || {
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
