//! Ranker: answers "top-k for user U". Waits (bounded) until U's acked events are
//! applied, fetches U's features, fans out to the ALS, content and popularity branches in
//! parallel (each under a deadline and a circuit breaker), blends what answered
//! (`troupe_models::blend`), filters, and returns the top-k with each branch's share.
//! A branch that failed, timed out or is open makes the answer `degraded`.
//!
//! Requests run as tasks spawned by the actor, so one slow request never blocks another;
//! the actor owns the breakers and answers `Observe`.

use crate::Discard;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorClusterMessage;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use troupe_models::blend::{self, BranchList};
use troupe_models::content;
use troupe_models::topk::{self, Scored};

use crate::breaker::Breaker;
use crate::ctx::Ctx;
use crate::faults::FaultAction;
use crate::features::{UserFeaturesMsg, UserQuery, UserView};
use crate::item_stats::{ItemStatsMsg, TopRequest};
use crate::messages::Observation;
use crate::metrics::label;
use crate::names;
use crate::record::partition_of;
use crate::wire::{self, WIRE_VERSION};
use crate::wire_payload;

pub const BRANCHES: [&str; 3] = ["als", "content", "popularity"];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecommendRequest {
    pub version: u16,
    pub user: String,
    pub k: u32,
    pub category: Option<String>,
    pub exclude: Vec<String>,
    /// Per-request blend weights (als, content, popularity).
    pub weights: Option<Vec<f32>>,
    pub request_id: String,
    /// Clock for decays (ms); 0 = the node's clock.
    pub now_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecommendedItem {
    pub item: String,
    pub score: f32,
    /// Share of the score from als, content, popularity.
    pub shares: Vec<f32>,
    /// Category filter aside: categories of the item (for explanations).
    pub categories: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BranchReport {
    pub name: String,
    /// `ok`, `empty`, `failed`, `timeout`, `open`, `unavailable`.
    pub status: String,
    pub candidates: u32,
    pub micros: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecommendReply {
    pub version: u16,
    pub request_id: String,
    pub user: String,
    pub items: Vec<RecommendedItem>,
    pub als_model_version: u64,
    pub content_encoder: String,
    pub applied_offset: u64,
    /// Offset of the user's last acked event that the answer waited for.
    pub awaited_offset: u64,
    pub degraded: bool,
    pub stale: bool,
    pub cold_start: bool,
    pub branches: Vec<BranchReport>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SimilarRequest {
    pub version: u16,
    pub item: String,
    pub k: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SimilarReply {
    pub version: u16,
    pub item: String,
    /// `content`, `als` or empty when the item is unknown to both.
    pub source: String,
    pub items: Vec<(String, f32)>,
}

wire_payload!(
    RecommendRequest,
    RecommendReply,
    SimilarRequest,
    SimilarReply
);

#[derive(RactorClusterMessage)]
pub enum RankerMsg {
    #[rpc]
    Recommend(RecommendRequest, RpcReplyPort<RecommendReply>),
    #[rpc]
    Similar(SimilarRequest, RpcReplyPort<SimilarReply>),
    #[rpc]
    Observe(RpcReplyPort<Observation>),
}

/// What a request must not show.
struct Exclusions {
    seen: FxHashSet<String>,
    exclude: FxHashSet<String>,
    category: Option<String>,
}

impl Exclusions {
    fn blocks(&self, ctx: &Ctx, id: &str) -> bool {
        if self.seen.contains(id) || self.exclude.contains(id) {
            return true;
        }
        let view = ctx.catalog.read();
        if view.hidden(id) {
            return true;
        }
        match &self.category {
            Some(c) => !view.in_category(id, c),
            None => false,
        }
    }
}

enum BranchError {
    Failed(String),
}

/// Shared by the actor and its request tasks.
pub struct RankerCore {
    ctx: Arc<Ctx>,
    breakers: [Breaker; 3],
}

type Candidates = Vec<(String, f32)>;

impl RankerCore {
    pub fn new(ctx: Arc<Ctx>) -> RankerCore {
        let r = &ctx.settings.ranker;
        let b = |n: &str| Breaker::new(n, r.breaker_failures, r.breaker_open);
        RankerCore {
            breakers: [b("als"), b("content"), b("popularity")],
            ctx,
        }
    }

    /// Runs one branch under its breaker, deadline and fault hook.
    async fn branch<F>(&self, idx: usize, fut: F) -> (Option<Candidates>, BranchReport)
    where
        F: std::future::Future<Output = Result<Option<Candidates>, String>>,
    {
        let name = BRANCHES[idx];
        let started = Instant::now();
        let breaker = &self.breakers[idx];
        let mut report = BranchReport {
            name: name.to_string(),
            ..Default::default()
        };
        if !breaker.allow() {
            report.status = "open".into();
            self.note(idx, &report.status);
            return (None, report);
        }
        let deadline = self.ctx.settings.ranker.branch_deadline;
        let fault = self.ctx.faults.on_call(&format!("branch.{name}"));
        let run = async {
            match fault {
                Some(FaultAction::Error) | Some(FaultAction::Panic) => {
                    Err(BranchError::Failed("injected fault".into()))
                }
                Some(FaultAction::Stall(d)) => {
                    tokio::time::sleep(d).await;
                    fut.await.map_err(BranchError::Failed)
                }
                None => fut.await.map_err(BranchError::Failed),
            }
        };
        let out = match tokio::time::timeout(deadline, run).await {
            Ok(Ok(v)) => {
                breaker.record(true);
                report.status = match &v {
                    None => "unavailable".into(),
                    Some(c) if c.is_empty() => "empty".into(),
                    Some(_) => "ok".into(),
                };
                v
            }
            Ok(Err(BranchError::Failed(e))) => {
                breaker.record(false);
                tracing::warn!(branch = name, error = %e, "branch failed");
                report.status = "failed".into();
                None
            }
            Err(_) => {
                breaker.record(false);
                report.status = "timeout".into();
                None
            }
        };
        report.candidates = out.as_ref().map_or(0, |c| c.len() as u32);
        report.micros = started.elapsed().as_micros() as u64;
        self.note(idx, &report.status);
        (out, report)
    }

    fn note(&self, idx: usize, status: &str) {
        let m = &self.ctx.metrics;
        m.branch_outcomes
            .get_or_create(&crate::metrics::labels2(
                "branch",
                BRANCHES[idx],
                "status",
                status,
            ))
            .inc();
        m.breaker_state
            .get_or_create(&label("branch", BRANCHES[idx]))
            .set(self.breakers[idx].state().gauge());
    }

    async fn fetch_user(&self, user: &str, partition: u32) -> Option<UserView> {
        let cell = ractor::registry::where_is(names::user_features(partition))?;
        let actor: ActorRef<UserFeaturesMsg> = cell.into();
        let q = UserQuery {
            version: WIRE_VERSION,
            user: user.to_string(),
        };
        let timeout = self
            .ctx
            .settings
            .ranker
            .branch_deadline
            .max(Duration::from_millis(20));
        match ractor::call_t!(
            actor,
            UserFeaturesMsg::GetUser,
            timeout.as_millis() as u64,
            q
        ) {
            Ok(v) if wire::accepted(v.version) => Some(v),
            _ => None,
        }
    }

    pub async fn recommend(&self, req: RecommendRequest) -> RecommendReply {
        let started = Instant::now();
        let ctx = &self.ctx;
        let s = &ctx.settings;
        let mut reply = RecommendReply {
            version: WIRE_VERSION,
            request_id: req.request_id.clone(),
            user: req.user.clone(),
            content_encoder: ctx.content.read().encoder.clone(),
            ..Default::default()
        };
        let p = partition_of(&req.user, s.partitions);
        // Freshness: wait until this user's last acked event is applied (bounded).
        let target = ctx.last_acked[p as usize]
            .lock()
            .get(&req.user)
            .copied()
            .unwrap_or(0);
        reply.awaited_offset = target;
        let mut rx = ctx.applied[p as usize].subscribe();
        if *rx.borrow() < target {
            let waited =
                tokio::time::timeout(s.ranker.freshness_wait, rx.wait_for(|&o| o >= target)).await;
            reply.stale = !matches!(waited, Ok(Ok(_)));
        }
        let view = self.fetch_user(&req.user, p).await;
        let features_ok = view.is_some();
        let view = view.unwrap_or_default();
        reply.applied_offset = view.applied_offset.max(*ctx.applied[p as usize].borrow());
        reply.cold_start = !view.known || view.history.is_empty();
        let excl = Arc::new(Exclusions {
            seen: view
                .seen
                .iter()
                .chain(view.disliked.iter())
                .cloned()
                .collect(),
            exclude: req.exclude.iter().cloned().collect(),
            category: req.category.clone(),
        });
        let k = req.k.max(1) as usize;
        let n = s.ranker.candidates.max(k);
        let now_ms = if req.now_ms > 0 {
            req.now_ms
        } else {
            view.last_ts_ms.max(now_ms())
        };
        let history = Arc::new(view.history.clone());

        let als_fut = self.branch(0, {
            let (ctx, excl, history, vector, vv) = (
                ctx.clone(),
                excl.clone(),
                history.clone(),
                view.vector.clone(),
                view.vector_version,
            );
            async move {
                let Some(model) = ctx.als.load_full() else {
                    return Ok(None);
                };
                if history.is_empty() {
                    return Ok(Some(Vec::new()));
                }
                tokio::task::spawn_blocking(move || {
                    let v = if vv == model.version && !vector.is_empty() {
                        vector
                    } else {
                        let inter: Vec<(u32, f32)> = history
                            .iter()
                            .filter_map(|t| model.items.get(&t.item).map(|i| (i, t.weight)))
                            .collect();
                        model.fold_in.solve(model.item_factors.view(), &inter)
                    };
                    if v.iter().all(|x| *x == 0.0) {
                        return Vec::new();
                    }
                    let mut scratch = Vec::new();
                    let top = topk::top_k_dense(
                        model.item_factors.view(),
                        &v,
                        n,
                        |i| model.items.name(i).is_none_or(|id| excl.blocks(&ctx, id)),
                        &mut scratch,
                    );
                    named(&top, |i| model.items.name(i))
                })
                .await
                .map(Some)
                .map_err(|e| e.to_string())
            }
        });
        let content_fut = self.branch(1, {
            let (ctx, excl, history) = (ctx.clone(), excl.clone(), history.clone());
            let half_life = s.content.profile_half_life.as_secs_f64();
            async move {
                if ctx.content.read().is_empty() {
                    return Ok(None);
                }
                if history.is_empty() {
                    return Ok(Some(Vec::new()));
                }
                tokio::task::spawn_blocking(move || {
                    let index = ctx.content.read();
                    let touched: Vec<(u32, f32, i64)> = history
                        .iter()
                        .filter_map(|t| index.index(&t.item).map(|i| (i, t.weight, t.ts_ms / 1000)))
                        .collect();
                    let Some(profile) =
                        content::user_profile(index.matrix(), &touched, now_ms / 1000, half_life)
                    else {
                        return Vec::new();
                    };
                    let mut scratch = Vec::new();
                    let top = content::score_profile(
                        index.matrix(),
                        &profile,
                        n,
                        |i| {
                            index
                                .name(i)
                                .is_none_or(|id| index.index(id).is_none() || excl.blocks(&ctx, id))
                        },
                        &mut scratch,
                    );
                    named(&top, |i| index.name(i))
                })
                .await
                .map(Some)
                .map_err(|e| e.to_string())
            }
        });
        let pop_fut = self.branch(2, {
            let (ctx, excl, category) = (ctx.clone(), excl.clone(), req.category.clone());
            let want = (n + excl.seen.len() + excl.exclude.len()).min(100_000) as u32;
            let deadline = s.ranker.branch_deadline;
            async move {
                let cell = ractor::registry::where_is(names::ITEM_STATS)
                    .ok_or("item stats unavailable")?;
                let actor: ActorRef<ItemStatsMsg> = cell.into();
                let top = ractor::call_t!(
                    actor,
                    ItemStatsMsg::Top,
                    deadline.as_millis() as u64,
                    TopRequest {
                        version: WIRE_VERSION,
                        n: want,
                        category,
                        now_ms,
                    }
                )
                .map_err(|e| e.to_string())?;
                Ok(Some(
                    top.items
                        .into_iter()
                        .filter(|(id, _)| !excl.blocks(&ctx, id))
                        .take(n)
                        .collect(),
                ))
            }
        });
        let ((als, r0), (cnt, r1), (pop, r2)) = tokio::join!(als_fut, content_fut, pop_fut);
        reply.als_model_version = ctx.als.load().as_ref().map_or(0, |m| m.version);
        reply.branches = vec![r0, r1, r2];
        reply.degraded = !features_ok
            || reply
                .branches
                .iter()
                .any(|b| matches!(b.status.as_str(), "failed" | "timeout" | "open"));

        // Blend over a per-request index of candidate ids.
        let mut ids: Vec<String> = Vec::new();
        let mut index: FxHashMap<String, u32> = FxHashMap::default();
        let mut lists: Vec<Vec<Scored>> = Vec::new();
        for cands in [als, cnt, pop] {
            let list = cands
                .unwrap_or_default()
                .into_iter()
                .map(|(id, score)| {
                    let next = ids.len() as u32;
                    let i = *index.entry(id.clone()).or_insert_with(|| {
                        ids.push(id);
                        next
                    });
                    Scored { item: i, score }
                })
                .collect();
            lists.push(list);
        }
        let weights = req
            .weights
            .as_ref()
            .filter(|w| w.len() == 3)
            .map(|w| [w[0], w[1], w[2]])
            .unwrap_or(s.ranker.weights);
        let branch_lists: Vec<BranchList<'_>> = lists
            .iter()
            .zip(weights)
            .map(|(l, w)| BranchList {
                weight: w,
                items: l,
            })
            .collect();
        let blended = blend::blend(&branch_lists, s.ranker.normalization, k, |_| true);
        let catalog = ctx.catalog.read();
        reply.items = blended
            .iter()
            .map(|b| {
                let id = ids[b.item as usize].clone();
                let categories = catalog
                    .items
                    .get(&id)
                    .map(|i| i.categories.clone())
                    .unwrap_or_default();
                RecommendedItem {
                    item: id,
                    score: b.score,
                    shares: b.shares(),
                    categories,
                }
            })
            .collect();
        drop(catalog);
        ctx.metrics
            .recommend_seconds
            .observe(started.elapsed().as_secs_f64());
        ctx.metrics
            .recommendations
            .get_or_create(&label(
                "outcome",
                if reply.degraded { "degraded" } else { "ok" },
            ))
            .inc();
        reply
    }

    pub fn similar(&self, req: &SimilarRequest) -> SimilarReply {
        let k = req.k.max(1) as usize;
        let ctx = &self.ctx;
        let mut reply = SimilarReply {
            version: WIRE_VERSION,
            item: req.item.clone(),
            ..Default::default()
        };
        let mut scratch = Vec::new();
        {
            let index = ctx.content.read();
            if let Some(row) = index.row(&req.item).map(<[f32]>::to_vec) {
                let catalog = ctx.catalog.read();
                let top = topk::top_k_dense(
                    index.matrix(),
                    &row,
                    k,
                    |i| {
                        index.name(i).is_none_or(|id| {
                            id == req.item || index.index(id).is_none() || catalog.hidden(id)
                        })
                    },
                    &mut scratch,
                );
                reply.source = "content".into();
                reply.items = named(&top, |i| index.name(i));
                return reply;
            }
        }
        if let Some(model) = ctx.als.load_full() {
            if let Some(i) = model.items.get(&req.item) {
                let row = model.item_factors.row(i as usize).to_vec();
                let catalog = ctx.catalog.read();
                let top = topk::top_k_dense(
                    model.item_factors.view(),
                    &row,
                    k,
                    |j| j == i || model.items.name(j).is_none_or(|id| catalog.hidden(id)),
                    &mut scratch,
                );
                reply.source = "als".into();
                reply.items = named(&top, |j| model.items.name(j));
            }
        }
        reply
    }
}

fn named<'a>(top: &[Scored], name: impl Fn(u32) -> Option<&'a str>) -> Vec<(String, f32)> {
    top.iter()
        .filter_map(|s| name(s.item).map(|n| (n.to_string(), s.score)))
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub struct Ranker;

pub struct RankerState {
    core: Arc<RankerCore>,
    requests: u64,
}

impl Actor for Ranker {
    type Msg = RankerMsg;
    type State = RankerState;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        _: ActorRef<RankerMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<RankerState, ActorProcessingErr> {
        Ok(RankerState {
            core: Arc::new(RankerCore::new(ctx)),
            requests: 0,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<RankerMsg>,
        msg: RankerMsg,
        st: &mut RankerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RankerMsg::Recommend(req, port) => {
                st.requests += 1;
                if !wire::accepted(req.version) {
                    port.send(RecommendReply {
                        error: Some("request of an unknown wire version".into()),
                        ..Default::default()
                    })
                    .discard();
                    return Ok(());
                }
                match st.core.ctx.faults.on_key("ranker", &req.user) {
                    Some(FaultAction::Panic) => {
                        panic!("injected panic in ranker for user {}", req.user)
                    }
                    Some(FaultAction::Error) => {
                        return Err(format!("injected fault in ranker for user {}", req.user).into())
                    }
                    Some(FaultAction::Stall(d)) => tokio::time::sleep(d).await,
                    None => {}
                }
                let core = st.core.clone();
                tokio::spawn(async move {
                    let r = core.recommend(req).await;
                    port.send(r).discard();
                });
            }
            RankerMsg::Similar(req, port) => {
                let core = st.core.clone();
                tokio::task::spawn_blocking(move || {
                    port.send(core.similar(&req)).discard();
                });
            }
            RankerMsg::Observe(port) => {
                let breakers: Vec<_> = st.core.breakers.iter().map(|b| b.snapshot()).collect();
                port.send(Observation::new(
                    names::RANKER,
                    serde_json::json!({ "requests": st.requests, "breakers": breakers }),
                ))
                .discard();
            }
        }
        Ok(())
    }
}
