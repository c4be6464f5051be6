//! ItemStats: decayed item popularity, global and per category, on the events' clock,
//! and each item's undecayed event count. One per node, fed by every partition (counts)
//! and the catalog stream (categories); checkpoints `{state, cursor per stream}`.

use crate::Discard;
use std::borrow::Cow;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use serde::{Deserialize, Serialize};
use troupe_models::dataset::IdMap;
use troupe_models::popularity::Popularity;

use crate::consumer::{Apply, Consumer, ConsumerRuntime, Cursors};
use crate::ctx::Ctx;
use crate::messages::{CheckpointReply, Observation};
use crate::names;
use crate::record::{Payload, Record};
use crate::state::Form;
use crate::wire::WIRE_VERSION;
use crate::wire_payload;

pub const ITEM_STATS_CHECKPOINT_FORMAT: u16 = 4;
/// Where an older build kept the checkpoint in the embedded store's own table.
const LEGACY_NAME: &str = "item_stats";

/// Request for the most popular items.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopRequest {
    pub version: u16,
    pub n: u32,
    pub category: Option<String>,
    /// Evaluation time (ms); popularity decays on the events' clock.
    pub now_ms: i64,
}

/// Popular items, best first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopReply {
    pub version: u16,
    pub items: Vec<(String, f32)>,
}

wire_payload!(TopRequest, TopReply);

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
    ids: Cow<'a, IdMap>,
    popularity: Cow<'a, Popularity>,
    /// Events per interned item, every kind, undecayed.
    events: Cow<'a, [u64]>,
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
}

pub struct ItemStatsState {
    ctx: Arc<Ctx>,
    rt: ConsumerRuntime,
    /// A head-moved wake-up is queued (see `consumer::follow_heads`).
    wake: Arc<std::sync::atomic::AtomicBool>,
    data: Stats,
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
            }
            Payload::ItemDelete { id } => {
                if let Some(i) = self.ids.get(id) {
                    self.popularity.set_categories(i, &[]);
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
        if let Some(c) = ractor::registry::where_is(names::CATALOG) {
            c.send_message(crate::catalog::CatalogMsg::Placeholders(
                crate::messages::ItemIds {
                    version: WIRE_VERSION,
                    ids: std::mem::take(&mut self.new_items),
                },
            ))
            .discard();
        }
        self.new_items.clear();
    }

    fn snapshot(&mut self, rt: &ConsumerRuntime) -> Result<(Form, Vec<u8>), ActorProcessingErr> {
        let cp = Checkpoint {
            format: ITEM_STATS_CHECKPOINT_FORMAT,
            cursors: Cow::Borrowed(&rt.cursors),
            ids: Cow::Borrowed(&self.ids),
            popularity: Cow::Borrowed(&self.popularity),
            events: Cow::Borrowed(&self.events),
            latest_ts_ms: self.latest_ts_ms,
        };
        Ok((Form::Full, crate::codec::encode(&cp)?))
    }
}

impl ItemStatsState {
    fn top(&self, req: &TopRequest) -> TopReply {
        let items = self
            .data
            .popularity
            .top_k(req.n as usize, req.category.as_deref(), |_| false)
            .into_iter()
            .filter_map(|s| self.data.ids.name(s.item).map(|n| (n.to_string(), s.score)))
            .collect();
        TopReply {
            version: WIRE_VERSION,
            items,
        }
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
        let hl = ctx.settings.popularity_half_life.as_secs_f64();
        let rt =
            ConsumerRuntime::load(&ctx, names::ITEM_STATS, "item_stats", ctx.streams()).await?;
        Ok(ItemStatsState {
            data: Stats {
                ctx: ctx.clone(),
                ids: IdMap::default(),
                popularity: Popularity::new(0, hl),
                events: Vec::new(),
                latest_ts_ms: 0,
                new_items: Vec::new(),
            },
            ctx,
            rt,
            wake: Default::default(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ItemStatsMsg>,
        st: &mut ItemStatsState,
    ) -> Result<(), ActorProcessingErr> {
        let p = st.ctx.settings.partitions;
        let cp: Option<(Checkpoint, _)> = st
            .rt
            .load_checkpoint(
                &st.ctx,
                LEGACY_NAME,
                ITEM_STATS_CHECKPOINT_FORMAT,
                move |cp: &Checkpoint| crate::consumer::check_partitions(&cp.cursors, p),
            )
            .await?;
        if let Some((cp, _)) = cp {
            st.rt
                .restore(cp.cursors.into_owned())
                .map_err(|e| format!("checkpoint of {}: {e}", names::ITEM_STATS))?;
            st.data.ids = cp.ids.into_owned();
            st.data.popularity = cp.popularity.into_owned();
            st.data.events = cp.events.into_owned();
            st.data.latest_ts_ms = cp.latest_ts_ms;
        }
        st.rt.verify_log(&st.ctx).await?;
        st.rt.step(&st.ctx, &mut st.data).await?;
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
            ItemStatsMsg::HeadMoved | ItemStatsMsg::Tick => {
                st.wake.store(false, std::sync::atomic::Ordering::Release);
                st.rt.step(&st.ctx, &mut st.data).await?;
            }
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
            ids: Cow::Owned(ids),
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

    proptest! {
        #[test]
        fn checkpoint_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            drop(crate::consumer::decode_checkpoint::<Checkpoint>(&bytes));
        }
    }
}
