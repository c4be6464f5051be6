//! Cluster mode: nodes joined by ractor_cluster, partitions owned under leases.
//!
//! - [`membership`]: this node's ractor_cluster `NodeServer`, one session to every other
//!   known member, configured or discovered from its member record (the member with the
//!   smaller name dials, so two nodes never race two sessions), a handshake deadline, reconnects with capped backoff, and liveness by
//!   a timed call every `heartbeat` (ractor_cluster itself notices only closed sockets).
//! - [`gateway`]: the one actor peers call, with two remote messages (`Ping`, `Call`);
//!   payloads are versioned bincode and a payload that does not decode is answered with
//!   an explicit error.
//! - [`lease`]: ownership. Each partition is a lease record in the state store, renewed by
//!   compare-and-set; its desired owner is given by rendezvous hashing over the members
//!   whose member records are being renewed. Peer liveness never decides ownership: a cut
//!   link between two nodes that both reach the log moves nothing.
//!
//! [`Cluster`] is the shared picture (peers, partition slots, counters) that the HTTP
//! layer, the ranker and `/v1/cluster` read.

pub mod gateway;
pub mod leader;
pub mod lease;
pub mod membership;
pub mod records;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use crate::settings::{ClusterSettings, Member};

/// How this node sees one peer, and where a partition stands here (shared with clients).
pub use troupe_proto::api::{PeerState, SlotState};

/// One peer's record.
#[derive(Debug, Clone)]
pub struct Peer {
    pub state: PeerState,
    pub since: Instant,
    pub last_ok: Option<Instant>,
    pub misses: u32,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Authenticated sessions to it now open (normally one; two for a moment when a
    /// new session authenticates before a dead one has closed).
    pub sessions: u32,
    /// Since when its process is known to have exited: its session closed and both its
    /// addresses refuse connections (see [`membership`]). Cleared when a session to it
    /// authenticates again or one of its addresses accepts a connection.
    pub exited: Option<Instant>,
}

impl Peer {
    fn new() -> Peer {
        Peer {
            state: PeerState::Connecting,
            since: Instant::now(),
            last_ok: None,
            misses: 0,
            reconnects: 0,
            last_error: None,
            sessions: 0,
            exited: None,
        }
    }

    pub fn set(&mut self, state: PeerState) {
        if self.state != state {
            self.state = state;
            self.since = Instant::now();
        }
    }
}

/// A partition as this node knows it.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Node name of the lease holder ("" when released or never claimed).
    pub owner: String,
    pub epoch: u64,
    /// This node's lease is valid until then (`None`: not held here).
    pub valid_until: Option<Instant>,
    pub moving: bool,
    pub failed: Option<String>,
    /// When the lease record last changed, as this node observed it.
    pub changed: Instant,
}

/// Counters shown in `/v1/cluster` and as metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Partitions this node claimed after their owner's lease lapsed or its process
    /// exited.
    pub failovers: AtomicU64,
    /// Of those, the ones claimed before the lease ran out: the owner's process had
    /// exited, or this is the restarted process of the owner.
    pub takeovers: AtomicU64,
    /// Partitions this node claimed (any reason).
    pub claims: AtomicU64,
    /// Partitions this node handed over to their desired owner.
    pub handoffs: AtomicU64,
    /// Leases this node lost (lapsed or taken).
    pub lost: AtomicU64,
    /// Partitions this node gave up after repeated failures.
    pub failed: AtomicU64,
    /// Leases that lapsed here and were re-adopted at their last revision (nobody had
    /// taken them): answered again without a reload or replay.
    pub readopted: AtomicU64,
    /// Requests forwarded to an owner, and those that fell back to a degraded answer.
    pub forwarded: AtomicU64,
    pub forward_failures: AtomicU64,
}

/// The cluster as this node sees it.
pub struct Cluster {
    pub settings: ClusterSettings,
    /// This node's member name.
    pub me: String,
    pub peers: Mutex<BTreeMap<String, Peer>>,
    pub slots: Vec<Mutex<Slot>>,
    pub counters: Counters,
    /// Partitions the partition supervisor gave up, for the lease manager to release.
    pub(crate) given_up: Mutex<Vec<(u32, String)>>,
    pub(crate) wake: tokio::sync::Notify,
    /// Whether the log answered this node's last lease round (its own leases are only
    /// renewed while it does).
    pub log_reachable: std::sync::atomic::AtomicBool,
    /// See [`lease`]: a node claims partitions only once it has joined.
    pub joined: std::sync::atomic::AtomicBool,
    /// The leases this node holds (the renewer renews them; the manager adds and
    /// removes them). Kept here so that either actor restarts without losing them.
    pub(crate) held: Mutex<std::collections::HashMap<u32, lease::Held>>,
    /// Leases the renewer lost (another writer took them), for the manager to stop.
    pub(crate) lost: Mutex<Vec<(u32, String)>>,
    /// Set on a graceful stop: no more heartbeats, no more claims.
    pub(crate) leaving: std::sync::atomic::AtomicBool,
    /// A manager round is scheduled (one timer at a time).
    pub(crate) round_scheduled: std::sync::atomic::AtomicBool,
    /// A quick extra round is scheduled (while an exited member's partition waits).
    pub(crate) fast_round_scheduled: std::sync::atomic::AtomicBool,
    /// Alive members held down after lapses (not given partitions for now).
    pub held_down: Mutex<Vec<String>>,
    /// When this node last read the lease and member records.
    pub last_read: Mutex<Option<Instant>>,
    /// Incarnation of the membership actor (events of older node servers are ignored).
    pub(crate) membership_incarnation: AtomicU64,
    /// The trainer leadership (see [`leader`]).
    pub leader: Mutex<leader::LeaderView>,
    /// The model version each peer serves, from its member record.
    pub model_versions: Mutex<std::collections::HashMap<String, u64>>,
    /// Every member known here with its addresses: the configured ones (`members`, the
    /// seeds, and this node) and those discovered from their member records in the state
    /// store. A configured address wins over an advertised one.
    directory: Mutex<BTreeMap<String, Member>>,
    /// The lease, member and leader records as this node's watch has them (see
    /// [`records`]).
    pub records: records::Records,
}

impl Cluster {
    pub fn new(settings: ClusterSettings, me: &str, partitions: u32) -> Cluster {
        let peers = settings
            .members
            .iter()
            .filter(|m| m.name != me)
            .map(|m| (m.name.clone(), Peer::new()))
            .collect();
        Cluster {
            me: me.to_string(),
            peers: Mutex::new(peers),
            slots: (0..partitions)
                .map(|_| {
                    Mutex::new(Slot {
                        owner: String::new(),
                        epoch: 0,
                        valid_until: None,
                        moving: false,
                        failed: None,
                        changed: Instant::now(),
                    })
                })
                .collect(),
            counters: Counters::default(),
            given_up: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            log_reachable: std::sync::atomic::AtomicBool::new(false),
            joined: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(Default::default()),
            lost: Mutex::new(Vec::new()),
            leaving: std::sync::atomic::AtomicBool::new(false),
            round_scheduled: std::sync::atomic::AtomicBool::new(false),
            fast_round_scheduled: std::sync::atomic::AtomicBool::new(false),
            held_down: Mutex::new(Vec::new()),
            last_read: Mutex::new(None),
            membership_incarnation: AtomicU64::new(0),
            leader: leader::new_view(),
            model_versions: Mutex::new(Default::default()),
            records: records::Records::default(),
            directory: Mutex::new(
                settings
                    .members
                    .iter()
                    .map(|m| (m.name.clone(), m.clone()))
                    .collect(),
            ),
            settings,
        }
    }

    /// A known member's entry (configured or discovered).
    pub fn member(&self, name: &str) -> Option<Member> {
        self.directory.lock().get(name).cloned()
    }

    /// Every member known here, this node included, by name.
    pub fn member_names(&self) -> Vec<String> {
        self.directory.lock().keys().cloned().collect()
    }

    /// True for a member named in this node's configuration (a seed, or this node).
    pub fn configured(&self, name: &str) -> bool {
        self.settings.members.iter().any(|m| m.name == name)
    }

    /// Adds a member discovered from its record; true when it was not known. Configured
    /// members keep their configured addresses; a discovered member's addresses follow
    /// its latest record.
    pub fn learn(&self, m: Member) -> bool {
        if m.name == self.me || self.configured(&m.name) {
            return false;
        }
        let new = self
            .directory
            .lock()
            .insert(m.name.clone(), m.clone())
            .is_none();
        self.peers
            .lock()
            .entry(m.name.clone())
            .or_insert_with(Peer::new);
        new
    }

    /// Drops a discovered member that left (configured members are never dropped).
    pub fn forget(&self, name: &str) -> bool {
        if self.configured(name) {
            return false;
        }
        let known = self.directory.lock().remove(name).is_some();
        let peer = self.peers.lock().remove(name).is_some();
        self.model_versions.lock().remove(name);
        known || peer
    }

    /// True while this node holds a valid lease on `p` (checked on every answer: a node
    /// resumed after a pause answers nothing from a lapsed lease).
    pub fn holds(&self, p: u32) -> bool {
        self.slots.get(p as usize).is_some_and(|s| {
            let s = s.lock();
            !s.moving && s.valid_until.is_some_and(|t| Instant::now() < t)
        })
    }

    /// The node holding `p`'s lease as last observed ("" when none), and its epoch.
    pub fn owner_of(&self, p: u32) -> (String, u64) {
        self.slots.get(p as usize).map_or((String::new(), 0), |s| {
            let s = s.lock();
            (s.owner.clone(), s.epoch)
        })
    }

    /// The members whose process is known to have exited (their leases are taken over
    /// without waiting for them to run out).
    pub fn exited(&self) -> std::collections::HashSet<String> {
        self.peers
            .lock()
            .iter()
            .filter(|(_, p)| p.exited.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// True when `peer` has an authenticated session whose liveness calls are answered.
    pub fn peer_up(&self, peer: &str) -> bool {
        self.peers
            .lock()
            .get(peer)
            .is_some_and(|p| p.state == PeerState::Up)
    }

    pub fn http_addr(&self, name: &str) -> Option<String> {
        self.directory.lock().get(name).map(|m| m.http_addr.clone())
    }

    /// Forgets a lease another writer took: the partition stops being answered at once,
    /// and the lease manager stops its actor.
    pub(crate) fn lose(&self, p: u32, why: &str) {
        if self.held.lock().remove(&p).is_none() {
            return;
        }
        {
            let mut slot = self.slots[p as usize].lock();
            slot.valid_until = None;
            slot.moving = false;
        }
        self.lost.lock().push((p, why.to_string()));
        self.wake.notify_one();
    }

    /// True while this node holds `p`'s lease, valid or lapsed.
    pub fn held_here(&self, p: u32) -> bool {
        self.held.lock().contains_key(&p)
    }

    /// Reports a partition its supervisor gave up (see [`lease`]).
    pub fn give_up(&self, p: u32, reason: &str) {
        self.given_up.lock().push((p, reason.to_string()));
        self.wake.notify_one();
    }

    pub fn count(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request forwarded to an owner, in `/v1/cluster` and the metrics.
    pub fn forwarded(&self, ctx: &crate::ctx::Ctx, ok: bool) {
        self.count(&self.counters.forwarded);
        if !ok {
            self.count(&self.counters.forward_failures);
        }
        ctx.metrics
            .forwarded
            .get_or_create(&crate::metrics::label(
                "outcome",
                if ok { "ok" } else { "failed" },
            ))
            .inc();
    }

    /// Where partition `p` (its slot `s`) stands here at `now`, and whether this node
    /// holds its lease now.
    fn slot_state(
        &self,
        ctx: &crate::ctx::Ctx,
        p: u32,
        s: &Slot,
        now: Instant,
    ) -> (SlotState, bool) {
        let here = self.held_here(p);
        let held = s.valid_until.is_some_and(|t| now < t);
        let state = if s.failed.is_some() {
            SlotState::Failed
        } else if s.moving {
            SlotState::Moving
        } else if here && !held {
            SlotState::Lapsed
        } else if !held {
            SlotState::Remote
        } else if ctx.health.is_recovering(&crate::names::user_features(p)) {
            SlotState::Replaying
        } else {
            SlotState::Serving
        };
        (state, held)
    }

    /// The cluster as this node sees it, for clients.
    pub fn status(&self, ctx: &crate::ctx::Ctx) -> troupe_proto::api::ClusterStatus {
        use troupe_proto::api::{ClusterStatus, MemberStatus, PartitionStatus};
        let own = ctx.als.load().as_ref().map_or(0, |m| m.version);
        let versions = self.model_versions.lock().clone();
        let mut members = vec![MemberStatus {
            name: self.me.clone(),
            this_node: true,
            state: PeerState::Up,
            model_version: own,
        }];
        for (name, p) in self.peers.lock().iter() {
            members.push(MemberStatus {
                name: name.clone(),
                this_node: false,
                state: p.state,
                model_version: versions.get(name).copied().unwrap_or(0),
            });
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let now = Instant::now();
        let partitions = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let p = i as u32;
                let s = slot.lock().clone();
                let (state, held) = self.slot_state(ctx, p, &s, now);
                PartitionStatus {
                    partition: p,
                    owner: s.owner.clone(),
                    epoch: s.epoch,
                    state,
                    applied_offset: held.then(|| ctx.applied(p)),
                }
            })
            .collect();
        ClusterStatus {
            node: self.me.clone(),
            ready: ctx.health.ready(),
            members,
            partitions,
            trainer_leader: self.leader_status().leader,
            model_version: own,
        }
    }

    /// Sets the scrape-time gauges: peers by state, held partitions by state.
    pub fn export(&self, ctx: &crate::ctx::Ctx) {
        let m = &ctx.metrics;
        let states = [
            PeerState::Connecting,
            PeerState::Up,
            PeerState::Unresponsive,
            PeerState::Down,
            PeerState::Refused,
            PeerState::Incompatible,
        ];
        let peers = self.peers.lock();
        for st in states {
            let n = peers.values().filter(|p| p.state == st).count();
            let label = serde_json::to_value(st)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            m.peers
                .get_or_create(&crate::metrics::label("state", &label))
                .set(n as i64);
        }
        drop(peers);
        m.log_reachable
            .set(i64::from(self.log_reachable.load(Ordering::Relaxed)));
        let (mut serving, mut replaying, mut moving, mut lapsed) = (0, 0, 0, 0);
        for (i, slot) in self.slots.iter().enumerate() {
            let held = self.held_here(i as u32);
            let s = slot.lock();
            if s.moving {
                moving += 1;
            } else if held && s.valid_until.is_none_or(|t| Instant::now() >= t) {
                lapsed += 1;
            } else if s.valid_until.is_some_and(|t| Instant::now() < t) {
                if ctx
                    .health
                    .is_recovering(&crate::names::user_features(i as u32))
                {
                    replaying += 1;
                } else {
                    serving += 1;
                }
            }
        }
        for (label, n) in [
            ("serving", serving),
            ("replaying", replaying),
            ("moving", moving),
            ("lapsed", lapsed),
        ] {
            m.partitions_held
                .get_or_create(&crate::metrics::label("state", label))
                .set(n);
        }
        // The lease table as this node last read it: a partition is owned while this
        // node holds its lease or its holder is a member answering here (up), failed
        // when marked so, unowned otherwise (released, or held by a member that is down
        // until another claims it).
        let now = Instant::now();
        let up: std::collections::HashSet<String> = self
            .peers
            .lock()
            .iter()
            .filter(|(_, p)| p.state == PeerState::Up)
            .map(|(n, _)| n.clone())
            .collect();
        let (mut owned, mut unowned, mut failed) = (0, 0, 0);
        for slot in &self.slots {
            let s = slot.lock();
            if s.failed.is_some() {
                failed += 1;
            } else if s.valid_until.is_some_and(|t| now < t) || up.contains(&s.owner) {
                owned += 1;
            } else {
                unowned += 1;
            }
        }
        for (label, n) in [("owned", owned), ("unowned", unowned), ("failed", failed)] {
            m.partitions
                .get_or_create(&crate::metrics::label("state", label))
                .set(n);
        }
        m.trainer_leader_known
            .set(i64::from(self.leader_status().leader.is_some()));
    }
}

impl Cluster {
    /// This node's view for `/v1/cluster`: members, partitions, counters.
    pub fn describe(&self, ctx: &crate::ctx::Ctx) -> serde_json::Value {
        use serde_json::json;
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        let mut members = vec![json!({
            "name": self.me,
            "self": true,
            "state": "up",
            "http_addr": self.http_addr(&self.me),
            "model_version": ctx.als.load().as_ref().map_or(0, |m| m.version),
            "protocol": troupe_proto::wire::speaks(),
            "protocols_accepted": gateway::accepted_versions(),
        })];
        let versions = self.model_versions.lock().clone();
        for (name, p) in self.peers.lock().iter() {
            members.push(json!({
                "model_version": versions.get(name),
                "name": name,
                "self": false,
                "state": p.state,
                "http_addr": self.http_addr(name),
                "state_for_ms": ms(p.since.elapsed()),
                "last_answer_ms_ago": p.last_ok.map(|t| ms(t.elapsed())),
                "missed": p.misses,
                "reconnects": p.reconnects,
                "sessions": p.sessions,
                "exited_ms_ago": p.exited.map(|t| ms(t.elapsed())),
                "error": p.last_error,
                "protocol": troupe_proto::wire::peer_version(name),
            }));
        }
        let now = Instant::now();
        let partitions: Vec<serde_json::Value> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let p = i as u32;
                let s = slot.lock().clone();
                let (state, held) = self.slot_state(ctx, p, &s, now);
                json!({
                    "partition": p,
                    "owner": s.owner,
                    "epoch": s.epoch,
                    "state": state,
                    "lease_age_ms": ms(now.saturating_duration_since(s.changed)),
                    "lease_left_ms": s.valid_until.map(|t| ms(t.saturating_duration_since(now))),
                    "applied_offset": held.then(|| ctx.applied(p)),
                    "failed": s.failed,
                })
            })
            .collect();
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "me": self.me,
            "members": members,
            "partitions": partitions,
            "trainer": self.leader_status(),
            "log_reachable": self.log_reachable.load(Ordering::Relaxed),
            "joined": self.joined.load(Ordering::Relaxed),
            "held_down": self.held_down.lock().clone(),
            "leases_read_ms_ago": self.last_read.lock().map(|t| ms(t.elapsed())),
            "counts": {
                "claims": n(&c.claims),
                "failovers": n(&c.failovers),
                "takeovers": n(&c.takeovers),
                "handoffs": n(&c.handoffs),
                "leases_lost": n(&c.lost),
                "leases_readopted": n(&c.readopted),
                "partitions_failed": n(&c.failed),
                "forwarded": n(&c.forwarded),
                "forward_failures": n(&c.forward_failures),
            },
        })
    }
}

/// Answers a recommendation request on any node: here when this node serves the user's
/// partition (always on a single node); otherwise one hop to the partition's owner under
/// `forward_timeout`; when the owner is unreachable or the partition is moving, a
/// degraded answer from here (popularity and content without the user's features,
/// flagged `degraded` and `stale`), never an error.
pub async fn recommend(
    ctx: &std::sync::Arc<crate::ctx::Ctx>,
    mut req: crate::ranker::RecommendRequest,
    timeout: std::time::Duration,
) -> Result<crate::ranker::RecommendReply, crate::node::CallError> {
    let p = crate::record::partition_of(&req.user, ctx.settings.partitions);
    use troupe_proto::api::Route;
    let mut route = Route::Local;
    let mut unsure = false;
    if ctx.cluster.is_some() && req.min_offset.is_none() {
        let (target, u) = read_target(ctx, p).await;
        req.min_offset = Some(target);
        unsure = u;
    }
    if let Some(cl) = ctx.cluster.as_ref().filter(|_| !ctx.serving(p)) {
        let (owner, _) = cl.owner_of(p);
        route = if owner.is_empty() || owner == cl.me {
            Route::NoOwner
        } else {
            Route::OwnerUnreachable
        };
        if route == Route::OwnerUnreachable && cl.peer_up(&owner) {
            // Read-your-writes across nodes: the owner waits for the target taken
            // when the request arrived here.
            let fwd = req.clone();
            let id = req.request_id.clone();
            let t = cl.settings.forward_timeout.min(timeout);
            match gateway::call(&owner, &id, troupe_proto::wire::Request::Recommend(fwd), t).await {
                Ok(troupe_proto::wire::Response::Recommend(mut r)) => {
                    cl.forwarded(ctx, true);
                    r.route = Route::Forwarded;
                    r.stale |= unsure;
                    return Ok(r);
                }
                Ok(_) => {
                    cl.forwarded(ctx, false);
                    tracing::warn!(owner = %owner, "owner answered a recommendation with another kind of response");
                }
                Err(e) => {
                    cl.forwarded(ctx, false);
                    tracing::debug!(owner = %owner, partition = p, error = %e, "forward failed; answering degraded");
                }
            }
        }
        // Answered here without the user's features: the ranker sees it does not serve
        // the partition.
        req.min_offset = None;
    }
    let mut reply = crate::handles::ranker()
        .call(timeout, |port| {
            crate::ranker::RankerMsg::Recommend(req, port)
        })
        .await?;
    reply.route = route;
    reply.stale |= unsure;
    Ok(reply)
}

/// How long a cluster read waits for the log to say where a partition ends.
const TARGET_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

/// The freshness target of a cluster read of partition `p` that names no position: the
/// partition's last acknowledged offset in the shared log when the request arrived (one
/// round trip), so the answer reflects every write any node acknowledged before it.
/// When the log does not answer in time: this node's head, and `true` (the answer is
/// then flagged stale: it may miss a write another node acknowledged).
async fn read_target(ctx: &crate::ctx::Ctx, p: u32) -> (u64, bool) {
    match tokio::time::timeout(TARGET_TIMEOUT, ctx.log.refresh_head(p)).await {
        Ok(Ok(last)) => (last.max(ctx.head(p)), false),
        _ => (ctx.head(p), true),
    }
}

/// A user's features on any node: here when this node serves the partition, otherwise
/// from the owner. `Err` with a reason when the owner cannot be reached (the caller
/// answers 503: there is no degraded form of a user's own data).
pub async fn user_view(
    ctx: &std::sync::Arc<crate::ctx::Ctx>,
    query: crate::features::UserQuery,
    min_offset: Option<u64>,
    timeout: std::time::Duration,
) -> Result<(crate::features::UserView, bool), String> {
    let p = crate::record::partition_of(&query.user, ctx.settings.partitions);
    let (min_offset, unsure) = match min_offset {
        Some(m) => (Some(m), false),
        None if ctx.cluster.is_some() => {
            let (t, u) = read_target(ctx, p).await;
            (Some(t), u)
        }
        None => (None, false),
    };
    let Some(cl) = ctx.cluster.as_ref().filter(|_| !ctx.serving(p)) else {
        let target = min_offset.unwrap_or_else(|| ctx.head(p));
        let fresh = ctx
            .wait_applied(p, target, ctx.settings.ranker.freshness_wait)
            .await;
        let view = crate::handles::user_features(p)
            .call(timeout, |port| {
                crate::features::UserFeaturesMsg::GetUser(query, port)
            })
            .await
            .map_err(|e| e.to_string())?;
        return Ok((view, unsure || !fresh || !ctx.log.writable()));
    };
    let (owner, _) = cl.owner_of(p);
    if owner.is_empty() || owner == cl.me {
        return Err(format!(
            "partition {p} is moving (no node serves it right now)"
        ));
    }
    if !cl.peer_up(&owner) {
        return Err(format!(
            "partition {p} is owned by {owner}, which is unreachable"
        ));
    }
    let id = format!("user-{}", query.user);
    let t = cl.settings.forward_timeout.min(timeout);
    let r = gateway::call(
        &owner,
        &id,
        troupe_proto::wire::Request::User { query, min_offset },
        t,
    )
    .await;
    cl.forwarded(
        ctx,
        matches!(r, Ok(troupe_proto::wire::Response::User { .. })),
    );
    match r {
        Ok(troupe_proto::wire::Response::User { view, stale }) => Ok((view, stale || unsure)),
        Ok(_) => Err(format!("{owner} answered with another kind of response")),
        Err(e) => Err(format!("partition {p} is owned by {owner}: {e}")),
    }
}

/// Rendezvous (highest random weight) choice of `p`'s owner among `members`: the member
/// with the highest hash of (partition, name). Every node computing it over the same
/// set agrees, and removing a member moves only that member's partitions.
pub fn rendezvous<'a>(p: u32, members: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    members.into_iter().max_by_key(|m| {
        (
            crate::record::hash128(&[&b"owner"[..], &p.to_le_bytes(), m.as_bytes()]),
            *m,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_moves_only_the_lost_members_partitions() {
        let all = ["a", "b", "c"];
        let before: Vec<&str> = (0..64).map(|p| rendezvous(p, all).unwrap()).collect();
        // Each member gets some partitions.
        for m in all {
            assert!(before.iter().filter(|&&o| o == m).count() > 5, "{m}");
        }
        let after: Vec<&str> = (0..64)
            .map(|p| rendezvous(p, ["a", "c"]).unwrap())
            .collect();
        for p in 0..64 {
            if before[p] != "b" {
                assert_eq!(before[p], after[p], "partition {p} moved without need");
            } else {
                assert_ne!(after[p], "b");
            }
        }
        // Order of the member list does not matter.
        let shuffled: Vec<&str> = (0..64)
            .map(|p| rendezvous(p, ["c", "a", "b"]).unwrap())
            .collect();
        assert_eq!(before, shuffled);
        assert_eq!(rendezvous(0, []), None);
    }
}
