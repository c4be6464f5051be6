//! Catalog: items (text, categories, hidden flag, attributes) from the journaled catalog
//! stream; upserts and deletes. Publishes the view the ranker filters with, feeds the
//! content encoder and item categories to ItemStats. Items seen only in events get a
//! placeholder entry (derived, not journaled).

use crate::Discard;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorClusterMessage;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::consumer::Applier;
use crate::ctx::Ctx;
use crate::encoder::ContentEncoderMsg;
use crate::item_stats::{Categorize, ItemStatsMsg};
use crate::messages::{CheckpointReply, ItemIds, ItemTexts, Observation, RecordBatch};
use crate::metrics::labels2;
use crate::names;
use crate::record::{Item, Payload, Record, CATALOG_STREAM};
use crate::wire::WIRE_VERSION;

pub const CATALOG_CHECKPOINT_FORMAT: u16 = 1;
const CHECKPOINT_NAME: &str = "catalog";

#[derive(RactorClusterMessage)]
pub enum CatalogMsg {
    Committed(RecordBatch),
    Tick,
    /// Item ids seen in events (placeholders for unknown ones).
    Placeholders(ItemIds),
    #[rpc]
    Checkpoint(RpcReplyPort<CheckpointReply>),
    #[rpc]
    Observe(RpcReplyPort<Observation>),
}

#[derive(Serialize, Deserialize)]
struct Checkpoint<'a> {
    format: u16,
    applied: u64,
    items: Cow<'a, FxHashMap<String, Item>>,
    deleted: Cow<'a, FxHashSet<String>>,
}

pub struct Catalog;

pub struct CatalogState {
    ctx: Arc<Ctx>,
    applied: u64,
    applier: Option<Applier>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    upserts: u64,
    deletes: u64,
}

fn send_encode(items: Vec<(String, String)>) {
    if items.is_empty() {
        return;
    }
    if let Some(e) = ractor::registry::where_is(names::CONTENT_ENCODER) {
        e.send_message(ContentEncoderMsg::Encode(ItemTexts {
            version: WIRE_VERSION,
            items,
        }))
        .discard();
    }
}

fn send_categories(item: &Item) {
    if item.categories.is_empty() {
        return;
    }
    if let Some(s) = ractor::registry::where_is(names::ITEM_STATS) {
        s.send_message(ItemStatsMsg::Categorize(Categorize {
            version: WIRE_VERSION,
            item: item.id.clone(),
            categories: item.categories.clone(),
        }))
        .discard();
    }
}

impl CatalogState {
    async fn process(&mut self, records: Vec<Record>) -> Result<(), ActorProcessingErr> {
        let mut applier = self.applier.take().ok_or("applier missing")?;
        let ctx = self.ctx.clone();
        let mut applied = self.applied;
        let head = ctx.head(CATALOG_STREAM);
        let (buf, result) = applier
            .next_batch(&ctx, CATALOG_STREAM, &mut applied, records, head)
            .await;
        self.applier = Some(applier);
        let mut encode = Vec::new();
        let mut removed = Vec::new();
        {
            let mut view = ctx.catalog.write();
            for r in &buf {
                match &r.payload {
                    Payload::ItemUpsert(item) => {
                        encode.push((item.id.clone(), item.text.clone()));
                        send_categories(item);
                        view.upsert(item.clone());
                        self.upserts += 1;
                    }
                    Payload::ItemDelete { id } => {
                        view.delete(id);
                        removed.push(id.clone());
                        self.deletes += 1;
                    }
                    _ => {}
                }
            }
            view.applied = applied;
        }
        // Lock order is content before catalog (the ranker's): never nest them here.
        if !removed.is_empty() {
            let mut content = ctx.content.write();
            removed.iter().for_each(|id| content.remove(id));
        }
        self.applied = applied;
        send_encode(encode);
        self.since_checkpoint += result?;
        ctx.metrics
            .applied_offset
            .get_or_create(&labels2("consumer", "catalog", "stream", "catalog"))
            .set(applied as i64);
        Ok(())
    }

    async fn checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        let bytes = {
            let view = self.ctx.catalog.read();
            let cp = Checkpoint {
                format: CATALOG_CHECKPOINT_FORMAT,
                applied: self.applied,
                items: Cow::Borrowed(&view.items),
                deleted: Cow::Borrowed(&view.deleted),
            };
            bincode::serde::encode_to_vec(&cp, bincode::config::standard())?
        };
        crate::consumer::write_checkpoint(&self.ctx, CHECKPOINT_NAME.to_string(), bytes).await?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.ctx
            .note_checkpoint(names::CATALOG, CATALOG_STREAM, self.applied);
        Ok(())
    }
}

impl Actor for Catalog {
    type Msg = CatalogMsg;
    type State = CatalogState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _: ActorRef<CatalogMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<CatalogState, ActorProcessingErr> {
        ctx.health.begin_recovery(names::CATALOG);
        Ok(CatalogState {
            ctx,
            applied: 0,
            applier: None,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            upserts: 0,
            deletes: 0,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<CatalogMsg>,
        st: &mut CatalogState,
    ) -> Result<(), ActorProcessingErr> {
        let cp: Option<Checkpoint> = crate::consumer::load_checkpoint(
            &st.ctx,
            CHECKPOINT_NAME.to_string(),
            |cp: &Checkpoint| {
                crate::consumer::check_checkpoint(cp.format, CATALOG_CHECKPOINT_FORMAT, None)
            },
        )
        .await?;
        // The view is rebuilt from the checkpoint (a restart must not keep stale entries).
        let items: Vec<(String, String)> = {
            let mut view = st.ctx.catalog.write();
            let placeholders = std::mem::take(&mut view.placeholders);
            *view = Default::default();
            view.placeholders = placeholders;
            if let Some(cp) = cp {
                st.applied = cp.applied;
                view.set_items(cp.items.into_owned());
                view.deleted = cp.deleted.into_owned();
                view.applied = cp.applied;
            }
            view.items
                .values()
                .map(|i| (i.id.clone(), i.text.clone()))
                .collect()
        };
        send_encode(items);
        st.applier = Some(Applier::load(&st.ctx, names::CATALOG, "catalog").await?);
        st.process(Vec::new()).await?;
        st.ctx.health.end_recovery(names::CATALOG);
        myself.send_interval(st.ctx.settings.poll_interval, || CatalogMsg::Tick);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<CatalogMsg>,
        msg: CatalogMsg,
        st: &mut CatalogState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CatalogMsg::Committed(b) => {
                if b.stream == CATALOG_STREAM {
                    st.process(b.into_records()).await?;
                }
            }
            CatalogMsg::Tick => {
                if st.ctx.head(CATALOG_STREAM) > st.applied {
                    st.process(Vec::new()).await?;
                }
                let s = &st.ctx.settings;
                if st.since_checkpoint > 0
                    && (st.since_checkpoint >= s.checkpoint_every_records
                        || st.last_checkpoint.elapsed() >= s.checkpoint_interval)
                {
                    st.checkpoint().await?;
                }
            }
            CatalogMsg::Placeholders(ids) => {
                let mut view = st.ctx.catalog.write();
                for id in ids.ids {
                    if !view.items.contains_key(&id) {
                        view.placeholders.insert(id);
                    }
                }
            }
            CatalogMsg::Checkpoint(port) => {
                let r = st.checkpoint().await;
                port.send(CheckpointReply::new(vec![(CATALOG_STREAM, st.applied)], r))
                    .discard();
            }
            CatalogMsg::Observe(port) => {
                let (items, placeholders, deleted) = {
                    let v = st.ctx.catalog.read();
                    (v.items.len(), v.placeholders.len(), v.deleted.len())
                };
                port.send(Observation::new(
                    names::CATALOG,
                    serde_json::json!({
                        "applied_offset": st.applied,
                        "items": items,
                        "placeholders": placeholders,
                        "deleted": deleted,
                        "upserts": st.upserts,
                        "deletes": st.deletes,
                        "dead_lettered": st.applier.as_ref().map_or(0, |a| a.dead_lettered),
                    }),
                ))
                .discard();
            }
        }
        Ok(())
    }
}
