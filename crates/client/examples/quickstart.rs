//! The client API in a few calls: ingest events, read your own write, ask for
//! recommendations and similar items, print each branch's share.
//!
//!     troupe demo --nodes 3        # prints the TROUPE_SEEDS and TROUPE_COOKIE_FILE to use
//!     TROUPE_SEEDS=127.0.0.1:7001,127.0.0.1:7002 TROUPE_COOKIE_FILE=/path/cookie \
//!         cargo run -p troupe-client --example quickstart
//!
//! `TROUPE_CLUSTER_COOKIE` may hold the cookie itself; `TROUPE_ROUNDS` repeats the
//! write/read/recommend round (a run that outlives a member shows the failover).

use std::time::Duration;

use troupe_client::proto::api::{Branch, EventIn, ItemIn, RecommendQuery};
use troupe_client::{Client, ClientConfig, ClientError};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seeds = env("TROUPE_SEEDS").ok_or("set TROUPE_SEEDS to members' cluster addresses")?;
    let cookie = match (env("TROUPE_CLUSTER_COOKIE"), env("TROUPE_COOKIE_FILE")) {
        (Some(c), _) => c,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .map_err(|e| format!("{f}: {e}"))?
            .trim()
            .to_string(),
        (None, None) => return Err("set TROUPE_CLUSTER_COOKIE or TROUPE_COOKIE_FILE".into()),
    };
    let rounds: usize = env("TROUPE_ROUNDS").map_or(Ok(1), |r| r.parse())?;
    let seeds: Vec<&str> = seeds.split(',').collect();
    let mut cfg = ClientConfig::new(&seeds, &cookie);
    cfg.name = "quickstart".into();
    cfg.call_timeout = Duration::from_secs(20);
    let client = Client::connect_with(cfg).await?;
    println!(
        "connected; members seen: {:?}",
        troupe_client::members_seen()
    );

    let items: Vec<ItemIn> = ["red running shoes", "blue trail shoes", "wool hiking socks"]
        .iter()
        .enumerate()
        .map(|(i, text)| ItemIn {
            id: format!("qs-item-{i}"),
            text: text.to_string(),
            categories: vec!["outdoor".into()],
            ..Default::default()
        })
        .collect();
    let w = client.upsert_items(items).await?;
    println!("items stored at catalog offset {}", w.positions[0].offset);

    for round in 0..rounds {
        let events: Vec<EventIn> = (0..3)
            .map(|i| EventIn {
                event_id: Some(format!("qs-{round}-{i}")),
                user: "qs-user".into(),
                item: format!("qs-item-{}", (round + i) % 3),
                kind: "view".into(),
                ..Default::default()
            })
            .collect();
        let w = loop {
            match client.ingest(events.clone(), None).await {
                Ok(w) => break w,
                // A partition moving after a member died: retried after the delay the
                // node asked for; the event ids make the retry safe.
                Err(ClientError::Unavailable { retry_after, .. }) => {
                    tokio::time::sleep(retry_after).await
                }
                Err(e) => return Err(e.into()),
            }
        };
        let at = w.positions.iter().map(|p| p.offset).max().unwrap_or(0);
        // Read your own write: the answer reflects the partition up to `at`.
        let user = client.get_user("qs-user", Some(at)).await?;
        println!(
            "round {round}: {} new, {} duplicate; qs-user has {} events (stale: {}) via {}",
            w.acked,
            w.duplicates,
            user.view.events,
            user.stale,
            client.current_member().await.unwrap_or_default()
        );
        let r = client
            .recommend(RecommendQuery {
                user: "qs-user".into(),
                k: 5,
                min_offset: Some(at),
                ..Default::default()
            })
            .await?;
        println!(
            "  recommendations (served by {}, route {}, degraded {}):",
            r.served_by,
            r.route.name(),
            r.degraded
        );
        for it in &r.items {
            let shares: Vec<String> = Branch::ALL
                .iter()
                .map(|b| format!("{} {:.2}", b.name(), it.share(*b)))
                .collect();
            println!(
                "    {:<12} {:.4}  [{}]",
                it.item,
                it.score,
                shares.join(", ")
            );
        }
    }
    match client.similar("qs-item-0", 3, None).await {
        Ok(s) => {
            println!("similar to qs-item-0 ({:?}):", s.source);
            for (id, score) in s.items {
                println!("    {id:<12} {score:.4}");
            }
        }
        Err(ClientError::NotFound(why)) => println!("no similar items yet: {why}"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
