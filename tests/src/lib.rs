//! Helpers for Troupe's multi-process tests: locate the `troupe` binary, run it, and
//! generate small data sets. The binary comes from `TROUPE_BIN` when set (e.g. a release
//! build), else from the workspace target directory next to this test executable.

pub mod browser;
pub mod nats;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Wall time of one test, appended as `<seconds> <test name>` to the file named by
/// `TROUPE_TEST_TIMES` (when set) on drop; CI prints the list. The name is the test
/// thread's (libtest names it after the test).
pub struct Timed {
    started: std::time::Instant,
}

/// Starts timing the current test (keep the guard alive for the whole test).
pub fn timed() -> Timed {
    Timed {
        started: std::time::Instant::now(),
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        let Ok(path) = std::env::var("TROUPE_TEST_TIMES") else {
            return;
        };
        let name = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        let outcome = if std::thread::panicking() {
            " (failed)"
        } else {
            ""
        };
        let line = format!(
            "{:8.1} s  {name}{outcome}\n",
            self.started.elapsed().as_secs_f64()
        );
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            f.write_all(line.as_bytes()).ok();
        }
    }
}

/// Path of the `troupe` binary under test.
pub fn troupe_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TROUPE_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/troupe
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let bin = profile_dir.join(format!("troupe{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p troupe-node) or set TROUPE_BIN",
        bin.display()
    );
    bin
}

/// Runs `troupe` with `args` and returns its output.
pub fn troupe(args: &[&str]) -> Output {
    Command::new(troupe_bin())
        .args(args)
        .env("TROUPE_LOG", "warn")
        .output()
        .expect("running troupe")
}

/// Root of the shared data sets (`../shared/data` from the workspace), if present.
/// When `TROUPE_REQUIRE_SHARED=1` is set, a missing folder is a failure, not a skip.
pub fn shared_data() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    if root.is_dir() {
        return Some(root);
    }
    if std::env::var("TROUPE_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("{} is missing and TROUPE_REQUIRE_SHARED=1", root.display());
    }
    eprintln!(
        "skipping: {} not found (set TROUPE_REQUIRE_SHARED=1 to make this fail)",
        root.display()
    );
    None
}

/// Parses the single JSON object `troupe eval --json` prints on stdout.
pub fn parse_report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "troupe failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().count(),
        1,
        "stdout must be one line: {stdout}"
    );
    serde_json::from_str(stdout.trim_end()).expect("stdout is JSON")
}

/// A `troupe node` process on a loopback port with its own data directory.
pub struct Node {
    pub dir: PathBuf,
    pub port: u16,
    pub config: PathBuf,
    child: Option<std::process::Child>,
    pub starts: u32,
    extra_env: Vec<(String, String)>,
}

/// A free loopback port for a listener a test starts (bound then released; the process
/// binds it right after). Chosen below the kernel's ephemeral range (32768 and up on
/// Linux), so that no outgoing connection of the processes under test can take it in
/// the meantime; each pick differs from the ones before in this process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
    });
    // A walk through 20000..32000 that visits every port once (7919 is prime and does
    // not divide 12000).
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(7919)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found in 20000..32000")
}

/// Polls `cond` every 20 ms until it holds or `secs` pass.
pub fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("timed out after {secs} s waiting for: {what}");
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into()
}

/// An HTTP answer: status and parsed JSON body (Null when not JSON).
pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
    pub retry_after: Option<String>,
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Option<Reply> {
    let mut r = r.ok()?;
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = r.body_mut().read_to_string().unwrap_or_default();
    Some(Reply {
        status,
        body: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        retry_after,
    })
}

impl Node {
    /// Writes a config (defaults tuned for tests plus `extra` TOML) and starts the node.
    pub fn start(dir: &std::path::Path, extra: &str, env: &[(&str, &str)]) -> Node {
        Self::start_with(dir, "", extra, env)
    }

    /// Like `start`, with `http` extra keys for the `[http]` section.
    pub fn start_with(
        dir: &std::path::Path,
        http: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Node {
        let port = free_port();
        let data = dir.join("data");
        let text = format!(
            "[node]\nname = \"test\"\ndata_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{port}\"\n{http}\n{extra}\n",
            data.display()
        );
        Self::start_config(dir, port, &text, env)
    }

    /// Starts a node on `port` with the config `text` written verbatim (cluster tests,
    /// whose members must know each other's ports before any starts).
    pub fn start_config(
        dir: &std::path::Path,
        port: u16,
        text: &str,
        env: &[(&str, &str)],
    ) -> Node {
        let mut n = Self::launch_config(dir, port, text, env);
        n.wait_ready(60);
        n
    }

    /// Like [`Node::start_config`] without waiting for readiness ([`Node::wait_ready`]).
    pub fn launch_config(
        dir: &std::path::Path,
        port: u16,
        text: &str,
        env: &[(&str, &str)],
    ) -> Node {
        std::fs::create_dir_all(dir).expect("node dir");
        let config = dir.join("node.toml");
        std::fs::write(&config, text).expect("write config");
        let mut n = Node {
            dir: dir.to_path_buf(),
            port,
            config,
            child: None,
            starts: 0,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        n.launch();
        n
    }

    /// Sends a signal (`STOP`, `CONT`, `TERM`, ...) to the running process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -{sig} failed");
        }
    }

    /// (Re)starts the process and waits for `/readyz`.
    pub fn spawn(&mut self) {
        self.launch();
        self.wait_ready(60);
    }

    /// (Re)starts the process without waiting.
    pub fn launch(&mut self) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("node-{}.log", self.starts))).expect("log");
        let out =
            std::fs::File::create(self.dir.join(format!("node-{}.out", self.starts))).expect("out");
        let mut cmd = Command::new(troupe_bin());
        cmd.args(["node", "--config"])
            .arg(&self.config)
            .stdout(out)
            .stderr(log)
            .env("TROUPE_LOG", "info");
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start troupe node"));
    }

    /// True when `/readyz` answers 200 now.
    pub fn ready(&self) -> bool {
        reply(agent().get(format!("{}/readyz", self.url())).call()).is_some_and(|r| r.status == 200)
    }

    /// The exit status if the process has exited (it is then forgotten).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Waits until `/readyz` answers 200; panics with the log when `secs` pass first or
    /// the process exits.
    pub fn wait_ready(&mut self, secs: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut exited = None;
        while std::time::Instant::now() < deadline {
            if self.ready() {
                return;
            }
            if let Some(s) = self.exited() {
                exited = Some(s);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let log = self.log(self.starts);
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "{} (log, newest first):\n{}\nstdout: {}",
            self.config.display(),
            tail.join("\n"),
            self.stdout(self.starts)
        );
        match exited {
            Some(s) => panic!("the node exited ({s}) before it was ready"),
            None => panic!("timed out after {secs} s waiting for: node ready"),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        ureq::get(format!("{}/metrics", self.url()))
            .call()
            .expect("GET /metrics")
            .into_body()
            .read_to_string()
            .expect("metrics text")
    }

    /// Sum of the samples of the Prometheus metric `name` (exactly that name, any
    /// labels) whose labels contain every one of `labels`; 0 when there is none.
    pub fn metric_sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                    && labels.iter().all(|x| l.contains(x))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Already gone is fine: the test only needs it dead.
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .ok()?;
        c.wait().ok().and_then(|s| s.code())
    }

    /// Waits for the process to exit on its own (escalation); returns the exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let c = self.child.as_mut()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                self.child = None;
                return s.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    pub fn get(&self, path: &str) -> Reply {
        reply(agent().get(format!("{}{path}", self.url())).call()).expect("node answers")
    }

    pub fn post(&self, path: &str, body: &str) -> Reply {
        reply(
            agent()
                .post(format!("{}{path}", self.url()))
                .header("Content-Type", "application/json")
                .send(body),
        )
        .expect("node answers")
    }

    /// POST with extra headers.
    pub fn post_with(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut r = agent().post(format!("{}{path}", self.url()));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            r = r.header("Content-Type", "application/json");
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        reply(r.send(body)).expect("node answers")
    }

    /// GET with extra headers.
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut r = agent().get(format!("{}{path}", self.url()));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        reply(r.call()).expect("node answers")
    }

    /// HEAD with extra headers: the status only.
    pub fn head(&self, path: &str, headers: &[(&str, &str)]) -> u16 {
        let mut r = agent().head(format!("{}{path}", self.url()));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.call().expect("node answers").status().as_u16()
    }

    pub fn put(&self, path: &str, body: &str) -> Reply {
        reply(
            agent()
                .put(format!("{}{path}", self.url()))
                .header("Content-Type", "application/json")
                .send(body),
        )
        .expect("node answers")
    }

    pub fn delete(&self, path: &str) -> Reply {
        reply(agent().delete(format!("{}{path}", self.url())).call()).expect("node answers")
    }

    /// Log text of start number `n` (1-based).
    pub fn log(&self, n: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{n}.log"))).unwrap_or_default()
    }

    pub fn stdout(&self, n: u32) -> String {
        std::fs::read_to_string(self.dir.join(format!("node-{n}.out"))).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Events with one unique item per row (`it<row>`), so a user's history shows exactly
/// which rows were applied (and whether one was applied twice).
pub fn write_events(path: &std::path::Path, rows: std::ops::Range<usize>, users: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    writeln!(f, "user,item,kind,timestamp").unwrap();
    for r in rows {
        writeln!(f, "u{},it{r},view,{}", r % users, 1_600_000_000 + r).unwrap();
    }
}

/// `troupe load` of `events` into `node` in batches of `batch`, retrying refused batches
/// for up to two minutes, logging acked event ids to `log`.
pub fn start_loader(
    node: &Node,
    events: &std::path::Path,
    log: &std::path::Path,
    batch: usize,
) -> std::process::Child {
    Command::new(troupe_bin())
        .args([
            "load",
            "--batch",
            &batch.to_string(),
            "--retry-for-secs",
            "120",
        ])
        .args(["--url", &node.url(), "--events"])
        .arg(events)
        .arg("--acked-log")
        .arg(log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The items (`it<row>`) of the events a loader logged as acked.
pub fn acked_rows(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|id| format!("it{}", id.rsplit('-').next().unwrap_or_default()))
        .collect()
}

/// An integer span attribute (exporters send unsigned values as numbers or as strings).
pub fn as_int(v: &serde_json::Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// `scripts/otlp_receiver.py` on a free port: an OTLP/HTTP (JSON) trace receiver whose
/// spans the test reads back. Killed when dropped.
pub struct OtlpReceiver {
    child: std::process::Child,
    pub port: u16,
    out: PathBuf,
}

impl OtlpReceiver {
    /// Starts the receiver writing to `dir/spans.jsonl` and waits until it listens.
    pub fn start(dir: &std::path::Path) -> OtlpReceiver {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("scripts")
            .join("otlp_receiver.py");
        let port = free_port();
        let out = dir.join("spans.jsonl");
        let child = std::process::Command::new("python3")
            .arg(&script)
            .args(["--port", &port.to_string(), "--out"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs the OTLP receiver");
        let r = OtlpReceiver { child, port, out };
        wait_until(20, "the OTLP receiver listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        r
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
