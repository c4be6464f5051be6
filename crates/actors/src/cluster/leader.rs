//! The trainer leader: one member at a time trains the cluster's model, elected under a
//! lease in the state store (record `leader.trainer`, a [`LeaseRecord`]) with the same
//! rules as a partition's lease ([`super::lease`]):
//!
//! - the holder renews it by compare-and-set every `lease_renew` and counts itself leader
//!   until `lease_period - lease_renew` after the last renewal it *sent* that succeeded;
//! - another eligible member claims it when it is free (released on a graceful stop) or
//!   once it has seen the record unchanged for a full `lease_period`, counted only over
//!   rounds that could read the store; every claim raises the epoch;
//! - a renewal whose answer was lost but that was written (the record names this process
//!   and epoch at a newer revision) is adopted, not counted as a loss.
//!
//! The epoch fences the model plane: the leader writes the model record
//! ([`crate::snapshots`]) under its epoch, and a record written under a higher epoch
//! refuses every later write of a deposed leader (a compare-and-set that fails and a
//! re-read that names another epoch).
//!
//! Which members may lead is configured per member (`[[cluster.members]] trainer`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use serde::Serialize;

use super::lease::{bounded, early_takeover, LeaseRecord};
use crate::ctx::Ctx;
use crate::state::{now_ms, StateError};
use crate::Discard;

/// The registered name of the election actor.
pub const NAME: &str = "trainer_lease";
/// The lease record of the trainer leader.
pub const LEADER_KEY: &str = "leader.trainer";

/// The trainer leadership as this node sees it.
#[derive(Debug, Default)]
pub struct LeaderView {
    /// The holder named by the record as last read ("" when released or never claimed).
    pub holder: String,
    pub epoch: u64,
    /// When this node last saw the record change.
    pub changed: Option<Instant>,
    /// This node's own lease: the record as written, its revision, valid until.
    pub mine: Option<(LeaseRecord, u64, Instant)>,
}

/// What `/v1/cluster` shows of the leadership.
#[derive(Debug, Clone, Serialize)]
pub struct LeaderStatus {
    pub leader: Option<String>,
    pub epoch: u64,
    /// Since this node last saw the record change, ms.
    pub record_age_ms: Option<u64>,
    pub this_node_leads: bool,
    pub this_node_may_lead: bool,
}

impl super::Cluster {
    /// This node's leader epoch while its trainer lease is valid.
    pub fn trainer_epoch(&self) -> Option<u64> {
        let v = self.leader.lock();
        v.mine
            .as_ref()
            .filter(|(_, _, until)| Instant::now() < *until)
            .map(|(r, _, _)| r.epoch)
    }

    /// The leader named by the record as last read (`None`: nobody holds it).
    pub fn trainer_leader(&self) -> Option<String> {
        let v = self.leader.lock();
        (!v.holder.is_empty()).then(|| v.holder.clone())
    }

    /// Whether this member may lead the training (its `trainer` flag).
    pub fn may_lead(&self) -> bool {
        self.settings
            .members
            .iter()
            .find(|m| m.name == self.me)
            .is_some_and(|m| m.trainer)
    }

    pub fn leader_status(&self) -> LeaderStatus {
        let leads = self.trainer_epoch().is_some();
        let v = self.leader.lock();
        LeaderStatus {
            leader: (!v.holder.is_empty()).then(|| v.holder.clone()),
            epoch: v.epoch,
            record_age_ms: v.changed.map(|t| t.elapsed().as_millis() as u64),
            this_node_leads: leads,
            this_node_may_lead: self.may_lead(),
        }
    }
}

#[derive(RactorMessage)]
pub enum TrainerLeaseMsg {
    Round,
    /// Graceful stop: the lease is released so another member leads at once.
    Release(RpcReplyPort<()>),
}

pub struct TrainerLease;

pub struct TrainerLeaseState {
    ctx: Arc<Ctx>,
    cluster: Arc<super::Cluster>,
    /// Revision of the record observed and since when (reset by a round that cannot read).
    seen: Option<(u64, Instant)>,
    released: bool,
}

impl Actor for TrainerLease {
    type Msg = TrainerLeaseMsg;
    type State = TrainerLeaseState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        myself: ActorRef<TrainerLeaseMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<TrainerLeaseState, ActorProcessingErr> {
        let cluster = ctx
            .cluster
            .clone()
            .ok_or("the trainer lease runs in cluster mode only")?;
        myself.send_message(TrainerLeaseMsg::Round)?;
        Ok(TrainerLeaseState {
            ctx,
            cluster,
            seen: None,
            released: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<TrainerLeaseMsg>,
        msg: TrainerLeaseMsg,
        st: &mut TrainerLeaseState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TrainerLeaseMsg::Round => {
                if st.released {
                    return Ok(());
                }
                crate::faults::fire(&st.ctx.faults, NAME).await?;
                let ok = st.round().await;
                let renew = st.cluster.settings.lease_renew;
                myself.send_after(if ok { renew } else { renew / 3 }, || {
                    TrainerLeaseMsg::Round
                });
            }
            TrainerLeaseMsg::Release(port) => {
                st.released = true;
                st.release().await;
                port.send(()).discard();
            }
        }
        Ok(())
    }
}

impl TrainerLeaseState {
    fn incarnation(&self) -> String {
        self.ctx.consumers.owner().to_string()
    }

    /// One round: renew the own lease, or observe the record and claim it when due.
    /// False when the store did not answer.
    async fn round(&mut self) -> bool {
        let s = self.cluster.settings.clone();
        let held = self.cluster.leader.lock().mine.clone();
        if let Some((rec, rev, _)) = held {
            return self.renew(rec, rev).await;
        }
        let keys = [LEADER_KEY.to_string()];
        let read = super::records::read(&self.ctx, &self.cluster, &keys).await;
        let current = match read {
            Ok(mut v) => v.pop().flatten(),
            Err(e) => {
                self.seen = None;
                tracing::debug!(error = %e, "trainer lease record not read");
                return false;
            }
        };
        let (rec, rev) = match &current {
            Some(v) => match serde_json::from_slice::<LeaseRecord>(&v.value) {
                Ok(r) => (Some(r), Some(v.revision)),
                Err(e) => {
                    tracing::warn!(error = %e, "trainer lease record does not decode; it is claimed anew");
                    (None, Some(v.revision))
                }
            },
            None => (None, None),
        };
        self.observe(rec.as_ref(), rev);
        if !self.cluster.may_lead()
            || !self
                .cluster
                .joined
                .load(std::sync::atomic::Ordering::Relaxed)
            || self
                .cluster
                .leaving
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return true;
        }
        let free = rec.as_ref().is_none_or(|r| r.owner.is_empty());
        let own = rec
            .as_ref()
            .is_some_and(|r| r.owner == self.cluster.me && r.incarnation == self.incarnation());
        let expired = self
            .seen
            .is_some_and(|(r, since)| Some(r) == rev && since.elapsed() >= s.lease_period);
        if own {
            // This process's own record (the actor restarted): adopted by renewing it.
            if let (Some(r), Some(rev)) = (rec.clone(), rev) {
                return self.renew(r, rev).await;
            }
        }
        // The holder's process exited, or this is its restarted process and the record
        // missed a renewal: taken without waiting for the lease (ADR 017).
        let early = rec.as_ref().is_some_and(|r| {
            let unchanged_for = self
                .seen
                .filter(|(r, _)| Some(*r) == rev)
                .map_or(Duration::ZERO, |(_, since)| since.elapsed());
            early_takeover(
                &self.cluster,
                &self.cluster.exited(),
                &self.incarnation(),
                r,
                unchanged_for,
            )
        });
        if free || expired || early {
            return self.claim(rec, rev).await;
        }
        true
    }

    fn observe(&mut self, rec: Option<&LeaseRecord>, rev: Option<u64>) {
        let rev = rev.unwrap_or(0);
        if self.seen.is_none_or(|(r, _)| r != rev) {
            self.seen = Some((rev, Instant::now()));
            let mut v = self.cluster.leader.lock();
            v.changed = Some(Instant::now());
            v.holder = rec.map(|r| r.owner.clone()).unwrap_or_default();
            v.epoch = rec.map_or(0, |r| r.epoch);
        }
    }

    async fn claim(&mut self, prev: Option<LeaseRecord>, rev: Option<u64>) -> bool {
        let s = &self.cluster.settings;
        let rec = LeaseRecord {
            owner: self.cluster.me.clone(),
            incarnation: self.incarnation(),
            epoch: prev.as_ref().map_or(0, |r| r.epoch) + 1,
            beat: 0,
            failed: None,
            written_ms: now_ms(),
        };
        let bytes = serde_json::to_vec(&rec).unwrap_or_default();
        let sent = Instant::now();
        match bounded(
            s.lease_renew,
            self.ctx.state.compare_and_set(LEADER_KEY, bytes, rev),
        )
        .await
        {
            Ok(new_rev) => {
                tracing::info!(
                    epoch = rec.epoch,
                    previous = prev.as_ref().map(|r| r.owner.as_str()).unwrap_or(""),
                    "this node leads the training"
                );
                self.hold(rec, new_rev, sent);
                true
            }
            Err(StateError::Conflict { .. }) => {
                self.seen = None;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "trainer lease claim failed");
                self.seen = None;
                false
            }
        }
    }

    fn hold(&mut self, rec: LeaseRecord, rev: u64, sent: Instant) {
        let s = &self.cluster.settings;
        let until = sent + s.lease_period.saturating_sub(s.lease_renew);
        self.seen = Some((rev, Instant::now()));
        let mut v = self.cluster.leader.lock();
        if v.epoch != rec.epoch || v.holder != rec.owner {
            v.changed = Some(Instant::now());
        }
        v.holder = rec.owner.clone();
        v.epoch = rec.epoch;
        v.mine = Some((rec, rev, until));
    }

    async fn renew(&mut self, mut rec: LeaseRecord, rev: u64) -> bool {
        let bound = self.cluster.settings.lease_renew;
        let attempt = |mut rec: LeaseRecord, rev: u64| {
            let state = self.ctx.state.clone();
            async move {
                rec.beat += 1;
                rec.written_ms = now_ms();
                let bytes = serde_json::to_vec(&rec).unwrap_or_default();
                let sent = Instant::now();
                let r = bounded(bound, state.compare_and_set(LEADER_KEY, bytes, Some(rev))).await;
                (rec, sent, r)
            }
        };
        let (mut next, mut sent, mut r) = attempt(rec.clone(), rev).await;
        if let Err(StateError::Conflict { .. }) = &r {
            // Lost, unless the record read now is this holder's own write.
            match bounded(bound, self.ctx.state.get(LEADER_KEY)).await {
                Ok(Some(v)) => {
                    let found: Option<LeaseRecord> = v.json();
                    match found {
                        Some(f) if f.same_holder(&rec) => {
                            rec = f;
                            (next, sent, r) = attempt(rec.clone(), v.revision).await;
                        }
                        other => {
                            self.lose(other.map(|o| o.owner).unwrap_or_default());
                            return true;
                        }
                    }
                }
                Ok(None) => {
                    self.lose(String::new());
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "trainer lease record not read after a conflict");
                    return false;
                }
            }
        }
        match r {
            Ok(new_rev) => {
                self.hold(next, new_rev, sent);
                true
            }
            Err(StateError::Conflict { .. }) => {
                self.lose(String::new());
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "trainer lease renewal failed; retrying soon");
                false
            }
        }
    }

    fn lose(&mut self, to: String) {
        tracing::warn!(to = %to, "trainer leadership lost");
        let mut v = self.cluster.leader.lock();
        v.mine = None;
        v.holder = to;
        v.changed = Some(Instant::now());
        self.seen = None;
    }

    /// Writes the record released (owner "") so another member claims it at once.
    async fn release(&mut self) {
        let held = self.cluster.leader.lock().mine.take();
        let Some((mut rec, rev, _)) = held else {
            return;
        };
        rec.owner = String::new();
        rec.written_ms = now_ms();
        let bytes = serde_json::to_vec(&rec).unwrap_or_default();
        let bound = self.cluster.settings.lease_renew;
        match bounded(
            bound,
            self.ctx.state.compare_and_set(LEADER_KEY, bytes, Some(rev)),
        )
        .await
        {
            Ok(_) => tracing::info!("trainer lease released"),
            Err(e) => tracing::warn!(error = %e, "trainer lease not released (it lapses)"),
        }
        self.cluster.leader.lock().holder = String::new();
    }
}

/// Releases the trainer lease on a graceful stop (nothing when not leading).
pub async fn release(timeout: Duration) {
    if let Err(e) = crate::node::call(NAME, timeout, TrainerLeaseMsg::Release).await {
        tracing::debug!(error = %e, "trainer lease release not sent");
    }
}

/// Shared holder of the view, created with the cluster.
pub fn new_view() -> Mutex<LeaderView> {
    Mutex::new(LeaderView::default())
}
