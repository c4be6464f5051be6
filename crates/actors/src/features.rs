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

use crate::consumer::Applier;
use crate::ctx::Ctx;
use crate::messages::{CheckpointReply, Observation, RecordBatch};
use crate::metrics::labels2;
use crate::record::{Payload, Record};
use crate::wire::WIRE_VERSION;
use crate::wire_payload;

/// Version of the UserFeatures checkpoint format.
pub const FEATURES_CHECKPOINT_FORMAT: u16 = 1;

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
    pub history: VecDeque<Touch>,
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
    pub history: Vec<Touch>,
    pub seen: Vec<String>,
    pub disliked: Vec<String>,
    pub kind_counts: Vec<(String, u64)>,
    pub events: u64,
    pub last_ts_ms: i64,
    pub last_offset: u64,
    /// Partition offset applied when this view was taken.
    pub applied_offset: u64,
    pub vector_version: u64,
    pub vector: Vec<f32>,
}

/// A user to erase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserQuery {
    pub version: u16,
    pub user: String,
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

pub struct UserFeaturesState {
    ctx: Arc<Ctx>,
    partition: u32,
    name: String,
    users: FxHashMap<String, UserState>,
    applied: u64,
    applier: Option<Applier>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    checkpoint_offset: u64,
    checkpoints: u64,
    replayed: u64,
    fold_ins: u64,
    dirty: FxHashSet<String>,
}

/// Borrowed when written, owned when read.
#[derive(Serialize, Deserialize)]
struct Checkpoint<'a> {
    format: u16,
    applied: u64,
    users: Cow<'a, FxHashMap<String, UserState>>,
}

fn checkpoint_name(p: u32) -> String {
    format!("user_features/{p}")
}

impl UserFeaturesState {
    fn apply(&mut self, r: &Record) {
        let ctx = self.ctx.clone();
        match &r.payload {
            Payload::Event(e) => {
                // Keys are cloned only when new (most events touch known users and kinds).
                if !self.users.contains_key(&e.user) {
                    self.users.insert(e.user.clone(), UserState::default());
                }
                let Some(u) = self.users.get_mut(&e.user) else {
                    return;
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
    }

    fn view(&self, user: &str) -> UserView {
        let applied = self.applied;
        match self.users.get(user) {
            None => UserView {
                version: WIRE_VERSION,
                applied_offset: applied,
                ..Default::default()
            },
            Some(u) => UserView {
                version: WIRE_VERSION,
                known: true,
                history: u.history.iter().cloned().collect(),
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
            applied: self.applied,
            users: Cow::Borrowed(&self.users),
        };
        crate::consumer::save_checkpoint(&self.ctx, checkpoint_name(self.partition), &cp).await?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.checkpoint_offset = self.applied;
        self.checkpoints += 1;
        self.ctx
            .note_checkpoint(&self.name, self.partition, self.applied);
        Ok(())
    }

    async fn maybe_checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        let s = &self.ctx.settings;
        if self.applied > self.checkpoint_offset
            && (self.since_checkpoint >= s.checkpoint_every_records
                || self.last_checkpoint.elapsed() >= s.checkpoint_interval)
        {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Folds in the users touched since the last call against the serving ALS model.
    async fn fold_in_dirty(&mut self) -> Result<(), ActorProcessingErr> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let Some(model) = self.ctx.als.load_full() else {
            self.dirty.clear();
            return Ok(());
        };
        let jobs: Vec<(String, Vec<(u32, f32)>)> = self
            .dirty
            .drain()
            .filter_map(|u| {
                let st = self.users.get(&u)?;
                let inter: Vec<(u32, f32)> = st
                    .history
                    .iter()
                    .filter_map(|t| model.items.get(&t.item).map(|i| (i, t.weight)))
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
            if let Some(st) = self.users.get_mut(&u) {
                st.vector = Some((model.version, v));
            }
        }
        Ok(())
    }

    fn publish(&self) {
        self.ctx.applied[self.partition as usize].send_replace(self.applied);
        self.ctx
            .metrics
            .applied_offset
            .get_or_create(&labels2(
                "consumer",
                "user_features",
                "stream",
                self.partition,
            ))
            .set(self.applied as i64);
    }

    async fn process(&mut self, records: Vec<Record>) -> Result<(), ActorProcessingErr> {
        let mut applier = self.applier.take().ok_or("applier missing")?;
        let mut applied = self.applied;
        let ctx = self.ctx.clone();
        let partition = self.partition;
        let head = ctx.head(partition);
        let (buf, result) = applier
            .next_batch(&ctx, partition, &mut applied, records, head)
            .await;
        self.applier = Some(applier);
        // Records passed every check (faults included) in order; apply them now.
        let name = self.name.clone();
        crate::consumer::apply_marked(&ctx, &name, &buf, |r| self.apply(r));
        self.applied = applied;
        let n = result?;
        self.since_checkpoint += n;
        self.fold_in_dirty().await?;
        self.publish();
        self.maybe_checkpoint().await
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
        Ok(UserFeaturesState {
            ctx: args.ctx,
            partition: args.partition,
            name,
            users: FxHashMap::default(),
            applied: 0,
            applier: None,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            checkpoint_offset: 0,
            checkpoints: 0,
            replayed: 0,
            fold_ins: 0,
            dirty: FxHashSet::default(),
        })
    }

    /// Recovery runs here (not in `pre_start`) so that its failures reach the supervisor.
    async fn post_start(
        &self,
        myself: ActorRef<UserFeaturesMsg>,
        st: &mut UserFeaturesState,
    ) -> Result<(), ActorProcessingErr> {
        let cname = checkpoint_name(st.partition);
        let cp: Option<Checkpoint> =
            crate::consumer::load_checkpoint(&st.ctx, cname, |cp: &Checkpoint| {
                crate::consumer::check_checkpoint(cp.format, FEATURES_CHECKPOINT_FORMAT, None)
            })
            .await?;
        if let Some(cp) = cp {
            st.applied = cp.applied;
            st.checkpoint_offset = cp.applied;
            st.users = cp.users.into_owned();
        }
        st.applier = Some(Applier::load(&st.ctx, &st.name, "user_features").await?);
        let before = st.applied;
        let started = Instant::now();
        st.process(Vec::new()).await?;
        st.replayed = st.applied - before;
        tracing::info!(
            partition = st.partition,
            checkpoint = before,
            replayed = st.replayed,
            users = st.users.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "user features recovered"
        );
        st.ctx.health.end_recovery(&st.name);
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
                    st.process(batch.into_records()).await?;
                }
            }
            UserFeaturesMsg::Tick => {
                if st.ctx.head(st.partition) > st.applied {
                    st.process(Vec::new()).await?;
                } else {
                    st.maybe_checkpoint().await?;
                }
            }
            UserFeaturesMsg::GetUser(q, port) => {
                port.send(st.view(&q.user)).discard();
            }
            UserFeaturesMsg::Checkpoint(port) => {
                let r = st.checkpoint().await;
                port.send(CheckpointReply::new(vec![(st.partition, st.applied)], r))
                    .discard();
            }
            UserFeaturesMsg::Observe(port) => {
                port.send(Observation::new(
                    &st.name,
                    serde_json::json!({
                        "partition": st.partition,
                        "applied_offset": st.applied,
                        "head": st.ctx.head(st.partition),
                        "checkpoint_offset": st.checkpoint_offset,
                        "checkpoints": st.checkpoints,
                        "replayed_on_start": st.replayed,
                        "users": st.users.len(),
                        "fold_ins": st.fold_ins,
                        "dead_lettered": st.applier.as_ref().map_or(0, |a| a.dead_lettered),
                    }),
                ))
                .discard();
            }
        }
        Ok(())
    }
}
