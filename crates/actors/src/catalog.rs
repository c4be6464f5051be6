//! Catalog: items (text, categories, hidden flag, attributes) from the journaled catalog
//! stream; upserts and deletes. Publishes the view the ranker filters with and feeds the
//! content encoder (ItemStats reads categories from the same stream itself). Items seen
//! only in events get a placeholder entry (derived, not journaled).

use crate::Discard;
use std::borrow::Cow;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::consumer::{Apply, Consumer, ConsumerRuntime, Cursors};
use crate::ctx::Ctx;
use crate::encoder::ContentEncoderMsg;
use crate::messages::{CheckpointReply, ItemIds, ItemTexts, Observation};
use crate::names;
use crate::record::{Item, Payload, Record, CATALOG_STREAM};
use crate::state::Form;
use crate::wire::WIRE_VERSION;

pub const CATALOG_CHECKPOINT_FORMAT: u16 = 3;
/// Where an older build kept the checkpoint in the embedded store's own table.
const LEGACY_NAME: &str = "catalog";

#[derive(RactorMessage)]
pub enum CatalogMsg {
    /// The head of a stream this consumer reads moved (from `consumer::follow_heads`).
    HeadMoved,
    Tick,
    /// Item ids seen in events (placeholders for unknown ones).
    Placeholders(ItemIds),
    Checkpoint(RpcReplyPort<CheckpointReply>),
    Observe(RpcReplyPort<Observation>),
}

#[derive(Serialize, Deserialize)]
struct Checkpoint<'a> {
    format: u16,
    cursors: Cow<'a, Cursors>,
    items: Cow<'a, FxHashMap<String, Item>>,
    deleted: Cow<'a, FxHashSet<String>>,
}

pub struct Catalog;

/// What records are applied to: the shared catalogue view, plus the work they leave for
/// after the step (texts to embed, embeddings to drop).
struct Items {
    ctx: Arc<Ctx>,
    encode: Vec<(String, String)>,
    removed: Vec<String>,
    upserts: u64,
    deletes: u64,
}

pub struct CatalogState {
    ctx: Arc<Ctx>,
    rt: ConsumerRuntime,
    /// A head-moved wake-up is queued (see `consumer::follow_heads`).
    wake: Arc<std::sync::atomic::AtomicBool>,
    data: Items,
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

impl Apply for Items {
    fn apply(&mut self, r: &Record) -> Result<(), ActorProcessingErr> {
        match &r.payload {
            Payload::ItemUpsert(item) => {
                self.encode.push((item.id.clone(), item.embed_text()));
                self.ctx.catalog.write().upsert(item.clone());
                self.upserts += 1;
            }
            Payload::ItemDelete { id } => {
                self.ctx.catalog.write().delete(id);
                self.removed.push(id.clone());
                self.deletes += 1;
            }
            Payload::Event(_) | Payload::EraseUser { .. } => {}
        }
        Ok(())
    }
}

impl Consumer for Items {
    /// Drops embeddings of deleted items, asks for new ones, publishes the position
    /// (waking reads that wait for it).
    fn stepped(&mut self, rt: &ConsumerRuntime) {
        let ctx = &self.ctx;
        // Lock order is content before catalog (the ranker's): never nest them here.
        if !self.removed.is_empty() {
            let mut content = ctx.content.write();
            self.removed.drain(..).for_each(|id| content.remove(&id));
        }
        send_encode(std::mem::take(&mut self.encode));
        let applied = rt.applied(CATALOG_STREAM);
        if ctx.catalog.read().applied != applied {
            ctx.catalog.write().applied = applied;
        }
        ctx.publish_applied(CATALOG_STREAM, applied);
    }

    fn snapshot(&mut self, rt: &ConsumerRuntime) -> Result<(Form, Vec<u8>), ActorProcessingErr> {
        let view = self.ctx.catalog.read();
        let cp = Checkpoint {
            format: CATALOG_CHECKPOINT_FORMAT,
            cursors: Cow::Borrowed(&rt.cursors),
            items: Cow::Borrowed(&view.items),
            deleted: Cow::Borrowed(&view.deleted),
        };
        Ok((Form::Full, crate::codec::encode(&cp)?))
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
        let rt = ConsumerRuntime::load(&ctx, names::CATALOG, "catalog", [CATALOG_STREAM]).await?;
        Ok(CatalogState {
            data: Items {
                ctx: ctx.clone(),
                encode: Vec::new(),
                removed: Vec::new(),
                upserts: 0,
                deletes: 0,
            },
            ctx,
            rt,
            wake: Default::default(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<CatalogMsg>,
        st: &mut CatalogState,
    ) -> Result<(), ActorProcessingErr> {
        let cp: Option<(Checkpoint, _)> = st
            .rt
            .load_checkpoint(
                &st.ctx,
                LEGACY_NAME,
                CATALOG_CHECKPOINT_FORMAT,
                |_: &Checkpoint| Ok(()),
            )
            .await?;
        // The view is rebuilt from the checkpoint (a restart must not keep stale entries).
        let items: Vec<(String, String)> = {
            let mut view = st.ctx.catalog.write();
            let placeholders = std::mem::take(&mut view.placeholders);
            *view = Default::default();
            view.placeholders = placeholders;
            if let Some((cp, _)) = cp {
                st.rt
                    .restore(cp.cursors.into_owned())
                    .map_err(|e| format!("checkpoint of {}: {e}", names::CATALOG))?;
                view.set_items(cp.items.into_owned());
                view.deleted = cp.deleted.into_owned();
            }
            view.items
                .values()
                .map(|i| (i.id.clone(), i.embed_text()))
                .collect()
        };
        send_encode(items);
        st.rt.verify_log(&st.ctx).await?;
        st.rt.step(&st.ctx, &mut st.data).await?;
        st.ctx.health.end_recovery(names::CATALOG);
        st.wake = crate::consumer::follow_heads(&st.ctx, [CATALOG_STREAM], myself.clone(), || {
            CatalogMsg::HeadMoved
        });
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
            CatalogMsg::HeadMoved | CatalogMsg::Tick => {
                st.wake.store(false, std::sync::atomic::Ordering::Release);
                st.rt.step(&st.ctx, &mut st.data).await?;
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
                let r = st.rt.checkpoint(&st.ctx, &mut st.data).await;
                port.send(CheckpointReply::new(st.rt.positions(), r))
                    .discard();
            }
            CatalogMsg::Observe(port) => {
                let (items, placeholders, deleted) = {
                    let v = st.ctx.catalog.read();
                    (v.items.len(), v.placeholders.len(), v.deleted.len())
                };
                let mut doc = st.rt.observe();
                doc["applied_offset"] = st.rt.applied(CATALOG_STREAM).into();
                doc["items"] = items.into();
                doc["placeholders"] = placeholders.into();
                doc["deleted"] = deleted.into();
                doc["upserts"] = st.data.upserts.into();
                doc["deletes"] = st.data.deletes.into();
                port.send(Observation::new(names::CATALOG, doc)).discard();
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
        let mut items = FxHashMap::default();
        items.insert(
            "a".to_string(),
            Item {
                id: "a".into(),
                text: "red lamp".into(),
                categories: vec!["lights".into()],
                hidden: true,
                attributes: [("k".to_string(), "v".to_string())].into(),
            },
        );
        let cp = Checkpoint {
            format: CATALOG_CHECKPOINT_FORMAT,
            cursors: Cow::Owned(Cursors::default()),
            items: Cow::Owned(items),
            deleted: Cow::Owned(["b".to_string()].into_iter().collect()),
        };
        let back: Checkpoint =
            crate::consumer::decode_checkpoint(&crate::codec::encode(&cp).unwrap()).unwrap();
        assert_eq!(back.items["a"], cp.items["a"]);
        assert!(back.deleted.contains("b"));
    }

    proptest! {
        #[test]
        fn checkpoint_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            drop(crate::consumer::decode_checkpoint::<Checkpoint>(&bytes));
        }
    }
}
