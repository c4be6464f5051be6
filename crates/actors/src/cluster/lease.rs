//! Partition ownership by leases in the state store.
//!
//! Records (JSON, in the state store's records: a KV bucket on JetStream):
//! - `member.<name>`: a member's heartbeat, rewritten every `lease_renew`. A member is
//!   *alive* while this node has seen its record change within `lease_period`.
//! - `lease.<p>`: `{owner, epoch, beat, failed}` of partition `p`. The owner renews it by
//!   compare-and-set every `lease_renew` (NATS 2.9 KV has no per-key TTL).
//!
//! Time is each node's own monotonic clock; no clocks are compared. The owner counts its
//! lease from the moment it *sent* the renewal that succeeded and stops answering for and
//! applying the partition `lease_period - lease_renew` after it, unless a later renewal
//! succeeded. A claimant takes a lease only after it has seen the record unchanged for a
//! full `lease_period` (timed from when it *observed* the last change, which is after the
//! owner sent it), so the old owner has stopped before the new one starts. A released
//! lease (`owner = ""`, written on SIGTERM or a hand-over) is taken at once.
//!
//! The desired owner of a partition is the rendezvous choice over the alive members. A
//! node claims the free or lapsed leases it is the desired owner of, all in the same
//! round (a dead node's partitions move in parallel), and hands over at most one
//! partition per `rebalance_interval` to a desired owner that has been alive for two
//! renewals (a node that joins or returns), so there is no storm. Claiming a lease is
//! followed by the consumer's own fenced claim of the partition's state scope, its
//! checkpoint load and its replay; the partition is answered from here only after that.
//!
//! A partition whose actors keep failing is given up by the partition supervisor: its
//! lease is released and marked `failed` (nobody claims it until an operator resets it),
//! instead of taking down every node that claims it in turn.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{rendezvous, Cluster};
use crate::ctx::Ctx;
use crate::state::{now_ms, StateError};
use crate::supervisor::{ChildSpec, SupervisorMsg};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Member name of the holder; "" when released.
    pub owner: String,
    /// The holder's process (`name#pid-start`), for operators.
    pub incarnation: String,
    /// Raised by every claim.
    pub epoch: u64,
    /// Raised by every renewal.
    pub beat: u64,
    /// Set when the partition was given up: why.
    pub failed: Option<String>,
    pub written_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub incarnation: String,
    pub beat: u64,
    /// Written on a graceful stop: the member is not alive from then on.
    pub leaving: bool,
    pub written_ms: i64,
}

/// A state store call bounded by `limit` (an election can hold a call far longer than
/// a lease round may wait); running out of time is `Unavailable`.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, StateError>>,
) -> Result<T, StateError> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(StateError::Unavailable(format!(
            "no answer within {} ms",
            limit.as_millis()
        )))
    })
}

pub fn lease_key(p: u32) -> String {
    format!("lease.{p}")
}

pub fn member_key(name: &str) -> String {
    format!("member.{name}")
}

/// Builds the supervised child of a partition.
pub type MakeChild = Arc<dyn Fn(u32) -> ChildSpec + Send + Sync>;

/// The lease manager's state (one per node; its round and a graceful stop take turns).
pub struct Leases {
    ctx: Arc<Ctx>,
    cluster: Arc<Cluster>,
    make_child: MakeChild,
    /// Revision of every record observed, and when it last changed.
    seen: HashMap<String, (u64, Instant)>,
    /// Leases held here: the record's revision after this node's last write.
    mine: HashMap<u32, (LeaseRecord, u64)>,
    /// Members alive, since when.
    alive_since: HashMap<String, Instant>,
    beat: u64,
    last_handoff: Instant,
    stopped: bool,
    /// Joined the cluster: had an authenticated session with a peer, or found no other
    /// member alive. Until then the node writes no member record and claims nothing, so
    /// a node with a wrong cookie never owns a partition its peers cannot reach.
    joined: bool,
    /// A renewal failed in the last round: the next comes sooner.
    renewal_failed: bool,
}

type Shared = Arc<tokio::sync::Mutex<Leases>>;

/// Starts the lease rounds; the handle stops them and releases every lease.
pub fn start(ctx: Arc<Ctx>, cluster: Arc<Cluster>, make_child: MakeChild) -> LeaseHandle {
    let leases = Arc::new(tokio::sync::Mutex::new(Leases {
        ctx,
        cluster: cluster.clone(),
        make_child,
        seen: HashMap::new(),
        mine: HashMap::new(),
        alive_since: HashMap::new(),
        beat: 0,
        last_handoff: Instant::now(),
        stopped: false,
        joined: false,
        renewal_failed: false,
    }));
    let l = leases.clone();
    let task = tokio::spawn(async move {
        let every = cluster.settings.lease_renew;
        loop {
            let retry_soon = {
                let mut g = l.lock().await;
                if g.stopped {
                    return;
                }
                g.round().await;
                g.renewal_failed
            };
            // The next round comes at the renewal interval, or sooner when a held lease
            // would lapse first (its partition is then stopped at once).
            let lapse = cluster
                .slots
                .iter()
                .filter_map(|s| s.lock().valid_until)
                .min()
                .map(|t| t.saturating_duration_since(Instant::now()));
            let mut next = lapse.map_or(every, |d| d.min(every));
            if retry_soon {
                // A failed renewal is retried well before the lease could lapse.
                next = next.min(every / 3);
            }
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = cluster.wake.notified() => {}
            }
        }
    });
    LeaseHandle { leases, task }
}

pub struct LeaseHandle {
    leases: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseHandle {
    /// Graceful stop: no more rounds; every owned partition checkpointed, stopped and
    /// released; this member marked leaving. Returns the problems met.
    pub async fn release_all(&self) -> Vec<String> {
        let mut g = self.leases.lock().await;
        g.stopped = true;
        self.task.abort();
        let mut problems = Vec::new();
        let mut owned: Vec<u32> = g.mine.keys().copied().collect();
        owned.sort_unstable();
        for p in owned {
            if let Err(e) = g.hand_over(p).await {
                problems.push(format!("partition {p}: {e}"));
            }
        }
        let me = g.cluster.me.clone();
        let rec = MemberRecord {
            incarnation: g.ctx.consumers.owner().to_string(),
            beat: g.beat + 1,
            leaving: true,
            written_ms: now_ms(),
        };
        if let Err(e) = g
            .ctx
            .state
            .put(
                &member_key(&me),
                serde_json::to_vec(&rec).unwrap_or_default(),
            )
            .await
        {
            problems.push(format!("member record: {e}"));
        }
        problems
    }
}

impl Leases {
    /// Counts a lease event in `/v1/cluster` (`counter`) and in the metrics (`kind`).
    fn event(&self, counter: &std::sync::atomic::AtomicU64, kind: &str) {
        self.cluster.count(counter);
        self.ctx
            .metrics
            .partition_events
            .get_or_create(&crate::metrics::label("event", kind))
            .inc();
    }

    fn period(&self) -> Duration {
        self.cluster.settings.lease_period
    }

    /// How long a renewal sent at `sent` keeps the lease valid here.
    fn valid_until(&self, sent: Instant) -> Instant {
        let s = &self.cluster.settings;
        sent + s.lease_period.saturating_sub(s.lease_renew)
    }

    fn observe(&mut self, key: &str, rev: u64, now: Instant) -> Instant {
        let e = self.seen.entry(key.to_string()).or_insert((rev, now));
        if e.0 != rev {
            *e = (rev, now);
        }
        e.1
    }

    /// One round: failed partitions released, own heartbeat, records read, leases
    /// renewed or dropped, free leases claimed, at most one hand-over.
    async fn round(&mut self) {
        // Leases whose time ran out stop at once, before any network call.
        let expired: Vec<u32> = self
            .mine
            .keys()
            .copied()
            .filter(|&p| !self.cluster.holds(p) && !self.cluster.slots[p as usize].lock().moving)
            .collect();
        for p in expired {
            self.lose(p, "the lease lapsed before a renewal succeeded")
                .await;
        }
        let given_up = std::mem::take(&mut *self.cluster.given_up.lock());
        for (p, why) in given_up {
            self.mark_failed(p, &why).await;
        }
        // Renewals first and together: while the store is slow (a leader election), no
        // other call of the round delays them.
        self.renew_all().await;
        let me = self.cluster.me.clone();
        let joined = self.joined || self.join().await;
        let state = self.ctx.state.clone();
        let bound = self.cluster.settings.lease_renew;
        // A node that has not joined only follows the leases (for routing).
        if joined {
            self.beat += 1;
            let rec = MemberRecord {
                incarnation: self.ctx.consumers.owner().to_string(),
                beat: self.beat,
                leaving: false,
                written_ms: now_ms(),
            };
            let bytes = serde_json::to_vec(&rec).unwrap_or_default();
            if let Err(e) = bounded(bound, state.put(&member_key(&me), bytes)).await {
                self.unreachable(&e);
                return;
            }
        }
        // Everything else the round needs, read together.
        let members: Vec<String> = self
            .cluster
            .settings
            .members
            .iter()
            .map(|m| m.name.clone())
            .filter(|n| *n != me)
            .collect();
        let keys: Vec<String> = members
            .iter()
            .map(|m| member_key(m))
            .chain((0..self.cluster.slots.len() as u32).map(lease_key))
            .collect();
        let reads =
            futures_util::future::join_all(keys.iter().map(|k| bounded(bound, state.get(k)))).await;
        let mut values = HashMap::new();
        for (k, r) in keys.iter().zip(reads) {
            match r {
                Ok(v) => {
                    values.insert(k.clone(), v);
                }
                Err(e) => {
                    self.unreachable(&e);
                    return;
                }
            }
        }
        self.cluster
            .log_reachable
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let period = self.period();
        let mut alive = vec![me.clone()];
        for m in &members {
            let k = member_key(m);
            let v = values.get(&k).cloned().flatten();
            let rev = v.as_ref().map_or(0, |v| v.revision);
            let changed = self.observe(&k, rev, now);
            let rec: Option<MemberRecord> = v.and_then(|v| serde_json::from_slice(&v.value).ok());
            let is_alive = rec.is_some_and(|r| !r.leaving) && now.duration_since(changed) < period;
            if is_alive {
                self.alive_since.entry(m.clone()).or_insert(now);
                alive.push(m.clone());
            } else {
                self.alive_since.remove(m);
            }
        }
        self.alive_since.entry(me.clone()).or_insert(now);
        let alive_refs: Vec<&str> = alive.iter().map(String::as_str).collect();
        for p in 0..self.cluster.slots.len() as u32 {
            let k = lease_key(p);
            let v = values.get(&k).cloned().flatten();
            let rev = v.as_ref().map_or(0, |v| v.revision);
            let changed = self.observe(&k, rev, now);
            let rec: Option<LeaseRecord> = v
                .as_ref()
                .and_then(|v| serde_json::from_slice(&v.value).ok());
            if let Some((held, my_rev)) = self.mine.get(&p).cloned() {
                // Revisions only grow. An older one is a read from a replica that lags
                // (direct gets), not a change. A newer one is either a renewal of ours
                // that timed out here but was written (same incarnation and epoch:
                // adopted, without extending the lease) or someone else's write.
                if rev > my_rev {
                    match rec {
                        Some(r)
                            if r.owner == held.owner
                                && r.incarnation == held.incarnation
                                && r.epoch == held.epoch =>
                        {
                            self.mine.insert(p, (r, rev));
                        }
                        r => {
                            let by = r.map_or("nobody".into(), |r| r.owner);
                            self.lose(p, &format!("the lease was taken by {by}")).await;
                        }
                    }
                }
                continue;
            }
            {
                let mut slot = self.cluster.slots[p as usize].lock();
                if let Some(r) = &rec {
                    if slot.owner != r.owner || slot.epoch != r.epoch {
                        slot.changed = now;
                    }
                    slot.owner = r.owner.clone();
                    slot.epoch = r.epoch;
                    slot.failed = r.failed.clone();
                }
            }
            if !joined || rec.as_ref().is_some_and(|r| r.failed.is_some()) {
                continue;
            }
            if rendezvous(p, alive_refs.iter().copied()) != Some(me.as_str()) {
                continue;
            }
            let released = rec.as_ref().is_none_or(|r| r.owner.is_empty());
            let lapsed = now.duration_since(changed) >= period;
            if released || lapsed {
                let failover = !released;
                self.claim(p, rec.unwrap_or_default(), v.map(|v| v.revision), failover)
                    .await;
            }
        }
        if joined {
            self.rebalance(&alive).await;
        }
    }

    /// Decides whether this node has joined: a peer answered over an authenticated
    /// session, or no other member's record has changed for a full lease period.
    async fn join(&mut self) -> bool {
        let peers: Vec<String> = self.cluster.peers.lock().keys().cloned().collect();
        if peers.iter().any(|p| self.cluster.peer_up(p)) {
            tracing::info!("joined the cluster");
            self.joined = true;
            self.cluster
                .joined
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return true;
        }
        let now = Instant::now();
        let period = self.period();
        let mut others_alive = false;
        for p in &peers {
            let k = member_key(p);
            match bounded(self.cluster.settings.lease_renew, self.ctx.state.get(&k)).await {
                Ok(v) => {
                    let leaving = v
                        .as_ref()
                        .and_then(|v| serde_json::from_slice::<MemberRecord>(&v.value).ok())
                        .is_none_or(|r| r.leaving);
                    let changed = self.observe(&k, v.map_or(0, |v| v.revision), now);
                    others_alive |= !leaving && now.duration_since(changed) < period;
                }
                Err(e) => {
                    self.unreachable(&e);
                    return false;
                }
            }
        }
        if others_alive {
            tracing::debug!("not joined yet: other members are alive but none has an authenticated session with this node");
            return false;
        }
        tracing::info!("joined the cluster (no other member is alive)");
        self.joined = true;
        self.cluster
            .joined
            .store(true, std::sync::atomic::Ordering::Relaxed);
        true
    }

    fn unreachable(&mut self, e: &StateError) {
        if self
            .cluster
            .log_reachable
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "lease round failed: the state store is unreachable (own leases lapse unless renewed in time)");
        }
    }

    /// Renews every lease held here, all compare-and-sets in flight together, each
    /// counted valid from the moment it was sent.
    async fn renew_all(&mut self) {
        let held: Vec<(u32, LeaseRecord, u64)> = self
            .mine
            .iter()
            .map(|(&p, (rec, rev))| (p, rec.clone(), *rev))
            .collect();
        if held.is_empty() {
            return;
        }
        let state = self.ctx.state.clone();
        let bound = self.cluster.settings.lease_renew;
        let writes = held.into_iter().map(|(p, rec, rev)| {
            let state = state.clone();
            async move {
                let key = lease_key(p);
                let attempt = |mut rec: LeaseRecord, rev: u64| {
                    let (state, key) = (state.clone(), key.clone());
                    async move {
                        rec.beat += 1;
                        rec.written_ms = now_ms();
                        let bytes = serde_json::to_vec(&rec).unwrap_or_default();
                        let sent = Instant::now();
                        let r = bounded(bound, state.compare_and_set(&key, bytes, Some(rev))).await;
                        (rec, sent, r)
                    }
                };
                let (rec, sent, r) = attempt(rec, rev).await;
                // A renewal that timed out here may still have been written: the record
                // then holds this incarnation and epoch at a newer revision. Nobody else
                // can have written that, so it is adopted and renewed again.
                if let Err(StateError::Conflict { .. }) = &r {
                    if let Ok(Some(v)) = bounded(bound, state.get(&key)).await {
                        let found: Option<LeaseRecord> = serde_json::from_slice(&v.value).ok();
                        if found.as_ref().is_some_and(|f| {
                            f.owner == rec.owner
                                && f.incarnation == rec.incarnation
                                && f.epoch == rec.epoch
                        }) {
                            let again = attempt(found.unwrap_or_default(), v.revision).await;
                            return (p, again.0, again.1, again.2);
                        }
                    }
                }
                (p, rec, sent, r)
            }
        });
        self.renewal_failed = false;
        for (p, rec, sent, r) in futures_util::future::join_all(writes).await {
            if !self.mine.contains_key(&p) {
                continue;
            }
            match r {
                Ok(new) => {
                    self.mine.insert(p, (rec, new));
                    let until = self.valid_until(sent);
                    let mut slot = self.cluster.slots[p as usize].lock();
                    if !slot.moving {
                        slot.valid_until = Some(until);
                    }
                    drop(slot);
                    self.observe(&lease_key(p), new, sent);
                }
                Err(StateError::Conflict { .. }) => {
                    self.lose(p, "the lease changed under its owner").await
                }
                Err(e) => {
                    self.unreachable(&e);
                    self.renewal_failed = true;
                    tracing::warn!(partition = p, error = %e, "lease renewal failed; retrying soon")
                }
            }
        }
    }

    async fn claim(&mut self, p: u32, old: LeaseRecord, rev: Option<u64>, failover: bool) {
        let rec = LeaseRecord {
            owner: self.cluster.me.clone(),
            incarnation: self.ctx.consumers.owner().to_string(),
            epoch: old.epoch + 1,
            beat: 0,
            failed: None,
            written_ms: now_ms(),
        };
        let sent = Instant::now();
        let r = self
            .ctx
            .state
            .compare_and_set(
                &lease_key(p),
                serde_json::to_vec(&rec).unwrap_or_default(),
                rev,
            )
            .await;
        let new = match r {
            Ok(n) => n,
            Err(e) => {
                tracing::info!(partition = p, error = %e, "lease claim lost a race or failed");
                return;
            }
        };
        tracing::info!(partition = p, epoch = rec.epoch, from = %old.owner, failover, "partition lease claimed");
        self.observe(&lease_key(p), new, sent);
        let until = self.valid_until(sent);
        {
            let mut slot = self.cluster.slots[p as usize].lock();
            slot.owner = rec.owner.clone();
            slot.epoch = rec.epoch;
            slot.valid_until = Some(until);
            slot.moving = false;
            slot.failed = None;
            slot.changed = sent;
        }
        self.mine.insert(p, (rec, new));
        self.event(&self.cluster.counters.claims, "claim");
        if failover {
            self.event(&self.cluster.counters.failovers, "failover");
        }
        // The partition's consumer claims its state scope anew (fencing the last owner),
        // loads the checkpoint and replays; it is answered once that is done.
        let scope = crate::names::user_features(p);
        self.ctx.consumers.deposed(&scope);
        let spec = (self.make_child)(p);
        let added = crate::node::call(
            crate::names::PARTITIONS_SUPERVISOR,
            Duration::from_secs(30),
            |port| SupervisorMsg::Add(spec, port),
        )
        .await;
        let problem = match added {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = problem {
            tracing::warn!(partition = p, error = %why, "partition did not start; releasing its lease");
            self.stop_partition(p).await;
            if let Err(e) = self.release(p, None).await {
                tracing::warn!(partition = p, error = %e, "lease not released; it lapses instead");
            }
        }
    }

    /// Stops answering for and applying `p` at once, and forgets the lease.
    async fn lose(&mut self, p: u32, why: &str) {
        {
            let mut slot = self.cluster.slots[p as usize].lock();
            slot.valid_until = None;
            slot.moving = false;
        }
        self.mine.remove(&p);
        self.event(&self.cluster.counters.lost, "lost");
        tracing::warn!(
            partition = p,
            reason = why,
            "partition lease lost; partition stopped here"
        );
        self.stop_partition(p).await;
    }

    /// Stops the partition's actor (no restart) and drops what this node held of it.
    async fn stop_partition(&self, p: u32) {
        let scope = crate::names::user_features(p);
        crate::Discard::discard(
            crate::node::call(
                crate::names::PARTITIONS_SUPERVISOR,
                Duration::from_secs(30),
                |port| SupervisorMsg::Remove(scope.clone(), port),
            )
            .await,
        );
        self.ctx.consumers.deposed(&scope);
        self.ctx.health.end_recovery(&scope);
        *self.ctx.user_stores[p as usize].write() = Default::default();
    }

    /// Writes the lease released (or failed), if this node still holds it.
    async fn release(&mut self, p: u32, failed: Option<String>) -> Result<(), String> {
        let Some((mut rec, rev)) = self.mine.remove(&p) else {
            return Ok(());
        };
        rec.owner.clear();
        rec.incarnation.clear();
        rec.failed = failed;
        rec.written_ms = now_ms();
        {
            let mut slot = self.cluster.slots[p as usize].lock();
            slot.valid_until = None;
            slot.moving = false;
            slot.owner.clear();
            slot.failed = rec.failed.clone();
        }
        self.ctx
            .state
            .compare_and_set(
                &lease_key(p),
                serde_json::to_vec(&rec).unwrap_or_default(),
                Some(rev),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Final checkpoint, stop, release: the partition is free for its next owner at once.
    async fn hand_over(&mut self, p: u32) -> Result<(), String> {
        self.cluster.slots[p as usize].lock().moving = true;
        let scope = crate::names::user_features(p);
        let cp = crate::node::call(&scope, Duration::from_secs(30), |port| {
            crate::features::UserFeaturesMsg::Checkpoint(port)
        })
        .await;
        let problem = match cp {
            Ok(r) => r.error,
            Err(e) => Some(e.to_string()),
        };
        self.stop_partition(p).await;
        let released = self.release(p, None).await;
        match (problem, released) {
            (None, Ok(())) => Ok(()),
            (Some(e), _) => Err(format!(
                "final checkpoint: {e} (released; the next owner replays from the last one)"
            )),
            (None, Err(e)) => Err(format!("release: {e} (the lease lapses instead)")),
        }
    }

    async fn mark_failed(&mut self, p: u32, why: &str) {
        self.event(&self.cluster.counters.failed, "failed");
        tracing::error!(
            partition = p,
            reason = why,
            "partition given up after repeated failures; released and marked failed"
        );
        self.stop_partition(p).await;
        if let Err(e) = self.release(p, Some(why.to_string())).await {
            tracing::warn!(partition = p, error = %e, "could not mark the partition failed");
        }
    }

    /// Hands one owned partition to its desired owner, when that member has been alive
    /// for two renewals, has a session with this node, and no hand-over happened within
    /// `rebalance_interval`.
    async fn rebalance(&mut self, alive: &[String]) {
        let s = &self.cluster.settings;
        if self.last_handoff.elapsed() < s.rebalance_interval {
            return;
        }
        let settled = s.lease_renew * 2;
        let refs: Vec<&str> = alive.iter().map(String::as_str).collect();
        let mut owned: Vec<u32> = self.mine.keys().copied().collect();
        owned.sort_unstable();
        let me = self.cluster.me.clone();
        let target = owned.into_iter().find_map(|p| {
            let d = rendezvous(p, refs.iter().copied())?;
            let ready = self
                .alive_since
                .get(d)
                .is_some_and(|t| t.elapsed() >= settled);
            // Handed only to a member this node can reach (a partition handed over a cut
            // link would be answered degraded from here until the link heals).
            let reachable = self.cluster.peer_up(d);
            (d != me && ready && reachable && self.ctx.serving(p)).then(|| (p, d.to_string()))
        });
        if let Some((p, to)) = target {
            self.last_handoff = Instant::now();
            tracing::info!(partition = p, to = %to, "handing a partition to its desired owner");
            match self.hand_over(p).await {
                Ok(()) => {
                    self.event(&self.cluster.counters.handoffs, "handoff");
                }
                Err(e) => tracing::warn!(partition = p, error = %e, "hand-over incomplete"),
            }
        }
    }
}
