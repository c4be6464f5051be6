//! The JetStream engine's own ingest ceiling on this machine, for `bench/node_bench.py
//! jetstream`: publishes synthetic event records (encoded as the node encodes them, with
//! an idempotency key as `Nats-Msg-Id`, to the per-partition subjects of a stream laid out
//! as the node lays it out) from `clients` tasks sharing one connection, each sending a
//! batch of `batch` records and awaiting the batch's acks together, for `seconds`. With
//! `atomic`, each batch is one atomic batch publish (2.12+: every message carries the
//! batch headers, only the last one, the commit, is acknowledged; the stream must allow
//! atomic batches, which the node's layout does).
//! Prints one JSON line: `{"records": n, "seconds": s, "rate": n / s}`.
//!
//! Usage: jetstream_publish <url> <stream> <batch> <clients> <seconds> [atomic]
//! (`TROUPE_BENCH_REPLICAS`: the stream's replicas, default 1)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use troupe_actors::jetstream::{JetStream, JetStreamConfig};
use troupe_actors::record::{self, partition_of, Event, Payload};

const PARTITIONS: u32 = 8;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 && args.len() != 7 {
        return Err(
            "usage: jetstream_publish <url> <stream> <batch> <clients> <seconds> [atomic]".into(),
        );
    }
    let atomic = args.get(6).is_some_and(|a| a == "atomic");
    let (url, stream) = (&args[1], &args[2]);
    let batch: usize = args[3].parse()?;
    let clients: usize = args[4].parse()?;
    let seconds: f64 = args[5].parse()?;
    let mut config = JetStreamConfig::local(url, stream, PARTITIONS);
    // The stream's replicas (the benchmark's three-server runs set 3).
    if let Ok(r) = std::env::var("TROUPE_BENCH_REPLICAS") {
        config.replicas = r.parse()?;
    }
    let js = JetStream::connect(config).await?;
    let cfg = js.config.clone();
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (js, client, cfg, sent) = (js.js.clone(), js.client.clone(), cfg.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            let mut batches = 0u64;
            while Instant::now() < stop {
                let mut acks = Vec::with_capacity(batch);
                batches += 1;
                let batch_id = format!("raw{}-{c}-{batches}", std::process::id());
                for i in 0..batch {
                    let payload = Payload::Event(Event {
                        event_id: Some(format!("raw{c}-{k}")),
                        user: format!("u{}", (k * 7919 + c as u64) % 20_000),
                        item: format!("i{}", (k * 104_729) % 10_000),
                        kind: "view".into(),
                        value: None,
                        ts_ms: 1_700_000_000_000 + k as i64,
                        request_id: None,
                    });
                    let Payload::Event(e) = &payload else {
                        unreachable!()
                    };
                    let subject = cfg.subject(partition_of(&e.user, PARTITIONS));
                    let id = format!("{:032x}", payload.idempotency_key());
                    k += 1;
                    if atomic {
                        use async_nats::header::{self, HeaderMap};
                        let mut h = HeaderMap::new();
                        h.insert(header::NATS_BATCH_ID, batch_id.as_str());
                        h.insert(header::NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
                        h.insert(header::NATS_MESSAGE_ID, id.as_str());
                        let body = record::encode(&payload).into();
                        if i + 1 < batch {
                            client
                                .publish_with_headers(subject, h, body)
                                .await
                                .expect("publish");
                        } else {
                            h.insert(header::NATS_BATCH_COMMIT, "1");
                            let msg = async_nats::jetstream::message::PublishMessage::build()
                                .payload(body)
                                .headers(h);
                            acks.push(js.send_publish(subject, msg).await.expect("publish"));
                        }
                        continue;
                    }
                    let msg = async_nats::jetstream::message::PublishMessage::build()
                        .payload(record::encode(&payload).into())
                        .message_id(id);
                    acks.push(js.send_publish(subject, msg).await.expect("publish"));
                }
                for a in acks {
                    a.await.expect("ack");
                }
                sent.fetch_add(batch as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = sent.load(Ordering::Relaxed);
    println!(
        "{{\"records\": {n}, \"seconds\": {secs:.3}, \"rate\": {:.1}}}",
        n as f64 / secs
    );
    Ok(())
}
