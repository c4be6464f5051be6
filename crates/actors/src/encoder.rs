//! ContentEncoder: embeds item texts in batches off the async runtime, with up to
//! `workers` batches in flight, and caches embeddings in the state store keyed by encoder
//! name and text hash, so neither a restart nor another node on the same shared store
//! recomputes them.

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

#[derive(RactorMessage)]
pub enum ContentEncoderMsg {
    /// `(item id, text)` pairs to embed.
    Encode(ItemTexts),
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
}

/// Hash of an item text (the cache key with the encoder name).
pub fn text_hash(text: &str) -> u128 {
    hash128(&[b"text", text.as_bytes()]).max(1)
}

async fn encode_batch(
    ctx: Arc<Ctx>,
    encoder: Arc<dyn TextEncoder>,
    name: Arc<str>,
    batch: Vec<(String, String)>,
) -> Result<(), String> {
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
    for (((id, text), h), c) in batch.into_iter().zip(hashes).zip(cached) {
        match c {
            Some(v) if v.len() == encoder.dim() => ready.push((id, h, v)),
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
            .map(|(id, _, _)| view.items.get(id).map(|i| text_hash(&i.embed_text())))
            .collect()
    };
    let mut index = ctx.content.write();
    for ((id, h, v), cur) in ready.into_iter().zip(current) {
        if cur == Some(h) {
            index.set(&id, h, &v);
        }
    }
    Ok(())
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
                    let text = i.embed_text();
                    (index.text_hash(&i.id) != Some(text_hash(&text))).then(|| (i.id.clone(), text))
                })
                .collect()
        };
        if !missing.is_empty() {
            myself.send_message(ContentEncoderMsg::Encode(ItemTexts {
                version: crate::wire::WIRE_VERSION,
                items: missing,
            }))?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<ContentEncoderMsg>,
        msg: ContentEncoderMsg,
        st: &mut ContentEncoderState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ContentEncoderMsg::Encode(texts) => {
                let items = texts.items;
                for (id, _) in &items {
                    match st.ctx.faults.on_key("content_encoder", id) {
                        Some(crate::faults::FaultAction::Panic) => {
                            panic!("injected panic in content_encoder on item {id}")
                        }
                        Some(crate::faults::FaultAction::Error) => {
                            return Err(
                                format!("injected fault in content_encoder on item {id}").into()
                            )
                        }
                        _ => {}
                    }
                }
                st.requested += items.len() as u64;
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
                    tokio::spawn(async move {
                        if let Err(e) = encode_batch(ctx, enc, name, chunk).await {
                            tracing::error!(error = %e, "encoding a batch of item texts failed");
                        }
                        drop(permit);
                    });
                }
            }
            ContentEncoderMsg::Observe(port) => {
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
                    }),
                )).discard();
            }
        }
        Ok(())
    }
}
