//! Ranker: answers "top-k for user U". Waits (bounded) until U's acked events are
//! applied, fetches U's features, fans out to the ALS, content and popularity branches in
//! parallel (each under a deadline and a circuit breaker), blends what answered
//! (`troupe_models::blend`), filters, and returns the top-k with each branch's share.
//! A branch that failed, timed out or is open makes the answer `degraded`.
//!
//! Requests run as tasks spawned by the actor, so one slow request never blocks another;
//! the actor owns the breakers and answers `Observe`.

use crate::Discard;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorMessage;
use rustc_hash::{FxHashMap, FxHashSet};
use troupe_models::blend::{self, BranchList};
use troupe_models::pipeline;
use troupe_models::topk::{self, Scored};

use crate::breaker::Breaker;
use crate::ctx::Ctx;
use crate::faults::FaultAction;
use crate::features::{UserFeaturesMsg, UserQuery, UserView};
use crate::item_stats::{ItemStatsMsg, TopRequest};
use crate::messages::Observation;
use crate::metrics::{label, labels2};
use crate::names;
use crate::record::partition_of;
use crate::serving::{AlsServing, CatalogView};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

pub use troupe_proto::api::{
    Branch, BranchReport, BranchStatus, Fallback, RecommendReply, RecommendRequest,
    RecommendedItem, Route, SimilarReply, SimilarRequest, SimilarSource,
};

#[derive(RactorMessage)]
pub enum RankerMsg {
    Recommend(RecommendRequest, RpcReplyPort<RecommendReply>),
    Similar(SimilarRequest, RpcReplyPort<SimilarReply>),
    Observe(RpcReplyPort<Observation>),
}

/// What a request must not show.
struct Exclusions {
    seen: Arc<FxHashSet<String>>,
    exclude: FxHashSet<String>,
    category: Option<String>,
}

impl Exclusions {
    /// `view` is the catalogue, read-locked once by the caller for a whole scan.
    fn blocks(&self, view: &CatalogView, id: &str) -> bool {
        self.seen.contains(id) || self.blocks_unseen(view, id)
    }

    /// Everything but the seen set (which scans check by row, see `seen_rows`).
    fn blocks_unseen(&self, view: &CatalogView, id: &str) -> bool {
        if (!self.exclude.is_empty() && self.exclude.contains(id)) || view.hidden(id) {
            return true;
        }
        match &self.category {
            Some(c) => !view.in_category(id, c),
            None => false,
        }
    }

    /// The seen set as rows of an index (one lookup per seen item instead of one string
    /// lookup per scanned candidate).
    fn seen_rows(&self, row: impl Fn(&str) -> Option<u32>) -> FxHashSet<u32> {
        self.seen.iter().filter_map(|id| row(id)).collect()
    }
}

enum BranchError {
    Failed(String),
}

type Candidates = Vec<(String, f32)>;
/// A branch's own list (ALS, content) or one shared between requests (popularity).
type Owned = Box<Candidates>;

/// The ALS and content candidates of one user (for one category filter), reused while
/// the user has no newer applied event, the same ALS version serves, and the entry is
/// younger than `ranker.cache_ttl`. Lists are filtered by the user's seen set, the
/// category and the catalogue as it was; deletes and hides are filtered again per request.
///
/// Validity comes from positions only: the entry holds the offset of the user's last
/// event it reflects and the partition offset up to which that was checked. A request
/// whose target is at or below the checked offset uses it at once; otherwise the
/// partition's UserFeatures confirms the user's last event is unchanged (a light query).
struct UserCandidates {
    /// Offset of the user's last event these reflect (0: none).
    user_offset: u64,
    /// Partition offset up to which `user_offset` is known to be the user's last event.
    checked_to: std::sync::atomic::AtomicU64,
    als_version: u64,
    built: Instant,
    cold_start: bool,
    seen: Arc<FxHashSet<String>>,
    als: (Option<Owned>, BranchReport),
    content: (Option<Owned>, BranchReport),
    item_item: (Option<Owned>, BranchReport),
}

type CacheKey = (String, Option<String>);

/// Room one typical user takes in the candidate cache, in ids (three candidate lists of
/// `ranker.candidates` plus some seen items). The cache holds `cache_users` of these.
const CACHE_IDS_PER_USER: u64 = 384;

/// Weighs a cache entry by the ids it holds, so users with long seen sets take more room
/// and the cache's memory stays bounded whatever the mix.
#[derive(Clone)]
struct IdsWeighter;

impl quick_cache::Weighter<CacheKey, Arc<UserCandidates>> for IdsWeighter {
    fn weight(&self, _: &CacheKey, e: &Arc<UserCandidates>) -> u64 {
        let len = |l: &Option<Owned>| l.as_ref().map_or(0, |l| l.len());
        (1 + e.seen.len() + len(&e.als.0) + len(&e.content.0) + len(&e.item_item.0)) as u64
    }
}

type CandidateCache = quick_cache::sync::Cache<CacheKey, Arc<UserCandidates>, IdsWeighter>;

/// Popularity list of one category, shared by requests for `ranker.popularity_refresh`.
struct PopularList {
    fetched: Instant,
    asked: usize,
    items: Arc<Candidates>,
}

/// Depth of a shared popularity list (requests filter seen items out of it).
const POPULAR_DEPTH: usize = 1000;

const CACHE_OUTCOMES: [&str; 3] = ["hit", "miss", "bypass"];

/// Metric handles resolved once (a family lookup builds its label strings every time).
struct Handles {
    outcomes: Vec<Vec<Counter>>,
    breakers: Vec<Gauge>,
    /// ok, degraded.
    served: [Counter; 2],
    cache: Vec<Counter>,
}

impl Handles {
    fn new(m: &crate::metrics::Metrics) -> Handles {
        Handles {
            outcomes: Branch::ALL
                .iter()
                .map(|b| {
                    BranchStatus::ALL
                        .iter()
                        .map(|s| {
                            m.branch_outcomes
                                .get_or_create(&labels2("branch", b.name(), "status", s.name()))
                                .clone()
                        })
                        .collect()
                })
                .collect(),
            breakers: Branch::ALL
                .iter()
                .map(|b| {
                    m.breaker_state
                        .get_or_create(&label("branch", b.name()))
                        .clone()
                })
                .collect(),
            served: ["ok", "degraded"].map(|o| {
                m.recommendations
                    .get_or_create(&label("outcome", o))
                    .clone()
            }),
            cache: CACHE_OUTCOMES
                .iter()
                .map(|o| {
                    m.candidate_cache
                        .get_or_create(&label("outcome", o))
                        .clone()
                })
                .collect(),
        }
    }
}

/// Shared by the actor and its request tasks.
pub struct RankerCore {
    ctx: Arc<Ctx>,
    handles: Handles,
    breakers: [Breaker; Branch::ALL.len()],
    cache: Option<CandidateCache>,
    popular: Mutex<FxHashMap<Option<String>, PopularList>>,
}

impl RankerCore {
    pub fn new(ctx: Arc<Ctx>) -> RankerCore {
        let r = &ctx.settings.ranker;
        RankerCore {
            handles: Handles::new(&ctx.metrics),
            breakers: Branch::ALL
                .map(|b| Breaker::new(b.name(), r.breaker_failures, r.breaker_open)),
            cache: (r.cache_users > 0).then(|| {
                CandidateCache::with_weighter(
                    r.cache_users,
                    r.cache_users as u64 * CACHE_IDS_PER_USER,
                    IdsWeighter,
                )
            }),
            popular: Mutex::new(FxHashMap::default()),
            ctx,
        }
    }

    /// Runs one branch under its breaker, deadline and fault hook.
    async fn branch<T, F>(&self, branch: Branch, fut: F) -> (Option<T>, BranchReport)
    where
        T: std::ops::Deref<Target = Candidates>,
        F: std::future::Future<Output = Result<Option<T>, String>>,
    {
        let idx = branch.index();
        let name = branch.name();
        let started = Instant::now();
        let breaker = &self.breakers[idx];
        let mut report = BranchReport {
            name: branch,
            ..Default::default()
        };
        if !breaker.allow() {
            report.status = BranchStatus::Open;
            self.note(idx, report.status);
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
                    None => BranchStatus::Unavailable,
                    Some(c) if c.is_empty() => BranchStatus::Empty,
                    Some(_) => BranchStatus::Ok,
                };
                v
            }
            Ok(Err(BranchError::Failed(e))) => {
                breaker.record(false);
                tracing::warn!(branch = name, error = %e, "branch failed");
                report.status = BranchStatus::Failed;
                None
            }
            Err(_) => {
                breaker.record(false);
                report.status = BranchStatus::Timeout;
                None
            }
        };
        report.candidates = out.as_ref().map_or(0, |c| c.len() as u32);
        report.micros = started.elapsed().as_micros() as u64;
        self.note(idx, report.status);
        (out, report)
    }

    fn note(&self, idx: usize, status: BranchStatus) {
        let h = &self.handles;
        h.outcomes[idx][status as usize].inc();
        h.breakers[idx].set(self.breakers[idx].state().gauge());
    }

    /// The user's features from the partition's UserFeatures; with `unchanged_since`
    /// (the caller's copy's offset) the answer is light when the user has not changed.
    async fn fetch_user(
        &self,
        user: &str,
        partition: u32,
        unchanged_since: u64,
    ) -> Option<UserView> {
        let actor = crate::handles::user_features(partition).get()?;
        let q = UserQuery {
            user: user.to_string(),
            unchanged_since,
        };
        let timeout = self
            .ctx
            .settings
            .ranker
            .branch_deadline
            .max(Duration::from_millis(20));
        ractor::call_t!(
            actor,
            UserFeaturesMsg::GetUser,
            timeout.as_millis() as u64,
            q
        )
        .ok()
    }

    /// The popularity list for `category`, at least `want` deep when the catalogue has
    /// that many, shared between requests for `ranker.popularity_refresh`.
    async fn popular_list(
        &self,
        category: Option<String>,
        want: usize,
        now_ms: i64,
    ) -> Result<Arc<Candidates>, String> {
        let refresh = self.ctx.settings.ranker.popularity_refresh;
        if let Some(e) = self.popular.lock().get(&category) {
            let deep_enough = e.asked >= want || e.items.len() < e.asked;
            if e.fetched.elapsed() < refresh && deep_enough {
                return Ok(e.items.clone());
            }
        }
        let ask = want.clamp(POPULAR_DEPTH, 100_000);
        let actor = crate::handles::item_stats()
            .get()
            .ok_or("item stats unavailable")?;
        let top = ractor::call_t!(
            actor,
            ItemStatsMsg::Top,
            self.ctx.settings.ranker.branch_deadline.as_millis() as u64,
            TopRequest {
                n: ask as u32,
                category: category.clone(),
                now_ms,
            }
        )
        .map_err(|e| e.to_string())?;
        let items = Arc::new(top.items);
        if !refresh.is_zero() {
            self.popular.lock().insert(
                category,
                PopularList {
                    fetched: Instant::now(),
                    asked: ask,
                    items: items.clone(),
                },
            );
        }
        Ok(items)
    }

    /// Runs the ALS and content branches for the user's features `view`.
    async fn user_candidates(
        &self,
        req: &RecommendRequest,
        view: UserView,
        als_version: u64,
        n: usize,
    ) -> UserCandidates {
        let ctx = &self.ctx;
        let s = &ctx.settings;
        let seen: Arc<FxHashSet<String>> = Arc::new(
            view.seen
                .iter()
                .chain(view.disliked.iter())
                .cloned()
                .collect(),
        );
        let excl = Arc::new(Exclusions {
            seen: seen.clone(),
            exclude: req.exclude.iter().cloned().collect(),
            category: req.category.clone(),
        });
        // Models read the uncapped interests, never the display history.
        let interests = Arc::new(view.interests);

        let als_fut = self.branch(Branch::Als, {
            let (ctx, excl, interests) = (ctx.clone(), excl.clone(), interests.clone());
            async move {
                let Some(model) = ctx.als.load_full() else {
                    return Ok(None);
                };
                if interests.is_empty() {
                    return Ok(Some(Owned::default()));
                }
                tokio::task::spawn_blocking(move || {
                    // Real-time fold-in: the user's vector from every interest up to
                    // this request, against the serving item factors.
                    let inter = pipeline::rows_of(
                        interests.iter().map(|(item, w, _)| (item.as_str(), *w)),
                        |id| model.items.get(id),
                    );
                    // The fold-in first: the seen rows and the catalogue's read lock are
                    // only needed for the search.
                    let Some(v) =
                        pipeline::als_vector(&model.fold_in, model.item_factors.view(), &inter)
                    else {
                        return Vec::new();
                    };
                    let seen = excl.seen_rows(|id| model.items.get(id));
                    let catalog = ctx.catalog.read();
                    let mut scratch = Vec::new();
                    let top = als_top_k(
                        &ctx,
                        &model,
                        &v,
                        n,
                        |i| {
                            seen.contains(&i)
                                || model
                                    .items
                                    .name(i)
                                    .is_none_or(|id| excl.blocks_unseen(&catalog, id))
                        },
                        &mut scratch,
                    );
                    named(&top, |i| model.items.name(i))
                })
                .await
                .map(|v| Some(Box::new(v)))
                .map_err(|e| e.to_string())
            }
        });
        let content_fut = self.branch(Branch::Content, {
            let (ctx, excl, interests) = (ctx.clone(), excl.clone(), interests.clone());
            let half_life = s.content.profile_half_life.as_secs_f64();
            async move {
                if ctx.content.read().is_empty() {
                    return Ok(None);
                }
                if interests.is_empty() {
                    return Ok(Some(Owned::default()));
                }
                tokio::task::spawn_blocking(move || {
                    // Lock order: content before catalog.
                    let index = ctx.content.read();
                    let touched: Vec<(u32, f32, i64)> = interests
                        .iter()
                        .filter_map(|(item, w, ts)| index.index(item).map(|i| (i, *w, ts / 1000)))
                        .collect();
                    let mut scratch = Vec::new();
                    let seen = excl.seen_rows(|id| index.index(id));
                    let catalog = ctx.catalog.read();
                    let profile = index.user_profile(&touched, half_life);
                    let top = pipeline::content(profile, |q| {
                        let (top, path) = index.top_k(
                            q,
                            n,
                            |i| {
                                !index.live(i)
                                    || seen.contains(&i)
                                    || index
                                        .name(i)
                                        .is_none_or(|id| excl.blocks_unseen(&catalog, id))
                            },
                            &mut scratch,
                        );
                        if let Some(path) = path {
                            ctx.metrics
                                .ann_searches
                                .get_or_create(&labels2("branch", "content", "path", path.as_str()))
                                .inc();
                        }
                        top
                    });
                    named(&top, |i| index.name(i))
                })
                .await
                .map(|v| Some(Box::new(v)))
                .map_err(|e| e.to_string())
            }
        });
        let item_item_fut = self.branch(Branch::ItemItem, {
            let (ctx, excl, interests) = (ctx.clone(), excl.clone(), interests.clone());
            async move {
                let Some(model) = ctx.als.load_full() else {
                    return Ok(None);
                };
                if model.item_item.is_none() {
                    return Ok(None);
                }
                if interests.is_empty() {
                    return Ok(Some(Owned::default()));
                }
                tokio::task::spawn_blocking(move || {
                    let Some(ii) = model.item_item.as_ref() else {
                        return Vec::new();
                    };
                    // No fold-in: the user's items (every interest up to this request)
                    // times the item-item rows.
                    let inter = pipeline::rows_of(
                        interests.iter().map(|(item, w, _)| (item.as_str(), *w)),
                        |id| model.items.get(id),
                    );
                    let seen = excl.seen_rows(|id| model.items.get(id));
                    let catalog = ctx.catalog.read();
                    let top = pipeline::item_item(ii, &inter, n, |i| {
                        seen.contains(&i)
                            || model
                                .items
                                .name(i)
                                .is_none_or(|id| excl.blocks_unseen(&catalog, id))
                    });
                    named(&top, |i| model.items.name(i))
                })
                .await
                .map(|v| Some(Box::new(v)))
                .map_err(|e| e.to_string())
            }
        });
        let (als, content, item_item) = tokio::join!(als_fut, content_fut, item_item_fut);
        UserCandidates {
            user_offset: view.last_offset,
            checked_to: std::sync::atomic::AtomicU64::new(view.applied_offset),
            als_version,
            built: Instant::now(),
            cold_start: !view.known || interests.is_empty(),
            seen,
            als,
            content,
            item_item,
        }
    }

    pub async fn recommend(&self, req: RecommendRequest) -> RecommendReply {
        let started = Instant::now();
        let ctx = &self.ctx;
        let s = &ctx.settings;
        let mut reply = RecommendReply {
            request_id: req.request_id.clone(),
            served_by: ctx.settings.node_name.clone(),
            route: Route::Local,
            user: req.user.clone(),
            content_encoder: ctx.content.read().encoder.clone(),
            ..Default::default()
        };
        let p = partition_of(&req.user, s.partitions);
        // Read-your-writes: the answer reflects the partition up to the client's position
        // (or the head at arrival), or says it is stale; so does an answer while the log
        // is unreachable (the head this node knows may be behind).
        let target = req.min_offset.unwrap_or_else(|| ctx.head(p));
        reply.awaited_offset = target;
        // A cluster node asked for a partition it does not serve (its owner unreachable,
        // or the partition moving) answers without the user's features: degraded, stale.
        let local = ctx.serving(p);
        reply.stale = !local
            || !ctx.wait_applied(p, target, s.ranker.freshness_wait).await
            || !ctx.log.writable();
        let k = req.k.max(1) as usize;
        let n = s.ranker.candidates.max(k);
        let als_version = ctx.als.load().as_ref().map_or(0, |m| m.version);
        // Requests with their own exclusions or clock bypass the cache.
        let cache = self
            .cache
            .as_ref()
            .filter(|_| local && req.exclude.is_empty() && req.now_ms == 0);
        let key = (req.user.clone(), req.category.clone());
        let cached = cache
            .and_then(|c| c.get(&key))
            .filter(|e| e.als_version == als_version && e.built.elapsed() < s.ranker.cache_ttl);
        let mut features_ok = true;
        let mut view_applied = 0;
        // An entry checked up to the target is current; otherwise ask whether the user's
        // last event is still the one it reflects (the answer is full when it is not).
        let (hit, view) = match cached {
            Some(e) if e.checked_to.load(Ordering::Relaxed) >= target => (Some(e), None),
            Some(e) => match self.fetch_user(&req.user, p, e.user_offset).await {
                Some(v) if v.last_offset == e.user_offset => {
                    e.checked_to.fetch_max(v.applied_offset, Ordering::Relaxed);
                    view_applied = v.applied_offset;
                    (Some(e), None)
                }
                v => (None, v),
            },
            None if local => (None, self.fetch_user(&req.user, p, 0).await),
            None => (None, None),
        };
        // Indices into CACHE_OUTCOMES.
        let outcome = match (&cache, &hit) {
            (Some(_), Some(_)) => 0,
            (Some(_), None) => 1,
            (None, _) => 2,
        };
        self.handles.cache[outcome].inc();
        let user = match hit {
            Some(e) => {
                reply.cached = true;
                e
            }
            None => {
                features_ok = view.is_some();
                let view = view.unwrap_or_default();
                view_applied = view.applied_offset;
                let e = Arc::new(self.user_candidates(&req, view, als_version, n).await);
                // Only complete answers are reused. A missing ALS model is complete (a
                // new version drops the entry); an empty content index is not.
                let failed = [&e.als.1, &e.content.1, &e.item_item.1]
                    .iter()
                    .any(|r| r.status.is_fault())
                    || e.content.1.status == BranchStatus::Unavailable;
                if let Some(c) = cache {
                    if features_ok && !reply.stale && !failed {
                        c.insert(key, e.clone());
                    }
                }
                e
            }
        };
        reply.applied_offset = view_applied.max(ctx.applied(p));
        reply.cold_start = user.cold_start;

        let excl = Exclusions {
            seen: user.seen.clone(),
            exclude: req.exclude.iter().cloned().collect(),
            category: req.category.clone(),
        };
        let want = n + excl.seen.len() + excl.exclude.len();
        let (pop, r2) = self
            .branch(Branch::Popularity, async {
                self.popular_list(req.category.clone(), want, req.now_ms)
                    .await
                    .map(Some)
            })
            .await;
        let mut r0 = user.als.1.clone();
        let mut r1 = user.content.1.clone();
        let mut r3 = user.item_item.1.clone();
        if reply.cached {
            r0.micros = 0;
            r1.micros = 0;
            r3.micros = 0;
        }
        reply.als_model_version = als_version;
        // In `Branch` order.
        reply.branches = vec![r0, r1, r2, r3];
        reply.degraded = !features_ok || reply.branches.iter().any(|b| b.status.is_fault());

        // Blend over a per-request index of candidate ids; what the catalogue hides or
        // deletes, and what the request excludes, is filtered here for every branch.
        let catalog = ctx.catalog.read();
        let total = user.als.0.as_ref().map_or(0, |l| l.len())
            + user.content.0.as_ref().map_or(0, |l| l.len())
            + user.item_item.0.as_ref().map_or(0, |l| l.len())
            + n;
        let mut ids: Vec<&str> = Vec::with_capacity(total);
        let mut index: FxHashMap<&str, u32> =
            FxHashMap::with_capacity_and_hasher(total, Default::default());
        let mut lists: Vec<Vec<Scored>> = Vec::new();
        fn slice(l: Option<&Candidates>) -> &[(String, f32)] {
            l.map_or(&[], Vec::as_slice)
        }
        // ALS, content and item-item lists were scanned without the user's seen items, and
        // a cached entry dies with the user's next event, so they skip the seen check.
        // In `Branch` order.
        let sources = [
            (slice(user.als.0.as_deref()), usize::MAX, false),
            (slice(user.content.0.as_deref()), usize::MAX, false),
            (slice(pop.as_deref()), n, true),
            (slice(user.item_item.0.as_deref()), usize::MAX, false),
        ];
        for (cands, limit, check_seen) in sources {
            let list = cands
                .iter()
                .filter(|(id, _)| {
                    !(if check_seen {
                        excl.blocks(&catalog, id)
                    } else {
                        excl.blocks_unseen(&catalog, id)
                    })
                })
                .take(limit)
                .map(|(id, score)| {
                    let next = ids.len() as u32;
                    let i = *index.entry(id.as_str()).or_insert_with(|| {
                        ids.push(id.as_str());
                        next
                    });
                    Scored {
                        item: i,
                        score: *score,
                    }
                })
                .collect();
            lists.push(list);
        }
        let pi = Branch::Popularity.index();
        if let Some(b) = reply.branches.get_mut(pi) {
            b.candidates = lists[pi].len() as u32;
        }
        let requested = req
            .weights
            .as_deref()
            .and_then(requested_weights)
            .unwrap_or(s.ranker.weights);
        let (weights, fallback) = fallback_weights(requested, s.ranker.weights, &lists);
        reply.fallback = fallback;
        let branch_lists: Vec<BranchList<'_>> = lists
            .iter()
            .zip(weights)
            .map(|(l, w)| BranchList {
                weight: w,
                items: l,
            })
            .collect();
        let blended = blend::blend(&branch_lists, s.ranker.normalization, k, |_| true);
        reply.items = blended
            .iter()
            .map(|b| {
                let id = ids[b.item as usize];
                let categories = catalog
                    .items
                    .get(id)
                    .map(|i| i.categories.clone())
                    .unwrap_or_default();
                RecommendedItem {
                    item: id.to_string(),
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
        self.handles.served[usize::from(reply.degraded)].inc();
        if reply.stale {
            ctx.metrics.recommendations_stale.inc();
        }
        reply
    }

    pub fn similar(&self, req: &SimilarRequest) -> SimilarReply {
        let k = req.k.max(1) as usize;
        let ctx = &self.ctx;
        let mut reply = SimilarReply {
            item: req.item.clone(),
            ..Default::default()
        };
        let mut scratch = Vec::new();
        {
            let index = ctx.content.read();
            if let Some(row) = index.row(&req.item) {
                let catalog = ctx.catalog.read();
                let (top, _) = index.top_k(
                    &row,
                    k,
                    |i| {
                        !index.live(i)
                            || index
                                .name(i)
                                .is_none_or(|id| id == req.item || catalog.hidden(id))
                    },
                    &mut scratch,
                );
                reply.source = SimilarSource::Content;
                reply.items = named(&top, |i| index.name(i));
                return reply;
            }
        }
        if let Some(model) = ctx.als.load_full() {
            if let Some(i) = model.items.get(&req.item) {
                let row = model.item_factors.row(i as usize).to_vec();
                let catalog = ctx.catalog.read();
                let top = als_top_k(
                    ctx,
                    &model,
                    &row,
                    k,
                    |j| j == i || model.items.name(j).is_none_or(|id| catalog.hidden(id)),
                    &mut scratch,
                );
                reply.source = SimilarSource::Als;
                reply.items = named(&top, |j| model.items.name(j));
            }
        }
        reply
    }
}

/// The best `k` items of the ALS model for `query`: through the model's HNSW index
/// when it has one (built for large catalogues, `ranker.ann_min_items`), else by an
/// exact scan of every item factor.
fn als_top_k(
    ctx: &Ctx,
    model: &AlsServing,
    query: &[f32],
    k: usize,
    excluded: impl Fn(u32) -> bool,
    scratch: &mut Vec<f32>,
) -> Vec<topk::Scored> {
    match model.ann.load().as_deref() {
        Some(index) => {
            let (top, path) = index.search(model.item_factors.view(), query, k, excluded, scratch);
            ctx.metrics
                .ann_searches
                .get_or_create(&labels2("branch", "als", "path", path.as_str()))
                .inc();
            top
        }
        None => topk::top_k_dense(model.item_factors.view(), query, k, excluded, scratch),
    }
}

/// The weights to blend with: `requested`, unless every branch it selects (weight > 0)
/// has no candidate while another branch has some. Then the configured weights (or, when
/// those select nothing usable either, equal weights over the branches with candidates),
/// and a [`Fallback`] saying so: an answer never shows one branch's order with every share
/// zero.
fn fallback_weights(
    requested: Weights,
    configured: Weights,
    lists: &[Vec<Scored>],
) -> (Weights, Option<Fallback>) {
    let usable = |w: &Weights| w.iter().zip(lists).any(|(&w, l)| w > 0.0 && !l.is_empty());
    if usable(&requested) || lists.iter().all(Vec::is_empty) {
        return (requested, None);
    }
    let used = if usable(&configured) {
        configured
    } else {
        let mut w = [0.0; NB];
        for (x, l) in w.iter_mut().zip(lists) {
            if !l.is_empty() {
                *x = 1.0;
            }
        }
        w
    };
    let selected: Vec<&str> = Branch::ALL
        .iter()
        .zip(requested)
        .filter(|(_, w)| *w > 0.0)
        .map(|(b, _)| b.name())
        .collect();
    let fb = Fallback {
        requested: requested.to_vec(),
        used: used.to_vec(),
        reason: format!(
            "the selected branches ({}) have no candidates for this user",
            selected.join(", ")
        ),
    };
    (used, Some(fb))
}

const NB: usize = Branch::ALL.len();

/// Blend weights, one per [`Branch`] in blend order.
type Weights = [f32; NB];

/// A request's weights: four in `Branch` order, or three (als, content, popularity; the
/// form before the item-item branch) with item_item at 0. Other lengths are refused by
/// the request check; here they fall back to the configured weights.
fn requested_weights(w: &[f32]) -> Option<Weights> {
    match *w {
        [a, c, p] => Some([a, c, p, 0.0]),
        [a, c, p, i] => Some([a, c, p, i]),
        _ => None,
    }
}

fn named<'a>(top: &[Scored], name: impl Fn(u32) -> Option<&'a str>) -> Vec<(String, f32)> {
    top.iter()
        .filter_map(|s| name(s.item).map(|n| (n.to_string(), s.score)))
        .collect()
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
                // The sender's span (ractor carries it on local sends) is the parent.
                let span = tracing::info_span!("rank", user = %req.user, k = req.k);
                tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        let r = core.recommend(req).await;
                        port.send(r).discard();
                    },
                    span,
                ));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[u32]) -> Vec<Scored> {
        items
            .iter()
            .map(|&item| Scored { item, score: 1.0 })
            .collect()
    }

    #[test]
    fn weights_that_select_only_empty_branches_fall_back_and_say_so() {
        let lists = vec![list(&[1, 2]), Vec::new(), list(&[3]), Vec::new()];
        let configured = [0.5, 0.1, 0.1, 0.3];
        // Content only, and content is empty: the configured weights, flagged.
        let (w, fb) = fallback_weights([0.0, 1.0, 0.0, 0.0], configured, &lists);
        assert_eq!(w, configured);
        let fb = fb.unwrap();
        assert_eq!(fb.requested, vec![0.0, 1.0, 0.0, 0.0]);
        assert!(fb.reason.contains("content"), "{}", fb.reason);
        // Item-item only, and it is empty: flagged by its name.
        let (_, fb) = fallback_weights([0.0, 0.0, 0.0, 1.0], configured, &lists);
        assert!(fb.unwrap().reason.contains("item_item"));
        // Configured weights that select nothing usable either: equal over non-empty.
        let (w, fb) = fallback_weights([0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], &lists);
        assert_eq!((w, fb.is_some()), ([1.0, 0.0, 1.0, 0.0], true));
        // A usable selection is kept as asked, even when other branches are empty.
        let (w, fb) = fallback_weights([1.0, 0.0, 0.0, 0.0], configured, &lists);
        assert_eq!((w, fb), ([1.0, 0.0, 0.0, 0.0], None));
        // Nothing anywhere: nothing to fall back to.
        let empty = vec![Vec::new(); 4];
        assert!(fallback_weights([0.0, 1.0, 0.0, 0.0], configured, &empty)
            .1
            .is_none());
    }

    #[test]
    fn three_weights_leave_the_item_item_branch_out() {
        assert_eq!(
            requested_weights(&[0.7, 0.2, 0.1]),
            Some([0.7, 0.2, 0.1, 0.0])
        );
        assert_eq!(
            requested_weights(&[0.1, 0.2, 0.3, 0.4]),
            Some([0.1, 0.2, 0.3, 0.4])
        );
        assert_eq!(requested_weights(&[1.0]), None);
    }
}
