//! The client API against HTTP on the same member and data, in one run: latency of
//! sequential calls (p50, p99) and throughput of concurrent callers, for recommendations
//! and for event ingest (batches of `--batch` events). Run by `bench/node_bench.py
//! client-api`, which starts the member and loads the data.
//!
//!     client_bench --seed 127.0.0.1:7001 --http 127.0.0.1:8080 --cookie C --users 2000

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use troupe_client::proto::api::{EventIn, RecommendQuery};
use troupe_client::{Client, ClientConfig};

struct Args {
    seed: String,
    http: String,
    cookie: String,
    users: usize,
    samples: usize,
    threads: usize,
    seconds: f64,
    batch: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        seed: String::new(),
        http: String::new(),
        cookie: String::new(),
        users: 1000,
        samples: 2000,
        threads: 8,
        seconds: 5.0,
        batch: 100,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut it = v.chunks(2);
    for pair in &mut it {
        let [k, val] = pair else {
            return Err(format!("`{}` needs a value", pair[0]));
        };
        let num = |what: &str| {
            val.parse::<usize>()
                .map_err(|e| format!("{what} `{val}`: {e}"))
        };
        match k.as_str() {
            "--seed" => a.seed = val.clone(),
            "--http" => a.http = val.clone(),
            "--cookie" => a.cookie = val.clone(),
            "--users" => a.users = num("--users")?,
            "--samples" => a.samples = num("--samples")?,
            "--threads" => a.threads = num("--threads")?,
            "--batch" => a.batch = num("--batch")?,
            "--seconds" => a.seconds = val.parse().map_err(|e| format!("--seconds: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.seed.is_empty() || a.http.is_empty() || a.cookie.is_empty() {
        return Err("--seed, --http and --cookie are required".into());
    }
    Ok(a)
}

fn pct(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() as f64 - 1.0) * q).round() as usize]
}

fn events_body(prefix: &str, k: usize, n: usize, users: usize) -> (Vec<EventIn>, String) {
    let evs: Vec<EventIn> = (k..k + n)
        .map(|j| EventIn {
            event_id: Some(format!("{prefix}-{j}")),
            user: format!("u{}", j * 7919 % users),
            item: format!("i{}", j * 104729 % 10000),
            kind: "view".into(),
            ..Default::default()
        })
        .collect();
    let body: String = evs
        .iter()
        .map(|e| {
            format!(
                "{{\"event_id\":\"{}\",\"user\":\"{}\",\"item\":\"{}\",\"kind\":\"view\"}}\n",
                e.event_id.as_deref().unwrap_or_default(),
                e.user,
                e.item
            )
        })
        .collect();
    (evs, body)
}

type Call = Arc<dyn Fn(usize) -> bool + Send + Sync>;

/// Sequential latencies (ms) of `n` calls.
fn latencies(call: &Call, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let ok = call(i);
        if ok {
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    out
}

/// Calls per second of `threads` callers for `seconds`.
fn throughput(call: &Call, threads: usize, seconds: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (call, done) = (call.clone(), done.clone());
            std::thread::spawn(move || {
                let mut i = t * 1_000_000;
                while Instant::now() < end {
                    if call(i) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for h in hs {
        h.join().ok();
    }
    done.load(Ordering::Relaxed) as f64 / seconds
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args()?;
    let rt = Arc::new(tokio::runtime::Runtime::new()?);
    let mut cfg = ClientConfig::new(&[a.seed.as_str()], &a.cookie);
    cfg.name = "bench".into();
    cfg.call_timeout = Duration::from_secs(30);
    let client = Arc::new(rt.block_on(Client::connect_with(cfg))?);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let base = format!("http://{}", a.http);
    let users = a.users;
    let rec_client: Call = {
        let (c, rt) = (client.clone(), rt.clone());
        Arc::new(move |i| {
            let q = RecommendQuery {
                user: format!("u{}", i * 7919 % users),
                k: 10,
                ..Default::default()
            };
            rt.block_on(c.recommend(q)).is_ok()
        })
    };
    let rec_http: Call = {
        let (agent, base) = (agent.clone(), base.clone());
        Arc::new(move |i| {
            let url = format!("{base}/v1/recommendations/u{}?k=10", i * 7919 % users);
            agent
                .get(&url)
                .call()
                .is_ok_and(|mut r| r.status() == 200 && r.body_mut().read_to_vec().is_ok())
        })
    };
    let batch = a.batch;
    let ing_client: Call = {
        let (c, rt) = (client.clone(), rt.clone());
        Arc::new(move |i| {
            let (evs, _) = events_body("bc", i * batch, batch, users);
            rt.block_on(c.ingest(evs, None)).is_ok()
        })
    };
    let ing_http: Call = {
        let (agent, base) = (agent.clone(), base.clone());
        Arc::new(move |i| {
            let (_, body) = events_body("bh", i * batch, batch, users);
            agent
                .post(&format!("{base}/v1/events"))
                .header("Content-Type", "application/x-ndjson")
                .send(body.as_bytes())
                .is_ok_and(|mut r| r.status() == 200 && r.body_mut().read_to_vec().is_ok())
        })
    };
    // Warm both paths (connections, caches).
    latencies(&rec_client, 200);
    latencies(&rec_http, 200);
    println!(
        "same member, same users; sequential calls: {} recommendations, {} ingest batches of {batch}; throughput: {} callers for {} s",
        a.samples,
        a.samples / 4,
        a.threads,
        a.seconds
    );
    for (what, cl, ht, n) in [
        ("recommend k=10", &rec_client, &rec_http, a.samples),
        ("ingest", &ing_client, &ing_http, a.samples / 4),
    ] {
        let (mut lc, mut lh) = (latencies(cl, n), latencies(ht, n));
        let (c50, c99, h50, h99) = (
            pct(&mut lc, 0.5),
            pct(&mut lc, 0.99),
            pct(&mut lh, 0.5),
            pct(&mut lh, 0.99),
        );
        let (tc, th) = (
            throughput(cl, a.threads, a.seconds),
            throughput(ht, a.threads, a.seconds),
        );
        println!(
            "{what:<15} client p50 {c50:.3} ms p99 {c99:.3} ms {tc:.0}/s | HTTP p50 {h50:.3} ms p99 {h99:.3} ms {th:.0}/s | client/HTTP p50 {:.2} p99 {:.2} throughput {:.2}",
            c50 / h50,
            c99 / h99,
            tc / th
        );
    }
    Ok(())
}
