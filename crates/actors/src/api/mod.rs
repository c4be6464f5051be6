//! The request layer: one implementation of every API operation under the transports
//! (HTTP in the node crate, client calls arriving at the cluster gateway). It owns access
//! classes and tokens, admission (in-flight limits per class), field checks with the
//! reasons clients see, partitioning and idempotency keys of writes, freshness waits of
//! reads, and routing (local, forwarded to the partition's owner, degraded).
//!
//! A transport parses its own syntax (JSON bodies, query strings, frames) into the
//! `troupe_proto::api` types, calls [`Api`], and renders the answer; errors are
//! [`ApiError`]s whose `code` and `detail` are what HTTP puts in its JSON body.

pub mod limits;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use troupe_proto::api::{
    ApiError, ClusterStatus, ErrorKind, EventIn, ItemIn, ItemStatsView, ItemView, MemberStatus, Op,
    OpReply, PartitionStatus, PeerState, RecommendQuery, RecommendReply, RecommendRequest,
    RetrainReport, RollbackReply, SimilarReply, SimilarRequest, SimilarSource, SlotState,
    UserQuery, UserRead, Written,
};
use troupe_proto::log::{AppendEntry, Position};
use troupe_proto::record::{hash128, partition_of, Event, Item, Payload, CATALOG_STREAM};

use crate::ctx::Ctx;
use crate::log::LogError;
use crate::node::{self, CallError};
use limits::{check_id, check_text};

/// How long a retrain may take.
const RETRAIN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Options of the request layer (from the node's `[http]` settings: they apply to every
/// transport).
#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// Bearer token of writes and admin operations (and user data).
    pub auth_token: Option<String>,
    /// A second token that only reads user data (and reads, when they are not public).
    pub read_token: Option<String>,
    /// Recommendations, similar items and item reads need no token.
    pub public_reads: bool,
    pub max_events_per_request: usize,
    /// Reads handled at once (every transport together).
    pub max_in_flight_reads: usize,
    /// Writes handled at once (every transport together).
    pub max_in_flight_writes: usize,
    /// How long an operation may wait on the node's actors.
    pub request_timeout: Duration,
}

/// Who may ask for an operation, and which in-flight limit it counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Writes and admin operations: the token, when one is configured.
    Writes,
    /// Recommendations, similar items, item reads: public unless `public_reads = false`.
    Reads,
    /// User data: a token (the read token is enough) when any is configured.
    UserData,
    /// Operational reads: public.
    Ops,
}

impl Access {
    /// The class of `op`.
    pub fn of(op: &Op) -> Access {
        match op {
            Op::Events { .. }
            | Op::UpsertItems(_)
            | Op::DeleteItem { .. }
            | Op::EraseUser { .. }
            | Op::Retrain
            | Op::Rollback
            | Op::DeadLetters => Access::Writes,
            Op::Recommend(_) | Op::Similar { .. } | Op::GetItem { .. } | Op::ItemStats { .. } => {
                Access::Reads
            }
            Op::GetUser { .. } => Access::UserData,
            Op::ClusterStatus => Access::Ops,
        }
    }

    /// Counts against the write limit.
    pub fn is_write(self) -> bool {
        self == Access::Writes
    }

    fn needs_token(self, o: &ApiOptions) -> bool {
        match self {
            Access::Writes => o.auth_token.is_some(),
            Access::Reads => !o.public_reads && (o.auth_token.is_some() || o.read_token.is_some()),
            Access::UserData => o.auth_token.is_some() || o.read_token.is_some(),
            Access::Ops => false,
        }
    }

    fn read_token_ok(self) -> bool {
        matches!(self, Access::Reads | Access::UserData)
    }
}

/// One admission class: its permits and its in-flight gauge.
struct Class {
    name: &'static str,
    permits: Arc<Semaphore>,
    in_flight: Gauge,
}

impl Class {
    fn new(ctx: &Ctx, name: &'static str, n: usize) -> Class {
        // The refusal counter exists (at 0) before the first refusal, for alert rules.
        ctx.metrics
            .http_saturated
            .get_or_create(&crate::metrics::label("class", name))
            .inc_by(0);
        Class {
            name,
            permits: Arc::new(Semaphore::new(n.max(1))),
            in_flight: ctx
                .metrics
                .http_in_flight
                .get_or_create(&crate::metrics::label("class", name))
                .clone(),
        }
    }
}

/// An admitted operation's slot in its class, held until dropped.
pub struct Permit {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// Constant-time comparison, so the time of a refusal says nothing about the token.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// An actor that did not answer: the node cannot answer now.
fn unavailable(e: CallError) -> ApiError {
    ApiError::unavailable(e.to_string())
}

/// The request layer of one node.
pub struct Api {
    ctx: Arc<Ctx>,
    opts: ApiOptions,
    reads: Class,
    writes: Class,
    requests: AtomicU64,
}

impl Api {
    /// The node's request layer; the gateway reaches it through `ctx.api`.
    pub fn new(ctx: Arc<Ctx>, opts: ApiOptions) -> Arc<Api> {
        let api = Arc::new(Api {
            reads: Class::new(&ctx, "read", opts.max_in_flight_reads),
            writes: Class::new(&ctx, "write", opts.max_in_flight_writes),
            ctx,
            opts,
            requests: AtomicU64::new(0),
        });
        // A second layer (tests that build several routers) leaves the first in place.
        drop(api.ctx.api.set(Arc::downgrade(&api)));
        api
    }

    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    pub fn options(&self) -> &ApiOptions {
        &self.opts
    }

    /// Checks the bearer token `token` against `access`.
    pub fn authorize(&self, access: Access, token: Option<&str>) -> Result<(), ApiError> {
        let o = &self.opts;
        if !access.needs_token(o) {
            return Ok(());
        }
        let ok = token.is_some_and(|t| {
            o.auth_token.as_deref().is_some_and(|a| same_token(t, a))
                || (access.read_token_ok()
                    && o.read_token.as_deref().is_some_and(|r| same_token(t, r)))
        });
        if ok {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "a valid bearer token is required for this route",
            ))
        }
    }

    /// A slot in `access`'s class, or `overloaded` when every slot is taken.
    pub fn admit(&self, access: Access) -> Result<Permit, ApiError> {
        let class = if access.is_write() {
            &self.writes
        } else {
            &self.reads
        };
        match class.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                class.in_flight.inc();
                Ok(Permit {
                    _permit: permit,
                    in_flight: class.in_flight.clone(),
                })
            }
            Err(_) => {
                self.ctx
                    .metrics
                    .http_saturated
                    .get_or_create(&crate::metrics::label("class", class.name))
                    .inc();
                Err(ApiError::overloaded(format!(
                    "too many {}s in flight",
                    class.name
                )))
            }
        }
    }

    /// Reads and writes in flight now, and whether each class is full.
    pub fn in_flight(&self) -> [(i64, bool); 2] {
        [&self.reads, &self.writes].map(|c| (c.in_flight.get(), c.permits.available_permits() == 0))
    }

    /// One operation from a client program: the token checked, admitted into its class,
    /// then answered as the matching HTTP route answers it.
    pub async fn call(&self, token: Option<&str>, op: Op) -> Result<OpReply, ApiError> {
        let access = Access::of(&op);
        self.authorize(access, token)?;
        let _permit = self.admit(access)?;
        match op {
            Op::Events {
                events,
                request_key,
            } => {
                let request = match &request_key {
                    Some(k) => {
                        check_request_key(k)?;
                        request_key_bytes(k)
                    }
                    // Without a key the request is named by its content, so a retry of
                    // the same call maps to the same keys.
                    None => {
                        let body = troupe_proto::codec::encode(&events)
                            .map_err(|e| ApiError::invalid(format!("events: {e}")))?;
                        hash128(&[b"body", &body]).to_le_bytes().to_vec()
                    }
                };
                if events.is_empty() {
                    return Err(ApiError::invalid("no events in the body"));
                }
                self.check_count(events.len(), "too_many_events", "events")?;
                let now = now_ms();
                let mut checked = Vec::with_capacity(events.len());
                let mut problems = Vec::new();
                for (i, e) in events.into_iter().enumerate() {
                    match self.check_event(e, now) {
                        Ok(e) => checked.push(e),
                        Err(why) => problems.push(format!("event {}: {why}", i + 1)),
                    }
                }
                refuse_problems(problems).inspect_err(|_| self.count_invalid_events())?;
                self.append_events(checked, &request)
                    .await
                    .map(OpReply::Written)
            }
            Op::Recommend(q) => {
                let req = self.recommend_request(q)?;
                self.recommend(req).await.map(OpReply::Recommend)
            }
            Op::Similar {
                item,
                k,
                min_offset,
            } => {
                check_id("item", &item).map_err(ApiError::invalid)?;
                self.check_k(k)?;
                self.similar(item, k, min_offset)
                    .await
                    .map(OpReply::Similar)
            }
            Op::UpsertItems(items) => {
                if items.is_empty() {
                    return Err(ApiError::invalid("no items in the body"));
                }
                self.check_count(items.len(), "too_many_items", "items")?;
                let mut checked = Vec::with_capacity(items.len());
                let mut problems = Vec::new();
                for (n, i) in items.into_iter().enumerate() {
                    match check_item(i) {
                        Ok(it) => checked.push(it),
                        Err(e) => problems.push(format!("item {}: {e}", n + 1)),
                    }
                }
                if !problems.is_empty() {
                    problems.truncate(20);
                    return Err(ApiError::invalid(format!(
                        "nothing was accepted: {}",
                        problems.join("; ")
                    )));
                }
                self.upsert_items(checked).await.map(OpReply::Written)
            }
            Op::DeleteItem { id } => {
                check_id("id", &id).map_err(ApiError::invalid)?;
                self.delete_item(id).await.map(OpReply::Written)
            }
            Op::GetItem { id, min_offset } => {
                check_id("id", &id).map_err(ApiError::invalid)?;
                self.get_item(&id, min_offset).await.map(OpReply::Item)
            }
            Op::ItemStats { item, min_offset } => {
                check_id("id", &item).map_err(ApiError::invalid)?;
                self.item_stats(item, min_offset)
                    .await
                    .map(OpReply::ItemStats)
            }
            Op::GetUser { user, min_offset } => {
                check_id("id", &user).map_err(ApiError::invalid)?;
                self.get_user(user, min_offset).await.map(OpReply::User)
            }
            Op::EraseUser { user } => {
                check_id("id", &user).map_err(ApiError::invalid)?;
                self.erase_user(user).await.map(OpReply::Written)
            }
            Op::Retrain => self.retrain().await.map(OpReply::Retrain),
            Op::Rollback => self.rollback().await.map(OpReply::Rollback),
            Op::ClusterStatus => Ok(OpReply::Cluster(self.cluster_status())),
            Op::DeadLetters => self.dead_letters().await.map(|docs| {
                OpReply::DeadLetters(
                    docs.into_iter()
                        .map(|d| String::from_utf8_lossy(&d).into_owned())
                        .collect(),
                )
            }),
        }
    }

    fn check_count(&self, n: usize, code: &str, what: &str) -> Result<(), ApiError> {
        check_count(n, self.opts.max_events_per_request, code, what)
    }

    fn check_k(&self, k: u32) -> Result<(), ApiError> {
        let max = self.ctx.settings.ranker.max_k;
        if !(1..=max as u64).contains(&u64::from(k)) {
            return Err(ApiError::invalid(format!(
                "k must be an integer in 1..={max}, got `{k}`"
            )));
        }
        Ok(())
    }

    /// Counts a request of events refused as invalid.
    pub fn count_invalid_events(&self) {
        self.ctx
            .metrics
            .events_rejected
            .get_or_create(&crate::metrics::label("reason", "invalid"))
            .inc();
    }

    /// A checked event and whether it carried its own identity (`event_id` or `ts`).
    pub fn check_event(&self, e: EventIn, now: i64) -> Result<(Event, bool), String> {
        let skew_ms = self.ctx.settings.max_future_skew.as_millis() as i64;
        check_event(e, now, skew_ms)
    }

    /// Appends checked events, each to its user's partition, keyed by its own identity
    /// or by `request` (the request's name) and its place in it.
    pub async fn append_events(
        &self,
        events: Vec<(Event, bool)>,
        request: &[u8],
    ) -> Result<Written, ApiError> {
        let p = self.ctx.settings.partitions;
        let trace = crate::trace::sampled();
        let entries: Vec<AppendEntry> = events
            .into_iter()
            .enumerate()
            .map(|(i, (e, own))| {
                let stream = partition_of(&e.user, p);
                let payload = Payload::Event(e);
                AppendEntry {
                    stream,
                    key: event_key(&payload, own, request, i),
                    payload,
                    trace: trace.clone(),
                }
            })
            .collect();
        let positions = self.append(entries).await?;
        Ok(written(positions))
    }

    /// Appends checked items to the catalog stream.
    pub async fn upsert_items(&self, items: Vec<Item>) -> Result<Written, ApiError> {
        let entries = items
            .into_iter()
            .map(|it| {
                AppendEntry::new(CATALOG_STREAM, Payload::ItemUpsert(it))
                    .traced(crate::trace::sampled())
            })
            .collect();
        Ok(written(self.append(entries).await?))
    }

    pub async fn delete_item(&self, id: String) -> Result<Written, ApiError> {
        let e = AppendEntry::new(CATALOG_STREAM, Payload::ItemDelete { id })
            .traced(crate::trace::sampled());
        Ok(written(self.append(vec![e]).await?))
    }

    pub async fn erase_user(&self, user: String) -> Result<Written, ApiError> {
        let p = partition_of(&user, self.ctx.settings.partitions);
        let e = AppendEntry::new(p, Payload::EraseUser { user }).traced(crate::trace::sampled());
        Ok(written(self.append(vec![e]).await?))
    }

    /// Refuses writes the node cannot take now (draining, journal failed, log away).
    pub fn writable(&self) -> Result<(), ApiError> {
        let ctx = &self.ctx;
        if ctx.health.draining.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("node is shutting down"));
        }
        if ctx.health.journal_failed.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable(
                "journal is recovering from a write error",
            ));
        }
        if !ctx.log.writable() {
            ctx.metrics.log_write_errors.inc();
            return Err(ApiError::unavailable(format!(
                "the {} log cannot be reached; nothing was written, retry later",
                ctx.log.backend()
            )));
        }
        Ok(())
    }

    async fn append(&self, entries: Vec<AppendEntry>) -> Result<Vec<Position>, ApiError> {
        self.writable()?;
        node::append(&self.ctx, entries, self.opts.request_timeout)
            .await
            .map_err(|e| match e {
                LogError::Refused(why) => ApiError::invalid(why),
                LogError::Unavailable(why) | LogError::Failed(why) => {
                    self.ctx.metrics.log_write_errors.inc();
                    ApiError::unavailable(why)
                }
            })
    }

    /// Waits (bounded by `freshness_wait`) for the serving consumer of `stream` to reach
    /// `min_offset`, or the stream's head at arrival; true when it did not, or when the
    /// log is unreachable so the node cannot know its head is current (stale).
    pub async fn wait_fresh(&self, stream: u32, min_offset: Option<u64>) -> bool {
        let ctx = &self.ctx;
        let target = min_offset.unwrap_or_else(|| ctx.head(stream));
        !ctx.wait_applied(stream, target, ctx.settings.ranker.freshness_wait)
            .await
            || !ctx.log.writable()
    }

    /// Checks a client's recommendation query and names the request.
    pub fn recommend_request(&self, q: RecommendQuery) -> Result<RecommendRequest, ApiError> {
        check_id("user", &q.user).map_err(ApiError::invalid)?;
        self.check_k(q.k)?;
        if let Some(c) = &q.category {
            check_text("category", c, 1, limits::MAX_CATEGORY_CHARS).map_err(ApiError::invalid)?;
        }
        if q.exclude.len() > limits::MAX_EXCLUDE_IDS {
            return Err(ApiError::invalid(format!(
                "{} excluded items; the limit is {}",
                q.exclude.len(),
                limits::MAX_EXCLUDE_IDS
            )));
        }
        for x in &q.exclude {
            check_id("exclude", x).map_err(ApiError::invalid)?;
        }
        if let Some(w) = &q.weights {
            let ok = (3..=troupe_proto::api::Branch::ALL.len()).contains(&w.len())
                && w.iter()
                    .all(|x| x.is_finite() && (0.0..=limits::MAX_WEIGHT).contains(x));
            if !ok {
                return Err(ApiError::invalid(format!(
                    "weights must be three or four numbers in 0..={} (als, content, popularity, item_item); got {w:?}",
                    limits::MAX_WEIGHT
                )));
            }
        }
        Ok(self.name_request(RecommendRequest {
            user: q.user,
            k: q.k,
            category: q.category,
            exclude: q.exclude,
            weights: q.weights,
            request_id: String::new(),
            now_ms: 0,
            min_offset: q.min_offset,
        }))
    }

    /// Gives a checked request this node's next request id.
    pub fn name_request(&self, mut req: RecommendRequest) -> RecommendRequest {
        req.request_id = format!(
            "{}-{:x}-{}",
            self.ctx.settings.node_name,
            self.ctx.started.elapsed().as_nanos(),
            self.requests.fetch_add(1, Ordering::Relaxed)
        );
        req
    }

    /// Top-k for a checked request: here when this node serves the user's partition,
    /// else from the owner, else degraded (flagged).
    pub async fn recommend(&self, req: RecommendRequest) -> Result<RecommendReply, ApiError> {
        let reply = crate::cluster::recommend(&self.ctx, req, self.opts.request_timeout)
            .await
            .map_err(unavailable)?;
        match reply.error {
            Some(e) => Err(ApiError::unavailable(e)),
            None => Ok(reply),
        }
    }

    /// Items like `item` (checked id and k).
    pub async fn similar(
        &self,
        item: String,
        k: u32,
        min_offset: Option<u64>,
    ) -> Result<SimilarReply, ApiError> {
        self.wait_fresh(CATALOG_STREAM, min_offset).await;
        if self.ctx.catalog.read().deleted.contains(&item) {
            return Err(ApiError::not_found(format!("item `{item}` was deleted")));
        }
        let req = SimilarRequest { item, k };
        let r = crate::handles::ranker()
            .call(self.opts.request_timeout, |p| {
                crate::ranker::RankerMsg::Similar(req, p)
            })
            .await
            .map_err(unavailable)?;
        if r.source == SimilarSource::None {
            return Err(ApiError::not_found(format!(
                "item `{}` has no embedding or factors",
                r.item
            )));
        }
        Ok(r)
    }

    pub async fn get_item(&self, id: &str, min_offset: Option<u64>) -> Result<ItemView, ApiError> {
        let stale = self.wait_fresh(CATALOG_STREAM, min_offset).await;
        let view = self.ctx.catalog.read();
        let item = view
            .items
            .get(id)
            .ok_or_else(|| ApiError::not_found(format!("no item `{id}` in the catalog")))?;
        Ok(ItemView {
            item: item.clone(),
            applied_offset: view.applied,
            stale,
        })
    }

    /// The interaction events naming an item that this node's item statistics have
    /// applied (every kind, undecayed): 0 for a catalog item nobody touched yet; not
    /// found for a deleted item and for an id neither the catalog nor any event named.
    pub async fn item_stats(
        &self,
        item: String,
        min_offset: Option<u64>,
    ) -> Result<ItemStatsView, ApiError> {
        let stale = self.wait_fresh(CATALOG_STREAM, min_offset).await;
        if self.ctx.catalog.read().deleted.contains(&item) {
            return Err(ApiError::not_found(format!("item `{item}` was deleted")));
        }
        let counted = crate::handles::item_stats()
            .call(self.opts.request_timeout, |p| {
                crate::item_stats::ItemStatsMsg::EventCount(item.clone(), p)
            })
            .await
            .map_err(unavailable)?;
        let known = counted.is_some() || self.ctx.catalog.read().items.contains_key(&item);
        if !known {
            return Err(ApiError::not_found(format!(
                "no item `{item}` in the catalog and no event for it applied yet"
            )));
        }
        Ok(ItemStatsView {
            item,
            event_count: counted.unwrap_or(0),
            node: self.ctx.settings.node_name.clone(),
            stale,
        })
    }

    /// A user's features from the owner of their partition (here or one hop away).
    pub async fn get_user(
        &self,
        user: String,
        min_offset: Option<u64>,
    ) -> Result<UserRead, ApiError> {
        let partition = partition_of(&user, self.ctx.settings.partitions);
        let query = UserQuery {
            user: user.clone(),
            unchanged_since: 0,
        };
        let (view, stale) =
            crate::cluster::user_view(&self.ctx, query, min_offset, self.opts.request_timeout)
                .await
                .map_err(ApiError::unavailable)?;
        if !view.known {
            return Err(ApiError::not_found(format!("no events for user `{user}`")));
        }
        Ok(UserRead {
            user,
            partition,
            view,
            stale,
        })
    }

    /// The cluster as this node sees it; a single node reports itself serving every
    /// partition.
    pub fn cluster_status(&self) -> ClusterStatus {
        let ctx = &self.ctx;
        if let Some(c) = &ctx.cluster {
            return c.status(ctx);
        }
        let me = ctx.settings.node_name.clone();
        let model_version = ctx.als.load().as_ref().map_or(0, |m| m.version);
        ClusterStatus {
            node: me.clone(),
            ready: ctx.health.ready(),
            members: vec![MemberStatus {
                name: me.clone(),
                this_node: true,
                state: PeerState::Up,
                model_version,
            }],
            partitions: (0..ctx.settings.partitions)
                .map(|p| PartitionStatus {
                    partition: p,
                    owner: me.clone(),
                    epoch: 0,
                    state: SlotState::Serving,
                    applied_offset: Some(ctx.applied(p)),
                })
                .collect(),
            trainer_leader: Some(me),
            model_version,
        }
    }

    /// Every dead letter (JSON documents), oldest first, whichever backend keeps them.
    pub async fn dead_letters(&self) -> Result<Vec<Vec<u8>>, ApiError> {
        let ctx = &self.ctx;
        let mut docs: Vec<Vec<u8>> = ctx
            .state
            .dead_letters()
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
            .into_iter()
            .map(|d| d.doc)
            .collect();
        // Dead letters an older build kept elsewhere come first.
        let old = ctx
            .state
            .legacy_dead_letters()
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        docs.splice(0..0, old);
        Ok(docs)
    }

    /// Retrains now (on the trainer leader, wherever it runs). No leader, or one that
    /// did not answer: unavailable, retry after 5 s.
    pub async fn retrain(&self) -> Result<RetrainReport, ApiError> {
        let r = crate::handles::als_trainer()
            .call(RETRAIN_TIMEOUT, |p| {
                crate::trainer::AlsTrainerMsg::Retrain(p)
            })
            .await
            .map_err(unavailable)?;
        if r.no_leader {
            return Err(ApiError {
                retry_after_s: Some(5),
                ..ApiError::unavailable(r.reason)
            });
        }
        Ok(r)
    }

    /// Serves the newest kept model version below the served one, on every node.
    pub async fn rollback(&self) -> Result<RollbackReply, ApiError> {
        let r = crate::handles::als_trainer()
            .call(
                self.opts.request_timeout,
                crate::trainer::AlsTrainerMsg::Rollback,
            )
            .await
            .map_err(unavailable)?;
        if let Some(e) = r.error {
            return Err(ApiError::new(ErrorKind::Conflict, "conflict", e));
        }
        Ok(r)
    }
}

/// The refusal of a batch of events with these problems (nothing of the request is
/// accepted), naming at most 20.
pub fn refuse_problems(mut problems: Vec<String>) -> Result<(), ApiError> {
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(20);
    Err(ApiError::invalid(format!(
        "{n} invalid event(s), nothing was accepted: {}",
        problems.join("; ")
    )))
}

/// Positions and their counts.
fn written(positions: Vec<Position>) -> Written {
    let acked = positions.iter().filter(|p| !p.duplicate).count() as u32;
    Written {
        acked,
        duplicates: positions.len() as u32 - acked,
        positions,
    }
}

/// The request name an `Idempotency-Key` gives.
pub fn request_key_bytes(key: &str) -> Vec<u8> {
    [b"key:".as_slice(), key.as_bytes()].concat()
}

/// An idempotency key: 1..=256 visible ASCII characters.
pub fn check_request_key(k: &str) -> Result<(), ApiError> {
    let b = k.as_bytes();
    if b.is_empty()
        || b.len() > limits::MAX_ID_CHARS
        || !b.iter().all(|c| (0x21..=0x7e).contains(c))
    {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key must be 1..={} visible ASCII characters (no spaces)",
            limits::MAX_ID_CHARS
        )));
    }
    Ok(())
}

/// The idempotency key of event number `index` of a request. An event with `event_id`
/// or `ts` has its own (the payload's); one with neither is identified by the request
/// (its `Idempotency-Key`, else its whole body) and its place in it, so a retry of the
/// same request maps to the same keys although the node's clock moved.
fn event_key(payload: &Payload, own: bool, request: &[u8], index: usize) -> u128 {
    if own {
        payload.idempotency_key()
    } else {
        hash128(&[b"req", request, &(index as u64).to_le_bytes()])
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A checked event and whether it carried its own identity (`event_id` or `ts`).
pub fn check_event(e: EventIn, now: i64, skew_ms: i64) -> Result<(Event, bool), String> {
    check_event_ids(&e)?;
    check_event_rest(e, now, skew_ms)
}

/// At most `max` records (`what`: events, items) in one request; `code` names the refusal.
pub fn check_count(n: usize, max: usize, code: &str, what: &str) -> Result<(), ApiError> {
    if n > max {
        return Err(ApiError::new(
            ErrorKind::Invalid,
            code,
            format!("{n} {what} in one request; the limit is {max}"),
        ));
    }
    Ok(())
}

/// The identifiers of an event (user, item, kind, event and request ids), the first
/// checks of [`check_event`] (a transport that parses more fields checks these first so
/// the reasons keep their order).
pub fn check_event_ids(e: &EventIn) -> Result<(), String> {
    check_id("user", &e.user)?;
    check_id("item", &e.item)?;
    check_id("kind", &e.kind)?;
    if let Some(id) = &e.event_id {
        check_id("event_id", id)?;
    }
    if let Some(id) = &e.request_id {
        check_id("request_id", id)?;
    }
    Ok(())
}

/// The checks of [`check_event`] after [`check_event_ids`]: time and value.
pub fn check_event_rest(e: EventIn, now: i64, skew_ms: i64) -> Result<(Event, bool), String> {
    let ts_ms = e.ts_ms.unwrap_or(now);
    if ts_ms > now + skew_ms {
        return Err(format!(
            "ts {ts_ms} is more than {} s after the node's clock",
            skew_ms / 1000
        ));
    }
    if ts_ms < 0 {
        return Err("ts must not be before 1970".into());
    }
    let value = match e.value {
        None => None,
        Some(v) if v.abs() <= limits::MAX_ABS_VALUE => Some(v as f32),
        Some(v) => {
            return Err(format!(
                "value {v} is out of range: it must lie within ±{:e} (values are stored as 32-bit floats)",
                limits::MAX_ABS_VALUE
            ))
        }
    };
    let own_identity = e.event_id.is_some() || e.ts_ms.is_some();
    Ok((
        Event {
            event_id: e.event_id,
            user: e.user,
            item: e.item,
            kind: e.kind.to_ascii_lowercase(),
            value,
            ts_ms,
            request_id: e.request_id,
        },
        own_identity,
    ))
}

/// A checked catalog item (categories deduplicated in order).
pub fn check_item(i: ItemIn) -> Result<Item, String> {
    check_id("id", &i.id)?;
    check_text("text", &i.text, 0, limits::MAX_TEXT_CHARS)?;
    let mut categories = i.categories;
    if categories.len() > limits::MAX_CATEGORIES {
        return Err(format!(
            "{} categories; the limit is {}",
            categories.len(),
            limits::MAX_CATEGORIES
        ));
    }
    for c in &categories {
        check_text("category", c, 1, limits::MAX_CATEGORY_CHARS)?;
    }
    let mut seen = std::collections::HashSet::new();
    categories.retain(|c| seen.insert(c.clone()));
    if i.attributes.len() > limits::MAX_ATTRIBUTES {
        return Err(format!(
            "{} attributes; the limit is {}",
            i.attributes.len(),
            limits::MAX_ATTRIBUTES
        ));
    }
    for (k, v) in &i.attributes {
        check_text("attribute name", k, 1, limits::MAX_ATTRIBUTE_KEY_CHARS)?;
        check_text(
            &format!("attribute `{k}`"),
            v,
            0,
            limits::MAX_ATTRIBUTE_VALUE_CHARS,
        )?;
    }
    Ok(Item {
        id: i.id,
        text: i.text,
        categories,
        hidden: i.hidden,
        attributes: i.attributes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_without_ids_map_to_the_same_keys() {
        let p = Payload::Event(Event {
            event_id: None,
            user: "u".into(),
            item: "i".into(),
            kind: "view".into(),
            value: None,
            ts_ms: 1,
            request_id: None,
        });
        let body = b"[{\"user\":\"u\",\"item\":\"i\",\"kind\":\"view\"}]";
        let req = hash128(&[b"body", body]).to_le_bytes();
        assert_eq!(event_key(&p, false, &req, 0), event_key(&p, false, &req, 0));
        assert_ne!(event_key(&p, false, &req, 0), event_key(&p, false, &req, 1));
        let other = hash128(&[b"body", b"[]"]).to_le_bytes();
        assert_ne!(
            event_key(&p, false, &req, 0),
            event_key(&p, false, &other, 0)
        );
        assert_eq!(event_key(&p, true, &req, 3), p.idempotency_key());
    }

    #[test]
    fn events_are_checked_in_order_with_their_reasons() {
        let ev = |user: &str, ts: Option<i64>, value: Option<f64>| EventIn {
            user: user.into(),
            item: "i".into(),
            kind: "VIEW".into(),
            ts_ms: ts,
            value,
            ..Default::default()
        };
        let now = 1_700_000_000_000;
        let (e, own) = check_event(ev("u", None, Some(2.0)), now, 1000).unwrap();
        assert_eq!((e.kind.as_str(), e.ts_ms, own), ("view", now, false));
        assert!(check_event(ev("", None, None), now, 1000)
            .unwrap_err()
            .starts_with("user"));
        assert!(check_event(ev("u", Some(now + 5000), None), now, 1000)
            .unwrap_err()
            .contains("after the node's clock"));
        assert!(check_event(ev("u", Some(-1), None), now, 1000)
            .unwrap_err()
            .contains("before 1970"));
        assert!(check_event(ev("u", None, Some(1e12)), now, 1000)
            .unwrap_err()
            .contains("out of range"));
        assert!(check_request_key("k 1").is_err());
        assert!(check_request_key("batch-7").is_ok());
    }
}
