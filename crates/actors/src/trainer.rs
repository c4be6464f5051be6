//! AlsTrainer: one model for the node or the whole cluster.
//!
//! **Leader.** On one node the trainer always leads; in a cluster the member holding the
//! trainer lease does ([`crate::cluster::leader`]). The leader retrains ALS every N events
//! or T from every partition's compact interaction store ([`crate::user_store`]): the
//! partitions it owns are its live stores, the others are read-only copies loaded from
//! their owners' checkpoints and kept current from the log ([`Shadow`]); the trainer keeps
//! no interaction copy of its own. It validates the candidate against the serving model
//! on held-out interactions neither model has seen, refits on every interaction, and
//! publishes the accepted model as the next version of the model record
//! ([`crate::snapshots`]), fenced by its lease epoch.
//!
//! **Every node** (the leader too) follows the record: it watches it, loads the version
//! to serve off the request path, checks the bytes' hash and swaps the model in
//! atomically; a snapshot that fails the check is refused and the node keeps serving what
//! it had (shown in `/v1/cluster` and a metric). Fold-in stays on each partition's owner,
//! against the served item factors.

use crate::Discard;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use rustc_hash::{FxHashMap, FxHashSet};
use troupe_models::als::{self, FoldIn};
use troupe_models::dataset::IdMap;
use troupe_models::metrics::user_metrics;
use troupe_models::sparse::Csr;
use troupe_models::topk;

use crate::ctx::Ctx;
use crate::features::Shadow;
use crate::messages::Observation;
use crate::metrics::label;
use crate::names;
use crate::serving::{AlsServing, AlsSnapshot};
use crate::snapshots::{self, ModelRecord, RecordError, SnapshotMeta};

/// Name of the checkpoint older builds kept (a second copy of every interaction); it is
/// deleted at start.
const OLD_CHECKPOINT_NAME: &str = "als_trainer";
/// Blobs of older builds, named by version alone (`models/als/<version>`), and, with the
/// embedded backend, the store's own model table: the newest becomes the record's first
/// version when a leader finds no record.
fn legacy_blob(version: u64) -> String {
    format!("{}{version:020}", snapshots::MODEL_PREFIX)
}

async fn legacy_versions(ctx: &Ctx) -> Result<Vec<u64>, ActorProcessingErr> {
    let mut out: Vec<u64> = ctx
        .state
        .blob_names(snapshots::MODEL_PREFIX)
        .await?
        .iter()
        .filter_map(|n| n.strip_prefix(snapshots::MODEL_PREFIX)?.parse().ok())
        .collect();
    out.extend(ctx.state.legacy_model_versions().await?);
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

async fn legacy_bytes(ctx: &Ctx, version: u64) -> Result<Option<Vec<u8>>, ActorProcessingErr> {
    let mut bytes = ctx.state.get_blob(&legacy_blob(version)).await?;
    if bytes.is_none() {
        bytes = ctx.state.legacy_model(version).await?;
    }
    Ok(bytes)
}

/// How often a node reads the model record without a notification (a watch that ended,
/// or a backend without one).
const FOLLOW_POLL: Duration = Duration::from_secs(10);
/// A version that failed to load is tried again after this long.
const LOAD_RETRY: Duration = Duration::from_secs(10);
/// The validation gate compares the candidate with the serving model only on held-out
/// interactions newer than everything the serving model was trained on; with fewer
/// users than this there is no fair comparison and the candidate is accepted (said in
/// the report).
const MIN_UNSEEN_USERS: usize = 20;
/// Records a shadow partition reads per step.
const SHADOW_CHUNK: usize = 16_384;

/// How long a requested retrain waits for the feature stores to apply what was acked
/// before the request.
const RETRAIN_FRESHNESS_WAIT: Duration = Duration::from_secs(60);
/// How long a retrain forwarded to the leader may take.
const RETRAIN_FORWARD_TIMEOUT: Duration = Duration::from_secs(3600);

pub use troupe_proto::api::{RetrainReport, RollbackReply};

#[derive(RactorMessage)]
pub enum AlsTrainerMsg {
    Tick,
    /// The model record changed (from the watch).
    RecordChanged,
    /// A training task finished (its result waits in the state).
    Trained(u64),
    Retrain(RpcReplyPort<RetrainReport>),
    Rollback(RpcReplyPort<RollbackReply>),
    Observe(RpcReplyPort<Observation>),
}

pub struct AlsTrainer;

type Finished = Arc<Mutex<Option<(RetrainReport, Option<AlsServing>)>>>;

/// Read-only copies of the partitions this node does not own, by partition (leader only).
type Shadows = Arc<Vec<parking_lot::RwLock<Option<Shadow>>>>;

pub struct AlsTrainerState {
    ctx: Arc<Ctx>,
    /// Events in the training set when the last training started (the retrain cadence
    /// counts events from it; `None` until the partitions have recovered).
    trained_at: Option<usize>,
    last_train: Instant,
    training: bool,
    waiting: Vec<RpcReplyPort<RetrainReport>>,
    finished: Finished,
    reports: Vec<RetrainReport>,
    /// The epoch under which this node claimed the model record (leads the training).
    claimed: Option<u64>,
    shadows: Shadows,
    /// The model record as last read, and its revision (a read older than this is ignored).
    record: Option<ModelRecord>,
    record_rev: u64,
    last_follow: Instant,
    /// A version that failed to load, when, and why.
    load_failure: Option<(u64, Instant, String)>,
    /// Log positions the running training covers, per partition.
    positions: Vec<(u32, u64)>,
    _watch: Option<crate::cluster::lease::AbortOnDrop>,
}

/// What a training run needs (a copy, so the actor keeps consuming meanwhile).
struct TrainInput {
    version: u64,
    /// [`als::row_key`] of every user id, by the trainer's user index.
    user_keys: Vec<u64>,
    items: IdMap,
    pairs: Pairs,
    params: als::AlsParams,
    /// The item-item branch's parameters (fitted on the same interactions).
    item_item: troupe_models::ease::EaseParams,
    validation_users: usize,
    serving: Option<Arc<AlsServing>>,
    leader: String,
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
        model_version: input.version,
        interactions: input.pairs.len() as u64,
        users: input.user_keys.len() as u32,
        items: input.items.len() as u32,
        serving_version: input.serving.as_ref().map_or(0, |s| s.version),
        leader: input.leader.clone(),
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
    // Validation cases by name, each with whether the serving model has not seen it.
    let serving_max_ts = input.serving.as_ref().map(|s| s.max_event_ts);
    let mut unseen_flags = Vec::new();
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
            unseen_flags.push(serving_max_ts.is_some_and(|m| input.pairs[hk].3 > m));
            Some((train, target))
        })
        .collect();
    report.validation_users = cases.len() as u32;
    report.candidate_ndcg = holdout_ndcg(&input.items, model.item_factors.view(), &fold, &cases);
    // The comparison uses only held-out interactions the serving model has not seen
    // either: later than every event it was trained on (on the interactions it was
    // trained on it would be favoured).
    let mut note = String::new();
    if let Some(s) = &input.serving {
        let unseen: Vec<(Vec<(&str, f32)>, &str)> = cases
            .iter()
            .zip(&unseen_flags)
            .filter(|(_, &f)| f)
            .map(|(c, _)| c.clone())
            .collect();
        report.compared_users = unseen.len() as u32;
        if unseen.len() >= MIN_UNSEEN_USERS {
            let cand = holdout_ndcg(&input.items, model.item_factors.view(), &fold, &unseen);
            let serv = holdout_ndcg(&s.items, s.item_factors.view(), &s.fold_in, &unseen);
            report.serving_ndcg = serv;
            // A small tolerance: both are estimates on the same users.
            if cand + 1e-9 < serv {
                report.train_ms = started.elapsed().as_millis() as u64;
                report.reason = format!(
                    "candidate NDCG@10 {cand:.4} is below the serving model's {serv:.4} on {} held-out interactions neither has seen",
                    unseen.len()
                );
                return (report, None);
            }
        } else {
            note = format!(
                " (not compared: {} held-out interactions are newer than the serving model's training set, {MIN_UNSEEN_USERS} needed)",
                unseen.len()
            );
        }
    }
    drop(cases);
    // Validation held rows out; the model that serves learns from every row (as the
    // model `troupe eval` scores does).
    let all: Vec<(u32, u32, f32)> = input.pairs.iter().map(|p| (p.0, p.1, p.2)).collect();
    let csr_all = Csr::from_triples(input.user_keys.len(), input.items.len(), &all);
    drop(all);
    let (model, fold) = if held.is_empty() {
        (model, fold)
    } else {
        match als::fit_keyed(&csr_all, &input.params, &input.user_keys, &item_keys) {
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
    // The item-item branch from the same interactions, over the same item indices. A
    // failed fit leaves the version without it (the other branches still serve).
    let ease_started = Instant::now();
    let item_item = match troupe_models::ease::fit(&csr_all, &input.item_item) {
        Ok(m) => {
            tracing::info!(
                fitted_items = m.fitted_items,
                tail_items = m.tail_items,
                kept_bytes = m.memory_bytes(),
                fit_ms = ease_started.elapsed().as_millis() as u64,
                "item-item branch fitted"
            );
            Some(m)
        }
        Err(e) => {
            tracing::warn!(error = %e, "item-item fit failed; the version serves without it");
            None
        }
    };
    drop(csr_all);
    report.train_ms = started.elapsed().as_millis() as u64;
    report.accepted = true;
    report.reason = format!("accepted{note}");
    let max_event_ts = input.pairs.iter().map(|p| p.3).max().unwrap_or(0);
    let serving = AlsServing {
        version: input.version,
        items: input.items,
        item_factors: model.item_factors,
        fold_in: fold,
        params: model.params,
        validation_ndcg: report.candidate_ndcg,
        trained_at_ms: now_ms(),
        interactions: report.interactions,
        max_event_ts,
        ann: Default::default(),
        item_item,
    };
    (report, Some(serving))
}

/// `(user, item, summed weight, latest ts ms)` by the trainer's indices.
type Pairs = Vec<(u32, u32, f32, i64)>;

/// The trainer's input from every partition's interaction store: `(users, items,
/// (user, item, summed weight, latest ts))`. Each partition is read under its read lock,
/// one after the other (its applies wait meanwhile).
fn gather(ctx: &Ctx, shadows: &Shadows) -> (IdMap, IdMap, Pairs) {
    let rules = ctx.user_rules();
    let mut users = IdMap::default();
    let mut items = IdMap::default();
    let mut pairs = Vec::new();
    for (p, store) in ctx.user_stores.iter().enumerate() {
        let mut add = |store: &crate::user_store::UserStore| {
            pairs.reserve(store.events() / 2);
            store.for_each_interest(&rules, |u, i, x| {
                pairs.push((users.intern(u), items.intern(i), x.weight, x.ts));
            });
        };
        let shadow = shadows.get(p).map(|s| s.read());
        match shadow.as_ref().and_then(|s| s.as_ref()) {
            Some(sh) => add(&sh.store),
            None => add(&store.read()),
        }
    }
    pairs.shrink_to_fit();
    (users, items, pairs)
}

impl AlsTrainerState {
    /// This node's leader epoch: always 1 on one node; in a cluster, while it holds the
    /// trainer lease.
    fn leader_epoch(&self) -> Option<u64> {
        match &self.ctx.cluster {
            None => Some(1),
            Some(c) => c.trainer_epoch(),
        }
    }

    fn me(&self) -> &str {
        &self.ctx.settings.node_name
    }

    /// Events in the training set: the owned partitions' stores and the shadows.
    fn events_held(&self) -> usize {
        (0..self.ctx.user_stores.len())
            .map(|p| {
                match self
                    .shadows
                    .get(p)
                    .and_then(|s| s.read().as_ref().map(|s| s.store.events()))
                {
                    Some(n) => n,
                    None => self.ctx.user_stores[p].read().events(),
                }
            })
            .sum()
    }

    /// True while a partition's feature store is still loading or replaying.
    fn partitions_recovering(&self) -> bool {
        self.ctx
            .health
            .recovering()
            .iter()
            .any(|n| n.starts_with(names::USER_FEATURES_PREFIX))
    }

    /// Leader in a cluster: a shadow for every partition this node does not serve
    /// (loaded from its owner's checkpoint), caught up to the head; the shadow of a
    /// partition served here is dropped (its live store is read instead). With
    /// `upto_head`, each shadow reads until the head as it was at the call.
    ///
    /// A log or store that does not answer is an error for the caller to report and try
    /// again later, never a failure of the actor.
    async fn refresh_shadows(&mut self, upto_head: bool) -> Result<(), String> {
        if self.ctx.cluster.is_none() {
            return Ok(());
        }
        for p in 0..self.ctx.settings.partitions {
            let slot = &self.shadows[p as usize];
            if self.ctx.serving(p) {
                if slot.write().take().is_some() {
                    tracing::debug!(
                        partition = p,
                        "shadow dropped: the partition is served here"
                    );
                }
                continue;
            }
            if slot.read().is_none() {
                let started = Instant::now();
                let sh = Shadow::load(&self.ctx, p)
                    .await
                    .map_err(|e| format!("partition {p}: {e}"))?;
                tracing::info!(
                    partition = p,
                    applied = sh.applied,
                    events = sh.store.events(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "trainer loaded a shadow of the partition from its owner's checkpoint"
                );
                *slot.write() = Some(sh);
            }
            let head = self.ctx.head(p);
            let mut reloaded = false;
            loop {
                let after = slot.read().as_ref().map_or(0, |s| s.applied);
                if after >= head {
                    break;
                }
                let r = self
                    .ctx
                    .log
                    .read(p, after, head, SHADOW_CHUNK)
                    .await
                    .map_err(|e| format!("partition {p}: {e}"))?;
                if r.truncated > after {
                    // Retention deleted records the shadow has not read: the owner's
                    // checkpoint covers them; load it again (once: a checkpoint still
                    // below the cut is an error, tried again later).
                    if reloaded {
                        *slot.write() = None;
                        return Err(format!(
                            "partition {p}: the log is cut at {} and the owner's checkpoint covers only {after}",
                            r.truncated
                        ));
                    }
                    reloaded = true;
                    let sh = Shadow::load(&self.ctx, p)
                        .await
                        .map_err(|e| format!("partition {p}: {e}"))?;
                    *slot.write() = Some(sh);
                    continue;
                }
                if r.records.is_empty() {
                    break;
                }
                let last = r.records.last().map_or(after, |x| x.offset);
                if let Some(sh) = slot.write().as_mut() {
                    sh.apply(&r.records);
                    sh.applied = sh.applied.max(last);
                }
                if !upto_head {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Claims the model record for this leader's epoch (once per epoch).
    async fn ensure_claimed(&mut self, epoch: u64) -> Result<bool, ActorProcessingErr> {
        if self.claimed == Some(epoch) {
            return Ok(true);
        }
        let me = self.me().to_string();
        match snapshots::claim(&*self.ctx.state, &me, epoch).await {
            Ok(rec) => {
                tracing::info!(
                    epoch,
                    latest = rec.latest,
                    serve = rec.serve,
                    "model record claimed by this leader"
                );
                self.claimed = Some(epoch);
                if rec.latest == 0 {
                    if let Err(e) = self.migrate_legacy(epoch).await {
                        tracing::warn!(error = %e, "an older build's model not migrated");
                    }
                }
                Ok(true)
            }
            Err(RecordError::Fenced { leader, epoch: e }) => {
                tracing::warn!(leader = %leader, epoch = e, "model record held by a newer leader");
                Ok(false)
            }
            Err(e) => {
                tracing::warn!(error = %e, "model record not claimed; trying again");
                Ok(false)
            }
        }
    }

    /// A record without versions, and a model an older build stored: the newest becomes
    /// the record's first version (its bytes as they are, under the new naming).
    async fn migrate_legacy(&mut self, epoch: u64) -> Result<(), ActorProcessingErr> {
        let versions = legacy_versions(&self.ctx).await?;
        let Some(&v) = versions.last() else {
            return Ok(());
        };
        let Some(bytes) = legacy_bytes(&self.ctx, v).await? else {
            return Ok(());
        };
        let model = decode_model(bytes.clone(), v).await?;
        // Versions are issued from 1: the snapshot is re-encoded as version 1.
        let mut model = model;
        model.version = 1;
        let snap = model.to_snapshot();
        let bytes = tokio::task::spawn_blocking(move || crate::codec::encode(&snap)).await??;
        let meta = self.meta_for(&model, &bytes, epoch, Vec::new(), &RetrainReport::default());
        self.ctx.state.put_blob(&meta.blob, bytes).await?;
        let me = self.me().to_string();
        let keep = self.ctx.settings.als.keep_versions;
        match snapshots::publish(&*self.ctx.state, &me, epoch, meta, keep).await {
            Ok(_) => {
                tracing::info!(
                    legacy_version = v,
                    "the model an older build stored is version 1 of the model record"
                );
                for old in versions {
                    if let Err(e) = self.ctx.state.delete_blob(&legacy_blob(old)).await {
                        tracing::warn!(version = old, error = %e, "an older build's model blob not deleted");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "the older build's model was not migrated"),
        }
        Ok(())
    }

    fn meta_for(
        &self,
        model: &AlsServing,
        bytes: &[u8],
        epoch: u64,
        positions: Vec<(u32, u64)>,
        report: &RetrainReport,
    ) -> SnapshotMeta {
        SnapshotMeta {
            version: model.version,
            blob: snapshots::blob_name(model.version, epoch),
            hash: snapshots::content_hash(bytes),
            bytes: bytes.len() as u64,
            leader: self.me().to_string(),
            epoch,
            positions,
            validation_ndcg: model.validation_ndcg,
            interactions: model.interactions,
            users: report.users,
            items: model.items.len() as u32,
            train_ms: report.train_ms,
            published_ms: now_ms(),
        }
    }

    /// Starts a training run in the background (leader only). With `fresh`, the run
    /// first waits until every partition has applied what was acknowledged at this call
    /// (what was acked before a requested retrain is trained on).
    async fn start_training(
        &mut self,
        myself: &ActorRef<AlsTrainerMsg>,
        fresh: bool,
    ) -> Result<(), ActorProcessingErr> {
        if self.training {
            return Ok(());
        }
        let heads: Vec<(u32, u64)> = (0..self.ctx.settings.partitions)
            .map(|p| (p, self.ctx.head(p)))
            .collect();
        if fresh {
            // Owned partitions: their consumers apply up to the head; shadows: read here.
            for &(p, h) in &heads {
                if self.ctx.serving(p) && !self.ctx.wait_applied(p, h, RETRAIN_FRESHNESS_WAIT).await
                {
                    tracing::warn!(partition = p, "retrain starts before partition caught up");
                }
            }
        }
        if let Err(e) = self.refresh_shadows(true).await {
            let reason = format!("the training set could not be read: {e}; retry shortly");
            tracing::warn!(reason = %reason, "training not started");
            for port in self.waiting.drain(..) {
                port.send(RetrainReport {
                    reason: reason.clone(),
                    leader: self.ctx.settings.node_name.clone(),
                    no_leader: true,
                    ..Default::default()
                })
                .discard();
            }
            return Ok(());
        }
        self.training = true;
        self.trained_at = Some(self.events_held());
        self.last_train = Instant::now();
        let ctx = self.ctx.clone();
        let shadows = self.shadows.clone();
        let slot = self.finished.clone();
        let me = myself.clone();
        let leader = self.me().to_string();
        tokio::spawn(async move {
            let out = tokio::task::spawn_blocking(move || {
                // Test hook: a training run that takes long (to kill a leader mid-run).
                if let Some(crate::faults::FaultAction::Stall(d)) =
                    ctx.faults.on_call("als_training")
                {
                    tracing::warn!(
                        stall_ms = d.as_millis() as u64,
                        "injected stall in training"
                    );
                    std::thread::sleep(d);
                }
                let (users, items, pairs) = gather(&ctx, &shadows);
                let (mut report, model) = train(TrainInput {
                    version: 0,
                    user_keys: users.row_keys(),
                    items,
                    pairs,
                    params: ctx.settings.als.params.clone(),
                    item_item: ctx.settings.als.item_item.clone(),
                    validation_users: ctx.settings.als.validation_users,
                    serving: ctx.als.load_full(),
                    leader,
                });
                report.users = users.len() as u32;
                (report, model)
            })
            .await;
            let out = out.unwrap_or_else(|e| {
                (
                    RetrainReport {
                        reason: format!("training task failed: {e}"),
                        ..Default::default()
                    },
                    None,
                )
            });
            *slot.lock() = Some(out);
            me.send_message(AlsTrainerMsg::Trained(0)).discard();
        });
        // The positions the run covers: what each partition had applied when it began.
        self.positions = heads
            .iter()
            .map(|&(p, _)| {
                let applied = match self.shadows[p as usize].read().as_ref() {
                    Some(sh) => sh.applied,
                    None => self.ctx.applied(p),
                };
                (p, applied)
            })
            .collect();
        Ok(())
    }

    /// Publishes an accepted candidate as the next version (leader only) and serves it.
    async fn finish_training(&mut self) -> Result<(), ActorProcessingErr> {
        self.training = false;
        // The training run's buffers are freed: hand their pages back.
        tokio::task::spawn_blocking(crate::alloc::trim).await?;
        let Some((mut report, model)) = self.finished.lock().take() else {
            return Ok(());
        };
        if let Some(mut model) = model {
            match self.publish(&mut model, &report).await {
                Ok(v) => {
                    report.model_version = v;
                    report.serving_version = v;
                    self.ctx.metrics.model_version.set(v as i64);
                    self.ctx.metrics.model_ndcg.set(model.validation_ndcg);
                    tracing::info!(
                        model_version = v,
                        ndcg = report.candidate_ndcg,
                        previous = report.serving_ndcg,
                        users = report.users,
                        train_ms = report.train_ms,
                        "als model published and swapped in"
                    );
                    self.ctx.serve_als(model);
                }
                Err(e) => {
                    report.accepted = false;
                    report.reason = format!("could not publish the model: {e}");
                    tracing::warn!(reason = %report.reason, "als candidate not published");
                }
            }
        } else {
            tracing::info!(reason = %report.reason, "als candidate rejected");
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

    /// Writes the model's blob and publishes it in the record under this leader's
    /// epoch; answers the version issued.
    async fn publish(
        &mut self,
        model: &mut AlsServing,
        report: &RetrainReport,
    ) -> Result<u64, String> {
        let epoch = self
            .leader_epoch()
            .filter(|e| self.claimed == Some(*e))
            .ok_or("this node no longer leads the training")?;
        let (rec, _) = snapshots::read(&*self.ctx.state)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the model record is missing")?;
        model.version = rec.latest + 1;
        let snap = model.to_snapshot();
        let bytes = tokio::task::spawn_blocking(move || crate::codec::encode(&snap))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let meta = self.meta_for(model, &bytes, epoch, self.positions.clone(), report);
        let blob = meta.blob.clone();
        self.ctx
            .state
            .put_blob(&blob, bytes)
            .await
            .map_err(|e| e.to_string())?;
        let me = self.me().to_string();
        let keep = self.ctx.settings.als.keep_versions;
        match snapshots::publish(&*self.ctx.state, &me, epoch, meta, keep).await {
            Ok((rec, dropped)) => {
                for b in dropped {
                    if let Err(e) = self.ctx.state.delete_blob(&b).await {
                        tracing::warn!(blob = %b, error = %e, "old model blob not deleted");
                    }
                }
                self.record_rev = 0;
                self.record = Some(rec);
                Ok(model.version)
            }
            Err(RecordError::Fenced { leader, epoch: e }) => {
                self.claimed = None;
                if let Err(e) = self.ctx.state.delete_blob(&blob).await {
                    tracing::warn!(blob = %blob, error = %e, "a deposed leader's blob not deleted");
                }
                Err(format!(
                    "deposed: {leader} leads the training now (epoch {e})"
                ))
            }
            // Unknown outcome: the blob stays (the record may name it).
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads the model record and serves the version it names, if this node does not
    /// already (loaded off the request path, the bytes' hash checked).
    async fn follow(&mut self) {
        self.last_follow = Instant::now();
        let read = snapshots::read(&*self.ctx.state).await;
        let (rec, rev) = match read {
            Ok(Some(x)) => x,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "model record not read");
                return;
            }
        };
        if rev < self.record_rev {
            return;
        }
        self.record_rev = rev;
        let meta = rec.serving().cloned();
        self.record = Some(rec);
        let Some(meta) = meta else { return };
        let current = self.ctx.als.load().as_ref().map(|m| m.version);
        if current == Some(meta.version) {
            return;
        }
        if let Some((v, at, _)) = &self.load_failure {
            if *v == meta.version && at.elapsed() < LOAD_RETRY {
                return;
            }
        }
        let started = Instant::now();
        match load_verified(&self.ctx, &meta).await {
            Ok(m) => {
                tracing::info!(
                    model_version = m.version,
                    previous = ?current,
                    items = m.items.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "als model loaded from the model record"
                );
                self.ctx.metrics.model_version.set(m.version as i64);
                self.ctx.metrics.model_ndcg.set(m.validation_ndcg);
                self.ctx.serve_als(m);
                self.load_failure = None;
            }
            Err(e) => {
                tracing::error!(model_version = meta.version, error = %e, serving = ?current, "published als model refused; serving what this node had");
                self.ctx.metrics.model_load_failures.inc();
                self.load_failure = Some((meta.version, Instant::now(), e.to_string()));
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let serving = self.ctx.als.load_full();
        let rec = self.record.as_ref();
        serde_json::json!({
            "serving_version": serving.as_ref().map(|m| m.version),
            "serving_ndcg": serving.as_ref().map(|m| m.validation_ndcg),
            "item_item": serving.as_ref().and_then(|m| m.item_item.as_ref()).map(|m| serde_json::json!({
                "fitted_items": m.fitted_items,
                "tail_items": m.tail_items,
                "kept_bytes": m.memory_bytes(),
                "params": m.params,
            })),
            "record": rec.map(|r| serde_json::json!({
                "latest": r.latest,
                "serve": r.serve,
                "leader": r.leader,
                "epoch": r.epoch,
                "rolled_back": r.rolled_back,
                "versions": r.snapshots.iter().map(|s| serde_json::json!({
                    "version": s.version,
                    "validation_ndcg": s.validation_ndcg,
                    "interactions": s.interactions,
                    "users": s.users,
                    "bytes": s.bytes,
                    "leader": s.leader,
                    "published_ms": s.published_ms,
                })).collect::<Vec<_>>(),
            })),
            "load_error": self.load_failure.as_ref().map(|(v, _, e)| format!("version {v}: {e}")),
            "leading": self.claimed.is_some() && self.leader_epoch() == self.claimed,
            "training": self.training,
        })
    }
}

/// A published version's bytes, checked against the record's hash, decoded. A test
/// hook (`model_blob.corrupt`) flips a byte after the read, as a corrupted store would.
async fn load_verified(ctx: &Ctx, meta: &SnapshotMeta) -> Result<AlsServing, ActorProcessingErr> {
    let mut bytes = ctx
        .state
        .get_blob(&meta.blob)
        .await?
        .ok_or_else(|| format!("blob {} of version {} is missing", meta.blob, meta.version))?;
    if ctx.faults.on_call("model_blob.corrupt").is_some() {
        let mid = bytes.len() / 2;
        if let Some(b) = bytes.get_mut(mid) {
            *b ^= 0x5a;
        }
    }
    let hash = snapshots::content_hash(&bytes);
    if hash != meta.hash {
        return Err(format!(
            "blob {} of version {} has hash {hash}, the record says {}: its bytes are damaged",
            meta.blob, meta.version, meta.hash
        )
        .into());
    }
    let m = decode_model(bytes, meta.version).await?;
    if m.version != meta.version {
        return Err(format!(
            "blob {} holds version {}, the record says {}",
            meta.blob, m.version, meta.version
        )
        .into());
    }
    let mut m = m;
    m.validation_ndcg = meta.validation_ndcg;
    Ok(m)
}

async fn decode_model(bytes: Vec<u8>, version: u64) -> Result<AlsServing, ActorProcessingErr> {
    let m = tokio::task::spawn_blocking(move || -> Result<AlsServing, ActorProcessingErr> {
        let snap = AlsSnapshot::decode(&bytes)
            .map_err(|e| format!("model snapshot {version} does not decode: {e}"))?;
        Ok(AlsServing::from_snapshot(snap)?)
    })
    .await??;
    Ok(m)
}

/// Turns the model record's watch into `RecordChanged` messages (re-watching after the
/// watch ends).
fn watch_record(ctx: &Arc<Ctx>, me: ActorRef<AlsTrainerMsg>) -> crate::cluster::lease::AbortOnDrop {
    let ctx = ctx.clone();
    crate::cluster::lease::AbortOnDrop(tokio::spawn(async move {
        loop {
            match ctx.state.watch(snapshots::MODEL_KEY).await {
                Ok(Some(mut rx)) => {
                    while rx.recv().await.is_some() {
                        if me.send_message(AlsTrainerMsg::RecordChanged).is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => return,
                Err(e) => tracing::debug!(error = %e, "model record watch not started"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }))
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
        let shadows = Arc::new(
            (0..ctx.settings.partitions)
                .map(|_| parking_lot::RwLock::new(None))
                .collect(),
        );
        Ok(AlsTrainerState {
            ctx,
            trained_at: None,
            last_train: Instant::now(),
            training: false,
            waiting: Vec::new(),
            finished: Arc::new(Mutex::new(None)),
            reports: Vec::new(),
            claimed: None,
            shadows,
            record: None,
            record_rev: 0,
            last_follow: Instant::now(),
            load_failure: None,
            positions: Vec::new(),
            _watch: None,
        })
    }

    /// Serves the version the model record names (a leader without a record migrates
    /// an older build's model first). The interactions are the partitions' (recovered by
    /// their own actors); the retrain cadence counts from what they hold once recovered.
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
        if let Some(epoch) = st.leader_epoch() {
            st.ensure_claimed(epoch).await?;
        }
        st._watch = Some(watch_record(&st.ctx, myself.clone()));
        st.follow().await;
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
            AlsTrainerMsg::RecordChanged => st.follow().await,
            AlsTrainerMsg::Tick => {
                if st.last_follow.elapsed() >= FOLLOW_POLL {
                    st.follow().await;
                }
                let Some(epoch) = st.leader_epoch() else {
                    st.claimed = None;
                    // Not leading: the shadows are the leader's.
                    for s in st.shadows.iter() {
                        s.write().take();
                    }
                    st.trained_at = None;
                    return Ok(());
                };
                if !st.ensure_claimed(epoch).await? || st.partitions_recovering() {
                    return Ok(());
                }
                if st.training {
                    return Ok(());
                }
                if let Err(e) = st.refresh_shadows(false).await {
                    tracing::warn!(error = %e, "trainer shadows not caught up; trying again");
                    return Ok(());
                }
                let held = st.events_held();
                let since = match st.trained_at {
                    Some(t) => held.saturating_sub(t),
                    None => {
                        // Counted from here; a leader without a model trains at once.
                        let base = if st.ctx.als.load().is_some() { held } else { 0 };
                        st.trained_at = Some(base);
                        held - base
                    }
                } as u64;
                let s = &st.ctx.settings;
                let due = since >= s.als.retrain_every_events
                    || (since > 0 && st.last_train.elapsed() >= s.als.retrain_interval);
                if due && held >= s.als.min_interactions {
                    st.start_training(&myself, false).await?;
                }
            }
            AlsTrainerMsg::Trained(_) => st.finish_training().await?,
            AlsTrainerMsg::Retrain(port) => match st.leader_epoch() {
                Some(epoch) => {
                    let acked: u64 = (0..st.ctx.settings.partitions)
                        .map(|p| st.ctx.head(p))
                        .sum();
                    if !st.ensure_claimed(epoch).await? {
                        port.send(RetrainReport {
                            reason: "this node leads but could not claim the model record (a newer leader holds it, or the store did not answer); retry shortly".into(),
                            no_leader: true,
                            ..Default::default()
                        })
                        .discard();
                    } else if acked == 0 && st.events_held() == 0 {
                        port.send(RetrainReport {
                            reason: "no interactions to train on".into(),
                            serving_version: st.ctx.als.load().as_ref().map_or(0, |m| m.version),
                            leader: st.me().to_string(),
                            ..Default::default()
                        })
                        .discard();
                    } else {
                        st.waiting.push(port);
                        st.start_training(&myself, true).await?;
                    }
                }
                None => {
                    // Another member leads: the request goes to it.
                    let leader = st
                        .ctx
                        .cluster
                        .as_ref()
                        .and_then(|c| c.trainer_leader())
                        .filter(|l| l != st.me());
                    tokio::spawn(async move {
                        let report = match leader {
                            None => RetrainReport {
                                reason: "no node leads the training now (an election is under way); retry shortly".into(),
                                no_leader: true,
                                ..Default::default()
                            },
                            Some(l) => match crate::cluster::gateway::call(
                                &l,
                                "retrain",
                                troupe_proto::wire::Request::Retrain,
                                RETRAIN_FORWARD_TIMEOUT,
                            )
                            .await
                            {
                                Ok(troupe_proto::wire::Response::Retrain(r)) => r,
                                Ok(_) => RetrainReport {
                                    reason: format!("{l} answered a retrain with something else"),
                                    no_leader: true,
                                    ..Default::default()
                                },
                                Err(e) => RetrainReport {
                                    reason: format!("the trainer leader {l} did not answer: {e}"),
                                    no_leader: true,
                                    leader: l,
                                    ..Default::default()
                                },
                            },
                        };
                        port.send(report).discard();
                    });
                }
            },
            AlsTrainerMsg::Rollback(port) => {
                let current = st.ctx.als.load().as_ref().map(|m| m.version);
                let by = st.me().to_string();
                let reply = match snapshots::rollback(&*st.ctx.state, &by).await {
                    Ok(rec) => {
                        tracing::warn!(
                            model_version = rec.serve,
                            "als model rolled back (every node follows)"
                        );
                        st.record_rev = 0;
                        st.follow().await;
                        let now = st.ctx.als.load().as_ref().map(|m| m.version);
                        RollbackReply {
                            serving_version: rec.serve,
                            error: (now != Some(rec.serve)).then(|| {
                                format!(
                                    "the record now serves version {}, this node could not load it: {}",
                                    rec.serve,
                                    st.load_failure.as_ref().map_or("", |f| f.2.as_str())
                                )
                            }),
                        }
                    }
                    Err(e) => RollbackReply {
                        serving_version: current.unwrap_or(0),
                        error: Some(e.to_string()),
                    },
                };
                port.send(reply).discard();
            }
            AlsTrainerMsg::Observe(port) => {
                let mut doc = st.status();
                doc["recovering"] = st.partitions_recovering().into();
                doc["users"] = st
                    .ctx
                    .user_stores
                    .iter()
                    .map(|s| s.read().users())
                    .sum::<usize>()
                    .into();
                doc["events"] = st.events_held().into();
                doc["events_since_train"] = st
                    .trained_at
                    .map_or(0, |t| st.events_held().saturating_sub(t))
                    .into();
                doc["shadows"] = st
                    .shadows
                    .iter()
                    .filter(|s| s.read().is_some())
                    .count()
                    .into();
                doc["reports"] = serde_json::to_value(&st.reports).unwrap_or_default();
                port.send(Observation::new(names::ALS_TRAINER, doc))
                    .discard();
            }
        }
        Ok(())
    }
}
