//! ItemStats: decayed item popularity, global and per category, on the events' clock,
//! and each item's undecayed event count, fed by every partition (counts) and the catalog
//! stream (categories); checkpoints `{state, cursor per stream}`.
//!
//! One per node, in one of two roles (ADR 022):
//! - **counting**: applies the log itself. One node always counts; in a cluster the
//!   trainer leader counts (and every member while nobody leads), and publishes its
//!   counts by checkpointing every [`PUBLISH_EVERY`] (a delta of what changed);
//! - **following** (a cluster member that does not lead): reads nothing of the log, but
//!   follows the leader's checkpoint chain in the state store (the new deltas once a
//!   second, the whole chain when it was replaced), taking its state and positions. It
//!   writes checkpoints of its own at the usual cadence (retention and its own restart
//!   read them), and if it becomes the leader it counts on from the positions it holds.

use crate::Discard;
use std::borrow::Cow;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use serde::{Deserialize, Serialize};
use troupe_models::dataset::IdMap;
use troupe_models::popularity::Popularity;

use crate::consumer::{Apply, Consumer, ConsumerRuntime, Cursors, DeltaChain};
use crate::ctx::Ctx;
use crate::messages::{CheckpointReply, Observation};
use crate::names;
use crate::record::{Payload, Record};
use crate::state::Form;

/// Format of the full checkpoint and of the deltas after it.
pub const ITEM_STATS_CHECKPOINT_FORMAT: u16 = 5;

/// A full checkpoint is written once the deltas after the last one add up to this many
/// times its size, and at most `MAX_DELTAS` deltas follow one (as for UserFeatures).
const COMPACT_RATIO: usize = 4;
const MAX_DELTAS: u64 = 256;
/// Where an older build kept the checkpoint in the embedded store's own table.
const LEGACY_NAME: &str = "item_stats";
/// In a cluster, the counting member checkpoints (publishes) this often while its
/// counts change, and a following member looks for new checkpoints this often: the
/// followers' statistics are about two of these behind the leader's.
pub const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Request for the most popular items.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopRequest {
    pub n: u32,
    pub category: Option<String>,
    /// Evaluation time (ms); popularity decays on the events' clock.
    pub now_ms: i64,
}

/// Popular items, best first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopReply {
    pub items: Vec<(String, f32)>,
}

#[derive(RactorMessage)]
pub enum ItemStatsMsg {
    /// The head of a stream this consumer reads moved (from `consumer::follow_heads`).
    HeadMoved,
    Tick,
    Top(TopRequest, RpcReplyPort<TopReply>),
    /// Interaction events applied for one item (`None`: no event for it yet).
    EventCount(String, RpcReplyPort<Option<u64>>),
    Checkpoint(RpcReplyPort<CheckpointReply>),
    Observe(RpcReplyPort<Observation>),
}

/// Borrowed when written, owned when read.
#[derive(Serialize, Deserialize)]
struct Checkpoint<'a> {
    format: u16,
    cursors: Cow<'a, Cursors>,
    ids: Names<'a>,
    popularity: Cow<'a, Popularity>,
    /// Events per interned item, every kind, undecayed.
    events: Cow<'a, [u64]>,
    latest_ts_ms: i64,
}

/// Item ids in index order as one string and the byte length of each: a full checkpoint
/// of millions of items reads them as one string and rebuilds the map from it, instead of
/// decoding a map and a list of names (each id twice) entry by entry.
#[derive(Serialize, Deserialize)]
struct Names<'a> {
    text: Cow<'a, str>,
    lengths: Vec<u32>,
}

impl Names<'static> {
    fn of(ids: &IdMap) -> Self {
        let names = ids.names();
        let mut text = String::with_capacity(names.iter().map(String::len).sum());
        let mut lengths = Vec::with_capacity(names.len());
        for n in names {
            text.push_str(n);
            lengths.push(n.len() as u32);
        }
        Names {
            text: Cow::Owned(text),
            lengths,
        }
    }
}

impl Names<'_> {
    fn into_ids(self) -> Result<IdMap, String> {
        let mut names = Vec::with_capacity(self.lengths.len());
        let mut at = 0usize;
        for (i, &l) in self.lengths.iter().enumerate() {
            let end = at + l as usize;
            let Some(n) = self.text.get(at..end) else {
                return Err(format!(
                    "item name {i} runs past the names or splits a character"
                ));
            };
            names.push(n.to_string());
            at = end;
        }
        if at != self.text.len() {
            return Err("the item names hold more bytes than their lengths".into());
        }
        IdMap::from_names(names)
    }
}

/// What changed since the previous checkpoint (full or delta): written as a delta while
/// the deltas stay small next to the full checkpoint, so a checkpoint costs what changed,
/// not the whole catalogue of items.
#[derive(Serialize, Deserialize)]
struct DeltaCheckpoint<'a> {
    format: u16,
    /// 1 for the first delta after a full checkpoint, then 2, 3, ...
    seq: u64,
    cursors: Cow<'a, Cursors>,
    /// Items interned since the previous checkpoint, in index order from `names_from`.
    names_from: u32,
    names: Vec<String>,
    /// The popularity anchor the raw values below are relative to (a delta is written
    /// only while it is the previous checkpoint's).
    anchor: i64,
    /// Items whose popularity or count changed: index, raw popularity, events.
    items: Vec<(u32, f64, u64)>,
    /// Items whose categories changed, with their categories now.
    categories: Vec<(u32, Vec<String>)>,
    latest_ts_ms: i64,
}

pub struct ItemStats;

/// What records are applied to: counts from every partition, categories from the catalog.
struct Stats {
    ctx: Arc<Ctx>,
    ids: IdMap,
    popularity: Popularity,
    /// Events per interned item, every kind, undecayed.
    events: Vec<u64>,
    latest_ts_ms: i64,
    new_items: Vec<String>,
    /// Since the previous checkpoint: items whose counts changed, items whose categories
    /// changed, the item count and the anchor then.
    dirty: rustc_hash::FxHashSet<u32>,
    dirty_categories: rustc_hash::FxHashSet<u32>,
    names_at_checkpoint: usize,
    anchor_at_checkpoint: i64,
    /// The checkpoint chain the next delta would continue.
    chain: DeltaChain,
}

pub struct ItemStatsState {
    ctx: Arc<Ctx>,
    rt: ConsumerRuntime,
    /// A head-moved wake-up is queued (see `consumer::follow_heads`).
    wake: Arc<std::sync::atomic::AtomicBool>,
    data: Stats,
    /// Following: where this node's copy stands in the chain it follows.
    followed: Option<Followed>,
    /// Following: a member's chain is being followed (`Some` even before the first
    /// load), and when the chain was last looked at.
    following: Option<String>,
    last_follow: Option<std::time::Instant>,
    /// Chains (full) and deltas taken from the leader.
    follow_loads: u64,
    follow_deltas: u64,
    follow_error: Option<String>,
}

/// The position of a following node's copy in the chain it follows.
#[derive(Debug, Clone)]
struct Followed {
    scope: String,
    revision: u64,
    /// The full checkpoint the chain starts with, and how many of its deltas are applied.
    base: String,
    deltas: usize,
}

/// The member whose published statistics this node follows; `None`: it counts them from
/// the log itself (one node, the trainer leader, or while nobody leads).
fn source(ctx: &Ctx) -> Option<String> {
    let c = ctx.cluster.as_ref()?;
    if c.trainer_epoch().is_some() {
        return None;
    }
    c.trainer_leader().filter(|h| *h != ctx.settings.node_name)
}

/// True when `theirs` covers less than `ours` of some stream (taking it would go back).
fn behind(theirs: &[(u32, u64)], ours: &[(u32, u64)]) -> bool {
    ours.iter().any(|&(s, o)| {
        o > theirs
            .iter()
            .find(|&&(ts, _)| ts == s)
            .map_or(0, |&(_, to)| to)
    })
}

impl Apply for Stats {
    fn apply(&mut self, r: &Record) -> Result<(), ActorProcessingErr> {
        match &r.payload {
            Payload::Event(e) => {
                let new = self.ids.get(&e.item).is_none();
                let i = self.ids.intern(&e.item);
                if new {
                    self.new_items.push(e.item.clone());
                }
                let slot = i as usize;
                if self.events.len() <= slot {
                    self.events.resize(slot + 1, 0);
                }
                self.events[slot] += 1;
                self.dirty.insert(i);
                if let Some(w) = self
                    .ctx
                    .settings
                    .weights
                    .weight(Some(&e.kind), e.value.unwrap_or(f32::NAN))
                {
                    self.popularity.add(i, w as f64, e.ts_ms / 1000);
                    self.latest_ts_ms = self.latest_ts_ms.max(e.ts_ms);
                }
            }
            // Categories come from the journaled catalog stream, so a restart replays them
            // like everything else.
            Payload::ItemUpsert(item) => {
                let i = self.ids.intern(&item.id);
                self.popularity.set_categories(i, &item.categories);
                self.dirty_categories.insert(i);
            }
            Payload::ItemDelete { id } => {
                if let Some(i) = self.ids.get(id) {
                    self.popularity.set_categories(i, &[]);
                    self.dirty_categories.insert(i);
                }
            }
            Payload::EraseUser { .. } => {}
        }
        Ok(())
    }
}

impl Consumer for Stats {
    /// Placeholders in the catalog for items seen in events first.
    fn stepped(&mut self, _rt: &ConsumerRuntime) {
        if self.new_items.is_empty() {
            return;
        }
        crate::handles::catalog().tell(crate::catalog::CatalogMsg::Placeholders(
            crate::messages::ItemIds {
                ids: std::mem::take(&mut self.new_items),
            },
        ));
        self.new_items.clear();
    }

    /// A delta of what changed since the previous checkpoint while the deltas stay small
    /// (and the popularity anchor has not moved), otherwise a full checkpoint.
    fn snapshot(&mut self, rt: &ConsumerRuntime) -> Result<(Form, Vec<u8>), ActorProcessingErr> {
        let anchor = self.popularity.anchor();
        let delta_allowed = self.chain.open(MAX_DELTAS) && anchor == self.anchor_at_checkpoint;
        let mut delta = None;
        if delta_allowed {
            let mut items: Vec<u32> = self.dirty.iter().copied().collect();
            items.sort_unstable();
            let mut categories: Vec<u32> = self.dirty_categories.iter().copied().collect();
            categories.sort_unstable();
            let d = DeltaCheckpoint {
                format: ITEM_STATS_CHECKPOINT_FORMAT,
                seq: self.chain.next_seq(),
                cursors: Cow::Borrowed(&rt.cursors),
                names_from: self.names_at_checkpoint as u32,
                names: (self.names_at_checkpoint..self.ids.len())
                    .filter_map(|i| self.ids.name(i as u32).map(str::to_string))
                    .collect(),
                anchor,
                items: items
                    .into_iter()
                    .map(|i| {
                        let n = self.events.get(i as usize).copied().unwrap_or(0);
                        (i, self.popularity.relative(i), n)
                    })
                    .collect(),
                categories: categories
                    .into_iter()
                    .map(|i| (i, self.popularity.categories_of(i).to_vec()))
                    .collect(),
                latest_ts_ms: self.latest_ts_ms,
            };
            delta = Some(crate::codec::encode(&d)?);
        }
        let out = self.chain.choose(delta, COMPACT_RATIO, || {
            crate::codec::encode(&Checkpoint {
                format: ITEM_STATS_CHECKPOINT_FORMAT,
                cursors: Cow::Borrowed(&rt.cursors),
                ids: Names::of(&self.ids),
                popularity: Cow::Borrowed(&self.popularity),
                events: Cow::Borrowed(&self.events),
                latest_ts_ms: self.latest_ts_ms,
            })
        })?;
        self.dirty.clear();
        self.dirty_categories.clear();
        self.names_at_checkpoint = self.ids.len();
        self.anchor_at_checkpoint = anchor;
        Ok(out)
    }

    fn checkpointed(&mut self, form: Form, bytes: usize, written: bool) {
        self.chain.written(form, bytes, written);
    }
}

impl Stats {
    /// Applies the deltas written after the full checkpoint just restored, in order;
    /// the cursors of the last one (`None`: no deltas).
    /// `first_seq` is the sequence number of the first of `deltas` (1 right after the
    /// full checkpoint). What they change is marked for this node's own next delta.
    fn replay_deltas(
        &mut self,
        deltas: Vec<Vec<u8>>,
        first_seq: u64,
    ) -> Result<Option<Cursors>, String> {
        let mut cursors = None;
        for (k, bytes) in deltas.into_iter().enumerate() {
            let seq = k as u64 + first_seq;
            let d: DeltaCheckpoint = crate::consumer::decode_delta(
                &bytes,
                seq,
                ITEM_STATS_CHECKPOINT_FORMAT,
                |d: &DeltaCheckpoint| d.seq,
            )?;
            if d.names_from as usize != self.ids.len() {
                return Err(format!(
                    "delta {seq} adds items from {}, the checkpoint holds {}: a delta is missing",
                    d.names_from,
                    self.ids.len()
                ));
            }
            if d.anchor != self.popularity.anchor() {
                return Err(format!(
                    "delta {seq} is relative to popularity anchor {}, the checkpoint's is {}",
                    d.anchor,
                    self.popularity.anchor()
                ));
            }
            for n in d.names {
                self.ids.intern(&n);
                self.new_items.push(n);
            }
            for (i, relative, events) in d.items {
                self.dirty.insert(i);
                self.popularity.set_relative(i, relative);
                let slot = i as usize;
                if self.events.len() <= slot {
                    self.events.resize(slot + 1, 0);
                }
                self.events[slot] = events;
            }
            for (i, c) in d.categories {
                self.dirty_categories.insert(i);
                self.popularity.set_categories(i, &c);
            }
            self.latest_ts_ms = d.latest_ts_ms;
            cursors = Some(d.cursors.into_owned());
        }
        Ok(cursors)
    }
}

impl Stats {
    fn empty(ctx: Arc<Ctx>) -> Stats {
        let hl = ctx.settings.popularity_half_life.as_secs_f64();
        Stats {
            ctx,
            ids: IdMap::default(),
            popularity: Popularity::new(0, hl),
            events: Vec::new(),
            latest_ts_ms: 0,
            dirty: Default::default(),
            dirty_categories: Default::default(),
            names_at_checkpoint: 0,
            anchor_at_checkpoint: 0,
            chain: DeltaChain::default(),
            new_items: Vec::new(),
        }
    }

    /// Takes a full checkpoint's state (every item named in it becomes a placeholder for
    /// the catalog until the catalog has it); its cursors.
    fn load_full(&mut self, cp: Checkpoint<'_>) -> Result<Cursors, String> {
        self.ids = cp.ids.into_ids()?;
        self.popularity = cp.popularity.into_owned();
        self.events = cp.events.into_owned();
        self.latest_ts_ms = cp.latest_ts_ms;
        self.new_items = self.ids.names().to_vec();
        self.dirty.clear();
        self.dirty_categories.clear();
        self.names_at_checkpoint = self.ids.len();
        self.anchor_at_checkpoint = self.popularity.anchor();
        Ok(cp.cursors.into_owned())
    }
}

impl ItemStatsState {
    /// Following `leader`: takes the deltas its chain gained since the last look, or the
    /// whole chain when it was replaced (never one that covers less of some stream than
    /// this copy does). Errors leave the copy as it was; the next look tries again.
    async fn follow(&mut self, leader: &str) -> Result<(), String> {
        let scope = crate::consumer::singleton_scope(names::ITEM_STATS, leader);
        let Some((pointer, revision)) = self
            .ctx
            .state
            .pointer(&scope)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let Some(base) = pointer.base.clone() else {
            return Ok(());
        };
        if let Some(f) = &self.followed {
            if f.scope == scope && f.revision == revision {
                return Ok(());
            }
        }
        // The same chain, grown: its new deltas only.
        if let Some(f) = self
            .followed
            .clone()
            .filter(|f| f.scope == scope && f.base == base && f.deltas <= pointer.deltas.len())
        {
            let mut blobs = Vec::new();
            for name in &pointer.deltas[f.deltas..] {
                match self
                    .ctx
                    .state
                    .get_blob(name)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    Some(b) => blobs.push(b),
                    // Compacted meanwhile: the whole chain below.
                    None => break,
                }
            }
            if blobs.len() == pointer.deltas.len() - f.deltas {
                let n = blobs.len();
                match self.data.replay_deltas(blobs, f.deltas as u64 + 1) {
                    Ok(cursors) => {
                        if let Some(c) = cursors {
                            self.rt.restore(c)?;
                        }
                        self.rt.since_checkpoint += n as u64;
                        self.follow_deltas += n as u64;
                        self.followed = Some(Followed {
                            revision,
                            deltas: pointer.deltas.len(),
                            ..f
                        });
                        self.data.stepped(&self.rt);
                        return Ok(());
                    }
                    Err(e) => {
                        // Partly applied: only a whole chain repairs the copy.
                        self.followed = None;
                        return Err(format!("delta of {scope}: {e}"));
                    }
                }
            }
        }
        if behind(&pointer.positions, &self.rt.positions()) {
            return Ok(());
        }
        let Some(loaded) = self
            .ctx
            .state
            .load(&scope)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let (Some(bytes), Some(base)) = (loaded.base, loaded.pointer.base.clone()) else {
            return Ok(());
        };
        let found = crate::consumer::checkpoint_format(&bytes)?;
        if found != ITEM_STATS_CHECKPOINT_FORMAT {
            return Err(format!(
                "{scope} has checkpoint format {found}, this build reads {ITEM_STATS_CHECKPOINT_FORMAT}"
            ));
        }
        let ctx = self.ctx.clone();
        let deltas = loaded.deltas;
        let n = deltas.len();
        let (fresh, cursors) =
            tokio::task::spawn_blocking(move || -> Result<(Stats, Cursors), String> {
                let cp: Checkpoint = crate::consumer::decode_checkpoint(&bytes)?;
                crate::consumer::check_partitions(&cp.cursors, ctx.settings.partitions)?;
                let mut s = Stats::empty(ctx);
                let mut cursors = s.load_full(cp)?;
                if let Some(c) = s.replay_deltas(deltas, 1)? {
                    cursors = c;
                }
                Ok((s, cursors))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{scope}: {e}"))?;
        self.rt.restore(cursors)?;
        self.data = fresh;
        self.rt.since_checkpoint += 1;
        self.follow_loads += 1;
        self.followed = Some(Followed {
            scope,
            revision: loaded.revision,
            base,
            deltas: n,
        });
        self.data.stepped(&self.rt);
        Ok(())
    }

    /// One tick or head move: count from the log, or follow the leader's chain.
    async fn step(&mut self, tick: bool) -> Result<(), ActorProcessingErr> {
        let source = source(&self.ctx);
        // A counting member (and the trainer leader, which is it) reads every partition;
        // a follower's log follower decodes only what this node's consumers read.
        self.ctx.tail.want_all(source.is_none());
        match source {
            None => {
                if self.following.take().is_some() {
                    tracing::info!("item statistics: counting from the log");
                    self.followed = None;
                }
                self.rt.checkpoint_interval = self.ctx.cluster.is_some().then_some(PUBLISH_EVERY);
                self.rt.step(&self.ctx, &mut self.data).await?;
            }
            Some(leader) => {
                if self.following.as_deref() != Some(leader.as_str()) {
                    tracing::info!(leader = %leader, "item statistics: following the leader's");
                    self.following = Some(leader.clone());
                }
                self.rt.checkpoint_interval = None;
                let due = self
                    .last_follow
                    .is_none_or(|t| t.elapsed() >= PUBLISH_EVERY);
                if tick && due {
                    self.last_follow = Some(std::time::Instant::now());
                    self.follow_error = match self.follow(&leader).await {
                        Ok(()) => None,
                        Err(e) => {
                            if self.follow_error.as_ref() != Some(&e) {
                                tracing::warn!(leader = %leader, error = %e, "item statistics not followed; trying again");
                            }
                            Some(e)
                        }
                    };
                }
                self.rt.checkpoint_if_due(&self.ctx, &mut self.data).await?;
            }
        }
        Ok(())
    }

    fn top(&self, req: &TopRequest) -> TopReply {
        let items = self
            .data
            .popularity
            .top_k(req.n as usize, req.category.as_deref(), |_| false)
            .into_iter()
            .filter_map(|s| self.data.ids.name(s.item).map(|n| (n.to_string(), s.score)))
            .collect();
        TopReply { items }
    }
}

impl Actor for ItemStats {
    type Msg = ItemStatsMsg;
    type State = ItemStatsState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _: ActorRef<ItemStatsMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<ItemStatsState, ActorProcessingErr> {
        ctx.health.begin_recovery(names::ITEM_STATS);
        let rt =
            ConsumerRuntime::load(&ctx, names::ITEM_STATS, "item_stats", ctx.streams()).await?;
        Ok(ItemStatsState {
            data: Stats::empty(ctx.clone()),
            ctx,
            rt,
            wake: Default::default(),
            followed: None,
            following: None,
            last_follow: None,
            follow_loads: 0,
            follow_deltas: 0,
            follow_error: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ItemStatsMsg>,
        st: &mut ItemStatsState,
    ) -> Result<(), ActorProcessingErr> {
        let p = st.ctx.settings.partitions;
        let started = std::time::Instant::now();
        let cp: Option<(Checkpoint, _)> = st
            .rt
            .load_checkpoint(
                &st.ctx,
                LEGACY_NAME,
                ITEM_STATS_CHECKPOINT_FORMAT,
                move |cp: &Checkpoint| crate::consumer::check_partitions(&cp.cursors, p),
            )
            .await?;
        let mut deltas_on_start = 0;
        if let Some((cp, deltas)) = cp {
            let cursors = st
                .data
                .load_full(cp)
                .map_err(|e| format!("checkpoint of {}: {e}", names::ITEM_STATS))?;
            st.rt
                .restore(cursors)
                .map_err(|e| format!("checkpoint of {}: {e}", names::ITEM_STATS))?;
            deltas_on_start = deltas.len();
            if let Some(cursors) = st
                .data
                .replay_deltas(deltas, 1)
                .map_err(|e| format!("checkpoint of {}: {e}", names::ITEM_STATS))?
            {
                st.rt
                    .restore(cursors)
                    .map_err(|e| format!("checkpoint of {}: {e}", names::ITEM_STATS))?;
            }
            // Deltas continue the chain just restored when it is this scope's own (its
            // sizes are known); otherwise the next checkpoint is a full one.
            st.data.chain = st.rt.restored_chain.unwrap_or_default();
            st.data.dirty.clear();
            st.data.dirty_categories.clear();
            st.data.names_at_checkpoint = st.data.ids.len();
            st.data.anchor_at_checkpoint = st.data.popularity.anchor();
        }
        let loaded_ms = started.elapsed().as_millis() as u64;
        let items_loaded = st.data.ids.len();
        st.rt.verify_log(&st.ctx).await?;
        let replayed = st.rt.step(&st.ctx, &mut st.data).await?;
        tracing::info!(
            items = items_loaded,
            deltas = deltas_on_start,
            load_ms = loaded_ms,
            replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "item stats recovered"
        );
        st.ctx.health.end_recovery(names::ITEM_STATS);
        st.wake = crate::consumer::follow_heads(&st.ctx, st.ctx.streams(), myself.clone(), || {
            ItemStatsMsg::HeadMoved
        });
        myself.send_interval(st.ctx.settings.poll_interval, || ItemStatsMsg::Tick);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<ItemStatsMsg>,
        msg: ItemStatsMsg,
        st: &mut ItemStatsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ItemStatsMsg::HeadMoved => {
                st.wake.store(false, std::sync::atomic::Ordering::Release);
                st.step(false).await?;
            }
            ItemStatsMsg::Tick => st.step(true).await?,
            ItemStatsMsg::Top(req, port) => {
                port.send(st.top(&req)).discard();
            }
            ItemStatsMsg::EventCount(item, port) => {
                let d = &st.data;
                let n = d
                    .ids
                    .get(&item)
                    .and_then(|i| d.events.get(i as usize).copied())
                    .filter(|&n| n > 0);
                port.send(n).discard();
            }
            ItemStatsMsg::Checkpoint(port) => {
                let r = st.rt.checkpoint(&st.ctx, &mut st.data).await;
                port.send(CheckpointReply::new(st.rt.positions(), r))
                    .discard();
            }
            ItemStatsMsg::Observe(port) => {
                let mut doc = st.rt.observe();
                doc["items"] = st.data.ids.len().into();
                doc["latest_event_ms"] = st.data.latest_ts_ms.into();
                doc["role"] = match &st.following {
                    None => "counting".into(),
                    Some(_) => "following".into(),
                };
                doc["following"] = st.following.clone().into();
                doc["followed"] = st.followed.as_ref().map_or(serde_json::Value::Null, |f| {
                    serde_json::json!({"scope": f.scope, "revision": f.revision, "deltas": f.deltas})
                });
                doc["follow_loads"] = st.follow_loads.into();
                doc["follow_deltas"] = st.follow_deltas.into();
                doc["follow_error"] = st.follow_error.clone().into();
                port.send(Observation::new(names::ITEM_STATS, doc))
                    .discard();
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
        let mut ids = IdMap::default();
        let i = ids.intern("lamp");
        let mut popularity = Popularity::new(0, 3600.0);
        popularity.add(i, 2.0, 100);
        popularity.set_categories(i, &["lights".to_string()]);
        let cp = Checkpoint {
            format: ITEM_STATS_CHECKPOINT_FORMAT,
            cursors: Cow::Owned(Cursors::default()),
            ids: Names::of(&ids),
            popularity: Cow::Owned(popularity),
            events: Cow::Owned(vec![3]),
            latest_ts_ms: 100_000,
        };
        let back: Checkpoint =
            crate::consumer::decode_checkpoint(&crate::codec::encode(&cp).unwrap()).unwrap();
        let top = back.popularity.top_k(5, Some("lights"), |_| false);
        assert_eq!(top.iter().map(|s| s.item).collect::<Vec<_>>(), vec![i]);
        assert_eq!(back.latest_ts_ms, 100_000);
        assert_eq!(&*back.events, &[3]);
    }

    #[test]
    fn names_round_trip_and_refuse_what_does_not_add_up() {
        let mut ids = IdMap::default();
        for n in ["lamp", "", "lampe à pied", "灯", "lamp2"] {
            ids.intern(n);
        }
        let bytes = crate::codec::encode(&Names::of(&ids)).unwrap();
        let back: Names = crate::consumer::decode_checkpoint(&bytes).unwrap();
        let back = back.into_ids().unwrap();
        assert_eq!(back.names(), ids.names());
        assert_eq!(back.get("灯"), Some(3));
        let split = Names {
            text: Cow::Borrowed("灯"),
            lengths: vec![1, 2],
        };
        assert!(split.into_ids().unwrap_err().contains("splits a character"));
        let short = Names {
            text: Cow::Borrowed("abc"),
            lengths: vec![2],
        };
        assert!(short.into_ids().is_err());
        let twice = Names {
            text: Cow::Borrowed("aa"),
            lengths: vec![1, 1],
        };
        assert!(twice.into_ids().unwrap_err().contains("twice"));
    }

    proptest! {
        #[test]
        fn checkpoint_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            drop(crate::consumer::decode_checkpoint::<Checkpoint>(&bytes));
            drop(crate::consumer::decode_checkpoint::<DeltaCheckpoint>(&bytes));
        }
    }

    fn stats(ctx: &Arc<Ctx>) -> Stats {
        let mut s = Stats::empty(ctx.clone());
        s.popularity = Popularity::new(0, 3600.0);
        s
    }

    fn event(item: &str, offset: u64) -> Record {
        Record {
            stream: 0,
            offset,
            key: offset as u128,
            at_ms: 1,
            payload: Payload::Event(crate::record::Event {
                event_id: None,
                user: "u".into(),
                item: item.into(),
                kind: "view".into(),
                value: None,
                ts_ms: 1_000_000 + offset as i64,
                request_id: None,
            }),
            trace: None,
        }
    }

    fn upsert(item: &str, category: &str) -> Record {
        Record {
            stream: crate::record::CATALOG_STREAM,
            offset: 1,
            key: 0,
            at_ms: 1,
            payload: Payload::ItemUpsert(crate::record::Item {
                id: item.into(),
                categories: vec![category.into()],
                ..Default::default()
            }),
            trace: None,
        }
    }

    /// After a restart the actor appends deltas to the chain it restored (no full
    /// checkpoint of the whole catalogue first), and the next start restores the full
    /// checkpoint, the old deltas and the new one to the counts of every event.
    #[tokio::test]
    async fn a_restart_continues_the_checkpoint_chain() {
        use crate::journal::{AppendEntry, AppendRequest, Journal, JournalMsg};
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = crate::store::Store::open(&dir.path().join("s.redb")).unwrap();
        let mut settings = crate::settings::Settings::defaults("t");
        settings.partitions = 1;
        let ctx = Arc::new(Ctx::new(settings, store, crate::faults::Faults::default()));
        let (j, _) = Actor::spawn(None, Journal, ctx.clone()).await.unwrap();
        let append = |from: u64, to: u64| {
            let j = j.clone();
            async move {
                let entries = (from..to)
                    .map(|o| AppendEntry::new(0, event(&format!("i{}", o % 50), o).payload))
                    .collect();
                let r = j
                    .call(|p| JournalMsg::Append(AppendRequest::new(entries), p), None)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(r.error, None);
            }
        };
        let count = |form: &str| {
            ctx.metrics
                .checkpoints
                .get_or_create(&crate::metrics::labels2(
                    "consumer",
                    "item_stats",
                    "form",
                    form,
                ))
                .get()
        };
        let run = |then: u64| {
            let ctx = ctx.clone();
            async move {
                let (a, h) = Actor::spawn(None, ItemStats, ctx.clone()).await.unwrap();
                if then > 0 {
                    let r = a
                        .call(ItemStatsMsg::Checkpoint, None)
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(r.error, None);
                }
                let mut counts = Vec::new();
                for i in 0..50 {
                    let n = a
                        .call(|p| ItemStatsMsg::EventCount(format!("i{i}"), p), None)
                        .await
                        .unwrap()
                        .unwrap();
                    counts.push(n.unwrap_or(0));
                }
                a.stop(None);
                h.await.unwrap();
                counts
            }
        };
        append(0, 200).await;
        run(1).await;
        assert_eq!((count("full"), count("delta")), (1, 0));
        append(200, 230).await;
        run(1).await;
        assert_eq!(
            (count("full"), count("delta")),
            (1, 1),
            "the checkpoint after a restart is a delta of the restored chain"
        );
        append(230, 260).await;
        run(1).await;
        assert_eq!((count("full"), count("delta")), (1, 2));
        let counts = run(0).await;
        let want: Vec<u64> = (0..50u64)
            .map(|i| (0..260u64).filter(|o| o % 50 == i).count() as u64)
            .collect();
        assert_eq!(
            counts, want,
            "full checkpoint + 2 deltas restore every count"
        );
        j.stop(None);
    }

    fn same_stats(a: &Stats, b: &Stats) {
        assert_eq!(a.ids.names(), b.ids.names());
        assert_eq!(a.events, b.events);
        for i in 0..a.ids.len() as u32 {
            assert_eq!(a.popularity.relative(i), b.popularity.relative(i));
            assert_eq!(a.popularity.categories_of(i), b.popularity.categories_of(i));
        }
        assert_eq!(a.latest_ts_ms, b.latest_ts_ms);
    }

    /// A following node takes the leader's published chain: the whole chain first, then
    /// only the deltas it gained, then the whole chain again once the leader wrote a new
    /// full checkpoint; each time its counts, categories and positions are the leader's.
    /// A chain that covers less of some stream than the follower holds is not taken.
    #[tokio::test]
    async fn a_follower_takes_the_leaders_published_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = crate::store::Store::open(&dir.path().join("s.redb")).unwrap();
        let mut settings = crate::settings::Settings::defaults("t");
        settings.partitions = 1;
        let ctx = Arc::new(Ctx::new(settings, store, crate::faults::Faults::default()));
        // The leader's scope as a member named "lead" writes it in a cluster.
        let lead_scope = crate::consumer::singleton_scope(names::ITEM_STATS, "lead");
        let streams = [0, crate::record::CATALOG_STREAM];
        let mut lead_rt = ConsumerRuntime::load(&ctx, &lead_scope, "item_stats", streams)
            .await
            .unwrap();
        let mut lead = stats(&ctx);
        let publish = |lead: &mut Stats, rt: &mut ConsumerRuntime, from: u64, to: u64| {
            for o in from..to {
                lead.apply(&event(&format!("i{}", o % 40), o)).unwrap();
            }
            lead.apply(&upsert(&format!("i{}", to % 40), &format!("c{to}")))
                .unwrap();
            rt.cursors.get_mut(&0).unwrap().applied = to;
        };
        let follower_rt = ConsumerRuntime::load(&ctx, names::ITEM_STATS, "item_stats", streams)
            .await
            .unwrap();
        let mut f = ItemStatsState {
            data: stats(&ctx),
            ctx: ctx.clone(),
            rt: follower_rt,
            wake: Default::default(),
            followed: None,
            following: None,
            last_follow: None,
            follow_loads: 0,
            follow_deltas: 0,
            follow_error: None,
        };
        // Nothing published yet: nothing taken.
        f.follow("lead").await.unwrap();
        assert!(f.followed.is_none());
        let mut offset = 300u64;
        publish(&mut lead, &mut lead_rt, 1, offset);
        lead_rt.checkpoint(&ctx, &mut lead).await.unwrap();
        f.follow("lead").await.unwrap();
        same_stats(&f.data, &lead);
        assert_eq!(f.rt.positions(), lead_rt.positions());
        assert_eq!((f.follow_loads, f.follow_deltas), (1, 0));
        // Two deltas: taken as deltas.
        for round in 0..2u64 {
            let from = offset + 1;
            offset += 25;
            publish(&mut lead, &mut lead_rt, from, offset + 1);
            let r = lead_rt.checkpoint(&ctx, &mut lead).await;
            assert!(r.is_ok(), "round {round}: {r:?}");
        }
        f.follow("lead").await.unwrap();
        same_stats(&f.data, &lead);
        assert_eq!(f.rt.positions(), lead_rt.positions());
        assert_eq!((f.follow_loads, f.follow_deltas), (1, 2));
        // Unchanged: nothing read again.
        f.follow("lead").await.unwrap();
        assert_eq!((f.follow_loads, f.follow_deltas), (1, 2));
        // A new full checkpoint replaces the chain: taken whole.
        publish(&mut lead, &mut lead_rt, offset + 1, offset + 30);
        offset += 29;
        lead.chain = DeltaChain::default();
        lead_rt.checkpoint(&ctx, &mut lead).await.unwrap();
        f.follow("lead").await.unwrap();
        same_stats(&f.data, &lead);
        assert_eq!((f.follow_loads, f.follow_deltas), (2, 2));
        // The follower's own checkpoint (full, then a delta) restores what it followed.
        f.rt.checkpoint(&f.ctx, &mut f.data).await.unwrap();
        publish(&mut lead, &mut lead_rt, offset + 1, offset + 10);
        offset += 9;
        lead_rt.checkpoint(&ctx, &mut lead).await.unwrap();
        f.follow("lead").await.unwrap();
        assert_eq!((f.follow_loads, f.follow_deltas), (2, 3));
        let (form, bytes) = f.data.snapshot(&f.rt).unwrap();
        assert_eq!(
            form,
            Form::Delta,
            "the follower's own chain goes on by deltas"
        );
        f.data.checkpointed(form, bytes.len(), true);
        // A chain behind this copy's positions waits.
        f.rt.cursors.get_mut(&0).unwrap().applied = offset + 1_000;
        publish(&mut lead, &mut lead_rt, offset + 1, offset + 5);
        lead.chain = DeltaChain::default();
        lead_rt.checkpoint(&ctx, &mut lead).await.unwrap();
        f.follow("lead").await.unwrap();
        assert_eq!(
            (f.follow_loads, f.follow_deltas),
            (2, 3),
            "a chain behind is not taken"
        );
    }

    /// A full checkpoint and the deltas after it restore exactly the state that wrote
    /// them; a delta holds only what changed, and a missing one is refused.
    #[tokio::test]
    async fn deltas_continue_the_full_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = crate::store::Store::open(&dir.path().join("s.redb")).unwrap();
        let ctx = Arc::new(Ctx::new(
            crate::settings::Settings::defaults("t"),
            store,
            crate::faults::Faults::default(),
        ));
        let rt = ConsumerRuntime::load(&ctx, names::ITEM_STATS, "item_stats", [0])
            .await
            .unwrap();
        let mut s = stats(&ctx);
        let mut written = Vec::new();
        for o in 1..=1000u64 {
            s.apply(&event(&format!("i{}", o % 300), o)).unwrap();
        }
        let (form, full) = s.snapshot(&rt).unwrap();
        assert_eq!(form, Form::Full);
        s.checkpointed(form, full.len(), true);
        for round in 0..3u64 {
            for o in 0..20u64 {
                s.apply(&event(
                    &format!("i{}", 290 + o + round),
                    2000 + round * 100 + o,
                ))
                .unwrap();
            }
            s.apply(&upsert(&format!("i{round}"), "lamps")).unwrap();
            let (form, d) = s.snapshot(&rt).unwrap();
            assert_eq!(form, Form::Delta, "round {round}");
            assert!(d.len() * 5 < full.len(), "a delta holds only what changed");
            s.checkpointed(form, d.len(), true);
            written.push(d);
        }
        let cp: Checkpoint = crate::consumer::decode_checkpoint(&full).unwrap();
        let mut back = stats(&ctx);
        back.ids = cp.ids.into_ids().unwrap();
        back.popularity = cp.popularity.into_owned();
        back.events = cp.events.into_owned();
        back.replay_deltas(written.clone(), 1).unwrap();
        assert_eq!(back.ids.len(), s.ids.len());
        assert_eq!(back.events, s.events);
        for i in 0..s.ids.len() as u32 {
            assert_eq!(back.ids.name(i), s.ids.name(i));
            assert_eq!(back.popularity.relative(i), s.popularity.relative(i));
            assert_eq!(
                back.popularity.categories_of(i),
                s.popularity.categories_of(i)
            );
        }
        assert_eq!(back.latest_ts_ms, s.latest_ts_ms);
        // A gap in the chain is refused.
        let mut gap = stats(&ctx);
        let cp: Checkpoint = crate::consumer::decode_checkpoint(&full).unwrap();
        gap.ids = cp.ids.into_ids().unwrap();
        gap.popularity = cp.popularity.into_owned();
        gap.events = cp.events.into_owned();
        assert!(gap.replay_deltas(written[1..].to_vec(), 1).is_err());
    }
}
