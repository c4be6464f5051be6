//! Partition ownership by leases in the state store, kept by two supervised actors.
//!
//! Records (JSON, in the state store's records: the KV bucket on JetStream, read from
//! its leader):
//! - `member.<name>`: a member's heartbeat, rewritten every `lease_renew`. A member is
//!   *alive* while this node has seen its record change within `lease_period`.
//! - `lease.<p>`: `{owner, epoch, beat, failed}` of partition `p`. The owner renews it by
//!   compare-and-set every `lease_renew`.
//! - `moves`: the times of the latest voluntary hand-overs, the cluster's move budget.
//!
//! **Two actors, so that nothing delays a renewal.** The [`Renewer`] does only the
//! time-critical writes: every held lease renewed (all compare-and-sets in flight
//! together, each bounded by `lease_renew`) and this member's heartbeat. The [`Manager`]
//! does everything that may take long: reading the records, claiming, starting and
//! stopping partitions, handing them over, marking them failed, releasing them on a
//! graceful stop. The leases held live in [`super::Cluster`] (`held`), so either actor
//! restarts without losing them.
//!
//! **Time** is each node's own monotonic clock; no clocks are compared for ownership. The
//! owner counts its lease from the moment it *sent* the renewal that succeeded and stops
//! answering for the partition `lease_period - lease_renew` after it, unless a later
//! renewal succeeded. A claimant takes a lease only after it has seen the record unchanged
//! for a full `lease_period`, counted only over time in which it could read the store (a
//! round that cannot read restarts every observation), so the old owner has stopped
//! before the new one starts. A released lease (`owner = ""`, written on SIGTERM or a
//! hand-over) is taken at once.
//!
//! **A store outage longer than the slack** stops answering, not the partitions: a lease
//! whose time ran out stays held here (`lapsed`), its actor keeps its state, and the
//! renewer keeps trying the compare-and-set at the lease's last revision. If nobody wrote
//! the record meanwhile, that write re-adopts the lease and the partition is answered
//! again at once, without a reload or replay; if someone did, the lease is lost and the
//! partition stopped here. Claimants restart their observation after an outage, so the
//! owner, which renews every `lease_renew`, gets there first.
//!
//! **Desired owner** = rendezvous choice over the members that are alive and not held
//! down. A member seen to lapse (alive, then silent without leaving, while this node
//! could read the store) is held down: not given partitions until it has been alive
//! again for `member_hold_down`, doubled for every further lapse up to
//! `member_hold_down_max`. Hand-overs are made by the owners, whose views hold the
//! flapping member down; a store outage, which silences every member at once, is not a
//! lapse of anyone (observations restart after it).
//! A node claims the free or lapsed leases it is the desired owner of, all in the same
//! round, and hands over at most one partition per `rebalance_interval`, to a desired
//! owner alive for two renewals with a session here, within the cluster-wide budget of
//! `move_budget` hand-overs per `move_budget_window`.
//!
//! A partition whose actors keep failing is given up by the partition supervisor: its
//! lease is released and marked `failed` (nobody claims it until an operator resets it).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use serde::{Deserialize, Serialize};

use super::{rendezvous, Cluster};
use crate::ctx::Ctx;
use crate::state::{now_ms, StateError, Versioned};
use crate::supervisor::{ChildSpec, SupervisorMsg};
use crate::Discard;

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

impl LeaseRecord {
    /// The same holder's record (owner, process and epoch): a write of this node's own.
    pub(crate) fn same_holder(&self, other: &LeaseRecord) -> bool {
        self.owner == other.owner
            && self.incarnation == other.incarnation
            && self.epoch == other.epoch
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub incarnation: String,
    pub beat: u64,
    /// Written on a graceful stop: the member is not alive from then on.
    pub leaving: bool,
    pub written_ms: i64,
    /// The ALS model version the member serves (0: none), for `/v1/cluster`.
    #[serde(default)]
    pub model_version: u64,
    /// Where the member listens, so that members not configured with it find it
    /// (empty in records of older builds).
    #[serde(default)]
    pub cluster_addr: String,
    #[serde(default)]
    pub http_addr: String,
    /// Whether it may lead the training.
    #[serde(default = "yes")]
    pub trainer: bool,
    /// Written by a starting member not yet joined: others learn its addresses and open
    /// sessions to it, but it is not alive (not given partitions) until its heartbeats.
    #[serde(default)]
    pub joining: bool,
}

fn yes() -> bool {
    true
}

impl MemberRecord {
    /// This node's record with its addresses and the model version it serves.
    pub(crate) fn own(
        ctx: &Ctx,
        cluster: &Cluster,
        beat: u64,
        leaving: bool,
        joining: bool,
    ) -> MemberRecord {
        let me = cluster
            .member(&cluster.me)
            .unwrap_or_else(|| crate::settings::Member {
                name: cluster.me.clone(),
                cluster_addr: String::new(),
                http_addr: String::new(),
                trainer: false,
            });
        MemberRecord {
            incarnation: ctx.consumers.owner().to_string(),
            beat,
            leaving,
            written_ms: now_ms(),
            model_version: if leaving {
                0
            } else {
                ctx.als.load().as_ref().map_or(0, |m| m.version)
            },
            cluster_addr: me.cluster_addr,
            http_addr: me.http_addr,
            trainer: me.trainer,
            joining,
        }
    }

    /// The member it describes, when it names its addresses.
    pub(crate) fn member(&self, name: &str) -> Option<crate::settings::Member> {
        (!self.cluster_addr.is_empty()).then(|| crate::settings::Member {
            name: name.to_string(),
            cluster_addr: self.cluster_addr.clone(),
            http_addr: self.http_addr.clone(),
            trainer: self.trainer,
        })
    }
}

/// The times (ms since the epoch, by each writer's clock) of the latest voluntary
/// hand-overs in the cluster. Clocks only bound the budget, never ownership.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MovesRecord {
    pub times_ms: Vec<i64>,
}

/// A lease this node holds: the record as last written here and its revision.
#[derive(Debug, Clone)]
pub struct Held {
    pub rec: LeaseRecord,
    pub rev: u64,
}

/// A state store call bounded by `limit` (an election can hold a call far longer than
/// a lease round may wait); running out of time is `Unavailable`.
pub(crate) async fn bounded<T>(
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

/// The prefix of member records' keys.
pub const MEMBER_PREFIX: &str = "member.";

pub fn member_key(name: &str) -> String {
    format!("{MEMBER_PREFIX}{name}")
}

const MOVES_KEY: &str = "moves";

/// Builds the supervised child of a partition.
pub type MakeChild = Arc<dyn Fn(u32) -> ChildSpec + Send + Sync>;

/// Counts a lease event in `/v1/cluster` (`counter`) and in the metrics (`kind`).
fn event(ctx: &Ctx, cluster: &Cluster, counter: &std::sync::atomic::AtomicU64, kind: &str) {
    cluster.count(counter);
    ctx.metrics
        .partition_events
        .get_or_create(&crate::metrics::label("event", kind))
        .inc();
}

/// Counts a failed call to the state store by a lease actor (`op`: renew, member, read,
/// claim, release) and marks the store unreachable.
fn store_error(ctx: &Ctx, cluster: &Cluster, op: &str, e: &StateError) {
    ctx.metrics
        .lease_store_errors
        .get_or_create(&crate::metrics::label("op", op))
        .inc();
    if cluster.log_reachable.swap(false, Ordering::Relaxed) {
        tracing::warn!(op, error = %e, "lease store call failed: the state store is unreachable or slow (own leases lapse unless renewed in time)");
    }
}

/// How long a renewal sent at `sent` keeps a lease valid here.
fn valid_until(cluster: &Cluster, sent: Instant) -> Instant {
    let s = &cluster.settings;
    sent + s.lease_period.saturating_sub(s.lease_renew)
}

/// Whether lease `r`, unchanged here for `unchanged_for`, may be taken before it runs
/// out (ADR 017; partition and trainer leases alike): its holder's process is known to
/// have exited, or it is held by this member's previous process (same name, another
/// incarnation than `own`) and has missed a renewal: unchanged for two renewal
/// intervals, while a live holder writes it every interval.
pub(crate) fn early_takeover(
    cluster: &Cluster,
    exited: &std::collections::HashSet<String>,
    own: &str,
    r: &LeaseRecord,
    unchanged_for: Duration,
) -> bool {
    let s = &cluster.settings;
    s.takeover_on_exit
        && (exited.contains(&r.owner)
            || (r.owner == cluster.me
                && r.incarnation != own
                && unchanged_for >= 2 * s.lease_renew))
}

// ---------------------------------------------------------------------------- renewer

/// The actor that renews every lease this node holds and writes its member heartbeat.
pub struct Renewer;

#[derive(RactorMessage)]
pub enum RenewerMsg {
    Tick,
}

pub struct RenewerState {
    ctx: Arc<Ctx>,
    cluster: Arc<Cluster>,
    beat: u64,
    /// Since when renewals or heartbeats have been failing, and when this node last
    /// asked for a new connection because of it.
    failing_since: Option<Instant>,
    reconnected: Option<Instant>,
}

impl Actor for Renewer {
    type Msg = RenewerMsg;
    type State = RenewerState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        myself: ActorRef<RenewerMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<RenewerState, ActorProcessingErr> {
        let cluster = ctx
            .cluster
            .clone()
            .ok_or("the lease renewer runs in cluster mode only")?;
        myself.send_message(RenewerMsg::Tick)?;
        Ok(RenewerState {
            ctx,
            cluster,
            beat: 0,
            failing_since: None,
            reconnected: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RenewerMsg>,
        _: RenewerMsg,
        st: &mut RenewerState,
    ) -> Result<(), ActorProcessingErr> {
        crate::faults::fire(&st.ctx.faults, "lease_renewer").await?;
        let s = st.cluster.settings.clone();
        let (ctx, cluster) = (st.ctx.clone(), st.cluster.clone());
        let (member, failed) = tokio::join!(st.heartbeat(), renew_all(&ctx, &cluster));
        // The next round comes at the renewal interval, sooner after a failure.
        let next = if failed || !member {
            s.lease_renew / 3
        } else {
            s.lease_renew
        };
        // A store that stops answering over a connection that is up: the server this
        // node holds may be cut off from the others (it cannot reach the leaders while
        // another server could). After two renewal intervals of failures the client
        // reconnects (to a server picked at random), at most once per half lease period.
        if failed || !member {
            let now = Instant::now();
            let since = *st.failing_since.get_or_insert(now);
            let due = st
                .reconnected
                .is_none_or(|t| now.duration_since(t) >= s.lease_period / 2);
            if now.duration_since(since) >= 2 * s.lease_renew && due {
                st.reconnected = Some(now);
                st.ctx
                    .metrics
                    .lease_store_errors
                    .get_or_create(&crate::metrics::label("op", "reconnect"))
                    .inc();
                st.ctx.state.reconnect().await;
            }
        } else {
            st.failing_since = None;
        }
        myself.send_after(next, || RenewerMsg::Tick);
        Ok(())
    }
}

impl RenewerState {
    /// This member's heartbeat record, once the node has joined (until it leaves).
    /// False when the write failed.
    async fn heartbeat(&mut self) -> bool {
        let cl = &self.cluster;
        if !cl.joined.load(Ordering::Relaxed) || cl.leaving.load(Ordering::Relaxed) {
            return true;
        }
        self.beat += 1;
        let rec = MemberRecord::own(&self.ctx, cl, self.beat, false, false);
        let bytes = serde_json::to_vec(&rec).unwrap_or_default();
        let key = member_key(&cl.me);
        match bounded(cl.settings.lease_renew, self.ctx.state.put(&key, bytes)).await {
            Ok(_) => true,
            Err(e) => {
                store_error(&self.ctx, cl, "member", &e);
                false
            }
        }
    }
}

/// Renews every lease held here, all compare-and-sets in flight together, each counted
/// valid from the moment it was sent. A lease whose time ran out is tried at its last
/// revision too (re-adopted when nobody wrote it meanwhile). Returns true when a renewal
/// failed for want of an answer.
async fn renew_all(ctx: &Arc<Ctx>, cluster: &Arc<Cluster>) -> bool {
    let held: Vec<(u32, Held)> = cluster
        .held
        .lock()
        .iter()
        .map(|(&p, h)| (p, h.clone()))
        .collect();
    if held.is_empty() {
        return false;
    }
    let bound = cluster.settings.lease_renew;
    let writes = held.into_iter().map(|(p, h)| {
        let state = ctx.state.clone();
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
            let (rec, sent, r) = attempt(h.rec.clone(), h.rev).await;
            // A renewal that timed out here may still have been written: the record then
            // holds this process and epoch at a newer revision. Nobody else writes that,
            // so it is adopted and renewed again. A conflict is a loss only once the
            // record has been read and is someone else's.
            if let Err(StateError::Conflict { .. }) = &r {
                match bounded(bound, state.get(&key)).await {
                    Ok(Some(v)) => {
                        let found: Option<LeaseRecord> = v.json();
                        if let Some(f) = found.filter(|f| f.same_holder(&rec)) {
                            let again = attempt(f, v.revision).await;
                            return (p, h, again.0, again.1, again.2);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return (p, h, rec, sent, Err(e)),
                }
            }
            (p, h, rec, sent, r)
        }
    });
    let mut failed = false;
    for (p, before, rec, sent, r) in futures_util::future::join_all(writes).await {
        // Released or lost meanwhile (by the manager): the result is not ours to apply.
        let current = cluster.held.lock().get(&p).map(|h| h.rec.epoch);
        if current != Some(before.rec.epoch) {
            continue;
        }
        match r {
            Ok(rev) => {
                cluster.held.lock().insert(p, Held { rec, rev });
                let mut slot = cluster.slots[p as usize].lock();
                let lapsed = slot.valid_until.is_none_or(|t| t <= sent);
                if !slot.moving {
                    slot.valid_until = Some(valid_until(cluster, sent));
                }
                drop(slot);
                cluster.log_reachable.store(true, Ordering::Relaxed);
                if lapsed {
                    tracing::info!(partition = p, "lease re-adopted at its last revision: nobody took it while it lapsed; answered again without a reload");
                    event(ctx, cluster, &cluster.counters.readopted, "readopted");
                }
            }
            Err(StateError::Conflict { .. }) => {
                cluster.lose(p, "the lease changed under its owner");
                event(ctx, cluster, &cluster.counters.lost, "lost");
            }
            Err(e) => {
                store_error(ctx, cluster, "renew", &e);
                failed = true;
                tracing::warn!(partition = p, error = %e, "lease renewal failed; retrying soon");
            }
        }
    }
    failed
}

// ---------------------------------------------------------------------------- manager

/// The actor that reads the lease and member records and acts on them: claims,
/// partition starts and stops, hand-overs, failures, the graceful release.
pub struct Manager;

pub struct ManagerArgs {
    pub ctx: Arc<Ctx>,
    pub make_child: MakeChild,
}

#[derive(RactorMessage)]
pub enum ManagerMsg {
    Round,
    /// Graceful stop: every owned partition checkpointed, stopped and released; this
    /// member marked leaving. Answers the problems met.
    ReleaseAll(RpcReplyPort<Vec<String>>),
}

/// A member's lapses, for its hold-down.
#[derive(Debug, Clone)]
struct Lapses {
    count: u32,
    hold: Duration,
}

pub struct ManagerState {
    ctx: Arc<Ctx>,
    cluster: Arc<Cluster>,
    make_child: MakeChild,
    /// Revision of every record observed, and since when this node has seen it so.
    seen: HashMap<String, (u64, Instant)>,
    /// Members alive, since when.
    alive_since: HashMap<String, Instant>,
    /// Members seen to lapse, by name (this node's own name: its own interruptions).
    lapses: HashMap<String, Lapses>,
    /// When this node last read the records, and when its last round ran.
    last_read: Option<Instant>,
    last_round: Instant,
    last_handoff: Instant,
    stopped: bool,
    /// When the member records were last listed (see [`ManagerState::discover`]).
    last_discovery: Option<Instant>,
    /// This node's record announces its addresses (see [`ManagerState::announce`]).
    announced: bool,
    /// Turns `cluster.wake` notifications into rounds (aborted with the actor).
    _waker: AbortOnDrop,
    /// Keeps `cluster.records` current (see [`super::records`]; aborted with the actor).
    _records: AbortOnDrop,
}

/// A task aborted when dropped (an actor's helper task ends with the actor, even after a
/// panic, which drops the state without running `post_stop`).
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Actor for Manager {
    type Msg = ManagerMsg;
    type State = ManagerState;
    type Arguments = ManagerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ManagerMsg>,
        args: ManagerArgs,
    ) -> Result<ManagerState, ActorProcessingErr> {
        let cluster = args
            .ctx
            .cluster
            .clone()
            .ok_or("the lease manager runs in cluster mode only")?;
        let (c, me) = (cluster.clone(), myself.clone());
        let waker = tokio::spawn(async move {
            loop {
                c.wake.notified().await;
                if me.cast(ManagerMsg::Round).is_err() {
                    return;
                }
            }
        });
        let records = tokio::spawn(super::records::follow(args.ctx.clone(), cluster.clone()));
        myself.send_message(ManagerMsg::Round)?;
        Ok(ManagerState {
            ctx: args.ctx,
            cluster,
            make_child: args.make_child,
            seen: HashMap::new(),
            alive_since: HashMap::new(),
            lapses: HashMap::new(),
            last_read: None,
            last_round: Instant::now(),
            last_handoff: Instant::now(),
            stopped: false,
            last_discovery: None,
            announced: false,
            _waker: AbortOnDrop(waker),
            _records: AbortOnDrop(records),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ManagerMsg>,
        msg: ManagerMsg,
        st: &mut ManagerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ManagerMsg::Round => {
                if st.stopped {
                    return Ok(());
                }
                crate::faults::fire(&st.ctx.faults, "lease_manager").await?;
                st.round().await;
                // One timer at a time: a wake-up's round does not add another.
                let due = st.last_round + st.cluster.settings.lease_renew;
                if !st.cluster.round_scheduled.swap(true, Ordering::AcqRel) {
                    let c = st.cluster.clone();
                    myself.send_after(due.saturating_duration_since(Instant::now()), move || {
                        c.round_scheduled.store(false, Ordering::Release);
                        ManagerMsg::Round
                    });
                }
                // While an exited member's partition waits for its claim: one more
                // timer at a tenth of the interval (at most one such timer at a time).
                if st.takeover_pending()
                    && !st.cluster.fast_round_scheduled.swap(true, Ordering::AcqRel)
                {
                    let c = st.cluster.clone();
                    myself.send_after(st.cluster.settings.lease_renew / 10, move || {
                        c.fast_round_scheduled.store(false, Ordering::Release);
                        ManagerMsg::Round
                    });
                }
            }
            ManagerMsg::ReleaseAll(reply) => {
                reply.send(st.release_all().await).discard();
            }
        }
        Ok(())
    }
}

impl ManagerState {
    fn period(&self) -> Duration {
        self.cluster.settings.lease_period
    }

    fn observe(&mut self, key: &str, rev: u64, now: Instant) -> Instant {
        let e = self.seen.entry(key.to_string()).or_insert((rev, now));
        if e.0 != rev {
            *e = (rev, now);
        }
        e.1
    }

    /// Notes a lapse of `member` and raises its hold-down.
    fn lapsed(&mut self, member: &str) {
        let s = &self.cluster.settings;
        let l = self.lapses.entry(member.to_string()).or_insert(Lapses {
            count: 0,
            hold: Duration::ZERO,
        });
        l.count += 1;
        l.hold = s
            .member_hold_down
            .saturating_mul(2u32.saturating_pow(l.count.saturating_sub(1).min(16)))
            .min(s.member_hold_down_max);
        tracing::warn!(
            member,
            lapses = l.count,
            hold_down_ms = l.hold.as_millis() as u64,
            "member lapsed; held down before it is given partitions again"
        );
        self.ctx
            .metrics
            .member_lapses
            .get_or_create(&crate::metrics::label("member", member))
            .inc();
    }

    /// True while `member`, alive since `since`, is held down after a lapse.
    fn held_down(&mut self, member: &str, since: Instant) -> bool {
        let max = self.cluster.settings.member_hold_down_max;
        let Some(l) = self.lapses.get(member) else {
            return false;
        };
        let alive_for = since.elapsed();
        if alive_for >= max {
            // Alive long enough for its record of lapses to be forgotten.
            self.lapses.remove(member);
            return false;
        }
        alive_for < l.hold
    }

    /// One round: lost and failed partitions stopped, records read, free leases
    /// claimed, at most one hand-over.
    async fn round(&mut self) {
        let now = Instant::now();
        self.last_round = now;
        let lost = std::mem::take(&mut *self.cluster.lost.lock());
        for (p, why) in lost {
            tracing::warn!(partition = p, reason = %why, "partition lease lost; partition stopped here");
            stop_partition(&self.ctx, p).await;
        }
        let given_up = std::mem::take(&mut *self.cluster.given_up.lock());
        for (p, why) in given_up {
            self.mark_failed(p, &why).await;
        }
        self.discover().await;
        let joined = self.cluster.joined.load(Ordering::Relaxed) || {
            self.announce().await;
            let now_joined = self.join().await;
            if now_joined {
                // The first heartbeat at once (the renewer writes the next ones): members
                // starting now see this one alive.
                let rec = MemberRecord::own(&self.ctx, &self.cluster, 0, false, false);
                let bytes = serde_json::to_vec(&rec).unwrap_or_default();
                let key = member_key(&self.cluster.me);
                if let Err(e) = bounded(
                    self.cluster.settings.lease_renew,
                    self.ctx.state.put(&key, bytes),
                )
                .await
                {
                    store_error(&self.ctx, &self.cluster, "member", &e);
                }
            }
            now_joined
        };
        // Everything the round needs, read together.
        let me = self.cluster.me.clone();
        let members: Vec<String> = self
            .cluster
            .member_names()
            .into_iter()
            .filter(|n| *n != me)
            .collect();
        let keys: Vec<String> = members
            .iter()
            .map(|m| member_key(m))
            .chain((0..self.cluster.slots.len() as u32).map(lease_key))
            .collect();
        let bound = self.cluster.settings.lease_renew;
        let values: HashMap<String, Option<Versioned>> =
            match super::records::read(&self.ctx, &self.cluster, &keys).await {
                Ok(v) => keys.iter().cloned().zip(v).collect(),
                Err(e) => {
                    store_error(&self.ctx, &self.cluster, "read", &e);
                    return;
                }
            };
        let now = Instant::now();
        // After an outage (or a pause) every observation starts again: a claimant only
        // counts time in which it could read the store, so the owner's renewer, which
        // re-adopts its lease at its last revision, gets there first.
        let interrupted = self
            .last_read
            .is_none_or(|t| now.duration_since(t) > 2 * bound);
        if interrupted {
            for v in self.seen.values_mut() {
                v.1 = now;
            }
        }
        self.last_read = Some(now);
        self.cluster.log_reachable.store(true, Ordering::Relaxed);
        *self.cluster.last_read.lock() = Some(now);
        let period = self.period();
        // Members whose process exited (see `membership`): not alive, and their leases
        // are taken over at once.
        let exited = self.cluster.exited();
        let mut alive = vec![me.clone()];
        for m in &members {
            let k = member_key(m);
            let v = values.get(&k).cloned().flatten();
            let rev = v.as_ref().map_or(0, |v| v.revision);
            let changed = self.observe(&k, rev, now);
            let rec: Option<MemberRecord> = v.and_then(|v| v.json());
            if let Some(r) = &rec {
                self.cluster
                    .model_versions
                    .lock()
                    .insert(m.clone(), r.model_version);
                if let Some(entry) = r.member(m).filter(|_| !r.leaving) {
                    self.cluster.learn(entry);
                }
            }
            // Leaving, or starting again (joining): said by the member, not a lapse.
            let leaving = rec.as_ref().is_none_or(|r| r.leaving || r.joining);
            let is_alive = !leaving && !exited.contains(m) && now.duration_since(changed) < period;
            if is_alive {
                self.alive_since.entry(m.clone()).or_insert(now);
                alive.push(m.clone());
            } else if self.alive_since.remove(m).is_some() && !leaving {
                self.lapsed(m);
            }
            // A discovered member that left (or whose record is gone) and has no session
            // here leaves the member list.
            let gone = rec.as_ref().is_none_or(|r| r.leaving);
            let sessions = self.cluster.peers.lock().get(m).map_or(0, |p| p.sessions);
            if gone && sessions == 0 && self.cluster.forget(m) {
                tracing::info!(member = %m, "member left the cluster");
            }
        }
        self.alive_since.entry(me.clone()).or_insert(now);
        // The desired owners: alive and not held down (all alive ones if that leaves
        // nobody, so partitions are never left without an owner).
        let mut eligible: Vec<String> = Vec::new();
        for m in &alive {
            let since = self.alive_since.get(m).copied().unwrap_or(now);
            if !self.held_down(m, since) {
                eligible.push(m.clone());
            }
        }
        if eligible.is_empty() {
            eligible = alive.clone();
        }
        *self.cluster.held_down.lock() = alive
            .iter()
            .filter(|m| !eligible.contains(m))
            .cloned()
            .collect();
        let eligible_refs: Vec<&str> = eligible.iter().map(String::as_str).collect();
        let held_here: Vec<u32> = self.cluster.held.lock().keys().copied().collect();
        for p in 0..self.cluster.slots.len() as u32 {
            let k = lease_key(p);
            let v = values.get(&k).cloned().flatten();
            let rev = v.as_ref().map_or(0, |v| v.revision);
            let changed = self.observe(&k, rev, now);
            let rec: Option<LeaseRecord> = v.as_ref().and_then(|v| v.json());
            if held_here.contains(&p) {
                // The renewer keeps it (revisions it wrote, adoption of its own writes,
                // and the loss on a conflict).
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
            if rendezvous(p, eligible_refs.iter().copied()) != Some(me.as_str()) {
                continue;
            }
            let released = rec.as_ref().is_none_or(|r| r.owner.is_empty());
            let lapsed = now.duration_since(changed) >= period;
            let early = !released
                && !lapsed
                && rec.as_ref().is_some_and(|r| {
                    early_takeover(
                        &self.cluster,
                        &exited,
                        self.ctx.consumers.owner(),
                        r,
                        now.duration_since(changed),
                    )
                });
            if released || lapsed || early {
                let failover = !released;
                self.claim(
                    p,
                    rec.unwrap_or_default(),
                    v.map(|v| v.revision),
                    failover,
                    early,
                )
                .await;
            }
        }
        if joined {
            self.rebalance(&eligible).await;
        }
    }

    /// True while a partition is held by a member whose process exited and nobody has
    /// claimed it yet: rounds then come ten times as often, so the claim and the new
    /// owner are seen within a fraction of a renewal interval.
    pub(crate) fn takeover_pending(&self) -> bool {
        let exited = self.cluster.exited();
        !exited.is_empty()
            && self
                .cluster
                .slots
                .iter()
                .any(|s| exited.contains(&s.lock().owner))
    }

    /// Members not configured here are found by listing the member records, at most every
    /// half lease period (and on every round until this node has joined): a record that
    /// names its addresses and is not leaving adds its member, whom the membership actor
    /// then dials (the smaller name dials) and the lease rounds read like any other.
    async fn discover(&mut self) {
        let now = Instant::now();
        let joined = self.cluster.joined.load(Ordering::Relaxed);
        if joined
            && self
                .last_discovery
                .is_some_and(|t| now.duration_since(t) < self.period() / 2)
        {
            return;
        }
        let records = match super::records::member_records(&self.ctx, &self.cluster).await {
            Ok(r) => r,
            Err(e) => {
                store_error(&self.ctx, &self.cluster, "read", &e);
                return;
            }
        };
        self.last_discovery = Some(now);
        let known = self.cluster.member_names();
        for (key, v) in records {
            let Some(name) = key.strip_prefix(MEMBER_PREFIX) else {
                continue;
            };
            if known.iter().any(|k| k == name) {
                continue;
            }
            let rec = v.json::<MemberRecord>();
            if let Some(m) = rec.filter(|r| !r.leaving).and_then(|r| r.member(name)) {
                tracing::info!(member = %name, cluster_addr = %m.cluster_addr, "member discovered from its record");
                self.cluster.learn(m);
            }
        }
    }

    /// Before joining, this node makes sure its record names its addresses, so that
    /// members not configured with it open sessions to it: written (as `joining`) when
    /// the record is absent, says leaving, or names other addresses. A node restarting
    /// after a crash, whose record is intact, writes nothing until it has joined.
    async fn announce(&mut self) {
        if self.announced {
            return;
        }
        let bound = self.cluster.settings.lease_renew;
        let key = member_key(&self.cluster.me);
        let current = match bounded(bound, self.ctx.state.get(&key)).await {
            Ok(v) => v.and_then(|v| v.json::<MemberRecord>()),
            Err(e) => {
                store_error(&self.ctx, &self.cluster, "read", &e);
                return;
            }
        };
        let rec = MemberRecord::own(&self.ctx, &self.cluster, 0, false, true);
        let intact = current.is_some_and(|c| {
            !c.leaving && c.cluster_addr == rec.cluster_addr && c.http_addr == rec.http_addr
        });
        if !intact {
            let bytes = serde_json::to_vec(&rec).unwrap_or_default();
            if let Err(e) = bounded(bound, self.ctx.state.put(&key, bytes)).await {
                store_error(&self.ctx, &self.cluster, "member", &e);
                return;
            }
            tracing::info!(cluster_addr = %rec.cluster_addr, "member record announces this node");
        }
        self.announced = true;
    }

    /// Decides whether this node has joined: a peer answered over an authenticated
    /// session, or no other member's record has changed for a full lease period.
    async fn join(&mut self) -> bool {
        let peers: Vec<String> = self.cluster.peers.lock().keys().cloned().collect();
        if peers.iter().any(|p| self.cluster.peer_up(p)) {
            tracing::info!("joined the cluster");
            self.cluster.joined.store(true, Ordering::Relaxed);
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
                        .and_then(|v| v.json::<MemberRecord>())
                        .is_none_or(|r| r.leaving);
                    let changed = self.observe(&k, v.map_or(0, |v| v.revision), now);
                    others_alive |= !leaving && now.duration_since(changed) < period;
                }
                Err(e) => {
                    store_error(&self.ctx, &self.cluster, "read", &e);
                    return false;
                }
            }
        }
        if others_alive {
            tracing::debug!("not joined yet: other members are alive but none has an authenticated session with this node");
            return false;
        }
        tracing::info!("joined the cluster (no other member is alive)");
        self.cluster.joined.store(true, Ordering::Relaxed);
        true
    }

    async fn claim(
        &mut self,
        p: u32,
        old: LeaseRecord,
        rev: Option<u64>,
        failover: bool,
        early: bool,
    ) {
        let rec = LeaseRecord {
            owner: self.cluster.me.clone(),
            incarnation: self.ctx.consumers.owner().to_string(),
            epoch: old.epoch + 1,
            beat: 0,
            failed: None,
            written_ms: now_ms(),
        };
        let sent = Instant::now();
        let r = bounded(
            self.cluster.settings.lease_renew,
            self.ctx.state.compare_and_set(
                &lease_key(p),
                serde_json::to_vec(&rec).unwrap_or_default(),
                rev,
            ),
        )
        .await;
        let new = match r {
            Ok(n) => n,
            Err(e) => {
                if !matches!(e, StateError::Conflict { .. }) {
                    store_error(&self.ctx, &self.cluster, "claim", &e);
                }
                tracing::info!(partition = p, error = %e, "lease claim lost a race or failed");
                return;
            }
        };
        tracing::info!(partition = p, epoch = rec.epoch, from = %old.owner, failover, early, "partition lease claimed");
        self.observe(&lease_key(p), new, sent);
        {
            let mut slot = self.cluster.slots[p as usize].lock();
            slot.owner = rec.owner.clone();
            slot.epoch = rec.epoch;
            slot.valid_until = Some(valid_until(&self.cluster, sent));
            slot.moving = false;
            slot.failed = None;
            slot.changed = sent;
        }
        // From here on the renewer keeps it.
        self.cluster.held.lock().insert(p, Held { rec, rev: new });
        event(
            &self.ctx,
            &self.cluster,
            &self.cluster.counters.claims,
            "claim",
        );
        if failover {
            event(
                &self.ctx,
                &self.cluster,
                &self.cluster.counters.failovers,
                "failover",
            );
        }
        if early {
            event(
                &self.ctx,
                &self.cluster,
                &self.cluster.counters.takeovers,
                "takeover",
            );
        }
        // The partition's consumer claims its state scope anew (fencing the last owner),
        // loads the checkpoint and replays; it is answered once that is done.
        let scope = crate::names::user_features(p);
        self.ctx.consumers.deposed(&scope);
        self.ctx.tail.want(p, true);
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
            stop_partition(&self.ctx, p).await;
            if let Err(e) = self.release(p, None).await {
                tracing::warn!(partition = p, error = %e, "lease not released; it lapses instead");
            }
        }
    }

    /// Writes the lease released (or failed), if this node still holds it. The lease
    /// leaves `held` first, so the renewer lets it go; a renewal of it in flight meanwhile
    /// is recognised (this process and epoch at a newer revision) and written over.
    async fn release(&mut self, p: u32, failed: Option<String>) -> Result<(), String> {
        let Some(h) = self.cluster.held.lock().remove(&p) else {
            return Ok(());
        };
        {
            let mut slot = self.cluster.slots[p as usize].lock();
            slot.valid_until = None;
            slot.moving = false;
            slot.owner.clear();
            slot.failed = failed.clone();
        }
        let mut rec = h.rec.clone();
        rec.owner.clear();
        rec.incarnation.clear();
        rec.failed = failed;
        let bound = self.cluster.settings.lease_renew;
        let key = lease_key(p);
        let mut rev = h.rev;
        for _ in 0..3 {
            rec.written_ms = now_ms();
            let bytes = serde_json::to_vec(&rec).unwrap_or_default();
            match bounded(
                bound,
                self.ctx.state.compare_and_set(&key, bytes, Some(rev)),
            )
            .await
            {
                Ok(_) => return Ok(()),
                Err(StateError::Conflict { .. }) => {
                    let found = bounded(bound, self.ctx.state.get(&key))
                        .await
                        .map_err(|e| e.to_string())?;
                    match found {
                        Some(v)
                            if v.json::<LeaseRecord>()
                                .is_some_and(|f| f.same_holder(&h.rec)) =>
                        {
                            rev = v.revision;
                        }
                        _ => return Err("the lease was taken meanwhile".into()),
                    }
                }
                Err(e) => {
                    store_error(&self.ctx, &self.cluster, "release", &e);
                    return Err(e.to_string());
                }
            }
        }
        Err("the lease kept changing".into())
    }

    /// Final checkpoint, stop, release: the partition is free for its next owner at once.
    /// The lease stays held (renewed) until the release.
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
        stop_partition(&self.ctx, p).await;
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
        event(
            &self.ctx,
            &self.cluster,
            &self.cluster.counters.failed,
            "failed",
        );
        tracing::error!(
            partition = p,
            reason = why,
            "partition given up after repeated failures; released and marked failed"
        );
        stop_partition(&self.ctx, p).await;
        if let Err(e) = self.release(p, Some(why.to_string())).await {
            tracing::warn!(partition = p, error = %e, "could not mark the partition failed");
        }
    }

    /// Takes one move from the cluster's budget (`move_budget` hand-overs per
    /// `move_budget_window`); false when it is spent or the store did not answer.
    async fn take_move(&mut self) -> bool {
        let s = self.cluster.settings.clone();
        let now = now_ms();
        let window = s.move_budget_window.as_millis() as i64;
        for _ in 0..3 {
            let cur = match bounded(s.lease_renew, self.ctx.state.get(MOVES_KEY)).await {
                Ok(v) => v,
                Err(_) => return false,
            };
            let mut rec: MovesRecord = cur.as_ref().and_then(|v| v.json()).unwrap_or_default();
            rec.times_ms.retain(|&t| now - t < window);
            if rec.times_ms.len() >= s.move_budget as usize {
                tracing::info!(
                    moves = rec.times_ms.len(),
                    "hand-over put off: the cluster's move budget is spent for now"
                );
                self.ctx.metrics.moves_deferred.inc();
                return false;
            }
            rec.times_ms.push(now);
            let bytes = serde_json::to_vec(&rec).unwrap_or_default();
            let expected = cur.map(|v| v.revision);
            match bounded(
                s.lease_renew,
                self.ctx.state.compare_and_set(MOVES_KEY, bytes, expected),
            )
            .await
            {
                Ok(_) => return true,
                Err(StateError::Conflict { .. }) => continue,
                Err(_) => return false,
            }
        }
        false
    }

    /// Hands one owned partition to its desired owner, when that member has been alive
    /// for two renewals, has a session with this node, no hand-over happened here within
    /// `rebalance_interval`, and the cluster's move budget allows one.
    async fn rebalance(&mut self, eligible: &[String]) {
        let s = self.cluster.settings.clone();
        if self.last_handoff.elapsed() < s.rebalance_interval {
            return;
        }
        let settled = s.lease_renew * 2;
        let refs: Vec<&str> = eligible.iter().map(String::as_str).collect();
        let mut owned: Vec<u32> = self.cluster.held.lock().keys().copied().collect();
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
        let Some((p, to)) = target else {
            return;
        };
        self.last_handoff = Instant::now();
        if !self.take_move().await {
            return;
        }
        tracing::info!(partition = p, to = %to, "handing a partition to its desired owner");
        match self.hand_over(p).await {
            Ok(()) => event(
                &self.ctx,
                &self.cluster,
                &self.cluster.counters.handoffs,
                "handoff",
            ),
            Err(e) => tracing::warn!(partition = p, error = %e, "hand-over incomplete"),
        }
    }

    /// See [`ManagerMsg::ReleaseAll`].
    async fn release_all(&mut self) -> Vec<String> {
        self.stopped = true;
        self.cluster.leaving.store(true, Ordering::Relaxed);
        let mut problems = Vec::new();
        let mut owned: Vec<u32> = self.cluster.held.lock().keys().copied().collect();
        owned.sort_unstable();
        for p in owned {
            if let Err(e) = self.hand_over(p).await {
                problems.push(format!("partition {p}: {e}"));
            }
        }
        let rec = MemberRecord::own(&self.ctx, &self.cluster, 0, true, false);
        let bytes = serde_json::to_vec(&rec).unwrap_or_default();
        let key = member_key(&self.cluster.me);
        if let Err(e) = bounded(
            self.cluster.settings.lease_period,
            self.ctx.state.put(&key, bytes),
        )
        .await
        {
            problems.push(format!("member record: {e}"));
        }
        problems
    }
}

/// Stops the partition's actor (no restart) and drops what this node held of it.
async fn stop_partition(ctx: &Ctx, p: u32) {
    let scope = crate::names::user_features(p);
    crate::node::call(
        crate::names::PARTITIONS_SUPERVISOR,
        Duration::from_secs(30),
        |port| SupervisorMsg::Remove(scope.clone(), port),
    )
    .await
    .discard();
    ctx.consumers.deposed(&scope);
    ctx.health.end_recovery(&scope);
    ctx.tail.want(p, false);
    *ctx.user_stores[p as usize].write() = Default::default();
}

/// The lease actors' registered names.
pub const RENEWER: &str = "lease_renewer";
pub const MANAGER: &str = "lease_manager";

/// The graceful release through the manager (see [`ManagerMsg::ReleaseAll`]).
pub async fn release_all(timeout: Duration) -> Vec<String> {
    match crate::node::call(MANAGER, timeout, ManagerMsg::ReleaseAll).await {
        Ok(problems) => problems,
        Err(e) => vec![format!("lease manager: {e}")],
    }
}
