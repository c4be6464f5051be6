//! UserFeatures: the online feature store of one partition, kept in the partition's
//! compact interaction store ([`crate::user_store`]): every applied event of every user,
//! from which a view derives the recent history (capped for display only), seen and
//! disliked sets, kind counts, last activity and the interests ALS fold-in and the content
//! profile read. The ranker folds a user in against the serving model when it asks.
//!
//! Processes the journal by offset; checkpoints `{store, applied_offset}` in one store
//! write every N records or T; on (re)start loads the checkpoint and replays the journal
//! after it.

use crate::Discard;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorClusterMessage;
use serde::{Deserialize, Serialize};

use crate::consumer::{Apply, ConsumerRuntime, Cursors};
use crate::ctx::Ctx;
use crate::messages::{CheckpointReply, Observation, RecordBatch};
use crate::record::{Payload, Record};
use crate::user_store::{Rules, StoreWire, UserStore};
use crate::wire::WIRE_VERSION;
use crate::wire_payload;

pub use crate::user_store::Touch;

/// Version of the UserFeatures checkpoint format.
pub const FEATURES_CHECKPOINT_FORMAT: u16 = 4;

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
    store: UserStore,
}

pub struct UserFeaturesState {
    ctx: Arc<Ctx>,
    partition: u32,
    rt: ConsumerRuntime,
    data: Partition,
    replayed: u64,
}

/// What a checkpoint holds (written from borrowed state, read back owned).
#[derive(Serialize)]
struct Checkpoint<'a> {
    format: u16,
    cursors: Cow<'a, Cursors>,
    store: &'a UserStore,
}

#[derive(Deserialize)]
struct StoredCheckpoint {
    format: u16,
    cursors: Cursors,
    store: StoreWire,
}

fn checkpoint_name(p: u32) -> String {
    format!("user_features/{p}")
}

fn rules(ctx: &Ctx) -> Rules<'_> {
    Rules {
        weights: &ctx.settings.weights,
        seen_kinds: &ctx.settings.seen_kinds,
        history_len: ctx.settings.history_len,
    }
}

impl Apply for Partition {
    fn apply(&mut self, r: &Record) -> Result<(), ActorProcessingErr> {
        match &r.payload {
            Payload::Event(e) => {
                self.store
                    .apply(&e.user, &e.item, &e.kind, e.value, e.ts_ms, r.offset);
            }
            Payload::EraseUser { user } => {
                self.store.erase(user);
            }
            Payload::ItemUpsert(_) | Payload::ItemDelete { .. } => {}
        }
        Ok(())
    }
}

impl UserFeaturesState {
    fn view(&self, q: &UserQuery) -> UserView {
        let applied = self.rt.applied(self.partition);
        let store = &self.data.store;
        match store.last_offset(&q.user) {
            None => UserView {
                version: WIRE_VERSION,
                applied_offset: applied,
                ..Default::default()
            },
            Some(last) if q.unchanged_since != 0 && q.unchanged_since == last => UserView {
                version: WIRE_VERSION,
                known: true,
                unchanged: true,
                last_offset: last,
                applied_offset: applied,
                ..Default::default()
            },
            Some(_) => {
                let s = store
                    .summary(&rules(&self.ctx), &q.user)
                    .unwrap_or_default();
                UserView {
                    version: WIRE_VERSION,
                    known: true,
                    unchanged: false,
                    history: s.history,
                    interests: s.interests,
                    seen: s.seen,
                    disliked: s.disliked,
                    kind_counts: s.kind_counts,
                    events: s.events,
                    last_ts_ms: s.last_ts_ms,
                    last_offset: s.last_offset,
                    applied_offset: applied,
                }
            }
        }
    }

    async fn checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        let cp = Checkpoint {
            format: FEATURES_CHECKPOINT_FORMAT,
            cursors: Cow::Borrowed(&self.rt.cursors),
            store: &self.data.store,
        };
        crate::consumer::save_checkpoint(&self.ctx, checkpoint_name(self.partition), &cp).await?;
        self.rt.checkpointed(&self.ctx);
        Ok(())
    }

    /// After records were applied: publish the position (waking reads that wait for it),
    /// checkpoint when due.
    async fn after_apply(&mut self) -> Result<(), ActorProcessingErr> {
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
                store: UserStore::default(),
            },
            ctx: args.ctx,
            partition: args.partition,
            rt,
            replayed: 0,
        })
    }

    /// Recovery runs here (not in `pre_start`) so that its failures reach the supervisor.
    async fn post_start(
        &self,
        myself: ActorRef<UserFeaturesMsg>,
        st: &mut UserFeaturesState,
    ) -> Result<(), ActorProcessingErr> {
        let cname = checkpoint_name(st.partition);
        let cp: Option<StoredCheckpoint> = crate::consumer::load_checkpoint(
            &st.ctx,
            cname,
            FEATURES_CHECKPOINT_FORMAT,
            vec![st.partition],
            |_: &StoredCheckpoint| Ok(()),
        )
        .await?;
        if let Some(cp) = cp {
            debug_assert_eq!(cp.format, FEATURES_CHECKPOINT_FORMAT);
            st.rt
                .restore(cp.cursors)
                .map_err(|e| format!("checkpoint of {}: {e}", st.rt.name))?;
            st.data.store = UserStore::from_wire(cp.store)
                .map_err(|e| format!("checkpoint of {}: {e}", st.rt.name))?;
        }
        let before = st.rt.applied(st.partition);
        let started = Instant::now();
        st.replayed = st.rt.catch_up_all(&st.ctx, &mut st.data).await?;
        st.after_apply().await?;
        tracing::info!(
            partition = st.partition,
            checkpoint = before,
            replayed = st.replayed,
            users = st.data.store.users(),
            events = st.data.store.events(),
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
                doc["users"] = st.data.store.users().into();
                doc["events"] = st.data.store.events().into();
                doc["memory"] = serde_json::to_value(st.data.store.footprint()).unwrap_or_default();
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
        let mut store = UserStore::default();
        store.apply("u", "i", "view", Some(1.5), 9, 4);
        let mut cursors = Cursors::default();
        cursors.insert(2, Default::default());
        let cp = Checkpoint {
            format: FEATURES_CHECKPOINT_FORMAT,
            cursors: Cow::Owned(cursors),
            store: &store,
        };
        let back: StoredCheckpoint =
            crate::consumer::decode_checkpoint(&crate::codec::encode(&cp).unwrap()).unwrap();
        assert_eq!(back.format, FEATURES_CHECKPOINT_FORMAT);
        let back_store = UserStore::from_wire(back.store).unwrap();
        assert_eq!(back_store.last_offset("u"), Some(4));
        assert_eq!(back_store.events(), 1);
        assert!(back.cursors.contains_key(&2));
    }

    proptest! {
        #[test]
        fn checkpoint_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(cp) = crate::consumer::decode_checkpoint::<StoredCheckpoint>(&bytes) {
                drop(UserStore::from_wire(cp.store));
            }
        }
    }
}
