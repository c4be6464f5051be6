//! AlsTrainer: retrains ALS every N applied events or T from the partitions' compact
//! interaction stores ([`crate::user_store`], the same events the feature store serves
//! from; the trainer keeps no copy of its own), validates the candidate against the
//! serving model on held-out interactions, and swaps it in atomically only when its
//! NDCG@10 is not worse (refit on every interaction first, so the held-out rows are not
//! missing from what serves). Versions are kept in the store for rollback; serving
//! continues on the old version while a retrain runs.

use crate::Discard;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use troupe_models::als::{self, FoldIn};
use troupe_models::dataset::IdMap;
use troupe_models::metrics::user_metrics;
use troupe_models::sparse::Csr;
use troupe_models::topk;

use crate::ctx::Ctx;
use crate::messages::Observation;
use crate::metrics::label;
use crate::names;
use crate::serving::{AlsServing, AlsSnapshot};
use crate::wire::WIRE_VERSION;
use crate::wire_payload;

/// Name of the checkpoint older builds kept (a second copy of every interaction); it is
/// deleted at start.
const OLD_CHECKPOINT_NAME: &str = "als_trainer";
/// Model snapshots are blobs named by version (zero-padded, so names sort by version) in
/// the state store.
const MODEL_PREFIX: &str = "models/als/";

fn model_blob(version: u64) -> String {
    format!("{MODEL_PREFIX}{version:020}")
}

/// Stored model versions, oldest first (with the embedded backend, also those an older
/// build kept in the store's own table).
async fn model_versions(ctx: &Ctx) -> Result<Vec<u64>, ActorProcessingErr> {
    let mut out: Vec<u64> = ctx
        .state
        .blob_names(MODEL_PREFIX)
        .await?
        .iter()
        .filter_map(|n| n.strip_prefix(MODEL_PREFIX)?.parse().ok())
        .collect();
    if ctx.state.backend() == "embedded" {
        let store = ctx.store.clone();
        out.extend(tokio::task::spawn_blocking(move || store.model_versions()).await??);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Stores a model snapshot (a blob under a new name: readers see it whole or not at all)
/// and deletes all but the newest `keep` versions.
async fn put_model(
    ctx: &Ctx,
    version: u64,
    bytes: Vec<u8>,
    keep: usize,
) -> Result<(), ActorProcessingErr> {
    ctx.state.put_blob(&model_blob(version), bytes).await?;
    let versions = model_versions(ctx).await?;
    let drop = versions.len().saturating_sub(keep.max(1));
    for &v in &versions[..drop] {
        delete_model(ctx, v).await?;
    }
    Ok(())
}

async fn delete_model(ctx: &Ctx, version: u64) -> Result<(), ActorProcessingErr> {
    ctx.state.delete_blob(&model_blob(version)).await?;
    if ctx.state.backend() == "embedded" {
        let store = ctx.store.clone();
        tokio::task::spawn_blocking(move || store.delete_model(version)).await??;
    }
    Ok(())
}

/// How long a requested retrain waits for the feature stores to apply what was acked
/// before the request.
const RETRAIN_FRESHNESS_WAIT: Duration = Duration::from_secs(60);

/// Outcome of one retrain.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RetrainReport {
    pub version: u16,
    pub model_version: u64,
    pub accepted: bool,
    pub reason: String,
    pub candidate_ndcg: f64,
    pub serving_ndcg: f64,
    pub validation_users: u32,
    pub interactions: u64,
    pub users: u32,
    pub items: u32,
    pub train_ms: u64,
    pub serving_version: u64,
}

/// Result of a rollback.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RollbackReply {
    pub version: u16,
    pub serving_version: u64,
    pub error: Option<String>,
}

wire_payload!(RetrainReport, RollbackReply);

#[derive(RactorMessage)]
pub enum AlsTrainerMsg {
    Tick,
    /// A training task finished (its result waits in the state).
    Trained(u64),
    Retrain(RpcReplyPort<RetrainReport>),
    Rollback(RpcReplyPort<RollbackReply>),
    Observe(RpcReplyPort<Observation>),
}

pub struct AlsTrainer;

type Finished = Arc<Mutex<Option<(RetrainReport, Option<AlsServing>)>>>;

pub struct AlsTrainerState {
    ctx: Arc<Ctx>,
    /// Sum of the partitions' applied offsets when the last training started (the
    /// retrain cadence counts events from it).
    trained_at: u64,
    last_train: Instant,
    next_version: u64,
    training: bool,
    waiting: Vec<RpcReplyPort<RetrainReport>>,
    finished: Finished,
    reports: Vec<RetrainReport>,
}

/// What a training run needs (a copy, so the actor keeps consuming meanwhile).
struct TrainInput {
    version: u64,
    /// [`als::row_key`] of every user id, by the trainer's user index.
    user_keys: Vec<u64>,
    items: IdMap,
    pairs: Pairs,
    params: als::AlsParams,
    validation_users: usize,
    serving: Option<Arc<AlsServing>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// NDCG@10 of one model on the held-out item of each user, folding each user in from
/// their training interactions (names, so models with different item indices compare).
fn holdout_ndcg(
    items: &IdMap,
    factors: ndarray::ArrayView2<f32>,
    fold: &FoldIn,
    cases: &[(Vec<(&str, f32)>, &str)],
) -> f64 {
    if cases.is_empty() {
        return 0.0;
    }
    let mut scratch = Vec::new();
    let mut total = 0.0;
    for (train, target) in cases {
        let inter: Vec<(u32, f32)> = train
            .iter()
            .filter_map(|(n, w)| items.get(n).map(|i| (i, *w)))
            .collect();
        let Some(t) = items.get(target) else { continue };
        let own: FxHashSet<u32> = inter.iter().map(|p| p.0).collect();
        let v = fold.solve(factors, &inter);
        let top = topk::top_k_dense(factors, &v, 10, |i| own.contains(&i), &mut scratch);
        let ranked: Vec<u32> = top.iter().map(|s| s.item).collect();
        let rel: FxHashSet<u32> = [t].into_iter().collect();
        total += user_metrics(&ranked, &rel, 10).ndcg;
    }
    total / cases.len() as f64
}

fn train(input: TrainInput) -> (RetrainReport, Option<AlsServing>) {
    let started = Instant::now();
    let mut report = RetrainReport {
        version: WIRE_VERSION,
        model_version: input.version,
        interactions: input.pairs.len() as u64,
        users: input.user_keys.len() as u32,
        items: input.items.len() as u32,
        serving_version: input.serving.as_ref().map_or(0, |s| s.version),
        ..Default::default()
    };
    if input.pairs.is_empty() {
        report.reason = "no interactions to train on".into();
        return (report, None);
    }
    // Hold out the latest interaction of up to `validation_users` users with >= 3.
    let mut by_user: FxHashMap<u32, Vec<usize>> = FxHashMap::default();
    for (k, p) in input.pairs.iter().enumerate() {
        by_user.entry(p.0).or_default().push(k);
    }
    let mut candidates: Vec<u32> = by_user
        .iter()
        .filter(|(_, v)| v.len() >= 3)
        .map(|(&u, _)| u)
        .collect();
    candidates.sort_unstable_by_key(|&u| (crate::record::hash128(&[&u.to_le_bytes()]), u));
    candidates.truncate(input.validation_users);
    let mut held: FxHashSet<usize> = FxHashSet::default();
    for u in &candidates {
        let v = &by_user[u];
        if let Some(&k) = v.iter().max_by_key(|&&k| (input.pairs[k].3, k)) {
            held.insert(k);
        }
    }
    let triples: Vec<(u32, u32, f32)> = input
        .pairs
        .iter()
        .enumerate()
        .filter(|(k, _)| !held.contains(k))
        .map(|(_, p)| (p.0, p.1, p.2))
        .collect();
    let item_keys = input.items.row_keys();
    let csr = Csr::from_triples(input.user_keys.len(), input.items.len(), &triples);
    let model = match als::fit_keyed(&csr, &input.params, &input.user_keys, &item_keys) {
        Ok(m) => m,
        Err(e) => {
            report.reason = format!("training failed: {e}");
            return (report, None);
        }
    };
    let fold = FoldIn::new(model.item_factors.view(), &model.params);
    // Validation cases by name.
    let cases: Vec<(Vec<(&str, f32)>, &str)> = candidates
        .iter()
        .filter_map(|u| {
            let v = &by_user[u];
            let hk = v.iter().copied().find(|k| held.contains(k))?;
            let target = input.items.name(input.pairs[hk].1)?;
            let train: Vec<(&str, f32)> = v
                .iter()
                .filter(|&&k| k != hk)
                .filter_map(|&k| {
                    input
                        .items
                        .name(input.pairs[k].1)
                        .map(|n| (n, input.pairs[k].2))
                })
                .collect();
            Some((train, target))
        })
        .collect();
    report.validation_users = cases.len() as u32;
    report.candidate_ndcg = holdout_ndcg(&input.items, model.item_factors.view(), &fold, &cases);
    report.serving_ndcg = match &input.serving {
        Some(s) => holdout_ndcg(&s.items, s.item_factors.view(), &s.fold_in, &cases),
        None => 0.0,
    };
    // A small tolerance: the two NDCGs are estimates on the same few hundred users.
    if input.serving.is_some() && report.candidate_ndcg + 1e-9 < report.serving_ndcg {
        report.train_ms = started.elapsed().as_millis() as u64;
        report.reason = "candidate NDCG@10 is below the serving model's".into();
        return (report, None);
    }
    drop(cases);
    // Validation held rows out; the model that serves learns from every row (as the
    // model `troupe eval` scores does).
    let (model, fold) = if held.is_empty() {
        (model, fold)
    } else {
        let all: Vec<(u32, u32, f32)> = input.pairs.iter().map(|p| (p.0, p.1, p.2)).collect();
        let csr = Csr::from_triples(input.user_keys.len(), input.items.len(), &all);
        match als::fit_keyed(&csr, &input.params, &input.user_keys, &item_keys) {
            Ok(m) => {
                let f = FoldIn::new(m.item_factors.view(), &m.params);
                (m, f)
            }
            Err(e) => {
                report.train_ms = started.elapsed().as_millis() as u64;
                report.reason = format!("refit on every interaction failed: {e}");
                return (report, None);
            }
        }
    };
    report.train_ms = started.elapsed().as_millis() as u64;
    report.accepted = true;
    report.reason = "accepted".into();
    let serving = AlsServing {
        version: input.version,
        items: input.items,
        item_factors: model.item_factors,
        fold_in: fold,
        params: model.params,
        validation_ndcg: report.candidate_ndcg,
        trained_at_ms: now_ms(),
        interactions: report.interactions,
    };
    (report, Some(serving))
}

/// `(user, item, summed weight, latest ts ms)` by the trainer's indices.
type Pairs = Vec<(u32, u32, f32, i64)>;

/// The trainer's input from every partition's interaction store: `(users, items,
/// (user, item, summed weight, latest ts))`. Each partition is read under its read lock,
/// one after the other (its applies wait meanwhile).
fn gather(ctx: &Ctx) -> (IdMap, IdMap, Pairs) {
    let rules = ctx.user_rules();
    let mut users = IdMap::default();
    let mut items = IdMap::default();
    let mut pairs = Vec::new();
    for store in &ctx.user_stores {
        let store = store.read();
        pairs.reserve(store.events() / 2);
        store.for_each_interest(&rules, |u, i, x| {
            pairs.push((users.intern(u), items.intern(i), x.weight, x.ts));
        });
    }
    pairs.shrink_to_fit();
    (users, items, pairs)
}

impl AlsTrainerState {
    /// Sum of the partitions' applied offsets (grows with every applied event).
    fn applied_total(&self) -> u64 {
        (0..self.ctx.settings.partitions)
            .map(|p| self.ctx.applied(p))
            .sum()
    }

    /// Events held by the partition stores.
    fn events_held(&self) -> usize {
        self.ctx.user_stores.iter().map(|s| s.read().events()).sum()
    }

    /// True while a partition's feature store is still loading or replaying.
    fn partitions_recovering(&self) -> bool {
        self.ctx
            .health
            .recovering()
            .iter()
            .any(|n| n.starts_with(names::USER_FEATURES_PREFIX))
    }

    /// Starts a training run in the background. With `fresh`, the run first waits until
    /// every partition has applied what its journal held at this call (what was acked
    /// before a requested retrain is trained on).
    fn start_training(&mut self, myself: &ActorRef<AlsTrainerMsg>, fresh: bool) {
        if self.training {
            return;
        }
        self.training = true;
        self.trained_at = self.applied_total();
        self.last_train = Instant::now();
        let version = self.next_version;
        self.next_version += 1;
        let ctx = self.ctx.clone();
        let slot = self.finished.clone();
        let me = myself.clone();
        // A cluster node trains on the partitions it serves (the others' stores are
        // empty here).
        let heads: Vec<(u32, u64)> = (0..ctx.settings.partitions)
            .filter(|&p| ctx.serving(p))
            .map(|p| (p, ctx.head(p)))
            .collect();
        tokio::spawn(async move {
            if fresh {
                for &(p, h) in &heads {
                    if !ctx.wait_applied(p, h, RETRAIN_FRESHNESS_WAIT).await {
                        tracing::warn!(partition = p, "retrain starts before partition caught up");
                    }
                }
            }
            let out = tokio::task::spawn_blocking(move || {
                let (users, items, pairs) = gather(&ctx);
                train(TrainInput {
                    version,
                    user_keys: users.row_keys(),
                    items,
                    pairs,
                    params: ctx.settings.als.params.clone(),
                    validation_users: ctx.settings.als.validation_users,
                    serving: ctx.als.load_full(),
                })
            })
            .await;
            let out = out.unwrap_or_else(|e| {
                (
                    RetrainReport {
                        version: WIRE_VERSION,
                        model_version: version,
                        reason: format!("training task failed: {e}"),
                        ..Default::default()
                    },
                    None,
                )
            });
            *slot.lock() = Some(out);
            me.send_message(AlsTrainerMsg::Trained(version)).discard();
        });
    }

    async fn finish_training(&mut self) -> Result<(), ActorProcessingErr> {
        self.training = false;
        // The training run's buffers are freed: hand their pages back.
        tokio::task::spawn_blocking(crate::alloc::trim).await?;
        let Some((mut report, model)) = self.finished.lock().take() else {
            return Ok(());
        };
        if let Some(model) = model {
            let snap = model.to_snapshot();
            let keep = self.ctx.settings.als.keep_versions;
            let v = model.version;
            let bytes = tokio::task::spawn_blocking(move || crate::codec::encode(&snap)).await??;
            let r = put_model(&self.ctx, v, bytes, keep).await;
            match r {
                Ok(()) => {
                    self.ctx.als.store(Some(Arc::new(model)));
                    self.ctx.metrics.model_version.set(v as i64);
                    report.serving_version = v;
                    tracing::info!(
                        model_version = v,
                        ndcg = report.candidate_ndcg,
                        previous = report.serving_ndcg,
                        train_ms = report.train_ms,
                        "als model swapped in"
                    );
                }
                Err(e) => {
                    report.accepted = false;
                    report.reason = format!("could not persist the model: {e}");
                }
            }
        } else {
            tracing::info!(model_version = report.model_version, reason = %report.reason, "als candidate rejected");
        }
        self.ctx
            .metrics
            .retrains
            .get_or_create(&label(
                "outcome",
                if report.accepted {
                    "accepted"
                } else {
                    "rejected"
                },
            ))
            .inc();
        for port in self.waiting.drain(..) {
            port.send(report.clone()).discard();
        }
        self.reports.push(report);
        if self.reports.len() > 10 {
            self.reports.remove(0);
        }
        Ok(())
    }
}

/// Loads a stored model version.
async fn load_model(ctx: &Ctx, version: u64) -> Result<Option<AlsServing>, ActorProcessingErr> {
    let mut bytes = ctx.state.get_blob(&model_blob(version)).await?;
    if bytes.is_none() && ctx.state.backend() == "embedded" {
        let store = ctx.store.clone();
        bytes = tokio::task::spawn_blocking(move || store.get_model(version)).await??;
    }
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    let m = tokio::task::spawn_blocking(move || -> Result<AlsServing, ActorProcessingErr> {
        let snap: AlsSnapshot = crate::codec::decode(&bytes)
            .map_err(|e| format!("model snapshot {version} does not decode: {e}"))?;
        Ok(AlsServing::from_snapshot(snap)?)
    })
    .await??;
    Ok(Some(m))
}

impl Actor for AlsTrainer {
    type Msg = AlsTrainerMsg;
    type State = AlsTrainerState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _: ActorRef<AlsTrainerMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<AlsTrainerState, ActorProcessingErr> {
        ctx.health.begin_recovery(names::ALS_TRAINER);
        Ok(AlsTrainerState {
            ctx,
            trained_at: 0,
            last_train: Instant::now(),
            next_version: 1,
            training: false,
            waiting: Vec::new(),
            finished: Arc::new(Mutex::new(None)),
            reports: Vec::new(),
        })
    }

    /// Loads the newest model. The interactions are the partitions' (recovered by their
    /// own actors); a node that already serves a model counts the retrain cadence from
    /// what the partitions hold once recovered, one without a model trains as soon as
    /// there is enough to train on.
    async fn post_start(
        &self,
        myself: ActorRef<AlsTrainerMsg>,
        st: &mut AlsTrainerState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = st.ctx.clone();
        tokio::task::spawn_blocking(move || -> Result<_, ActorProcessingErr> {
            if ctx.store.get_checkpoint(OLD_CHECKPOINT_NAME)?.is_some() {
                ctx.store.delete_checkpoint(OLD_CHECKPOINT_NAME)?;
                tracing::info!("deleted the trainer checkpoint of an older build (the trainer now reads the partition stores)");
            }
            Ok(())
        })
        .await??;
        let versions = model_versions(&st.ctx).await?;
        let model = match versions.last() {
            Some(&v) => load_model(&st.ctx, v).await?,
            None => None,
        };
        st.next_version = versions.last().map_or(1, |v| v + 1);
        if let Some(m) = model {
            tracing::info!(
                model_version = m.version,
                items = m.items.len(),
                "als model loaded"
            );
            st.ctx.metrics.model_version.set(m.version as i64);
            st.ctx.als.store(Some(Arc::new(m)));
            // Counted from the recovered partitions at the first tick after recovery.
            st.trained_at = u64::MAX;
        }
        st.ctx.health.end_recovery(names::ALS_TRAINER);
        myself.send_interval(st.ctx.settings.poll_interval, || AlsTrainerMsg::Tick);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<AlsTrainerMsg>,
        msg: AlsTrainerMsg,
        st: &mut AlsTrainerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AlsTrainerMsg::Tick => {
                if st.partitions_recovering() {
                    return Ok(());
                }
                let applied = st.applied_total();
                if st.trained_at == u64::MAX {
                    st.trained_at = applied;
                }
                let since = applied.saturating_sub(st.trained_at);
                let s = &st.ctx.settings;
                let due = since >= s.als.retrain_every_events
                    || (since > 0 && st.last_train.elapsed() >= s.als.retrain_interval);
                if due && !st.training && st.events_held() >= s.als.min_interactions {
                    st.start_training(&myself, false);
                }
            }
            AlsTrainerMsg::Trained(_) => st.finish_training().await?,
            AlsTrainerMsg::Retrain(port) => {
                let acked: u64 = (0..st.ctx.settings.partitions)
                    .map(|p| st.ctx.head(p))
                    .sum();
                if acked == 0 && st.events_held() == 0 {
                    port.send(RetrainReport {
                        version: WIRE_VERSION,
                        reason: "no interactions to train on".into(),
                        serving_version: st.ctx.als.load().as_ref().map_or(0, |m| m.version),
                        ..Default::default()
                    })
                    .discard();
                } else {
                    st.waiting.push(port);
                    st.start_training(&myself, true);
                }
            }
            AlsTrainerMsg::Rollback(port) => {
                let ctx = st.ctx.clone();
                let current = ctx.als.load().as_ref().map(|m| m.version);
                let r = async {
                    let versions = model_versions(&ctx).await?;
                    let cur = current.ok_or("no model is being served")?;
                    let prev = versions
                        .iter()
                        .rev()
                        .copied()
                        .find(|&v| v < cur)
                        .ok_or("no older model version is stored")?;
                    let m = load_model(&ctx, prev)
                        .await?
                        .ok_or("older model vanished")?;
                    // The rolled-back version is deleted so a restart serves the older one.
                    delete_model(&ctx, cur).await?;
                    Ok::<AlsServing, ActorProcessingErr>(m)
                }
                .await;
                let reply = match r {
                    Ok(m) => {
                        let v = m.version;
                        st.ctx.als.store(Some(Arc::new(m)));
                        st.ctx.metrics.model_version.set(v as i64);
                        tracing::warn!(model_version = v, "als model rolled back");
                        RollbackReply {
                            version: WIRE_VERSION,
                            serving_version: v,
                            error: None,
                        }
                    }
                    Err(e) => RollbackReply {
                        version: WIRE_VERSION,
                        serving_version: current.unwrap_or(0),
                        error: Some(e.to_string()),
                    },
                };
                port.send(reply).discard();
            }
            AlsTrainerMsg::Observe(port) => {
                let serving = st.ctx.als.load_full();
                let mut doc = serde_json::json!({});
                doc["recovering"] = st.partitions_recovering().into();
                doc["users"] = st
                    .ctx
                    .user_stores
                    .iter()
                    .map(|s| s.read().users())
                    .sum::<usize>()
                    .into();
                doc["events"] = st.events_held().into();
                doc["events_since_train"] = match st.trained_at {
                    u64::MAX => 0,
                    t => st.applied_total().saturating_sub(t),
                }
                .into();
                doc["training"] = st.training.into();
                doc["serving_version"] = serving.as_ref().map(|m| m.version).into();
                doc["serving_ndcg"] = serving.as_ref().map(|m| m.validation_ndcg).into();
                doc["reports"] = serde_json::to_value(&st.reports).unwrap_or_default();
                port.send(Observation::new(names::ALS_TRAINER, doc))
                    .discard();
            }
        }
        Ok(())
    }
}
