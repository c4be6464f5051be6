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

use crate::consumer::{Apply, Consumer, ConsumerRuntime, Cursors, DeltaChain};
use crate::ctx::Ctx;
use crate::encoder::ContentEncoderMsg;
use crate::messages::{CheckpointReply, ItemIds, ItemTexts, Observation};
use crate::names;
use crate::record::{Item, Payload, Record, CATALOG_STREAM};
use crate::state::Form;

/// Format of the full checkpoint and of the deltas after it.
pub const CATALOG_CHECKPOINT_FORMAT: u16 = 3;

/// A full checkpoint is written once the deltas after the last one add up to this many
/// times its size, and at most `MAX_DELTAS` deltas follow one.
const COMPACT_RATIO: usize = 4;
const MAX_DELTAS: u64 = 256;
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

/// The items upserted and deleted since the previous checkpoint (full or delta).
#[derive(Serialize, Deserialize)]
struct DeltaCheckpoint<'a> {
    format: u16,
    /// 1 for the first delta after a full checkpoint, then 2, 3, ...
    seq: u64,
    cursors: Cow<'a, Cursors>,
    upserts: Vec<Item>,
    deletes: Vec<String>,
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
    /// Ids upserted or deleted since the previous checkpoint.
    changed: FxHashSet<String>,
    /// The checkpoint chain the next delta would continue.
    chain: DeltaChain,
}

pub struct CatalogState {
    ctx: Arc<Ctx>,
    rt: ConsumerRuntime,
    /// A head-moved wake-up is queued (see `consumer::follow_heads`).
    wake: Arc<std::sync::atomic::AtomicBool>,
    data: Items,
}

/// What the content model embeds for an item: the text `troupe eval` embeds (the item
/// text, then its categories).
pub fn embed_text(item: &Item) -> String {
    troupe_models::data::content_text(&item.text, &item.categories, &[])
}

fn send_encode(items: Vec<(String, String)>) {
    if items.is_empty() {
        return;
    }
    crate::handles::content_encoder().tell(ContentEncoderMsg::Encode(ItemTexts { items }));
}

impl Items {
    fn new(ctx: Arc<Ctx>) -> Self {
        Items {
            ctx,
            encode: Vec::new(),
            removed: Vec::new(),
            upserts: 0,
            deletes: 0,
            changed: Default::default(),
            chain: DeltaChain::default(),
        }
    }
}

impl Apply for Items {
    fn apply(&mut self, r: &Record) -> Result<(), ActorProcessingErr> {
        match &r.payload {
            Payload::ItemUpsert(item) => {
                self.encode.push((item.id.clone(), embed_text(item)));
                self.ctx.catalog.write().upsert(item.clone());
                self.changed.insert(item.id.clone());
                self.upserts += 1;
            }
            Payload::ItemDelete { id } => {
                self.ctx.catalog.write().delete(id);
                self.removed.push(id.clone());
                self.changed.insert(id.clone());
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

    /// A delta of the items changed since the previous checkpoint while the deltas stay
    /// small next to the full checkpoint, otherwise a full one.
    fn snapshot(&mut self, rt: &ConsumerRuntime) -> Result<(Form, Vec<u8>), ActorProcessingErr> {
        let view = self.ctx.catalog.read();
        let mut delta = None;
        if self.chain.open(MAX_DELTAS) {
            let mut changed: Vec<&String> = self.changed.iter().collect();
            changed.sort();
            let (mut upserts, mut deletes) = (Vec::new(), Vec::new());
            for id in changed {
                match view.items.get(id) {
                    Some(item) => upserts.push(item.clone()),
                    None => deletes.push(id.clone()),
                }
            }
            let d = DeltaCheckpoint {
                format: CATALOG_CHECKPOINT_FORMAT,
                seq: self.chain.next_seq(),
                cursors: Cow::Borrowed(&rt.cursors),
                upserts,
                deletes,
            };
            delta = Some(crate::codec::encode(&d)?);
        }
        let out = self.chain.choose(delta, COMPACT_RATIO, || {
            crate::codec::encode(&Checkpoint {
                format: CATALOG_CHECKPOINT_FORMAT,
                cursors: Cow::Borrowed(&rt.cursors),
                items: Cow::Borrowed(&view.items),
                deleted: Cow::Borrowed(&view.deleted),
            })
        })?;
        drop(view);
        self.changed.clear();
        Ok(out)
    }

    fn checkpointed(&mut self, form: Form, bytes: usize, written: bool) {
        self.chain.written(form, bytes, written);
    }
}

/// Applies the deltas written after a full checkpoint to `view`, in order; the cursors of
/// the last one (`None`: no deltas).
fn replay_deltas(
    view: &mut crate::serving::CatalogView,
    deltas: Vec<Vec<u8>>,
) -> Result<Option<Cursors>, String> {
    let mut cursors = None;
    for (k, bytes) in deltas.into_iter().enumerate() {
        let d: DeltaCheckpoint = crate::consumer::decode_delta(
            &bytes,
            k as u64 + 1,
            CATALOG_CHECKPOINT_FORMAT,
            |d: &DeltaCheckpoint| d.seq,
        )?;
        for item in d.upserts {
            view.upsert(item);
        }
        for id in d.deletes {
            view.delete(&id);
        }
        cursors = Some(d.cursors.into_owned());
    }
    Ok(cursors)
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
            data: Items::new(ctx.clone()),
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
        let started = std::time::Instant::now();
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
            if let Some((cp, deltas)) = cp {
                st.rt
                    .restore(cp.cursors.into_owned())
                    .map_err(|e| format!("checkpoint of {}: {e}", names::CATALOG))?;
                view.set_items(cp.items.into_owned());
                view.deleted = cp.deleted.into_owned();
                if let Some(cursors) = replay_deltas(&mut view, deltas)
                    .map_err(|e| format!("checkpoint of {}: {e}", names::CATALOG))?
                {
                    st.rt
                        .restore(cursors)
                        .map_err(|e| format!("checkpoint of {}: {e}", names::CATALOG))?;
                }
            }
            view.items
                .values()
                .map(|i| (i.id.clone(), embed_text(i)))
                .collect()
        };
        // Deltas continue the chain just restored when it is this scope's own.
        st.data.chain = st.rt.restored_chain.unwrap_or_default();
        st.data.changed.clear();
        let (loaded, loaded_ms) = (items.len(), started.elapsed().as_millis() as u64);
        send_encode(items);
        st.rt.verify_log(&st.ctx).await?;
        let replayed = st.rt.step(&st.ctx, &mut st.data).await?;
        tracing::info!(
            items = loaded,
            load_ms = loaded_ms,
            replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "catalog recovered"
        );
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
            drop(crate::consumer::decode_checkpoint::<DeltaCheckpoint>(&bytes));
        }
    }

    fn record(payload: Payload) -> Record {
        Record {
            stream: CATALOG_STREAM,
            offset: 1,
            key: 0,
            at_ms: 1,
            payload,
            trace: None,
        }
    }

    fn item(id: &str, text: &str) -> Payload {
        Payload::ItemUpsert(Item {
            id: id.into(),
            text: text.into(),
            ..Default::default()
        })
    }

    /// A full checkpoint and the deltas after it rebuild the view that wrote them: upserts,
    /// re-upserts, deletes (and a delete then an upsert) in the order they happened.
    #[tokio::test]
    async fn deltas_continue_the_full_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = crate::store::Store::open(&dir.path().join("s.redb")).unwrap();
        let ctx = Arc::new(Ctx::new(
            crate::settings::Settings::defaults("t"),
            store,
            crate::faults::Faults::default(),
        ));
        let rt = ConsumerRuntime::load(&ctx, names::CATALOG, "catalog", [CATALOG_STREAM])
            .await
            .unwrap();
        let mut items = Items::new(ctx.clone());
        for i in 0..500 {
            items
                .apply(&record(item(&format!("i{i}"), "a lamp")))
                .unwrap();
        }
        let (form, full) = items.snapshot(&rt).unwrap();
        assert_eq!(form, Form::Full);
        items.checkpointed(form, full.len(), true);
        let steps = [
            vec![
                item("i1", "a red lamp"),
                Payload::ItemDelete { id: "i2".into() },
            ],
            vec![
                item("new", "a chair"),
                Payload::ItemDelete { id: "i3".into() },
            ],
            vec![
                item("i2", "back again"),
                Payload::ItemDelete { id: "new".into() },
            ],
        ];
        let mut deltas = Vec::new();
        for step in steps {
            for p in step {
                items.apply(&record(p)).unwrap();
            }
            let (form, d) = items.snapshot(&rt).unwrap();
            assert_eq!(form, Form::Delta);
            assert!(d.len() * 10 < full.len(), "a delta holds only what changed");
            items.checkpointed(form, d.len(), true);
            deltas.push(d);
        }
        let cp: Checkpoint = crate::consumer::decode_checkpoint(&full).unwrap();
        let mut view = crate::serving::CatalogView::default();
        view.set_items(cp.items.into_owned());
        view.deleted = cp.deleted.into_owned();
        replay_deltas(&mut view, deltas.clone()).unwrap();
        let now = ctx.catalog.read();
        assert_eq!(view.items, now.items);
        assert_eq!(view.deleted, now.deleted);
        assert_eq!(view.items["i1"].text, "a red lamp");
        assert!(view.items.contains_key("i2") && !view.items.contains_key("i3"));
        assert!(!view.items.contains_key("new") && view.deleted.contains("new"));
        drop(now);
        let mut gap = crate::serving::CatalogView::default();
        assert!(replay_deltas(&mut gap, deltas[1..].to_vec()).is_err());
    }
}
