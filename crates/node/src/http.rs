//! The HTTP/JSON API (axum) under `/v1`, plus `/healthz`, `/readyz` and `/metrics`.
//! Every error is JSON `{error, detail}` with the right status; overload and an
//! unavailable journal answer 503 with `Retry-After`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use troupe_actors::ctx::Ctx;
use troupe_actors::features::{UserFeaturesMsg, UserQuery};
use troupe_actors::journal::{AppendRequest, Position};
use troupe_actors::names;
use troupe_actors::node::{self, CallError};
use troupe_actors::ranker::{BranchReport, RankerMsg, RecommendRequest, SimilarRequest};
use troupe_actors::record::{partition_of, Event, Item, Payload, CATALOG_STREAM};
use troupe_actors::trainer::AlsTrainerMsg;
use troupe_actors::wire::WIRE_VERSION;

/// The OpenAPI document served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Limits and options of the HTTP layer.
#[derive(Clone)]
pub struct HttpOptions {
    pub max_body_bytes: usize,
    pub max_events_per_request: usize,
    pub max_in_flight: usize,
    pub auth_token: Option<String>,
    pub request_timeout: Duration,
}

#[derive(Clone)]
pub struct AppState {
    ctx: Arc<Ctx>,
    opts: HttpOptions,
    permits: Arc<Semaphore>,
    requests: Arc<AtomicU64>,
}

/// An API error rendered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            detail: detail.into(),
            retry_after: None,
        }
    }
    fn bad(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
    fn unavailable(detail: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        ApiError::unavailable(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": self.error, "detail": self.detail})),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

type ApiResult = Result<Response, ApiError>;

pub fn router(ctx: Arc<Ctx>, opts: HttpOptions) -> Router {
    let state = AppState {
        permits: Arc::new(Semaphore::new(opts.max_in_flight)),
        requests: Arc::new(AtomicU64::new(0)),
        ctx,
        opts,
    };
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/items", post(post_items))
        .route("/v1/items/{id}", put(put_item).delete(delete_item))
        .route("/v1/items/{id}/similar", get(similar))
        .route("/v1/recommendations/{user}", get(recommend))
        .route("/v1/users/{id}", get(get_user).delete(delete_user))
        .route("/v1/cluster", get(cluster))
        .route("/v1/admin/dead-letters", get(dead_letters))
        .route("/v1/admin/retrain", post(retrain))
        .route("/v1/admin/rollback", post(rollback))
        .route(
            "/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Per-request span, in-flight limit (503 + Retry-After past it), auth for writes and
/// admin, and the request counter.
async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let id = st.requests.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("http", %method, route = %route, request = id);
    let is_probe = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
    let writes = method != axum::http::Method::GET || path.starts_with("/v1/admin");
    if writes {
        if let Some(token) = &st.opts.auth_token {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| t == token);
            if !ok {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid bearer token is required for this route",
                )
                .into_response();
            }
        }
    }
    let permit = if is_probe {
        None
    } else {
        match st.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "too many requests in flight",
                    )
                }
                .into_response()
            }
        }
    };
    let fut = next.run(req);
    let resp = tracing::Instrument::instrument(fut, span).await;
    drop(permit);
    st.ctx
        .metrics
        .http_requests
        .get_or_create(&troupe_actors::metrics::labels2(
            "route",
            &route,
            "status",
            resp.status().as_u16(),
        ))
        .inc();
    resp
}

async fn body_text(st: &AppState, body: Body) -> Result<String, ApiError> {
    let bytes: Bytes = axum::body::to_bytes(body, st.opts.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "request body is over the limit of {} bytes",
                    st.opts.max_body_bytes
                ),
            )
        })?;
    String::from_utf8(bytes.to_vec())
        .map_err(|e| ApiError::bad(format!("request body is not valid UTF-8: {e}")))
}

fn writable(st: &AppState) -> Result<(), ApiError> {
    if st.ctx.health.draining.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable("node is shutting down"));
    }
    if st.ctx.health.journal_failed.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable(
            "journal is recovering from a write error",
        ));
    }
    Ok(())
}

/// An event as clients send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn {
    event_id: Option<String>,
    user: String,
    item: String,
    kind: String,
    value: Option<f64>,
    /// Milliseconds since the epoch, or an RFC 3339 string; absent: now.
    ts: Option<Value>,
    request_id: Option<String>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn check_id(what: &str, v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if v.len() > 256 {
        return Err(format!("{what} is longer than 256 bytes"));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{what} contains control characters"));
    }
    Ok(())
}

fn to_event(e: EventIn, now: i64, skew_ms: i64) -> Result<Event, String> {
    check_id("user", &e.user)?;
    check_id("item", &e.item)?;
    check_id("kind", &e.kind)?;
    if let Some(id) = &e.event_id {
        check_id("event_id", id)?;
    }
    let ts_ms = match e.ts {
        None | Some(Value::Null) => now,
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or("ts must be an integer number of milliseconds")?,
        Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(&s)
            .map_err(|err| format!("ts `{s}` is not RFC 3339: {err}"))?
            .timestamp_millis(),
        Some(_) => {
            return Err("ts must be milliseconds since the epoch or an RFC 3339 string".into())
        }
    };
    if ts_ms > now + skew_ms {
        return Err(format!(
            "ts {ts_ms} is more than {} s in the future",
            skew_ms / 1000
        ));
    }
    if ts_ms < 0 {
        return Err("ts must not be before 1970".into());
    }
    let value = match e.value {
        None => None,
        Some(v) if v.is_finite() && v.abs() <= 1e9 => Some(v as f32),
        Some(_) => return Err("value must be a finite number".into()),
    };
    Ok(Event {
        event_id: e.event_id,
        user: e.user,
        item: e.item,
        kind: e.kind.to_ascii_lowercase(),
        value,
        ts_ms,
        request_id: e.request_id,
    })
}

/// Parses a JSON array or NDJSON body into events; every problem names its event.
fn parse_events(text: &str, now: i64, skew_ms: i64, max: usize) -> Result<Vec<Event>, ApiError> {
    let trimmed = text.trim_start();
    let raw: Vec<(usize, Result<EventIn, String>)> = if trimmed.starts_with('[') {
        // Well-formed arrays decode in one pass; the element-by-element pass below only
        // runs to name the bad elements.
        if let Ok(events) = serde_json::from_str::<Vec<EventIn>>(text) {
            events.into_iter().map(Ok).enumerate().collect()
        } else {
            let values: Vec<Value> = serde_json::from_str(text)
                .map_err(|e| ApiError::bad(format!("body is not a JSON array of events: {e}")))?;
            values
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    (
                        i,
                        serde_json::from_value::<EventIn>(v).map_err(|e| e.to_string()),
                    )
                })
                .collect()
        }
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                (
                    i,
                    serde_json::from_str::<EventIn>(l).map_err(|e| e.to_string()),
                )
            })
            .collect()
    };
    if raw.is_empty() {
        return Err(ApiError::bad("no events in the body"));
    }
    if raw.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!("{} events in one request; the limit is {max}", raw.len()),
        ));
    }
    let what = if trimmed.starts_with('[') {
        "event"
    } else {
        "line"
    };
    let mut out = Vec::with_capacity(raw.len());
    let mut problems = Vec::new();
    for (i, r) in raw {
        match r.and_then(|e| to_event(e, now, skew_ms)) {
            Ok(e) => out.push(e),
            Err(e) => problems.push(format!("{what} {}: {e}", i + 1)),
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(20);
        return Err(ApiError::bad(format!(
            "{n} invalid event(s), nothing was accepted: {}",
            problems.join("; ")
        )));
    }
    Ok(out)
}

async fn append(st: &AppState, entries: Vec<(u32, Payload)>) -> Result<Vec<Position>, ApiError> {
    writable(st)?;
    let reply = node::append(AppendRequest::new(entries), st.opts.request_timeout).await?;
    if let Some(e) = reply.error {
        return Err(ApiError::unavailable(e));
    }
    Ok(reply.positions)
}

/// A partition number, or `"catalog"` for the catalog stream.
#[derive(Serialize)]
#[serde(untagged)]
enum StreamOut {
    Partition(u32),
    Named(&'static str),
}

/// Where one accepted record went.
#[derive(Serialize)]
struct PositionOut {
    partition: StreamOut,
    offset: u64,
    duplicate: bool,
}

fn positions_json(positions: &[Position]) -> Vec<PositionOut> {
    positions
        .iter()
        .map(|p| PositionOut {
            partition: if p.stream == CATALOG_STREAM {
                StreamOut::Named("catalog")
            } else {
                StreamOut::Partition(p.stream)
            },
            offset: p.offset,
            duplicate: p.duplicate,
        })
        .collect()
}

#[derive(Serialize)]
struct EventsOut {
    acked: usize,
    duplicates: usize,
    results: Vec<PositionOut>,
}

async fn post_events(State(st): State<AppState>, body: Body) -> ApiResult {
    let text = body_text(&st, body).await?;
    let skew = st.ctx.settings.max_future_skew.as_millis() as i64;
    let events =
        parse_events(&text, now_ms(), skew, st.opts.max_events_per_request).inspect_err(|_| {
            st.ctx
                .metrics
                .events_rejected
                .get_or_create(&troupe_actors::metrics::label("reason", "invalid"))
                .inc();
        })?;
    let p = st.ctx.settings.partitions;
    let entries: Vec<(u32, Payload)> = events
        .into_iter()
        .map(|e| (partition_of(&e.user, p), Payload::Event(e)))
        .collect();
    let positions = append(&st, entries).await?;
    let acked = positions.iter().filter(|p| !p.duplicate).count();
    Ok(Json(EventsOut {
        acked,
        duplicates: positions.len() - acked,
        results: positions_json(&positions),
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemIn {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    text: String,
    #[serde(default)]
    categories: Vec<String>,
    #[serde(default)]
    hidden: bool,
    #[serde(default)]
    attributes: std::collections::BTreeMap<String, String>,
}

fn to_item(id: String, i: ItemIn) -> Result<Item, String> {
    check_id("id", &id)?;
    if i.text.len() > 64 * 1024 {
        return Err("text is longer than 64 KiB".into());
    }
    Ok(Item {
        id,
        text: i.text,
        categories: i.categories,
        hidden: i.hidden,
        attributes: i.attributes,
    })
}

async fn put_item(
    State(st): State<AppState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Body,
) -> ApiResult {
    let Path(id) = path.map_err(|e| ApiError::bad(e.body_text()))?;
    let text = body_text(&st, body).await?;
    let item: ItemIn =
        serde_json::from_str(&text).map_err(|e| ApiError::bad(format!("item: {e}")))?;
    if item.id.as_ref().is_some_and(|x| *x != id) {
        return Err(ApiError::bad("body id differs from the path id"));
    }
    let item = to_item(id, item).map_err(ApiError::bad)?;
    let pos = append(&st, vec![(CATALOG_STREAM, Payload::ItemUpsert(item))]).await?;
    Ok(Json(json!({"results": positions_json(&pos)})).into_response())
}

async fn post_items(State(st): State<AppState>, body: Body) -> ApiResult {
    let text = body_text(&st, body).await?;
    let items: Vec<ItemIn> = serde_json::from_str(&text)
        .map_err(|e| ApiError::bad(format!("body is not a JSON array of items: {e}")))?;
    if items.is_empty() {
        return Err(ApiError::bad("no items in the body"));
    }
    if items.len() > st.opts.max_events_per_request {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_items",
            "too many items in one request",
        ));
    }
    let mut entries = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    for (n, mut i) in items.into_iter().enumerate() {
        let id = i.id.take().unwrap_or_default();
        match to_item(id, i) {
            Ok(it) => entries.push((CATALOG_STREAM, Payload::ItemUpsert(it))),
            Err(e) => problems.push(format!("item {}: {e}", n + 1)),
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::bad(format!(
            "nothing was accepted: {}",
            problems.join("; ")
        )));
    }
    let pos = append(&st, entries).await?;
    Ok(Json(json!({"results": positions_json(&pos)})).into_response())
}

async fn delete_item(
    State(st): State<AppState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult {
    let Path(id) = path.map_err(|e| ApiError::bad(e.body_text()))?;
    check_id("id", &id).map_err(ApiError::bad)?;
    let pos = append(&st, vec![(CATALOG_STREAM, Payload::ItemDelete { id })]).await?;
    Ok(Json(json!({"results": positions_json(&pos)})).into_response())
}

type Q = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

fn query(q: Q) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m)
        .map_err(|e| ApiError::bad(e.body_text()))
}

fn parse_k(q: &HashMap<String, String>, max: usize) -> Result<u32, ApiError> {
    match q.get("k") {
        None => Ok(10),
        Some(s) => match s.parse::<u64>() {
            Ok(k) if k >= 1 && k <= max as u64 => Ok(k as u32),
            _ => Err(ApiError::bad(format!(
                "k must be an integer in 1..={max}, got `{s}`"
            ))),
        },
    }
}

async fn recommend(
    State(st): State<AppState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    q: Q,
) -> ApiResult {
    let Path(user) = path.map_err(|e| ApiError::bad(e.body_text()))?;
    check_id("user", &user).map_err(ApiError::bad)?;
    let q = query(q)?;
    for key in q.keys() {
        if !matches!(
            key.as_str(),
            "k" | "category" | "exclude" | "explain" | "weights"
        ) {
            return Err(ApiError::bad(format!("unknown query parameter `{key}`")));
        }
    }
    let k = parse_k(&q, st.ctx.settings.ranker.max_k)?;
    let explain = match q.get("explain").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(v) => {
            return Err(ApiError::bad(format!(
                "explain must be true or false, got `{v}`"
            )))
        }
    };
    let weights = match q.get("weights") {
        None => None,
        Some(w) => {
            let v: Result<Vec<f32>, _> = w.split(',').map(|x| x.trim().parse::<f32>()).collect();
            match v {
                Ok(v) if v.len() == 3 && v.iter().all(|x| x.is_finite() && *x >= 0.0) => Some(v),
                _ => {
                    return Err(ApiError::bad(
                        "weights must be three numbers >= 0: als,content,popularity",
                    ))
                }
            }
        }
    };
    let exclude: Vec<String> = q
        .get("exclude")
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let request_id = format!(
        "{}-{:x}-{}",
        st.ctx.settings.node_name,
        st.ctx.started.elapsed().as_nanos(),
        st.requests.load(Ordering::Relaxed)
    );
    let req = RecommendRequest {
        version: WIRE_VERSION,
        user,
        k,
        category: q.get("category").filter(|c| !c.is_empty()).cloned(),
        exclude,
        weights,
        request_id,
        now_ms: 0,
    };
    let reply = node::call(names::RANKER, st.opts.request_timeout, |p| {
        RankerMsg::Recommend(req, p)
    })
    .await?;
    if let Some(e) = reply.error {
        return Err(ApiError::unavailable(e));
    }
    let items: Vec<RecItemOut<'_>> = reply
        .items
        .iter()
        .map(|i| RecItemOut {
            item: &i.item,
            score: i.score,
            shares: SharesOut {
                als: i.shares.first().copied(),
                content: i.shares.get(1).copied(),
                popularity: i.shares.get(2).copied(),
            },
            categories: explain.then_some(i.categories.as_slice()),
        })
        .collect();
    let body = RecommendationsOut {
        request_id: &reply.request_id,
        user: &reply.user,
        items,
        model_versions: ModelVersionsOut {
            als: reply.als_model_version,
            content: &reply.content_encoder,
        },
        applied_offset: reply.applied_offset,
        awaited_offset: reply.awaited_offset,
        degraded: reply.degraded,
        stale: reply.stale,
        cold_start: reply.cold_start,
        cached: reply.cached,
        branches: if explain {
            BranchesOut::Full(&reply.branches)
        } else {
            BranchesOut::Brief(
                reply
                    .branches
                    .iter()
                    .map(|b| BriefBranch {
                        name: &b.name,
                        status: &b.status,
                    })
                    .collect(),
            )
        },
    };
    Ok(Json(body).into_response())
}

/// Body of `GET /v1/recommendations/{user}` (serialised straight from borrowed fields).
#[derive(Serialize)]
struct RecommendationsOut<'a> {
    request_id: &'a str,
    user: &'a str,
    items: Vec<RecItemOut<'a>>,
    model_versions: ModelVersionsOut<'a>,
    applied_offset: u64,
    awaited_offset: u64,
    degraded: bool,
    stale: bool,
    cold_start: bool,
    cached: bool,
    branches: BranchesOut<'a>,
}

#[derive(Serialize)]
struct RecItemOut<'a> {
    item: &'a str,
    score: f32,
    shares: SharesOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    categories: Option<&'a [String]>,
}

#[derive(Serialize)]
struct SharesOut {
    als: Option<f32>,
    content: Option<f32>,
    popularity: Option<f32>,
}

#[derive(Serialize)]
struct ModelVersionsOut<'a> {
    als: u64,
    content: &'a str,
}

#[derive(Serialize)]
struct BriefBranch<'a> {
    name: &'a str,
    status: &'a str,
}

/// Branch statuses, or with `explain` the full reports (candidates, time).
#[derive(Serialize)]
#[serde(untagged)]
enum BranchesOut<'a> {
    Brief(Vec<BriefBranch<'a>>),
    Full(&'a [BranchReport]),
}

async fn similar(
    State(st): State<AppState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    q: Q,
) -> ApiResult {
    let Path(item) = path.map_err(|e| ApiError::bad(e.body_text()))?;
    check_id("item", &item).map_err(ApiError::bad)?;
    let q = query(q)?;
    let k = parse_k(&q, st.ctx.settings.ranker.max_k)?;
    let req = SimilarRequest {
        version: WIRE_VERSION,
        item,
        k,
    };
    let r = node::call(names::RANKER, st.opts.request_timeout, |p| {
        RankerMsg::Similar(req, p)
    })
    .await?;
    if r.source.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("item `{}` has no embedding or factors", r.item),
        ));
    }
    Ok(Json(json!({
        "item": r.item,
        "source": r.source,
        "items": r.items.iter().map(|(i, s)| json!({"item": i, "score": s})).collect::<Vec<_>>(),
    }))
    .into_response())
}

async fn get_user(
    State(st): State<AppState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult {
    let Path(user) = path.map_err(|e| ApiError::bad(e.body_text()))?;
    check_id("user", &user).map_err(ApiError::bad)?;
    let p = partition_of(&user, st.ctx.settings.partitions);
    let q = UserQuery {
        version: WIRE_VERSION,
        user: user.clone(),
    };
    let v = node::call(&names::user_features(p), st.opts.request_timeout, |port| {
        UserFeaturesMsg::GetUser(q, port)
    })
    .await?;
    if !v.known {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no events for user `{user}`"),
        ));
    }
    Ok(Json(json!({
        "user": user,
        "partition": p,
        "events": v.events,
        "last_event_ms": v.last_ts_ms,
        "last_offset": v.last_offset,
        "applied_offset": v.applied_offset,
        "kind_counts": v.kind_counts.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "history": v.history.iter().map(|t| json!({"item": t.item, "kind": t.kind, "weight": t.weight, "ts": t.ts_ms})).collect::<Vec<_>>(),
        "seen": v.seen.len(),
        "disliked": v.disliked,
        "als_vector_version": v.vector_version,
    }))
    .into_response())
}

async fn delete_user(
    State(st): State<AppState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> ApiResult {
    let Path(user) = path.map_err(|e| ApiError::bad(e.body_text()))?;
    check_id("user", &user).map_err(ApiError::bad)?;
    let p = partition_of(&user, st.ctx.settings.partitions);
    let pos = append(&st, vec![(p, Payload::EraseUser { user })]).await?;
    Ok(Json(json!({"results": positions_json(&pos)})).into_response())
}

async fn cluster(State(st): State<AppState>) -> ApiResult {
    let (actors, sups) = node::observe_all(&st.ctx, Duration::from_secs(2)).await;
    let actors: Vec<Value> = actors
        .into_iter()
        .map(|(name, r)| match r {
            Ok(o) => json!({"name": name, "alive": true, "state": o.value()}),
            Err(e) => json!({"name": name, "alive": false, "error": e.to_string()}),
        })
        .collect();
    let sups: Vec<Value> = sups
        .into_iter()
        .map(|(n, s)| json!({"name": n, "children": s.map(|s| s.children)}))
        .collect();
    let h = &st.ctx.health;
    Ok(Json(json!({
        "node": st.ctx.settings.node_name,
        "partitions": st.ctx.settings.partitions,
        "ready": h.ready(),
        "recovering": h.recovering(),
        "escalated": h.escalated(),
        "journal_heads": st.ctx.streams().iter().map(|&s| json!({"stream": if s == CATALOG_STREAM { json!("catalog") } else { json!(s) }, "offset": st.ctx.head(s)})).collect::<Vec<_>>(),
        "als_model_version": st.ctx.als.load().as_ref().map(|m| m.version),
        "actors": actors,
        "supervisors": sups,
    }))
    .into_response())
}

async fn dead_letters(State(st): State<AppState>) -> ApiResult {
    let store = st.ctx.store.clone();
    let docs = tokio::task::spawn_blocking(move || store.dead_letters())
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let docs: Vec<Value> = docs
        .iter()
        .filter_map(|d| serde_json::from_slice(d).ok())
        .collect();
    Ok(Json(json!({"dead_letters": docs})).into_response())
}

async fn retrain() -> ApiResult {
    let r = node::call(
        names::ALS_TRAINER,
        Duration::from_secs(3600),
        AlsTrainerMsg::Retrain,
    )
    .await?;
    Ok(Json(serde_json::to_value(&r).unwrap_or(Value::Null)).into_response())
}

async fn rollback(State(st): State<AppState>) -> ApiResult {
    let r = node::call(
        names::ALS_TRAINER,
        st.opts.request_timeout,
        AlsTrainerMsg::Rollback,
    )
    .await?;
    if let Some(e) = r.error {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", e));
    }
    Ok(Json(json!({"serving_version": r.serving_version})).into_response())
}

async fn healthz(State(st): State<AppState>) -> Response {
    match st.ctx.health.escalated() {
        None => Json(json!({"status": "ok"})).into_response(),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "escalated", "detail": e})),
        )
            .into_response(),
    }
}

async fn readyz(State(st): State<AppState>) -> Response {
    let h = &st.ctx.health;
    let body = json!({
        "ready": h.ready(),
        "recovering": h.recovering(),
        "escalated": h.escalated(),
        "journal_failed": h.journal_failed.load(Ordering::Relaxed),
        "draining": h.draining.load(Ordering::Relaxed),
    });
    let status = if h.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(st): State<AppState>, _h: HeaderMap) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.ctx.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_array_and_ndjson_with_located_errors() {
        let now = 1_700_000_000_000;
        let a = parse_events(
            r#"[{"user":"u","item":"i","kind":"View","ts":5}]"#,
            now,
            1000,
            10,
        )
        .unwrap();
        assert_eq!(a[0].kind, "view");
        assert_eq!(a[0].ts_ms, 5);
        let n = parse_events(
            "{\"user\":\"u\",\"item\":\"i\",\"kind\":\"v\",\"ts\":\"2023-11-14T22:13:20Z\"}\n\n",
            now,
            1000,
            10,
        )
        .unwrap();
        assert_eq!(n[0].ts_ms, 1_700_000_000_000);
        let e = parse_events(
            "{\"user\":\"u\",\"item\":\"i\",\"kind\":\"v\"}\n{\"user\":\"u\",\"kind\":\"v\"}",
            now,
            1000,
            10,
        )
        .unwrap_err();
        assert!(
            e.detail.contains("line 2") && e.detail.contains("item"),
            "{}",
            e.detail
        );
        let e = parse_events(
            r#"[{"user":"u","item":"i","kind":"v","extra":1}]"#,
            now,
            1000,
            10,
        )
        .unwrap_err();
        assert!(e.detail.contains("extra"), "{}", e.detail);
        let e = parse_events(
            r#"[{"user":"u","item":"i","kind":"v","ts":9999999999999}]"#,
            now,
            1000,
            10,
        )
        .unwrap_err();
        assert!(e.detail.contains("future"), "{}", e.detail);
        let e = parse_events(r#"[{"user":1,"item":"i","kind":"v"}]"#, now, 1000, 10).unwrap_err();
        assert!(e.detail.contains("event 1"), "{}", e.detail);
    }
}
