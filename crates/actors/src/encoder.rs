//! ContentEncoder: embeds item texts in batches off the async runtime, with up to
//! `workers` batches in flight, and caches embeddings in the state store keyed by encoder
//! name and text hash, so neither a restart nor another node on the same shared store
//! recomputes them.
//!
//! In a cluster every node's catalog sees every item, so every node would encode every
//! text. A text missing from the cache is encoded by one member: its *encoder owner*, the
//! rendezvous choice by text hash over this node and the peers it sees up. The others
//! defer it and read the cache again after a pause (doubling per attempt); after
//! [`MAX_DEFERS`] attempts, or once the owner is no longer up, they encode it themselves,
//! so a dead or slow owner costs time, never the embedding.

use crate::Discard;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use tokio::sync::Semaphore;
use troupe_models::content::TextEncoder;

use crate::ctx::Ctx;
use crate::messages::{ItemTexts, Observation};
use crate::names;
use crate::record::hash128;

/// Attempts a node defers a text whose encoder owner is another member before encoding
/// it itself.
pub const MAX_DEFERS: u32 = 6;
/// The first pause before a deferred text's cache is read again (doubled per attempt).
const DEFER_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(RactorMessage)]
pub enum ContentEncoderMsg {
    /// `(item id, text)` pairs to embed.
    Encode(ItemTexts),
    /// Texts deferred to their encoder owner, read again from the cache (attempt number).
    Deferred(Vec<(String, String)>, u32),
    Observe(RpcReplyPort<Observation>),
}

pub struct ContentEncoderArgs {
    pub ctx: Arc<Ctx>,
    pub encoder: Arc<dyn TextEncoder>,
    /// Stable name used as the cache key (changes when the model changes).
    pub encoder_name: String,
}

pub struct ContentEncoder;

pub struct ContentEncoderState {
    ctx: Arc<Ctx>,
    encoder: Arc<dyn TextEncoder>,
    name: Arc<str>,
    permits: Arc<Semaphore>,
    requested: u64,
    /// Texts waiting for their encoder owner (shown as pending work).
    deferred: Arc<std::sync::atomic::AtomicUsize>,
}

/// Hash of an item text (the cache key with the encoder name).
pub fn text_hash(text: &str) -> u128 {
    hash128(&[b"text", text.as_bytes()]).max(1)
}

/// The member that encodes a text missing from the cache: the rendezvous choice by text
/// hash over `members`.
pub fn encoder_owner<'a>(h: u128, members: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    members.into_iter().max_by_key(|m| {
        (
            hash128(&[&b"encoder"[..], &h.to_le_bytes(), m.as_bytes()]),
            *m,
        )
    })
}

/// Whether this node encodes text `h` now (one node; in a cluster, its encoder owner
/// among the members this node sees up, or any node once `attempt` reached the limit).
fn encodes_here(ctx: &Ctx, h: u128, attempt: u32) -> bool {
    let Some(cl) = &ctx.cluster else {
        return true;
    };
    if attempt >= MAX_DEFERS {
        return true;
    }
    let up: Vec<String> = cl
        .peers
        .lock()
        .iter()
        .filter(|(_, p)| p.state == crate::cluster::PeerState::Up)
        .map(|(n, _)| n.clone())
        .collect();
    let members = std::iter::once(cl.me.as_str()).chain(up.iter().map(String::as_str));
    encoder_owner(h, members) == Some(cl.me.as_str())
}

/// Encodes a batch (cache first); answers the texts deferred to their encoder owner.
async fn encode_batch(
    ctx: Arc<Ctx>,
    encoder: Arc<dyn TextEncoder>,
    name: Arc<str>,
    batch: Vec<(String, String)>,
    attempt: u32,
) -> Result<Vec<(String, String)>, String> {
    let hashes: Vec<u128> = batch.iter().map(|(_, t)| text_hash(t)).collect();
    // A cache that cannot be read costs recomputation, not the batch.
    let cached = match ctx.state.cache_get(&name, &hashes).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "embedding cache not read; computing");
            vec![None; hashes.len()]
        }
    };
    let cached = cached.into_iter().map(|c| {
        c.map(|b| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<f32>>()
        })
    });
    let mut missing = Vec::new();
    let mut ready = Vec::new();
    let mut deferred = Vec::new();
    for (((id, text), h), c) in batch.into_iter().zip(hashes).zip(cached) {
        match c {
            Some(v) if v.len() == encoder.dim() => ready.push((id, h, v)),
            _ if !encodes_here(&ctx, h, attempt) => deferred.push((id, text)),
            _ => missing.push((id, text, h)),
        }
    }
    ctx.metrics.embeddings_cached.inc_by(ready.len() as u64);
    if !missing.is_empty() {
        let enc = encoder.clone();
        let texts: Vec<String> = missing.iter().map(|(_, t, _)| t.clone()).collect();
        let emb = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            enc.encode(&refs)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let mut to_store = Vec::with_capacity(missing.len());
        for ((id, _, h), row) in missing.into_iter().zip(emb.rows()) {
            let v: Vec<f32> = row.to_vec();
            to_store.push((
                h,
                v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            ));
            ready.push((id, h, v));
        }
        ctx.metrics
            .embeddings_computed
            .inc_by(to_store.len() as u64);
        if let Err(e) = ctx.state.cache_put(&name, to_store).await {
            tracing::warn!(error = %e, "embeddings not cached");
        }
    }
    // Only rows whose text is still the item's current text are published (batches may
    // finish out of order).
    let current: Vec<Option<u128>> = {
        let view = ctx.catalog.read();
        ready
            .iter()
            .map(|(id, _, _)| {
                view.items
                    .get(id)
                    .map(|i| text_hash(&crate::catalog::embed_text(i)))
            })
            .collect()
    };
    let mut index = ctx.content.write();
    for ((id, h, v), cur) in ready.into_iter().zip(current) {
        if cur == Some(h) {
            index.set(&id, h, &v);
        }
    }
    Ok(deferred)
}

impl Actor for ContentEncoder {
    type Msg = ContentEncoderMsg;
    type State = ContentEncoderState;
    type Arguments = ContentEncoderArgs;

    async fn pre_start(
        &self,
        _: ActorRef<ContentEncoderMsg>,
        args: ContentEncoderArgs,
    ) -> Result<ContentEncoderState, ActorProcessingErr> {
        {
            let mut idx = args.ctx.content.write();
            if idx.encoder != args.encoder_name || idx.dim() != args.encoder.dim() {
                *idx = crate::content_index::ContentIndex::new(
                    args.encoder.dim(),
                    args.encoder_name.clone(),
                );
            }
        }
        let workers = args.ctx.settings.content.workers.max(1);
        Ok(ContentEncoderState {
            ctx: args.ctx,
            encoder: args.encoder,
            name: args.encoder_name.into(),
            permits: Arc::new(Semaphore::new(workers)),
            requested: 0,
            deferred: Default::default(),
        })
    }

    /// A restarted encoder lost its mailbox: re-request every catalogue item whose
    /// embedding is missing or stale (cache hits make this cheap).
    async fn post_start(
        &self,
        myself: ActorRef<ContentEncoderMsg>,
        st: &mut ContentEncoderState,
    ) -> Result<(), ActorProcessingErr> {
        let missing: Vec<(String, String)> = {
            let view = st.ctx.catalog.read();
            let index = st.ctx.content.read();
            view.items
                .values()
                .filter_map(|i| {
                    let text = crate::catalog::embed_text(i);
                    (index.text_hash(&i.id) != Some(text_hash(&text))).then(|| (i.id.clone(), text))
                })
                .collect()
        };
        if !missing.is_empty() {
            myself.send_message(ContentEncoderMsg::Encode(ItemTexts { items: missing }))?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ContentEncoderMsg>,
        msg: ContentEncoderMsg,
        st: &mut ContentEncoderState,
    ) -> Result<(), ActorProcessingErr> {
        let (items, attempt) = match msg {
            ContentEncoderMsg::Encode(texts) => (texts.items, 0),
            ContentEncoderMsg::Deferred(items, attempt) => {
                st.deferred
                    .fetch_sub(items.len(), std::sync::atomic::Ordering::Relaxed);
                (items, attempt)
            }
            ContentEncoderMsg::Observe(port) => {
                st.observe(port);
                return Ok(());
            }
        };
        for (id, _) in &items {
            match st.ctx.faults.on_key("content_encoder", id) {
                Some(crate::faults::FaultAction::Panic) => {
                    panic!("injected panic in content_encoder on item {id}")
                }
                Some(crate::faults::FaultAction::Error) => {
                    return Err(format!("injected fault in content_encoder on item {id}").into())
                }
                _ => {}
            }
        }
        if attempt == 0 {
            st.requested += items.len() as u64;
        }
        let batch = st.ctx.settings.content.batch_size.max(1);
        for chunk in items.chunks(batch) {
            // Waiting for a permit here is the backpressure: the mailbox holds
            // the rest while `workers` batches are encoding.
            let permit = st.permits.clone().acquire_owned().await?;
            let (ctx, enc, name, chunk) = (
                st.ctx.clone(),
                st.encoder.clone(),
                st.name.clone(),
                chunk.to_vec(),
            );
            let (me, waiting) = (myself.clone(), st.deferred.clone());
            tokio::spawn(async move {
                match encode_batch(ctx, enc, name, chunk, attempt).await {
                    Ok(deferred) if !deferred.is_empty() => {
                        // Counted as pending before the permit is released, so
                        // the node never looks idle while texts wait.
                        waiting.fetch_add(deferred.len(), std::sync::atomic::Ordering::Relaxed);
                        drop(permit);
                        tokio::time::sleep(DEFER_PAUSE * 2u32.pow(attempt.min(6))).await;
                        if me
                            .send_message(ContentEncoderMsg::Deferred(deferred, attempt + 1))
                            .is_err()
                        {
                            // The actor restarted: its post_start re-requests
                            // every item still missing.
                            tracing::debug!("deferred texts dropped with a stopped encoder");
                        }
                    }
                    Ok(_) => drop(permit),
                    Err(e) => {
                        tracing::error!(error = %e, "encoding a batch of item texts failed");
                        drop(permit);
                    }
                }
            });
        }
        Ok(())
    }
}

impl ContentEncoderState {
    fn observe(&self, port: RpcReplyPort<Observation>) {
        let st = self;
        let (n, dim, bytes, sparse) = {
            let idx = st.ctx.content.read();
            (idx.len(), idx.dim(), idx.heap_bytes(), idx.sparse())
        };
        port.send(Observation::new(
            names::CONTENT_ENCODER,
            serde_json::json!({
                "encoder": &*st.name,
                "dim": dim,
                "embedded_items": n,
                "index_bytes": bytes,
                "sparse_rows": sparse,
                "requested": st.requested,
                "in_flight_batches": st.ctx.settings.content.workers.max(1) - st.permits.available_permits(),
                "deferred_items": st.deferred.load(std::sync::atomic::Ordering::Relaxed),
            }),
        )).discard();
    }
}
