//! The HTTP/JSON API (axum on a hyper server configured here) under `/v1`, plus
//! `/healthz`, `/readyz` and `/metrics`.
//!
//! - Every error is JSON `{error, detail}` with the right status; overload and an
//!   unavailable journal answer 503 with `Retry-After`.
//! - Access: each handler takes an [`Admitted`] extractor naming its class. Writes and
//!   admin routes need the bearer token when one is configured; user data needs it too
//!   (or the read token); recommendations, similar items and item reads are public
//!   unless `http.public_reads = false`. Probes and the OpenAPI document are public.
//! - Admission: reads and writes have separate in-flight limits, so clients holding
//!   write slots (slow bodies, big batches) never starve recommendations. Headers must
//!   arrive within `header_read_timeout`, bodies within `body_read_timeout`; a declared
//!   `Content-Length` over the limit is refused before the body is read.
//! - Reads wait (bounded) for the stream they read to reach `min_offset` or, without
//!   it, the stream's head at arrival (read-your-writes), and say `stale` when it did not.
//! - Every route refuses unknown query parameters and repeats of single-valued ones.
//!
//! [`openapi`](crate::openapi) states the same rules; `scripts/api-fuzz.sh` checks the
//! server against that document.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use troupe_actors::ctx::Ctx;
use troupe_actors::features::UserQuery;
use troupe_actors::journal::{AppendEntry, Position};
use troupe_actors::log::LogError;
use troupe_actors::names;
use troupe_actors::node::{self, CallError};
use troupe_actors::ranker::{BranchReport, RankerMsg, RecommendRequest, SimilarRequest};
use troupe_actors::record::{hash128, partition_of, Event, Item, Payload, CATALOG_STREAM};
use troupe_actors::trainer::AlsTrainerMsg;
use troupe_actors::wire::WIRE_VERSION;

use crate::limits::{self, check_id, check_text};
use crate::openapi::{self, ApiShape};

/// Limits and options of the HTTP layer.
#[derive(Clone)]
pub struct HttpOptions {
    /// On a JetStream log: its duplicate window (s) and the consumers' keys per
    /// partition (the dedupe horizon the OpenAPI document states).
    pub jetstream_dedupe: Option<(u64, usize)>,
    pub max_body_bytes: usize,
    pub max_events_per_request: usize,
    /// Reads (recommendations, similar items, items, users, cluster, admin reads)
    /// handled at once.
    pub max_in_flight_reads: usize,
    /// Writes (events, items, erasures, admin actions) handled at once.
    pub max_in_flight_writes: usize,
    /// Bearer token of writes and admin routes (and user data).
    pub auth_token: Option<String>,
    /// A second token that only reads user data (and reads, when they are not public).
    pub read_token: Option<String>,
    /// Recommendations, similar items and item reads need no token.
    pub public_reads: bool,
    /// How long a request may wait on the node's actors.
    pub request_timeout: Duration,
    /// How long a client may take to send a request's body.
    pub body_timeout: Duration,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
}

/// One admission class: its permits and its in-flight gauge.
#[derive(Clone)]
struct Class {
    name: &'static str,
    permits: Arc<Semaphore>,
    in_flight: Gauge,
}

impl Class {
    fn new(ctx: &Ctx, name: &'static str, n: usize) -> Class {
        Class {
            name,
            permits: Arc::new(Semaphore::new(n.max(1))),
            in_flight: ctx
                .metrics
                .http_in_flight
                .get_or_create(&troupe_actors::metrics::label("class", name))
                .clone(),
        }
    }

    fn saturated(&self) -> bool {
        self.permits.available_permits() == 0
    }
}

#[derive(Clone)]
pub struct AppState {
    ctx: Arc<Ctx>,
    opts: HttpOptions,
    reads: Class,
    writes: Class,
    requests: Arc<AtomicU64>,
    openapi: Arc<String>,
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
    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
    fn too_large(error: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, error, detail)
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

/// The router, with the OpenAPI document built from the same options.
pub fn router(ctx: Arc<Ctx>, opts: HttpOptions) -> Router {
    let s = &ctx.settings;
    let shape = ApiShape {
        max_k: s.ranker.max_k,
        max_events_per_request: opts.max_events_per_request,
        max_body_bytes: opts.max_body_bytes,
        max_future_skew_secs: s.max_future_skew.as_secs(),
        built_ms: now_ms(),
        idempotency_window_secs: s.idempotency_window.as_secs(),
        jetstream_dedupe: opts.jetstream_dedupe,
        writes_need_token: opts.auth_token.is_some(),
        user_data_needs_token: opts.auth_token.is_some() || opts.read_token.is_some(),
        reads_need_token: !opts.public_reads
            && (opts.auth_token.is_some() || opts.read_token.is_some()),
    };
    let state = AppState {
        reads: Class::new(&ctx, "read", opts.max_in_flight_reads),
        writes: Class::new(&ctx, "write", opts.max_in_flight_writes),
        requests: Arc::new(AtomicU64::new(0)),
        openapi: Arc::new(openapi::document(&shape).to_string()),
        ctx,
        opts,
    };
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/items", post(post_items))
        .route(
            "/v1/items/{id}",
            get(get_item).put(put_item).delete(delete_item),
        )
        .route("/v1/items/{id}/similar", get(similar))
        .route("/v1/items/{id}/stats", get(item_stats))
        .route("/v1/recommendations/{user}", get(recommend))
        .route("/v1/users/{id}", get(get_user).delete(delete_user))
        .route("/v1/cluster", get(cluster))
        .route("/v1/admin/dead-letters", get(dead_letters))
        .route("/v1/admin/retrain", post(retrain))
        .route("/v1/admin/rollback", post(rollback))
        .route("/v1/openapi.json", get(openapi_doc))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route (see the Allow header)",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Serves `app` on `listener` until `stop` resolves, then lets requests in flight finish
/// (at most 10 s). HTTP/1.1 with keep-alive; headers must arrive within `header_timeout`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let sock = match accepted {
                    Ok((sock, _)) => sock,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = sock.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout);
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(sock), svc));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("http connections did not close within 10 s");
    }
}

/// Per-request span and the request counter by route and status.
async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let id = st.requests.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("http", %method, route = %route, request = id);
    let resp = tracing::Instrument::instrument(next.run(req), span).await;
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

/// Who may call a route and which in-flight limit it counts against.
pub trait Access: Send + Sync + 'static {
    /// Needs a token (which ones: see [`Admitted`]).
    fn needs_token(o: &HttpOptions) -> bool;
    /// The read token is enough.
    const READ_TOKEN_OK: bool;
    /// Counts against the write limit and carries a body.
    const WRITE: bool;
}

/// Writes and admin routes.
pub struct Writes;
/// Recommendations, similar items, item reads: public unless `public_reads = false`.
pub struct Reads;
/// User data.
pub struct UserData;
/// Operational reads (cluster state): public.
pub struct Ops;

impl Access for Writes {
    fn needs_token(o: &HttpOptions) -> bool {
        o.auth_token.is_some()
    }
    const READ_TOKEN_OK: bool = false;
    const WRITE: bool = true;
}

impl Access for Reads {
    fn needs_token(o: &HttpOptions) -> bool {
        !o.public_reads && (o.auth_token.is_some() || o.read_token.is_some())
    }
    const READ_TOKEN_OK: bool = true;
    const WRITE: bool = false;
}

impl Access for UserData {
    fn needs_token(o: &HttpOptions) -> bool {
        o.auth_token.is_some() || o.read_token.is_some()
    }
    const READ_TOKEN_OK: bool = true;
    const WRITE: bool = false;
}

impl Access for Ops {
    fn needs_token(_: &HttpOptions) -> bool {
        false
    }
    const READ_TOKEN_OK: bool = false;
    const WRITE: bool = false;
}

/// A request past its access check and admitted into its class; the slot is held until
/// the handler returns.
pub struct Admitted<A> {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
    _access: PhantomData<A>,
}

impl<A> Drop for Admitted<A> {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Constant-time comparison, so the time of a refusal says nothing about the token.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl<A: Access> FromRequestParts<AppState> for Admitted<A> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let o = &st.opts;
        if A::needs_token(o) {
            let given = bearer(parts);
            let ok = given.is_some_and(|t| {
                o.auth_token.as_deref().is_some_and(|a| same_token(t, a))
                    || (A::READ_TOKEN_OK
                        && o.read_token.as_deref().is_some_and(|r| same_token(t, r)))
            });
            if !ok {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid bearer token is required for this route",
                ));
            }
        }
        if A::WRITE {
            // Refused before a byte of the body is read.
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > o.max_body_bytes as u64) {
                return Err(ApiError::too_large(
                    "payload_too_large",
                    format!(
                        "request body is over the limit of {} bytes",
                        o.max_body_bytes
                    ),
                ));
            }
            check_content_type(&parts.headers)?;
        }
        let class = if A::WRITE { &st.writes } else { &st.reads };
        match class.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                class.in_flight.inc();
                Ok(Admitted {
                    _permit: permit,
                    in_flight: class.in_flight.clone(),
                    _access: PhantomData,
                })
            }
            Err(_) => {
                st.ctx
                    .metrics
                    .http_saturated
                    .get_or_create(&troupe_actors::metrics::label("class", class.name))
                    .inc();
                Err(ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        format!("too many {}s in flight", class.name),
                    )
                })
            }
        }
    }
}

/// Bodies are JSON (or NDJSON for events); another declared type is refused.
fn check_content_type(h: &HeaderMap) -> Result<(), ApiError> {
    let mut all = h.get_all(header::CONTENT_TYPE).iter();
    let Some(v) = all.next() else {
        return Ok(());
    };
    if all.next().is_some() {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "more than one Content-Type header",
        ));
    }
    let essence = v
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json" | "application/x-ndjson") => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be application/json (or application/x-ndjson for events)",
        )),
    }
}

/// Query parameters of one request, checked against the route's list.
#[derive(Debug)]
struct Params(Vec<(String, String)>);

impl Params {
    /// Refuses unknown names and repeats of single-valued ones (`multi` lists the names
    /// that may repeat).
    fn parse(raw: Option<String>, known: &[&str], multi: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> = match raw.as_deref() {
            None | Some("") => Vec::new(),
            Some(q) => serde_urlencoded::from_str(q)
                .map_err(|e| ApiError::bad(format!("query string does not parse: {e}")))?,
        };
        for (i, (k, _)) in pairs.iter().enumerate() {
            if !known.contains(&k.as_str()) {
                return Err(ApiError::bad(if known.is_empty() {
                    format!("unknown query parameter `{k}`: this route takes none")
                } else {
                    format!(
                        "unknown query parameter `{k}`; this route takes {}",
                        known.join(", ")
                    )
                }));
            }
            if !multi.contains(&k.as_str()) && pairs[..i].iter().any(|(p, _)| p == k) {
                return Err(ApiError::bad(format!(
                    "query parameter `{k}` is given more than once"
                )));
            }
        }
        Ok(Params(pairs))
    }

    fn none(raw: Option<String>) -> Result<(), ApiError> {
        Self::parse(raw, &[], &[]).map(|_| ())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn k(&self, max: usize) -> Result<u32, ApiError> {
        match self.get("k") {
            None => Ok(10),
            Some(s) => match s.parse::<u64>() {
                Ok(k) if (1..=max as u64).contains(&k) => Ok(k as u32),
                _ => Err(ApiError::bad(format!(
                    "k must be an integer in 1..={max}, got `{s}`"
                ))),
            },
        }
    }

    fn min_offset(&self) -> Result<Option<u64>, ApiError> {
        self.get("min_offset")
            .map(|s| {
                s.parse::<u64>()
                    .ok()
                    .filter(|&o| o <= limits::MAX_OFFSET)
                    .ok_or_else(|| {
                        ApiError::bad(format!(
                            "min_offset must be an integer in 0..={}, got `{s}`",
                            limits::MAX_OFFSET
                        ))
                    })
            })
            .transpose()
    }
}

fn path_id(what: &str, path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad(format!("{what}: {}", e.body_text())))?;
    check_id(what, &id).map_err(ApiError::bad)?;
    Ok(id)
}

/// Reads a body within the size limit and the body timeout.
async fn read_body(st: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = st.opts.max_body_bytes;
    match tokio::time::timeout(st.opts.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms",
                st.opts.body_timeout.as_millis()
            ),
        )),
        Ok(Err(_)) => Err(ApiError::too_large(
            "payload_too_large",
            format!("request body is over the limit of {limit} bytes"),
        )),
        Ok(Ok(b)) => Ok(b),
    }
}

fn body_text(bytes: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(bytes)
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
    if !st.ctx.log.writable() {
        st.ctx.metrics.log_write_errors.inc();
        return Err(ApiError::unavailable(format!(
            "the {} log cannot be reached; nothing was written, retry later",
            st.ctx.log.backend()
        )));
    }
    Ok(())
}

/// `T` from a JSON object only: derived structs would also take an array (fields by
/// position), which the API does not allow.
struct Obj<T>(T);

/// What a body object is called in errors ("expected an event object").
trait Expecting {
    const WHAT: &'static str;
}

impl<'de, T: Deserialize<'de> + Expecting> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Only<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Expecting> serde::de::Visitor<'de> for Only<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(T::WHAT)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Only(std::marker::PhantomData)).map(Obj)
    }
}

impl Expecting for EventIn {
    const WHAT: &'static str = "an event object";
}

impl Expecting for ItemIn {
    const WHAT: &'static str = "an item object";
}

/// A field that may be absent but never null: `null` is refused with serde's "invalid
/// type: null" error.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// An event as clients send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an event object")]
struct EventIn {
    #[serde(default, deserialize_with = "present")]
    event_id: Option<String>,
    user: String,
    item: String,
    kind: String,
    #[serde(default, deserialize_with = "present")]
    value: Option<f64>,
    /// Milliseconds since the epoch, or an RFC 3339 string; absent: now.
    #[serde(default, deserialize_with = "present")]
    ts: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    request_id: Option<String>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A checked event and whether it carried its own identity (`event_id` or `ts`).
fn to_event(e: EventIn, now: i64, skew_ms: i64) -> Result<(Event, bool), String> {
    check_id("user", &e.user)?;
    check_id("item", &e.item)?;
    check_id("kind", &e.kind)?;
    if let Some(id) = &e.event_id {
        check_id("event_id", id)?;
    }
    if let Some(id) = &e.request_id {
        check_id("request_id", id)?;
    }
    let ts_ms = match &e.ts {
        None => now,
        // JSON has one number type: 1000.0 is the integer 1000.
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && (0.0..9.0e18).contains(f))
                    .map(|f| f as i64)
            })
            .filter(|&t| t >= 0)
            .ok_or_else(|| format!("ts {n} must be a whole number of milliseconds since 1970"))?,
        Some(Value::Null) => {
            return Err("ts is null: leave the field out to use the node's clock".into())
        }
        Some(Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|err| format!("ts `{s}` is not an RFC 3339 date-time: {err}"))?
            .timestamp_millis(),
        Some(_) => {
            return Err("ts must be milliseconds since the epoch or an RFC 3339 string".into())
        }
    };
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
    let own_identity = e.event_id.is_some() || e.ts.is_some();
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

/// Parses a JSON array or NDJSON body into events; every problem names its event or line.
fn parse_events(
    text: &str,
    now: i64,
    skew_ms: i64,
    max: usize,
) -> Result<Vec<(Event, bool)>, ApiError> {
    let trimmed = text.trim_start();
    let array = trimmed.starts_with('[');
    let raw: Vec<(usize, Result<EventIn, String>)> = if array {
        // Well-formed arrays decode in one pass; the element-by-element pass below only
        // runs to name the bad elements.
        if let Ok(events) = serde_json::from_str::<Vec<Obj<EventIn>>>(text) {
            events.into_iter().map(|e| Ok(e.0)).enumerate().collect()
        } else {
            let values: Vec<Value> = serde_json::from_str(text)
                .map_err(|e| ApiError::bad(format!("body is not a JSON array of events: {e}")))?;
            values
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    (
                        i,
                        serde_json::from_value::<Obj<EventIn>>(v)
                            .map(|e| e.0)
                            .map_err(|e| e.to_string()),
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
                    serde_json::from_str::<Obj<EventIn>>(l)
                        .map(|e| e.0)
                        .map_err(|e| e.to_string()),
                )
            })
            .collect()
    };
    if raw.is_empty() {
        return Err(ApiError::bad("no events in the body"));
    }
    if raw.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_events",
            format!("{} events in one request; the limit is {max}", raw.len()),
        ));
    }
    let what = if array { "event" } else { "line" };
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

async fn append(st: &AppState, entries: Vec<AppendEntry>) -> Result<Vec<Position>, ApiError> {
    writable(st)?;
    node::append(&st.ctx, entries, st.opts.request_timeout)
        .await
        .map_err(|e| match e {
            LogError::Refused(why) => ApiError::bad(why),
            LogError::Unavailable(why) | LogError::Failed(why) => {
                st.ctx.metrics.log_write_errors.inc();
                ApiError::unavailable(why)
            }
        })
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
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    partition: StreamOut,
    offset: u64,
    duplicate: bool,
}

fn position_out(p: &Position, id: Option<String>) -> PositionOut {
    PositionOut {
        id,
        partition: if p.stream == CATALOG_STREAM {
            StreamOut::Named("catalog")
        } else {
            StreamOut::Partition(p.stream)
        },
        offset: p.offset,
        duplicate: p.duplicate,
    }
}

#[derive(Serialize)]
struct EventsOut {
    acked: usize,
    duplicates: usize,
    results: Vec<PositionOut>,
}

async fn post_events(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    q: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    Params::none(q.0)?;
    let idem = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let b = v.as_bytes();
            if b.is_empty()
                || b.len() > limits::MAX_ID_CHARS
                || !b.iter().all(|c| (0x21..=0x7e).contains(c))
            {
                return Err(ApiError::bad(format!(
                    "Idempotency-Key must be 1..={} visible ASCII characters (no spaces)",
                    limits::MAX_ID_CHARS
                )));
            }
            Some(String::from_utf8_lossy(b).into_owned())
        }
    };
    let bytes = read_body(&st, body).await?;
    let text = body_text(&bytes)?;
    let skew = st.ctx.settings.max_future_skew.as_millis() as i64;
    let events =
        parse_events(text, now_ms(), skew, st.opts.max_events_per_request).inspect_err(|_| {
            st.ctx
                .metrics
                .events_rejected
                .get_or_create(&troupe_actors::metrics::label("reason", "invalid"))
                .inc();
        })?;
    let request: Vec<u8> = match &idem {
        Some(k) => [b"key:".as_slice(), k.as_bytes()].concat(),
        None => hash128(&[b"body", &bytes]).to_le_bytes().to_vec(),
    };
    let p = st.ctx.settings.partitions;
    let entries: Vec<AppendEntry> = events
        .into_iter()
        .enumerate()
        .map(|(i, (e, own))| {
            let stream = partition_of(&e.user, p);
            let payload = Payload::Event(e);
            AppendEntry {
                stream,
                key: event_key(&payload, own, &request, i),
                payload,
            }
        })
        .collect();
    let positions = append(&st, entries).await?;
    let acked = positions.iter().filter(|p| !p.duplicate).count();
    Ok(Json(EventsOut {
        acked,
        duplicates: positions.len() - acked,
        results: positions.iter().map(|p| position_out(p, None)).collect(),
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an item object")]
struct ItemIn {
    #[serde(default, deserialize_with = "present")]
    id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    text: Option<String>,
    #[serde(default, deserialize_with = "present")]
    categories: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    hidden: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    attributes: Option<BTreeMap<String, String>>,
}

fn to_item(id: String, i: ItemIn) -> Result<Item, String> {
    check_id("id", &id)?;
    let text = i.text.unwrap_or_default();
    check_text("text", &text, 0, limits::MAX_TEXT_CHARS)?;
    let mut categories = i.categories.unwrap_or_default();
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
    let attributes = i.attributes.unwrap_or_default();
    if attributes.len() > limits::MAX_ATTRIBUTES {
        return Err(format!(
            "{} attributes; the limit is {}",
            attributes.len(),
            limits::MAX_ATTRIBUTES
        ));
    }
    for (k, v) in &attributes {
        check_text("attribute name", k, 1, limits::MAX_ATTRIBUTE_KEY_CHARS)?;
        check_text(
            &format!("attribute `{k}`"),
            v,
            0,
            limits::MAX_ATTRIBUTE_VALUE_CHARS,
        )?;
    }
    Ok(Item {
        id,
        text,
        categories,
        hidden: i.hidden.unwrap_or(false),
        attributes,
    })
}

fn items_out(positions: &[Position], ids: Vec<String>) -> Response {
    let results: Vec<PositionOut> = positions
        .iter()
        .zip(ids)
        .map(|(p, id)| position_out(p, Some(id)))
        .collect();
    Json(json!({ "results": results })).into_response()
}

async fn put_item(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
    body: Body,
) -> ApiResult {
    let id = path_id("id", path)?;
    Params::none(q.0)?;
    let bytes = read_body(&st, body).await?;
    let Obj(item): Obj<ItemIn> = serde_json::from_str(body_text(&bytes)?)
        .map_err(|e| ApiError::bad(format!("item: {e}")))?;
    if item.id.is_some() {
        return Err(ApiError::bad(
            "the item id is the path's: leave `id` out of the body",
        ));
    }
    let item = to_item(id.clone(), item).map_err(ApiError::bad)?;
    let pos = append(
        &st,
        vec![AppendEntry::new(CATALOG_STREAM, Payload::ItemUpsert(item))],
    )
    .await?;
    Ok(items_out(&pos, vec![id]))
}

async fn post_items(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    q: RawQuery,
    body: Body,
) -> ApiResult {
    Params::none(q.0)?;
    let bytes = read_body(&st, body).await?;
    let items: Vec<Obj<ItemIn>> = serde_json::from_str(body_text(&bytes)?)
        .map_err(|e| ApiError::bad(format!("body is not a JSON array of items: {e}")))?;
    if items.is_empty() {
        return Err(ApiError::bad("no items in the body"));
    }
    if items.len() > st.opts.max_events_per_request {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_items",
            format!(
                "{} items in one request; the limit is {}",
                items.len(),
                st.opts.max_events_per_request
            ),
        ));
    }
    let mut entries = Vec::with_capacity(items.len());
    let mut ids = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    for (n, Obj(mut i)) in items.into_iter().enumerate() {
        let Some(id) = i.id.take() else {
            problems.push(format!("item {}: id is required", n + 1));
            continue;
        };
        match to_item(id, i) {
            Ok(it) => {
                ids.push(it.id.clone());
                entries.push(AppendEntry::new(CATALOG_STREAM, Payload::ItemUpsert(it)));
            }
            Err(e) => problems.push(format!("item {}: {e}", n + 1)),
        }
    }
    if !problems.is_empty() {
        problems.truncate(20);
        return Err(ApiError::bad(format!(
            "nothing was accepted: {}",
            problems.join("; ")
        )));
    }
    let pos = append(&st, entries).await?;
    Ok(items_out(&pos, ids))
}

async fn delete_item(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let id = path_id("id", path)?;
    Params::none(q.0)?;
    let pos = append(
        &st,
        vec![AppendEntry::new(
            CATALOG_STREAM,
            Payload::ItemDelete { id: id.clone() },
        )],
    )
    .await?;
    Ok(items_out(&pos, vec![id]))
}

/// Waits (bounded by `freshness_wait`) for the serving consumer of `stream` to reach
/// `min_offset`, or the stream's head at arrival; true when it did not, or when the log
/// is unreachable so the node cannot know its head is current (stale).
async fn wait_fresh(st: &AppState, stream: u32, min_offset: Option<u64>) -> bool {
    let ctx = &st.ctx;
    let target = min_offset.unwrap_or_else(|| ctx.head(stream));
    !ctx.wait_applied(stream, target, ctx.settings.ranker.freshness_wait)
        .await
        || !ctx.log.writable()
}

async fn get_item(
    State(st): State<AppState>,
    _a: Admitted<Reads>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let id = path_id("id", path)?;
    let q = Params::parse(q.0, &["min_offset"], &[])?;
    let stale = wait_fresh(&st, CATALOG_STREAM, q.min_offset()?).await;
    let view = st.ctx.catalog.read();
    let item = view
        .items
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("no item `{id}` in the catalog")))?;
    Ok(Json(json!({
        "id": item.id,
        "text": item.text,
        "categories": item.categories,
        "hidden": item.hidden,
        "attributes": item.attributes,
        "applied_offset": view.applied,
        "stale": stale,
    }))
    .into_response())
}

async fn recommend(
    State(st): State<AppState>,
    _a: Admitted<Reads>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let user = path_id("user", path)?;
    let q = Params::parse(
        q.0,
        &[
            "k",
            "category",
            "exclude",
            "explain",
            "weights",
            "min_offset",
        ],
        &["exclude"],
    )?;
    let k = q.k(st.ctx.settings.ranker.max_k)?;
    let explain = match q.get("explain") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ApiError::bad(format!(
                "explain must be true or false, got `{v}`"
            )))
        }
    };
    let weights = q
        .get("weights")
        .map(limits::parse_weights)
        .transpose()
        .map_err(ApiError::bad)?
        .map(|w| w.to_vec());
    let category = q
        .get("category")
        .map(|c| {
            check_text("category", c, 1, limits::MAX_CATEGORY_CHARS)
                .map(|_| c.to_string())
                .map_err(ApiError::bad)
        })
        .transpose()?;
    let mut exclude = Vec::new();
    for (n, v) in q.all("exclude").enumerate() {
        if n >= limits::MAX_EXCLUDE_PARAMS {
            return Err(ApiError::bad(format!(
                "more than {} exclude parameters",
                limits::MAX_EXCLUDE_PARAMS
            )));
        }
        check_text("exclude", v, 0, limits::MAX_EXCLUDE_CHARS).map_err(ApiError::bad)?;
        exclude.extend(v.split(',').filter(|x| !x.is_empty()).map(str::to_string));
    }
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
        category,
        exclude,
        weights,
        request_id,
        now_ms: 0,
        min_offset: q.min_offset()?,
    };
    let reply = troupe_actors::cluster::recommend(&st.ctx, req, st.opts.request_timeout).await?;
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
                als: i.shares.first().copied().unwrap_or(0.0),
                content: i.shares.get(1).copied().unwrap_or(0.0),
                popularity: i.shares.get(2).copied().unwrap_or(0.0),
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
        fallback: reply.fallback.as_ref(),
        served_by: &reply.served_by,
        route: &reply.route,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback: Option<&'a troupe_actors::ranker::Fallback>,
    served_by: &'a str,
    route: &'a str,
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
    als: f32,
    content: f32,
    popularity: f32,
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

/// The interaction events naming an item that this node's item statistics have applied
/// (every kind, undecayed): 0 for a catalog item nobody touched yet; 404 for a deleted
/// item and for an id neither the catalog nor any event named.
async fn item_stats(
    State(st): State<AppState>,
    _a: Admitted<Reads>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let item = path_id("id", path)?;
    let q = Params::parse(q.0, &["min_offset"], &[])?;
    let stale = wait_fresh(&st, CATALOG_STREAM, q.min_offset()?).await;
    if st.ctx.catalog.read().deleted.contains(&item) {
        return Err(ApiError::not_found(format!("item `{item}` was deleted")));
    }
    let counted = node::call(names::ITEM_STATS, st.opts.request_timeout, |p| {
        troupe_actors::item_stats::ItemStatsMsg::EventCount(item.clone(), p)
    })
    .await?;
    let known = counted.is_some() || st.ctx.catalog.read().items.contains_key(&item);
    if !known {
        return Err(ApiError::not_found(format!(
            "no item `{item}` in the catalog and no event for it applied yet"
        )));
    }
    Ok(Json(json!({
        "item": item,
        "event_count": counted.unwrap_or(0),
        "node": st.ctx.settings.node_name,
        "stale": stale,
    }))
    .into_response())
}

async fn similar(
    State(st): State<AppState>,
    _a: Admitted<Reads>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let item = path_id("id", path)?;
    let q = Params::parse(q.0, &["k", "min_offset"], &[])?;
    let k = q.k(st.ctx.settings.ranker.max_k)?;
    wait_fresh(&st, CATALOG_STREAM, q.min_offset()?).await;
    if st.ctx.catalog.read().deleted.contains(&item) {
        return Err(ApiError::not_found(format!("item `{item}` was deleted")));
    }
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
        return Err(ApiError::not_found(format!(
            "item `{}` has no embedding or factors",
            r.item
        )));
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
    _a: Admitted<UserData>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let user = path_id("id", path)?;
    let q = Params::parse(q.0, &["min_offset"], &[])?;
    let p = partition_of(&user, st.ctx.settings.partitions);
    let query = UserQuery {
        version: WIRE_VERSION,
        user: user.clone(),
        unchanged_since: 0,
    };
    let (v, stale) =
        troupe_actors::cluster::user_view(&st.ctx, query, q.min_offset()?, st.opts.request_timeout)
            .await
            .map_err(ApiError::unavailable)?;
    if !v.known {
        return Err(ApiError::not_found(format!("no events for user `{user}`")));
    }
    Ok(Json(json!({
        "user": user,
        "partition": p,
        "events": v.events,
        "last_event_ms": v.last_ts_ms,
        "last_offset": v.last_offset,
        "applied_offset": v.applied_offset,
        "stale": stale,
        "kind_counts": v.kind_counts.into_iter().collect::<BTreeMap<_, _>>(),
        "history": v.history.iter().map(|t| json!({"item": t.item, "kind": t.kind, "weight": t.weight, "ts": t.ts_ms})).collect::<Vec<_>>(),
        "seen": v.seen.len(),
        "disliked": v.disliked,
    }))
    .into_response())
}

async fn delete_user(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let user = path_id("id", path)?;
    Params::none(q.0)?;
    let p = partition_of(&user, st.ctx.settings.partitions);
    let pos = append(&st, vec![AppendEntry::new(p, Payload::EraseUser { user })]).await?;
    let results: Vec<PositionOut> = pos.iter().map(|p| position_out(p, None)).collect();
    Ok(Json(json!({ "results": results })).into_response())
}

async fn cluster(State(st): State<AppState>, _a: Admitted<Ops>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    // Every actor asked at once, each bounded: the page answers within about a second
    // whatever the log does (an actor stuck on it shows as not answering).
    let (actors, sups) = node::observe_all(&st.ctx, Duration::from_millis(800)).await;
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
    let streams = |f: &dyn Fn(u32) -> u64| {
        st.ctx
            .streams()
            .iter()
            .map(|&s| json!({"stream": troupe_actors::metrics::stream_label(s), "offset": f(s)}))
            .collect::<Vec<_>>()
    };
    Ok(Json(json!({
        "node": st.ctx.settings.node_name,
        "store_id": st.ctx.store.identity().unwrap_or_default(),
        "partitions": st.ctx.settings.partitions,
        "ready": h.ready(),
        "recovering": h.recovering(),
        "escalated": h.escalated(),
        "log": st.ctx.log.describe(),
        "state": {
            "backend": st.ctx.state.backend(),
            "owner": st.ctx.consumers.owner(),
            "claims": st.ctx.consumers.claims().into_iter().map(|(scope, epoch)| json!({"scope": scope, "epoch": epoch})).collect::<Vec<_>>(),
        },
        "cluster": st.ctx.cluster.as_ref().map(|c| c.describe(&st.ctx)),
        "journal_heads": streams(&|s| st.ctx.head(s)),
        "applied": streams(&|s| st.ctx.applied(s)),
        "als_model_version": st.ctx.als.load().as_ref().map(|m| m.version),
        "allocator": troupe_actors::alloc::stats(),
        "actors": actors,
        "supervisors": sups,
    }))
    .into_response())
}

async fn dead_letters(State(st): State<AppState>, _a: Admitted<Writes>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    let mut docs: Vec<Vec<u8>> = st
        .ctx
        .state
        .dead_letters()
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .into_iter()
        .map(|d| d.doc)
        .collect();
    if st.ctx.state.backend() == "embedded" {
        // Dead letters an older build kept in the store's own table.
        let store = st.ctx.store.clone();
        let old = tokio::task::spawn_blocking(move || store.dead_letters())
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        docs.splice(0..0, old);
    }
    let docs: Vec<Value> = docs
        .iter()
        .filter_map(|d| serde_json::from_slice(d).ok())
        .collect();
    Ok(Json(json!({"dead_letters": docs})).into_response())
}

async fn retrain(_a: Admitted<Writes>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    let r = node::call(
        names::ALS_TRAINER,
        Duration::from_secs(3600),
        AlsTrainerMsg::Retrain,
    )
    .await?;
    if r.no_leader {
        // No leader, or one that did not answer: nothing was trained; ask again soon.
        let mut resp = ApiError::unavailable(r.reason.clone()).into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        return Ok(resp);
    }
    Ok(Json(serde_json::to_value(&r).unwrap_or(Value::Null)).into_response())
}

async fn rollback(State(st): State<AppState>, _a: Admitted<Writes>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
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

async fn openapi_doc(State(st): State<AppState>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi.as_str().to_string(),
    )
        .into_response())
}

async fn healthz(State(st): State<AppState>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    Ok(match st.ctx.health.escalated() {
        None => Json(json!({
            "status": "ok",
            "node": st.ctx.settings.node_name,
            "store_id": st.ctx.store.identity().unwrap_or_default(),
        }))
        .into_response(),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "escalated", "detail": e})),
        )
            .into_response(),
    })
}

async fn readyz(State(st): State<AppState>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    let h = &st.ctx.health;
    let in_flight = |c: &Class| c.in_flight.get();
    let body = json!({
        "ready": h.ready(),
        "recovering": h.recovering(),
        "escalated": h.escalated(),
        "journal_failed": h.journal_failed.load(Ordering::Relaxed),
        // Writes need the log; reads do not, so readiness ignores it (a load balancer
        // must not drop every node when the shared log is down).
        "log_writable": st.ctx.log.writable(),
        "draining": h.draining.load(Ordering::Relaxed),
        "saturated": {"reads": st.reads.saturated(), "writes": st.writes.saturated()},
        "in_flight": {"reads": in_flight(&st.reads), "writes": in_flight(&st.writes)},
        // Cluster mode: what this node can do now. Reads are answered whatever the log
        // does: from here for the partitions it serves, through their owners for the
        // others, degraded when neither is possible.
        "cluster": st.ctx.cluster.as_ref().map(|c| {
            let parts = st.ctx.settings.partitions;
            let served: Vec<u32> = (0..parts).filter(|&p| st.ctx.serving(p)).collect();
            let peers_up = c.peers.lock().values().filter(|p| p.state == troupe_actors::cluster::PeerState::Up).count();
            json!({
                "log_reachable": c.log_reachable.load(Ordering::Relaxed),
                "leases_read_ms_ago": c.last_read.lock().map(|t| t.elapsed().as_millis() as u64),
                "partitions_served_here": served,
                "peers_up": peers_up,
                "accepts_writes": st.ctx.log.writable(),
                "joined": c.joined.load(Ordering::Relaxed),
            })
        }),
    });
    let status = if h.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(body)).into_response())
}

async fn metrics(State(st): State<AppState>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    st.ctx
        .metrics
        .log_writable
        .set(i64::from(st.ctx.log.writable()));
    st.ctx
        .metrics
        .log_sync_always
        .set(st.ctx.log.syncs_every_write());
    if let Some(c) = &st.ctx.cluster {
        c.export(&st.ctx);
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.ctx.metrics.render(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<(Event, bool)>, ApiError> {
        parse_events(text, 1_700_000_000_000, 1000, 10)
    }

    #[test]
    fn events_parse_array_and_ndjson_with_located_errors() {
        let a = parse(r#"[{"user":"u","item":"i","kind":"View","ts":5}]"#).unwrap();
        assert_eq!(
            (a[0].0.kind.as_str(), a[0].0.ts_ms, a[0].1),
            ("view", 5, true)
        );
        let n = parse(
            "{\"user\":\"u\",\"item\":\"i\",\"kind\":\"v\",\"ts\":\"2023-11-14T22:13:20Z\"}\n\n",
        )
        .unwrap();
        assert_eq!(n[0].0.ts_ms, 1_700_000_000_000);
        let e = parse(
            "{\"user\":\"u\",\"item\":\"i\",\"kind\":\"v\"}\n{\"user\":\"u\",\"kind\":\"v\"}",
        )
        .unwrap_err();
        assert!(
            e.detail.contains("line 2") && e.detail.contains("item"),
            "{}",
            e.detail
        );
        let e = parse(r#"[{"user":"u","item":"i","kind":"v","extra":1}]"#).unwrap_err();
        assert!(e.detail.contains("extra"), "{}", e.detail);
        let e = parse(r#"[{"user":"u","item":"i","kind":"v","ts":9999999999999}]"#).unwrap_err();
        assert!(e.detail.contains("after the node's clock"), "{}", e.detail);
        let e = parse(r#"[{"user":1,"item":"i","kind":"v"}]"#).unwrap_err();
        assert!(e.detail.contains("event 1"), "{}", e.detail);
    }

    #[test]
    fn errors_name_limits_not_internal_types() {
        let e = parse(r#"[{"user":"u","item":"i","kind":"v","value":1e308}]"#).unwrap_err();
        assert!(
            e.detail.contains("out of range") && e.detail.contains("32-bit"),
            "{}",
            e.detail
        );
        let e = parse("[5]").unwrap_err();
        assert!(
            !e.detail.contains("EventIn") && e.detail.contains("an event object"),
            "{}",
            e.detail
        );
        for field in ["event_id", "value", "ts", "request_id"] {
            let body = format!(r#"[{{"user":"u","item":"i","kind":"v","{field}":null}}]"#);
            let e = parse(&body).unwrap_err();
            assert!(e.detail.contains("null"), "{field}: {}", e.detail);
        }
        let long = "x".repeat(limits::MAX_ID_CHARS + 1);
        let e = parse(&format!(
            r#"[{{"user":"u","item":"i","kind":"v","request_id":"{long}"}}]"#
        ))
        .unwrap_err();
        assert!(e.detail.contains("request_id"), "{}", e.detail);
    }

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
    fn items_have_limits_on_every_field() {
        let ok = ItemIn {
            id: None,
            text: Some("t".into()),
            categories: Some(vec!["a".into(), "a".into()]),
            hidden: None,
            attributes: Some([("k".to_string(), "v".to_string())].into()),
        };
        assert_eq!(to_item("x".into(), ok).unwrap().categories, vec!["a"]);
        let many: Vec<String> = (0..=limits::MAX_CATEGORIES)
            .map(|i| i.to_string())
            .collect();
        let e = to_item(
            "x".into(),
            ItemIn {
                id: None,
                text: None,
                categories: Some(many),
                hidden: None,
                attributes: None,
            },
        )
        .unwrap_err();
        assert!(e.contains("categories"), "{e}");
        let attrs: BTreeMap<String, String> = (0..=limits::MAX_ATTRIBUTES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(to_item(
            "x".into(),
            ItemIn {
                id: None,
                text: None,
                categories: None,
                hidden: None,
                attributes: Some(attrs)
            }
        )
        .is_err());
        let big: BTreeMap<String, String> = [(
            "k".to_string(),
            "v".repeat(limits::MAX_ATTRIBUTE_VALUE_CHARS + 1),
        )]
        .into();
        assert!(to_item(
            "x".into(),
            ItemIn {
                id: None,
                text: None,
                categories: None,
                hidden: None,
                attributes: Some(big)
            }
        )
        .is_err());
        let e = serde_json::from_str::<ItemIn>(r#"{"id": null}"#).unwrap_err();
        assert!(e.to_string().contains("null"), "{e}");
    }

    proptest::proptest! {
        /// Any body text: events or a 4xx with a reason, never a panic.
        #[test]
        fn any_body_parses_or_is_refused(text in "(\\PC|\\n|[\\[\\]{}\",:])*") {
            if let Err(e) = parse(&text) {
                proptest::prop_assert!(e.status.is_client_error());
                proptest::prop_assert!(!e.detail.is_empty());
            }
        }

        /// Any query string: parameters or a 400, never a panic.
        #[test]
        fn any_query_parses_or_is_refused(q in "\\PC*") {
            if let Ok(p) = Params::parse(Some(q), &["k", "min_offset"], &[]) {
                drop(p.k(500));
                drop(p.min_offset());
            }
        }
    }

    #[test]
    fn query_parameters_unknown_or_repeated_are_refused() {
        let p = |q: &str| Params::parse(Some(q.to_string()), &["k", "exclude"], &["exclude"]);
        assert!(p("k=1&exclude=a&exclude=b").is_ok());
        assert!(p("k=1&k=2").unwrap_err().detail.contains("more than once"));
        assert!(p("colour=red").unwrap_err().detail.contains("colour"));
        assert!(Params::none(Some("x=1".into())).is_err());
        assert!(Params::none(None).is_ok());
    }
}
