//! UserFeatures: the online feature store of one partition, kept in the partition's
//! compact interaction store ([`crate::user_store`]): every applied event of every user,
//! from which a view derives the recent history (capped for display only), seen and
//! disliked sets, kind counts, last activity and the interests ALS fold-in and the content
//! profile read. The ranker folds a user in against the serving model when it asks.
//!
//! Processes the journal by offset and checkpoints every N records or T, incrementally: a
//! checkpoint is a delta (the events applied since the previous one, with the positions)
//! written under its own key, and a full checkpoint replaces the store and every delta in
//! one transaction once the deltas add up to `COMPACT_RATIO` times the last full one, after
//! an erasure (a delta cannot remove what earlier ones hold), or as the first checkpoint
//! after a start. On (re)start the actor loads the full checkpoint, replays the deltas
//! after it, then the journal after their position.

use crate::Discard;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use serde::{Deserialize, Serialize};

use crate::consumer::{Apply, Consumer, ConsumerRuntime, Cursors, DeltaChain};
use crate::ctx::Ctx;
use crate::messages::{CheckpointReply, Observation};
use crate::record::{Payload, Record};
use crate::state::Form;
use crate::user_store::{DeltaWire, StoreWire, UserStore};

/// Version of the UserFeatures checkpoint format (full checkpoints and deltas).
pub const FEATURES_CHECKPOINT_FORMAT: u16 = 6;
/// A full checkpoint is written once the deltas after the last one add up to this many
/// times its size. Amortised, an event costs its delta bytes, its bytes in a full
/// checkpoint, and `1 / COMPACT_RATIO` of its delta bytes more (the compaction that
/// rewrites what the deltas added); recovery reads at most `1 + COMPACT_RATIO` times the
/// store's size, one delta at a time.
const COMPACT_RATIO: usize = 8;
/// At most this many deltas follow a full checkpoint (bounds the keys recovery reads).
const MAX_DELTAS: u64 = 1024;

pub use troupe_proto::api::{UserQuery, UserView};

#[derive(RactorMessage)]
pub enum UserFeaturesMsg {
    /// The head of a stream this consumer reads moved (from `consumer::follow_heads`).
    HeadMoved,
    /// Catch up with the journal head (sent periodically).
    Tick,
    GetUser(UserQuery, RpcReplyPort<UserView>),
    Checkpoint(RpcReplyPort<CheckpointReply>),
    Observe(RpcReplyPort<Observation>),
}

/// Arguments: the shared context and the partition.
pub struct UserFeaturesArgs {
    pub ctx: Arc<Ctx>,
    pub partition: u32,
}

pub struct UserFeatures;

/// The users of one partition: what records are applied to (the partition's store in
/// `Ctx`, which this actor alone writes).
struct Partition {
    ctx: Arc<Ctx>,
    partition: u32,
    /// Sequence number of the last checkpoint written or loaded (full or delta).
    seq: u64,
    /// The chain of checkpoints this actor wrote (after a start, the first one is full).
    chain: DeltaChain,
}

impl Partition {
    fn store(&self) -> &parking_lot::RwLock<UserStore> {
        &self.ctx.user_stores[self.partition as usize]
    }
}

pub struct UserFeaturesState {
    ctx: Arc<Ctx>,
    partition: u32,
    rt: ConsumerRuntime,
    data: Partition,
    replayed: u64,
    /// A head-moved wake-up is queued (see `consumer::follow_heads`).
    wake: Arc<std::sync::atomic::AtomicBool>,
    /// Deltas replayed on start.
    deltas_on_start: u64,
}

/// What a full checkpoint holds (written from borrowed state, read back owned).
#[derive(Serialize)]
struct Checkpoint<'a> {
    format: u16,
    seq: u64,
    cursors: Cow<'a, Cursors>,
    store: &'a UserStore,
}

#[derive(Deserialize)]
struct StoredCheckpoint {
    format: u16,
    seq: u64,
    cursors: Cursors,
    store: StoreWire,
}

/// A delta checkpoint: what changed since checkpoint `seq - 1`, and the positions.
#[derive(Serialize, Deserialize)]
struct DeltaCheckpoint<'a> {
    format: u16,
    seq: u64,
    cursors: Cow<'a, Cursors>,
    delta: DeltaWire,
}

/// Where an older build kept partition `p`'s checkpoint (and `…/delta/` after it) in the
/// embedded store's own table.
fn legacy_name(p: u32) -> String {
    format!("user_features/{p}")
}

/// Replays `deltas` (stored after full checkpoint `seq`, in order) onto `store`; returns
/// the positions and sequence number of the last one (`None`: no deltas).
fn replay_deltas(
    name: &str,
    store: &mut UserStore,
    deltas: Vec<Vec<u8>>,
    mut seq: u64,
) -> Result<Option<(Cursors, u64)>, ActorProcessingErr> {
    let mut last = None;
    for bytes in deltas {
        let format = crate::consumer::checkpoint_format(&bytes).map_err(|e| {
            format!(
                "checkpoint of {name}: delta {} does not decode: {e}",
                seq + 1
            )
        })?;
        if format != FEATURES_CHECKPOINT_FORMAT {
            return Err(format!(
                "checkpoint of {name}: delta {} has format {format}, this build reads {FEATURES_CHECKPOINT_FORMAT}",
                seq + 1
            )
            .into());
        }
        let d: DeltaCheckpoint = crate::consumer::decode_checkpoint(&bytes).map_err(|e| {
            format!(
                "checkpoint of {name}: delta {} does not decode: {e}",
                seq + 1
            )
        })?;
        if d.seq != seq + 1 {
            return Err(format!(
                "checkpoint of {name}: a delta has sequence {}, expected {}: a delta is missing",
                d.seq,
                seq + 1
            )
            .into());
        }
        store
            .apply_delta(d.delta)
            .map_err(|e| format!("checkpoint of {name}: {e}"))?;
        seq = d.seq;
        last = Some((d.cursors.into_owned(), seq));
    }
    Ok(last)
}

/// What a partition's record does to its interaction store (events and erasures; item
/// records belong to the catalog), on the owner and in a shadow alike.
fn apply_record(store: &mut UserStore, r: &Record) {
    match &r.payload {
        Payload::Event(e) => store.apply(&e.user, &e.item, &e.kind, e.value, e.ts_ms, r.offset),
        Payload::EraseUser { user } => {
            store.erase(user);
        }
        Payload::ItemUpsert(_) | Payload::ItemDelete { .. } => {}
    }
}

/// A read-only copy of a partition this node does not own, for the trainer leader: its
/// owner's latest checkpoint (the compact interaction store, shared in the state store),
/// kept current by reading the log after it. Never written back: the owner alone
/// checkpoints the partition.
#[derive(Default)]
pub struct Shadow {
    pub store: UserStore,
    /// Offset of the last record applied.
    pub applied: u64,
}

impl Shadow {
    /// Loads partition `p` from its owner's latest checkpoint (empty when there is none).
    pub async fn load(ctx: &Ctx, p: u32) -> Result<Shadow, ActorProcessingErr> {
        let name = crate::names::user_features(p);
        let Some(loaded) = ctx.state.load(&name).await? else {
            return Ok(Shadow::default());
        };
        let Some(base) = loaded.base else {
            return Ok(Shadow::default());
        };
        let deltas = loaded.deltas;
        let shadow = tokio::task::spawn_blocking(move || -> Result<Shadow, String> {
            let format = crate::consumer::checkpoint_format(&base)
                .map_err(|e| format!("checkpoint of {name}: {e}"))?;
            if format != FEATURES_CHECKPOINT_FORMAT {
                return Err(format!(
                    "checkpoint of {name} has format {format}, this build reads {FEATURES_CHECKPOINT_FORMAT}"
                ));
            }
            let cp: StoredCheckpoint = crate::consumer::decode_checkpoint(&base)
                .map_err(|e| format!("checkpoint of {name}: {e}"))?;
            let mut applied = cp.cursors.get(&p).map_or(0, |c| c.applied);
            let mut store = UserStore::from_wire(cp.store)
                .map_err(|e| format!("checkpoint of {name}: {e}"))?;
            if let Some((cursors, _)) = replay_deltas(&name, &mut store, deltas, cp.seq)
                .map_err(|e| e.to_string())?
            {
                applied = cursors.get(&p).map_or(applied, |c| c.applied);
            }
            Ok(Shadow { store, applied })
        })
        .await??;
        Ok(shadow)
    }

    /// Applies records of the log (events and erasures, as the owner does).
    pub fn apply(&mut self, records: &[std::sync::Arc<Record>]) {
        for r in records {
            if r.offset <= self.applied {
                continue;
            }
            apply_record(&mut self.store, r);
            self.applied = r.offset;
        }
    }
}

impl Apply for Partition {
    fn apply(&mut self, r: &Record) -> Result<(), ActorProcessingErr> {
        apply_record(&mut self.store().write(), r);
        Ok(())
    }
}

/// Checkpoints are deltas of what changed since the previous one, or a full one replacing
/// every delta (see the module docs for when); the runtime writes them.
impl Consumer for Partition {
    fn stepped(&mut self, rt: &ConsumerRuntime) {
        // Publishes the position, waking reads that wait for it.
        self.ctx
            .publish_applied(self.partition, rt.applied(self.partition));
    }

    fn snapshot(&mut self, rt: &ConsumerRuntime) -> Result<(Form, Vec<u8>), ActorProcessingErr> {
        let seq = self.seq + 1;
        let mut store = self.store().write();
        let delta = if !self.chain.open(MAX_DELTAS) {
            None
        } else {
            store.delta()
        };
        let delta = match delta {
            Some(delta) => Some(crate::codec::encode(&DeltaCheckpoint {
                format: FEATURES_CHECKPOINT_FORMAT,
                seq,
                cursors: Cow::Borrowed(&rt.cursors),
                delta,
            })?),
            None => None,
        };
        let out = self.chain.choose(delta, COMPACT_RATIO, || {
            crate::codec::encode(&Checkpoint {
                format: FEATURES_CHECKPOINT_FORMAT,
                seq,
                cursors: Cow::Borrowed(&rt.cursors),
                store: &store,
            })
        })?;
        store.mark_checkpointed();
        Ok(out)
    }

    fn checkpointed(&mut self, form: Form, bytes: usize, written: bool) {
        if written {
            self.seq += 1;
        }
        // After a failed write the changes were marked written: the next one is full.
        self.chain.written(form, bytes, written);
    }
}

impl UserFeaturesState {
    fn view(&self, q: &UserQuery) -> UserView {
        let applied = self.rt.applied(self.partition);
        let store = self.data.store().read();
        match store.last_offset(&q.user) {
            None => UserView {
                applied_offset: applied,
                ..Default::default()
            },
            Some(last) if q.unchanged_since != 0 && q.unchanged_since == last => UserView {
                known: true,
                unchanged: true,
                last_offset: last,
                applied_offset: applied,
                ..Default::default()
            },
            Some(_) => {
                let s = store
                    .summary(&self.ctx.user_rules(), &q.user)
                    .unwrap_or_default();
                UserView {
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
                partition: args.partition,
                seq: 0,
                chain: DeltaChain::default(),
            },
            ctx: args.ctx,
            partition: args.partition,
            rt,
            replayed: 0,
            wake: Default::default(),
            deltas_on_start: 0,
        })
    }

    /// Recovery runs here (not in `pre_start`) so that its failures reach the supervisor.
    async fn post_start(
        &self,
        myself: ActorRef<UserFeaturesMsg>,
        st: &mut UserFeaturesState,
    ) -> Result<(), ActorProcessingErr> {
        // Test hook: a recovery that fails every time (a partition that crash-loops).
        let hook = format!("{}.recover", st.rt.name);
        if st.ctx.faults.on_call(&hook).is_some() {
            return Err(crate::faults::InjectedFault(hook).into());
        }
        let cp: Option<(StoredCheckpoint, Vec<Vec<u8>>)> = st
            .rt
            .load_checkpoint(
                &st.ctx,
                &legacy_name(st.partition),
                FEATURES_CHECKPOINT_FORMAT,
                |_: &StoredCheckpoint| Ok(()),
            )
            .await?;
        // A restarted actor starts over: nothing applied before survives but the
        // checkpoints.
        let mut store = UserStore::default();
        if let Some((cp, deltas)) = cp {
            debug_assert_eq!(cp.format, FEATURES_CHECKPOINT_FORMAT);
            st.rt
                .restore(cp.cursors)
                .map_err(|e| format!("checkpoint of {}: {e}", st.rt.name))?;
            let seq = cp.seq;
            let n_deltas = deltas.len() as u64;
            let name = st.rt.name.clone();
            let (back, last) = tokio::task::spawn_blocking(move || {
                let store = UserStore::from_wire(cp.store);
                match store {
                    Ok(mut store) => {
                        let last = replay_deltas(&name, &mut store, deltas, seq);
                        (store, last)
                    }
                    Err(e) => (
                        UserStore::default(),
                        Err(format!("checkpoint of {name}: {e}").into()),
                    ),
                }
            })
            .await?;
            store = back;
            st.data.seq = seq;
            st.deltas_on_start = n_deltas;
            if let Some((cursors, last)) = last? {
                st.rt
                    .restore(cursors)
                    .map_err(|e| format!("checkpoint of {}: {e}", st.rt.name))?;
                st.data.seq = last;
            }
        }
        *st.data.store().write() = store;
        st.rt.verify_log(&st.ctx).await?;
        let before = st.rt.applied(st.partition);
        let started = Instant::now();
        st.replayed = st.rt.step(&st.ctx, &mut st.data).await?;
        tracing::info!(
            partition = st.partition,
            checkpoint = before,
            deltas = st.deltas_on_start,
            replayed = st.replayed,
            users = st.data.store().read().users(),
            events = st.data.store().read().events(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "user features recovered"
        );
        st.ctx.health.end_recovery(&st.rt.name);
        st.wake = crate::consumer::follow_heads(&st.ctx, [st.partition], myself.clone(), || {
            UserFeaturesMsg::HeadMoved
        });
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
            UserFeaturesMsg::HeadMoved | UserFeaturesMsg::Tick => {
                st.wake.store(false, std::sync::atomic::Ordering::Release);
                st.rt.step(&st.ctx, &mut st.data).await?;
            }
            UserFeaturesMsg::GetUser(q, port) => {
                port.send(st.view(&q)).discard();
            }
            UserFeaturesMsg::Checkpoint(port) => {
                let r = st.rt.checkpoint(&st.ctx, &mut st.data).await;
                port.send(CheckpointReply::new(st.rt.positions(), r))
                    .discard();
            }
            UserFeaturesMsg::Observe(port) => {
                let mut doc = st.rt.observe();
                doc["partition"] = st.partition.into();
                doc["applied_offset"] = st.rt.applied(st.partition).into();
                doc["head"] = st.ctx.head(st.partition).into();
                doc["replayed_on_start"] = st.replayed.into();
                doc["deltas_on_start"] = st.deltas_on_start.into();
                doc["checkpoint_seq"] = st.data.seq.into();
                let store = st.data.store().read();
                doc["users"] = store.users().into();
                doc["events"] = store.events().into();
                doc["memory"] = serde_json::to_value(store.footprint()).unwrap_or_default();
                drop(store);
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
            seq: 7,
            cursors: Cow::Owned(cursors),
            store: &store,
        };
        let back: StoredCheckpoint =
            crate::consumer::decode_checkpoint(&crate::codec::encode(&cp).unwrap()).unwrap();
        assert_eq!((back.format, back.seq), (FEATURES_CHECKPOINT_FORMAT, 7));
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
