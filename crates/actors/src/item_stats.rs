//! ItemStats: decayed item popularity, global and per category, on the events' clock.
//! One per node, fed by every partition; checkpoints `{state, offsets per partition}`.

use crate::Discard;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorClusterMessage;
use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};
use troupe_models::dataset::IdMap;
use troupe_models::popularity::Popularity;

use crate::consumer::Applier;
use crate::ctx::Ctx;
use crate::messages::{CheckpointReply, Observation, RecordBatch};
use crate::metrics::labels2;
use crate::names;
use crate::record::{Payload, Record};
use crate::wire::WIRE_VERSION;
use crate::wire_payload;

pub const ITEM_STATS_CHECKPOINT_FORMAT: u16 = 1;
const CHECKPOINT_NAME: &str = "item_stats";

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

/// An item's categories, sent by the catalog.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Categorize {
    pub version: u16,
    pub item: String,
    pub categories: Vec<String>,
}

wire_payload!(TopRequest, TopReply, Categorize);

#[derive(RactorClusterMessage)]
pub enum ItemStatsMsg {
    Committed(RecordBatch),
    Tick,
    Categorize(Categorize),
    #[rpc]
    Top(TopRequest, RpcReplyPort<TopReply>),
    #[rpc]
    Checkpoint(RpcReplyPort<CheckpointReply>),
    #[rpc]
    Observe(RpcReplyPort<Observation>),
}

/// Borrowed when written, owned when read.
#[derive(Serialize, Deserialize)]
struct Checkpoint<'a> {
    format: u16,
    applied: Vec<u64>,
    ids: Cow<'a, IdMap>,
    categorized: Cow<'a, FxHashSet<u32>>,
    popularity: Cow<'a, Popularity>,
    latest_ts_ms: i64,
}

pub struct ItemStats;

pub struct ItemStatsState {
    ctx: Arc<Ctx>,
    applied: Vec<u64>,
    ids: IdMap,
    categorized: FxHashSet<u32>,
    popularity: Popularity,
    latest_ts_ms: i64,
    applier: Option<Applier>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    checkpoints: u64,
    new_items: Vec<String>,
}

impl ItemStatsState {
    fn apply(&mut self, r: &Record) {
        if let Payload::Event(e) = &r.payload {
            let new = self.ids.get(&e.item).is_none();
            let i = self.ids.intern(&e.item);
            if new {
                self.new_items.push(e.item.clone());
            }
            if !self.categorized.contains(&i) {
                let cats = self
                    .ctx
                    .catalog
                    .read()
                    .items
                    .get(&e.item)
                    .map(|it| it.categories.clone());
                if let Some(c) = cats {
                    self.popularity.set_categories(i, &c);
                    self.categorized.insert(i);
                }
            }
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
    }

    async fn process(
        &mut self,
        stream: u32,
        records: Vec<Record>,
    ) -> Result<(), ActorProcessingErr> {
        let mut applier = self.applier.take().ok_or("applier missing")?;
        let ctx = self.ctx.clone();
        let mut applied = self.applied[stream as usize];
        let head = ctx.head(stream);
        let (buf, result) = applier
            .next_batch(&ctx, stream, &mut applied, records, head)
            .await;
        self.applier = Some(applier);
        crate::consumer::apply_marked(&ctx, names::ITEM_STATS, &buf, |r| self.apply(r));
        self.applied[stream as usize] = applied;
        self.since_checkpoint += result?;
        self.ctx
            .metrics
            .applied_offset
            .get_or_create(&labels2("consumer", "item_stats", "stream", stream))
            .set(applied as i64);
        if !self.new_items.is_empty() {
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
        Ok(())
    }

    async fn checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        let cp = Checkpoint {
            format: ITEM_STATS_CHECKPOINT_FORMAT,
            applied: self.applied.clone(),
            ids: Cow::Borrowed(&self.ids),
            categorized: Cow::Borrowed(&self.categorized),
            popularity: Cow::Borrowed(&self.popularity),
            latest_ts_ms: self.latest_ts_ms,
        };
        crate::consumer::save_checkpoint(&self.ctx, CHECKPOINT_NAME.to_string(), &cp).await?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.checkpoints += 1;
        for (s, &o) in self.applied.iter().enumerate() {
            self.ctx.note_checkpoint(names::ITEM_STATS, s as u32, o);
        }
        Ok(())
    }

    async fn maybe_checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        let s = &self.ctx.settings;
        if self.since_checkpoint > 0
            && (self.since_checkpoint >= s.checkpoint_every_records
                || self.last_checkpoint.elapsed() >= s.checkpoint_interval)
        {
            self.checkpoint().await?;
        }
        Ok(())
    }

    fn top(&self, req: &TopRequest) -> TopReply {
        let now = if req.now_ms > 0 {
            req.now_ms
        } else {
            self.latest_ts_ms
        } / 1000;
        let items = self
            .popularity
            .top_k(req.n as usize, now, req.category.as_deref(), |_| false)
            .into_iter()
            .filter_map(|s| self.ids.name(s.item).map(|n| (n.to_string(), s.score)))
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
        let p = ctx.settings.partitions as usize;
        let hl = ctx.settings.popularity_half_life.as_secs_f64();
        Ok(ItemStatsState {
            ctx,
            applied: vec![0; p],
            ids: IdMap::default(),
            categorized: FxHashSet::default(),
            popularity: Popularity::new(0, hl),
            latest_ts_ms: 0,
            applier: None,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            checkpoints: 0,
            new_items: Vec::new(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ItemStatsMsg>,
        st: &mut ItemStatsState,
    ) -> Result<(), ActorProcessingErr> {
        let p = st.ctx.settings.partitions as usize;
        let cp: Option<Checkpoint> = crate::consumer::load_checkpoint(
            &st.ctx,
            CHECKPOINT_NAME.to_string(),
            move |cp: &Checkpoint| {
                crate::consumer::check_checkpoint(
                    cp.format,
                    ITEM_STATS_CHECKPOINT_FORMAT,
                    Some((cp.applied.len(), p)),
                )
            },
        )
        .await?;
        if let Some(cp) = cp {
            st.applied = cp.applied;
            st.ids = cp.ids.into_owned();
            st.categorized = cp.categorized.into_owned();
            st.popularity = cp.popularity.into_owned();
            st.latest_ts_ms = cp.latest_ts_ms;
        }
        st.applier = Some(Applier::load(&st.ctx, names::ITEM_STATS, "item_stats").await?);
        for s in 0..p as u32 {
            st.process(s, Vec::new()).await?;
        }
        st.ctx.health.end_recovery(names::ITEM_STATS);
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
            ItemStatsMsg::Committed(b) => {
                if (b.stream as usize) < st.applied.len() {
                    let s = b.stream;
                    st.process(s, b.into_records()).await?;
                }
            }
            ItemStatsMsg::Tick => {
                for s in 0..st.applied.len() as u32 {
                    if st.ctx.head(s) > st.applied[s as usize] {
                        st.process(s, Vec::new()).await?;
                    }
                }
                st.maybe_checkpoint().await?;
            }
            ItemStatsMsg::Categorize(c) => {
                let i = st.ids.intern(&c.item);
                st.popularity.set_categories(i, &c.categories);
                st.categorized.insert(i);
            }
            ItemStatsMsg::Top(req, port) => {
                port.send(st.top(&req)).discard();
            }
            ItemStatsMsg::Checkpoint(port) => {
                let r = st.checkpoint().await;
                port.send(CheckpointReply::partitions(&st.applied, r))
                    .discard();
            }
            ItemStatsMsg::Observe(port) => {
                port.send(Observation::new(
                    names::ITEM_STATS,
                    serde_json::json!({
                        "applied_offsets": st.applied,
                        "items": st.ids.len(),
                        "latest_event_ms": st.latest_ts_ms,
                        "checkpoints": st.checkpoints,
                        "dead_lettered": st.applier.as_ref().map_or(0, |a| a.dead_lettered),
                    }),
                ))
                .discard();
            }
        }
        Ok(())
    }
}
