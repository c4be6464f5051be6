//! UserFeatures: the online feature store of one partition. Per user: recent history
//! (bounded), seen and disliked sets, per-kind counts, last activity, and a folded-in ALS
//! vector for the serving model version.
//!
//! Processes the journal by offset; checkpoints `{state, applied_offset}` in one store
//! write every N records or T; on (re)start loads the checkpoint and replays the journal
//! after it. Fold-in runs after each applied batch, coalesced per user, off the ack path.

use crate::Discard;
use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorClusterMessage;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::consumer::{Apply, ConsumerRuntime, Cursors};
use crate::ctx::Ctx;
use crate::messages::{CheckpointReply, Observation, RecordBatch};
use crate::record::{Payload, Record};
use crate::wire::WIRE_VERSION;
use crate::wire_payload;
use troupe_models::interest::{self, Interest};

/// Version of the UserFeatures checkpoint format.
pub const FEATURES_CHECKPOINT_FORMAT: u16 = 3;

/// One interaction in a user's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Touch {
    pub item: String,
    pub kind: String,
    pub weight: f32,
    pub ts_ms: i64,
}

/// Features of one user.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserState {
    /// The latest touches, at most `features.history_len` (what `GET /v1/users` shows).
    pub history: VecDeque<Touch>,
    /// Every positive item with its summed weight and latest time (ms): what ALS fold-in
    /// and the content profile read, never capped by `history_len`.
    pub interests: FxHashMap<String, Interest>,
    /// Items to filter as already seen.
    pub seen: FxHashSet<String>,
    pub disliked: FxHashSet<String>,
    pub kind_counts: BTreeMap<String, u64>,
    pub events: u64,
    pub last_ts_ms: i64,
    pub last_offset: u64,
    /// Folded-in ALS vector and the model version it was solved against (not persisted).
    #[serde(skip)]
    pub vector: Option<(u64, Vec<f32>)>,
}

/// What the ranker gets for a user.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserView {
    pub version: u16,
    pub known: bool,
    /// The query's `unchanged_since` equals `last_offset`: only the positions are filled.
    pub unchanged: bool,
    pub history: Vec<Touch>,
    /// `(item, summed weight, latest ts ms)` of every positive item.
    pub interests: Vec<(String, f32, i64)>,
    pub seen: Vec<String>,
    pub disliked: Vec<String>,
    pub kind_counts: Vec<(String, u64)>,
    pub events: u64,
    pub last_ts_ms: i64,
    /// Offset of the user's last applied event (0: none).
    pub last_offset: u64,
    /// Partition offset applied when this view was taken.
    pub applied_offset: u64,
    pub vector_version: u64,
    pub vector: Vec<f32>,
}

/// A user to read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserQuery {
    pub version: u16,
    pub user: String,
    /// When non-zero and equal to the user's `last_offset`, the answer carries only the
    /// positions (`unchanged: true`): the caller's copy is current.
    pub unchanged_since: u64,
}

wire_payload!(UserView, UserQuery);

#[derive(RactorClusterMessage)]
pub enum UserFeaturesMsg {
    Committed(RecordBatch),
    /// Catch up with the journal head (sent periodically).
    Tick,
    #[rpc]
    GetUser(UserQuery, RpcReplyPort<UserView>),
    #[rpc]
    Checkpoint(RpcReplyPort<CheckpointReply>),
    #[rpc]
    Observe(RpcReplyPort<Observation>),
}

/// Arguments: the shared context and the partition.
pub struct UserFeaturesArgs {
    pub ctx: Arc<Ctx>,
    pub partition: u32,
}

pub struct UserFeatures;

/// The users of one partition: what records are applied to.
struct Partition {
    ctx: Arc<Ctx>,
    users: FxHashMap<String, UserState>,
    /// Users touched since the last fold-in.
    dirty: FxHashSet<String>,
}

pub struct UserFeaturesState {
    ctx: Arc<Ctx>,
    partition: u32,
    rt: ConsumerRuntime,
    data: Partition,
    replayed: u64,
    fold_ins: u64,
}

/// Borrowed when written, owned when read.
#[derive(Serialize, Deserialize)]
struct Checkpoint<'a> {
    format: u16,
    cursors: Cow<'a, Cursors>,
    users: Cow<'a, FxHashMap<String, UserState>>,
}

fn checkpoint_name(p: u32) -> String {
    format!("user_features/{p}")
}

impl Apply for Partition {
    fn apply(&mut self, r: &Record) -> Result<(), ActorProcessingErr> {
        let ctx = &self.ctx;
        match &r.payload {
            Payload::Event(e) => {
                // Keys are cloned only when new (most events touch known users and kinds).
                if !self.users.contains_key(&e.user) {
                    self.users.insert(e.user.clone(), UserState::default());
                }
                let Some(u) = self.users.get_mut(&e.user) else {
                    return Ok(());
                };
                let weight = ctx
                    .settings
                    .weights
                    .weight(Some(&e.kind), e.value.unwrap_or(f32::NAN));
                match u.kind_counts.get_mut(&e.kind) {
                    Some(c) => *c += 1,
                    None => {
                        u.kind_counts.insert(e.kind.clone(), 1);
                    }
                }
                u.events += 1;
                u.last_ts_ms = u.last_ts_ms.max(e.ts_ms);
                u.last_offset = r.offset;
                interest::record(&mut u.interests, e.item.as_str(), weight, e.ts_ms);
                match weight {
                    None => {
                        // A negative kind filters the item for this user.
                        u.disliked.insert(e.item.clone());
                        u.history.retain(|t| t.item != e.item);
                    }
                    Some(w) => {
                        u.disliked.remove(&e.item);
                        let kinds = &ctx.settings.seen_kinds;
                        if (kinds.is_empty() || kinds.iter().any(|k| k == &e.kind))
                            && !u.seen.contains(&e.item)
                        {
                            u.seen.insert(e.item.clone());
                        }
                        // Late events go to their place by time.
                        let t = Touch {
                            item: e.item.clone(),
                            kind: e.kind.clone(),
                            weight: w,
                            ts_ms: e.ts_ms,
                        };
                        let pos = u
                            .history
                            .iter()
                            .rposition(|h| h.ts_ms <= e.ts_ms)
                            .map_or(0, |p| p + 1);
                        u.history.insert(pos, t);
                        while u.history.len() > ctx.settings.history_len.max(1) {
                            u.history.pop_front();
                        }
                    }
                }
                if !self.dirty.contains(&e.user) {
                    self.dirty.insert(e.user.clone());
                }
            }
            Payload::EraseUser { user } => {
                self.users.remove(user);
                self.dirty.remove(user);
            }
            Payload::ItemUpsert(_) | Payload::ItemDelete { .. } => {}
        }
        Ok(())
    }
}

impl UserFeaturesState {
    fn view(&self, q: &UserQuery) -> UserView {
        let applied = self.rt.applied(self.partition);
        match self.data.users.get(&q.user) {
            None => UserView {
                version: WIRE_VERSION,
                applied_offset: applied,
                ..Default::default()
            },
            Some(u) if q.unchanged_since != 0 && q.unchanged_since == u.last_offset => UserView {
                version: WIRE_VERSION,
                known: true,
                unchanged: true,
                last_offset: u.last_offset,
                applied_offset: applied,
                ..Default::default()
            },
            Some(u) => UserView {
                version: WIRE_VERSION,
                known: true,
                unchanged: false,
                history: u.history.iter().cloned().collect(),
                interests: u
                    .interests
                    .iter()
                    .map(|(i, x)| (i.clone(), x.weight, x.ts))
                    .collect(),
                seen: u.seen.iter().cloned().collect(),
                disliked: u.disliked.iter().cloned().collect(),
                kind_counts: u.kind_counts.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                events: u.events,
                last_ts_ms: u.last_ts_ms,
                last_offset: u.last_offset,
                applied_offset: applied,
                vector_version: u.vector.as_ref().map_or(0, |v| v.0),
                vector: u.vector.as_ref().map(|v| v.1.clone()).unwrap_or_default(),
            },
        }
    }

    async fn checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        let cp = Checkpoint {
            format: FEATURES_CHECKPOINT_FORMAT,
            cursors: Cow::Borrowed(&self.rt.cursors),
            users: Cow::Borrowed(&self.data.users),
        };
        crate::consumer::save_checkpoint(&self.ctx, checkpoint_name(self.partition), &cp).await?;
        self.rt.checkpointed(&self.ctx);
        Ok(())
    }

    /// Folds in the users touched since the last call against the serving ALS model.
    async fn fold_in_dirty(&mut self) -> Result<(), ActorProcessingErr> {
        if self.data.dirty.is_empty() {
            return Ok(());
        }
        let Some(model) = self.ctx.als.load_full() else {
            self.data.dirty.clear();
            return Ok(());
        };
        let users = &self.data.users;
        let jobs: Vec<(String, Vec<(u32, f32)>)> = self
            .data
            .dirty
            .drain()
            .filter_map(|u| {
                let st = users.get(&u)?;
                let inter: Vec<(u32, f32)> = st
                    .interests
                    .iter()
                    .filter_map(|(item, x)| model.items.get(item).map(|i| (i, x.weight)))
                    .collect();
                Some((u, inter))
            })
            .collect();
        let m = model.clone();
        let solved = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(u, inter)| {
                    let v = m.fold_in.solve(m.item_factors.view(), &inter);
                    (u, v)
                })
                .collect::<Vec<_>>()
        })
        .await?;
        self.fold_ins += solved.len() as u64;
        for (u, v) in solved {
            if let Some(st) = self.data.users.get_mut(&u) {
                st.vector = Some((model.version, v));
            }
        }
        Ok(())
    }

    /// After records were applied: fold-in, publish the position (waking reads that wait
    /// for it), checkpoint when due.
    async fn after_apply(&mut self) -> Result<(), ActorProcessingErr> {
        self.fold_in_dirty().await?;
        self.ctx
            .publish_applied(self.partition, self.rt.applied(self.partition));
        if self.rt.checkpoint_due(&self.ctx) {
            self.checkpoint().await?;
        }
        Ok(())
    }
}

impl Actor for UserFeatures {
    type Msg = UserFeaturesMsg;
    type State = UserFeaturesState;
    type Arguments = UserFeaturesArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<UserFeaturesMsg>,
        args: UserFeaturesArgs,
    ) -> Result<UserFeaturesState, ActorProcessingErr> {
        let name = crate::names::user_features(args.partition);
        args.ctx.health.begin_recovery(&name);
        let rt = ConsumerRuntime::load(&args.ctx, &name, "user_features", [args.partition]).await?;
        Ok(UserFeaturesState {
            data: Partition {
                ctx: args.ctx.clone(),
                users: FxHashMap::default(),
                dirty: FxHashSet::default(),
            },
            ctx: args.ctx,
            partition: args.partition,
            rt,
            replayed: 0,
            fold_ins: 0,
        })
    }

    /// Recovery runs here (not in `pre_start`) so that its failures reach the supervisor.
    async fn post_start(
        &self,
        myself: ActorRef<UserFeaturesMsg>,
        st: &mut UserFeaturesState,
    ) -> Result<(), ActorProcessingErr> {
        let cname = checkpoint_name(st.partition);
        let cp: Option<Checkpoint> = crate::consumer::load_checkpoint(
            &st.ctx,
            cname,
            FEATURES_CHECKPOINT_FORMAT,
            vec![st.partition],
            |_: &Checkpoint| Ok(()),
        )
        .await?;
        if let Some(cp) = cp {
            st.rt
                .restore(cp.cursors.into_owned())
                .map_err(|e| format!("checkpoint of {}: {e}", st.rt.name))?;
            st.data.users = cp.users.into_owned();
        }
        let before = st.rt.applied(st.partition);
        let started = Instant::now();
        st.replayed = st.rt.catch_up_all(&st.ctx, &mut st.data).await?;
        st.after_apply().await?;
        tracing::info!(
            partition = st.partition,
            checkpoint = before,
            replayed = st.replayed,
            users = st.data.users.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "user features recovered"
        );
        st.ctx.health.end_recovery(&st.rt.name);
        myself.send_interval(st.ctx.settings.poll_interval, || UserFeaturesMsg::Tick);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<UserFeaturesMsg>,
        msg: UserFeaturesMsg,
        st: &mut UserFeaturesState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            UserFeaturesMsg::Committed(batch) => {
                if batch.stream == st.partition {
                    st.rt.notified(&st.ctx, batch, &mut st.data).await?;
                    st.after_apply().await?;
                }
            }
            UserFeaturesMsg::Tick => {
                if st.ctx.head(st.partition) > st.rt.applied(st.partition) {
                    st.rt.catch_up_all(&st.ctx, &mut st.data).await?;
                }
                st.after_apply().await?;
            }
            UserFeaturesMsg::GetUser(q, port) => {
                port.send(st.view(&q)).discard();
            }
            UserFeaturesMsg::Checkpoint(port) => {
                let r = st.checkpoint().await;
                port.send(CheckpointReply::new(st.rt.positions(), r))
                    .discard();
            }
            UserFeaturesMsg::Observe(port) => {
                let mut doc = st.rt.observe();
                doc["partition"] = st.partition.into();
                doc["applied_offset"] = st.rt.applied(st.partition).into();
                doc["head"] = st.ctx.head(st.partition).into();
                doc["replayed_on_start"] = st.replayed.into();
                doc["users"] = st.data.users.len().into();
                doc["fold_ins"] = st.fold_ins.into();
                port.send(Observation::new(&st.rt.name, doc)).discard();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn checkpoint_round_trips() {
        let mut users = FxHashMap::default();
        let mut u = UserState::default();
        u.history.push_back(Touch {
            item: "i".into(),
            kind: "view".into(),
            weight: 1.5,
            ts_ms: 9,
        });
        u.seen.insert("i".into());
        u.last_offset = 4;
        users.insert("u".to_string(), u);
        let mut cursors = Cursors::default();
        cursors.insert(2, Default::default());
        let cp = Checkpoint {
            format: FEATURES_CHECKPOINT_FORMAT,
            cursors: Cow::Owned(cursors),
            users: Cow::Owned(users),
        };
        let back: Checkpoint =
            crate::consumer::decode_checkpoint(&crate::codec::encode(&cp).unwrap()).unwrap();
        assert_eq!(back.format, FEATURES_CHECKPOINT_FORMAT);
        assert_eq!(back.users["u"].history, cp.users["u"].history);
        assert_eq!(back.users["u"].last_offset, 4);
        assert!(back.cursors.contains_key(&2));
    }

    proptest! {
        #[test]
        fn checkpoint_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            drop(crate::consumer::decode_checkpoint::<Checkpoint>(&bytes));
        }
    }
}
