//! This node's copy of the lease, member and trainer-leader records, kept current by one
//! KV watch instead of a read per key and round.
//!
//! Polling made every node read every lease and member record every renewal interval, so
//! the state store answered `members x (partitions + members)` reads per interval. With
//! the watch each node receives the changes once, as the store applies them, and the lease
//! rounds read this copy. The store then answers only the writes (renewals, heartbeats,
//! claims), which grow with partitions, not with partitions times members.
//!
//! **When the copy is used.** A watch can stall or end without this node noticing at
//! once, and a stale copy would make live members look lapsed. The copy is used only
//! while it is known current: this node's own heartbeat, which its renewer writes every
//! renewal interval, came back through the watch within the last `1.5 x lease_renew`.
//! The watch delivers in the store's order, so everything written before that heartbeat
//! is in the copy; what it may lack is at most that old, well inside the lease period a
//! member must stay silent before it counts as lapsed. Otherwise (no watch on this
//! backend, a node not yet joined and so not yet writing heartbeats, a stalled or
//! restarting watch) the rounds read every key from the store, as before. Reads are
//! counted by source in `troupe_cluster_record_reads_total{via}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::ctx::Ctx;
use crate::state::{StateError, Versioned, WatchedRecord};

use super::leader::LEADER_KEY;
use super::lease::{bounded, MEMBER_PREFIX};
use super::Cluster;

/// What the watch covers (NATS subject patterns over the state bucket's keys).
const PATTERNS: [&str; 3] = ["lease.>", "member.>", LEADER_KEY];

/// The copy and what is known of its currency.
#[derive(Default)]
pub struct Records {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Versioned>,
    /// When this member's own record last came back through the current watch.
    echo: Option<Instant>,
}

impl Inner {
    /// True while this member's own record came back within `within` of `now`.
    fn current(&self, within: Duration, now: Instant) -> bool {
        self.echo
            .is_some_and(|t| now.saturating_duration_since(t) < within)
    }
}

impl Records {
    /// Applies one change delivered by the watch (`own_key`: this member's record).
    fn apply(&self, rec: WatchedRecord, own_key: &str, now: Instant) {
        let mut inner = self.inner.lock();
        if rec.key == own_key && rec.value.is_some() {
            inner.echo = Some(now);
        }
        match rec.value {
            Some(v) => {
                // Revisions of a key only grow; a redelivery after the watch restarted
                // internally never moves a record back.
                let e = inner.entries.entry(rec.key).or_insert_with(|| v.clone());
                if v.revision >= e.revision {
                    *e = v;
                }
            }
            None => {
                inner.entries.remove(&rec.key);
            }
        }
    }

    /// Forgets everything (the watch ended; a new one delivers the latest of each
    /// record again).
    fn reset(&self) {
        *self.inner.lock() = Inner::default();
    }

    /// True while this member's own record came back within `within`.
    pub fn current(&self, within: Duration, now: Instant) -> bool {
        self.inner.lock().current(within, now)
    }

    /// The records of `keys` from the copy, when it is current.
    fn read(
        &self,
        keys: &[String],
        within: Duration,
        now: Instant,
    ) -> Option<Vec<Option<Versioned>>> {
        let inner = self.inner.lock();
        if !inner.current(within, now) {
            return None;
        }
        Some(keys.iter().map(|k| inner.entries.get(k).cloned()).collect())
    }

    /// Every record whose key starts with `prefix`, when the copy is current.
    fn with_prefix(
        &self,
        prefix: &str,
        within: Duration,
        now: Instant,
    ) -> Option<Vec<(String, Versioned)>> {
        let inner = self.inner.lock();
        if !inner.current(within, now) {
            return None;
        }
        Some(
            inner
                .entries
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}

/// How recent this member's own echo must be for the copy to be read.
fn within(cluster: &Cluster) -> Duration {
    cluster.settings.lease_renew + cluster.settings.lease_renew / 2
}

fn count(ctx: &Ctx, via: &str) {
    ctx.metrics
        .record_reads
        .get_or_create(&crate::metrics::label("via", via))
        .inc();
}

/// The records of `keys`: from the copy when it is current, otherwise one read per key
/// from the store, all in flight together (each bounded by the renewal interval).
pub(crate) async fn read(
    ctx: &Ctx,
    cluster: &Cluster,
    keys: &[String],
) -> Result<Vec<Option<Versioned>>, StateError> {
    if let Some(v) = cluster.records.read(keys, within(cluster), Instant::now()) {
        count(ctx, "watch");
        return Ok(v);
    }
    count(ctx, "store");
    read_keys(ctx, cluster.settings.lease_renew, keys).await
}

/// Every member record (key and value): from the copy when it is current, otherwise
/// listed and read from the store.
pub(crate) async fn member_records(
    ctx: &Ctx,
    cluster: &Cluster,
) -> Result<Vec<(String, Versioned)>, StateError> {
    if let Some(v) = cluster
        .records
        .with_prefix(MEMBER_PREFIX, within(cluster), Instant::now())
    {
        count(ctx, "watch");
        return Ok(v);
    }
    count(ctx, "store");
    let bound = cluster.settings.lease_renew;
    let keys = bounded(bound, ctx.state.keys(MEMBER_PREFIX)).await?;
    let values = read_keys(ctx, bound, &keys).await?;
    Ok(keys
        .into_iter()
        .zip(values)
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect())
}

/// One read per key, all in flight together, each bounded by `bound`.
async fn read_keys(
    ctx: &Ctx,
    bound: Duration,
    keys: &[String],
) -> Result<Vec<Option<Versioned>>, StateError> {
    futures_util::future::join_all(keys.iter().map(|k| bounded(bound, ctx.state.get(k))))
        .await
        .into_iter()
        .collect()
}

/// Keeps `cluster.records` current for as long as it runs: one watch at a time, started
/// again (after a pause) when it ends, or when it has not brought this member's own
/// record back for a whole lease period while this member writes it; the copy is
/// forgotten in between. Returns at once on a backend that cannot watch. The fault
/// target `record_watch` (`on` a key) stalls the application of changes (tests: a watch
/// that falls behind).
pub(crate) async fn follow(ctx: Arc<Ctx>, cluster: Arc<Cluster>) {
    if !cluster.settings.watch_records {
        return;
    }
    let own_key = super::lease::member_key(&cluster.me);
    let (renew, period) = (cluster.settings.lease_renew, cluster.settings.lease_period);
    let mut pause = Duration::from_millis(200);
    loop {
        let mut rx = match ctx.state.watch_records(&PATTERNS).await {
            Ok(Some(rx)) => rx,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "record watch not started; the lease rounds read every record from the store meanwhile");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(renew);
                continue;
            }
        };
        tracing::debug!("record watch started");
        let started = Instant::now();
        loop {
            match tokio::time::timeout(renew, rx.recv()).await {
                Ok(Some(rec)) => {
                    if let Some(crate::faults::FaultAction::Stall(d)) =
                        ctx.faults.on_key("record_watch", &rec.key)
                    {
                        tracing::warn!(key = %rec.key, stall_ms = d.as_millis() as u64, "injected stall");
                        tokio::time::sleep(d).await;
                    }
                    pause = Duration::from_millis(200);
                    cluster.records.apply(rec, &own_key, Instant::now());
                }
                Ok(None) => break,
                Err(_) => {}
            }
            // A watch that says nothing of this member's heartbeats for a lease period,
            // while the member is writing them, is started again.
            let writing = cluster.joined.load(std::sync::atomic::Ordering::Relaxed)
                && !cluster.leaving.load(std::sync::atomic::Ordering::Relaxed);
            if writing
                && started.elapsed() > period
                && !cluster.records.current(period, Instant::now())
            {
                tracing::warn!(
                    "record watch brought nothing of this member's heartbeats for a lease period"
                );
                break;
            }
        }
        cluster.records.reset();
        tracing::warn!("record watch ended; started again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(renew);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, revision: u64) -> WatchedRecord {
        WatchedRecord {
            key: key.to_string(),
            value: Some(Versioned {
                value: vec![revision as u8],
                revision,
            }),
        }
    }

    #[test]
    fn the_copy_is_read_only_while_the_own_record_came_back_recently() {
        let r = Records::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(3);
        let keys = vec!["lease.0".to_string(), "lease.1".to_string()];
        r.apply(rec("lease.0", 5), "member.a", t0);
        // Records arrived, but not this member's own: not known to be current.
        assert_eq!(r.read(&keys, w, t0), None);
        r.apply(rec("member.a", 6), "member.a", t0);
        let got = r.read(&keys, w, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(got[0].as_ref().map(|v| v.revision), Some(5));
        assert_eq!(got[1], None);
        // No echo for longer than the bound: the rounds go to the store.
        assert_eq!(r.read(&keys, w, t0 + Duration::from_secs(4)), None);
        assert!(!r.current(w, t0 + Duration::from_secs(4)));
        // A redelivered older revision never moves a record back; a delete removes it.
        r.apply(rec("lease.0", 9), "member.a", t0);
        r.apply(rec("lease.0", 7), "member.a", t0);
        r.apply(rec("member.a", 10), "member.a", t0);
        let got = r.read(&keys, w, t0).unwrap();
        assert_eq!(got[0].as_ref().map(|v| v.revision), Some(9));
        r.apply(
            WatchedRecord {
                key: "lease.0".into(),
                value: None,
            },
            "member.a",
            t0,
        );
        assert_eq!(r.read(&keys, w, t0).unwrap()[0], None);
        let members = r.with_prefix("member.", w, t0).unwrap();
        assert_eq!(members.len(), 1);
        r.reset();
        assert_eq!(r.read(&keys, w, t0), None);
    }
}
