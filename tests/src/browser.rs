//! A headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`),
//! for tests of the status page. Synchronous wrappers over `fantoccini` so tests read like
//! the other multi-process tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// One chromedriver process with one browser session.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
}

fn find(var: &str, default: &str) -> Option<PathBuf> {
    let p = std::env::var(var).map_or_else(|_| PathBuf::from(default), PathBuf::from);
    p.exists().then_some(p)
}

impl Browser {
    /// Starts chromedriver and a headless Chromium whose profile lives under `dir`. `None`
    /// (with a message) when either is not installed, unless `TROUPE_REQUIRE_BROWSER=1`,
    /// where that is a failure. Paths: `TROUPE_CHROMIUM` and `TROUPE_CHROMEDRIVER`, else
    /// Debian's `/usr/bin/chromium` and `/usr/bin/chromedriver`.
    pub fn start(dir: &Path) -> Option<Browser> {
        let chromium = find("TROUPE_CHROMIUM", "/usr/bin/chromium");
        let driver = find("TROUPE_CHROMEDRIVER", "/usr/bin/chromedriver");
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let msg =
                "chromium or chromedriver not installed (apt-get install chromium chromium-driver)";
            if std::env::var("TROUPE_REQUIRE_BROWSER").as_deref() == Ok("1") {
                panic!("{msg}, and TROUPE_REQUIRE_BROWSER=1");
            }
            eprintln!("skipping: {msg}");
            return None;
        };
        let port = crate::free_port();
        let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut b = Browser {
            rt,
            client: None,
            driver: child,
        };
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        // Flags: no sandbox (tests may run as root), and nothing that reaches out to the
        // network on its own (this machine has none beyond loopback).
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-quic", "--no-first-run",
                    "--window-size=1400,1800",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }
        });
        let caps: fantoccini::wd::Capabilities = serde_json::from_value(caps).unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let r = b.rt.block_on(
                ClientBuilder::new(connector)
                    .capabilities(caps.clone())
                    .connect(&url),
            );
            match r {
                Ok(c) => {
                    b.client = Some(c);
                    return Some(b);
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!(
                    "no browser session from chromedriver within 30 s: {e}; its log: {}",
                    std::fs::read_to_string(dir.join("chromedriver.log")).unwrap_or_default()
                ),
            }
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("session open")
    }

    /// Opens `url` (waits for the load event).
    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Runs `script` in the page (`arguments` are the args) and returns what it returns.
    pub fn eval(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt
            .block_on(self.client().execute(script, args))
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// Replaces the value of the input at `css` by typing `text` into it.
    pub fn type_into(&self, css: &str, text: &str) {
        self.rt.block_on(async {
            let e = self.client().find(Locator::Css(css)).await.unwrap();
            e.clear().await.unwrap();
            e.send_keys(text).await.unwrap();
        });
    }

    /// Clicks the element at `css`.
    pub fn click(&self, css: &str) {
        self.rt.block_on(async {
            let e = self
                .client()
                .find(Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no element {css}: {e}"));
            e.click().await.unwrap();
        });
    }

    /// Saves a PNG of the whole window at `path`.
    pub fn screenshot(&self, path: &Path) {
        let png = self.rt.block_on(self.client().screenshot()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Polls `cond` (every 100 ms) until it holds; panics naming `what` after `secs`.
    pub fn wait(&self, secs: u64, what: &str, mut cond: impl FnMut(&Browser) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out after {secs} s waiting in the browser for: {what}");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            // Best effort: the driver is killed next whatever the browser answers.
            self.rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), c.close()).await })
                .ok();
        }
        self.driver.kill().ok();
        self.driver.wait().ok();
    }
}
