//! The JetStream engine's own ingest ceiling on this machine, for `bench/node_bench.py
//! jetstream`: publishes synthetic event records (encoded as the node encodes them, with
//! an idempotency key as `Nats-Msg-Id`, to the per-partition subjects of a stream laid out
//! as the node lays it out) from `clients` tasks sharing one connection, each sending a
//! batch of `batch` records and awaiting the batch's acks together, for `seconds`.
//! Prints one JSON line: `{"records": n, "seconds": s, "rate": n / s}`.
//!
//! Usage: jetstream_publish <url> <stream> <batch> <clients> <seconds>

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use troupe_actors::jetstream::{JetStream, JetStreamConfig};
use troupe_actors::record::{self, partition_of, Event, Payload};

const PARTITIONS: u32 = 8;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        return Err("usage: jetstream_publish <url> <stream> <batch> <clients> <seconds>".into());
    }
    let (url, stream) = (&args[1], &args[2]);
    let batch: usize = args[3].parse()?;
    let clients: usize = args[4].parse()?;
    let seconds: f64 = args[5].parse()?;
    let js = JetStream::connect(JetStreamConfig::local(url, stream, PARTITIONS)).await?;
    let cfg = js.config.clone();
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (js, cfg, sent) = (js.js.clone(), cfg.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while Instant::now() < stop {
                let mut acks = Vec::with_capacity(batch);
                for _ in 0..batch {
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
                    let msg = async_nats::jetstream::message::PublishMessage::build()
                        .payload(record::encode(&payload).into())
                        .message_id(format!("{:032x}", payload.idempotency_key()));
                    acks.push(js.send_publish(subject, msg).await.expect("publish"));
                    k += 1;
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
