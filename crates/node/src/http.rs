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
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use troupe_actors::api::{now_ms, Access, Api, ApiOptions, Permit};
use troupe_actors::ctx::Ctx;
use troupe_actors::journal::Position;
use troupe_actors::node::{self, CallError};
use troupe_actors::proto::api::{self as proto, ErrorKind, UserRead};
use troupe_actors::ranker::{Branch, BranchReport, BranchStatus, RecommendRequest, Route};
use troupe_actors::record::{hash128, Event, Item, CATALOG_STREAM};

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

#[derive(Clone)]
pub struct AppState {
    ctx: Arc<Ctx>,
    opts: HttpOptions,
    /// The request layer every route calls (shared with the cluster gateway).
    api: Arc<Api>,
    /// Requests seen (span ids).
    requests: Arc<AtomicU64>,
    openapi: Arc<String>,
}

/// An API error rendered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: std::borrow::Cow<'static, str>,
    detail: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code: error.into(),
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

/// The request layer's errors, with the status their class has over HTTP.
impl From<proto::ApiError> for ApiError {
    fn from(e: proto::ApiError) -> Self {
        let status = match e.kind {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Overloaded | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError {
            status,
            code: e.code.into(),
            detail: e.detail,
            retry_after: e.retry_after_s,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": self.code, "detail": self.detail})),
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
    let api = Api::new(
        ctx.clone(),
        ApiOptions {
            auth_token: opts.auth_token.clone(),
            read_token: opts.read_token.clone(),
            public_reads: opts.public_reads,
            max_events_per_request: opts.max_events_per_request,
            max_in_flight_reads: opts.max_in_flight_reads,
            max_in_flight_writes: opts.max_in_flight_writes,
            request_timeout: opts.request_timeout,
        },
    );
    let state = AppState {
        api,
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
    let span = tracing::info_span!(
        "http",
        %method,
        route = %route,
        request = id,
        node = %st.ctx.settings.node_name,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    // A caller that traces sends W3C trace context: this request joins its trace.
    let caller = {
        let header = |h: &str| {
            req.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        troupe_actors::proto::wire::TraceContext {
            traceparent: header("traceparent"),
            tracestate: header("tracestate"),
        }
    };
    troupe_actors::trace::adopt(&span, &caller);
    troupe_actors::trace::record_ids(&span);
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

/// Who may call a route and which in-flight limit it counts against (the request
/// layer's classes, one type per class for the extractor).
pub trait Class: Send + Sync + 'static {
    const ACCESS: Access;
}

/// Writes and admin routes.
pub struct Writes;
/// Recommendations, similar items, item reads: public unless `public_reads = false`.
pub struct Reads;
/// User data.
pub struct UserData;
/// Operational reads (cluster state): public.
pub struct Ops;

impl Class for Writes {
    const ACCESS: Access = Access::Writes;
}
impl Class for Reads {
    const ACCESS: Access = Access::Reads;
}
impl Class for UserData {
    const ACCESS: Access = Access::UserData;
}
impl Class for Ops {
    const ACCESS: Access = Access::Ops;
}

/// A request past its access check and admitted into its class; the slot is held until
/// the handler returns.
pub struct Admitted<A> {
    _permit: Permit,
    _class: PhantomData<A>,
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

impl<A: Class> FromRequestParts<AppState> for Admitted<A> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let o = &st.opts;
        st.api.authorize(A::ACCESS, bearer(parts))?;
        if A::ACCESS.is_write() {
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
        Ok(Admitted {
            _permit: st.api.admit(A::ACCESS)?,
            _class: PhantomData,
        })
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

impl Expecting for EventJson {
    const WHAT: &'static str = "an event object";
}

impl Expecting for ItemJson {
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
struct EventJson {
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

/// An event of a body, its `ts` read (milliseconds or an RFC 3339 string), then checked
/// by the request layer; the bool says whether it carried its own identity.
fn to_event(e: EventJson, now: i64, skew_ms: i64) -> Result<(Event, bool), String> {
    // The fields the request layer checks first keep their place in the reasons.
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
        None => None,
        // JSON has one number type: 1000.0 is the integer 1000.
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && (0.0..9.0e18).contains(f))
                        .map(|f| f as i64)
                })
                .filter(|&t| t >= 0)
                .ok_or_else(|| {
                    format!("ts {n} must be a whole number of milliseconds since 1970")
                })?,
        ),
        Some(Value::Null) => {
            return Err("ts is null: leave the field out to use the node's clock".into())
        }
        Some(Value::String(s)) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|err| format!("ts `{s}` is not an RFC 3339 date-time: {err}"))?
                .timestamp_millis(),
        ),
        Some(_) => {
            return Err("ts must be milliseconds since the epoch or an RFC 3339 string".into())
        }
    };
    troupe_actors::api::check_event(
        proto::EventIn {
            event_id: e.event_id,
            user: e.user,
            item: e.item,
            kind: e.kind,
            value: e.value,
            ts_ms,
            request_id: e.request_id,
        },
        now,
        skew_ms,
    )
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
    let raw: Vec<(usize, Result<EventJson, String>)> = if array {
        // Well-formed arrays decode in one pass; the element-by-element pass below only
        // runs to name the bad elements.
        if let Ok(events) = serde_json::from_str::<Vec<Obj<EventJson>>>(text) {
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
                        serde_json::from_value::<Obj<EventJson>>(v)
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
                    serde_json::from_str::<Obj<EventJson>>(l)
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
    troupe_actors::api::refuse_problems(problems)?;
    Ok(out)
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
            let k = v.to_str().map_err(|_| {
                ApiError::bad(format!(
                    "Idempotency-Key must be 1..={} visible ASCII characters (no spaces)",
                    limits::MAX_ID_CHARS
                ))
            })?;
            troupe_actors::api::check_request_key(k)?;
            Some(k.to_string())
        }
    };
    let bytes = read_body(&st, body).await?;
    let text = body_text(&bytes)?;
    let skew = st.ctx.settings.max_future_skew.as_millis() as i64;
    let events = parse_events(text, now_ms(), skew, st.opts.max_events_per_request)
        .inspect_err(|_| st.api.count_invalid_events())?;
    // Events without their own identity are keyed by the request: its
    // Idempotency-Key, else its whole body.
    let request: Vec<u8> = match &idem {
        Some(k) => troupe_actors::api::request_key_bytes(k),
        None => hash128(&[b"body", &bytes]).to_le_bytes().to_vec(),
    };
    let w = st.api.append_events(events, &request).await?;
    Ok(Json(EventsOut {
        acked: w.acked as usize,
        duplicates: w.duplicates as usize,
        results: w.positions.iter().map(|p| position_out(p, None)).collect(),
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an item object")]
struct ItemJson {
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

/// An item of a body (its id given apart), checked by the request layer.
fn to_item(id: String, i: ItemJson) -> Result<Item, String> {
    troupe_actors::api::check_item(proto::ItemIn {
        id,
        text: i.text.unwrap_or_default(),
        categories: i.categories.unwrap_or_default(),
        hidden: i.hidden.unwrap_or(false),
        attributes: i.attributes.unwrap_or_default(),
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
    let Obj(item): Obj<ItemJson> = serde_json::from_str(body_text(&bytes)?)
        .map_err(|e| ApiError::bad(format!("item: {e}")))?;
    if item.id.is_some() {
        return Err(ApiError::bad(
            "the item id is the path's: leave `id` out of the body",
        ));
    }
    let item = to_item(id.clone(), item).map_err(ApiError::bad)?;
    let w = st.api.upsert_items(vec![item]).await?;
    Ok(items_out(&w.positions, vec![id]))
}

async fn post_items(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    q: RawQuery,
    body: Body,
) -> ApiResult {
    Params::none(q.0)?;
    let bytes = read_body(&st, body).await?;
    let items: Vec<Obj<ItemJson>> = serde_json::from_str(body_text(&bytes)?)
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
    let mut checked = Vec::with_capacity(items.len());
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
                checked.push(it);
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
    let w = st.api.upsert_items(checked).await?;
    Ok(items_out(&w.positions, ids))
}

async fn delete_item(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let id = path_id("id", path)?;
    Params::none(q.0)?;
    let w = st.api.delete_item(id.clone()).await?;
    Ok(items_out(&w.positions, vec![id]))
}

async fn get_item(
    State(st): State<AppState>,
    _a: Admitted<Reads>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let id = path_id("id", path)?;
    let q = Params::parse(q.0, &["min_offset"], &[])?;
    let v = st.api.get_item(&id, q.min_offset()?).await?;
    Ok(Json(json!({
        "id": v.item.id,
        "text": v.item.text,
        "categories": v.item.categories,
        "hidden": v.item.hidden,
        "attributes": v.item.attributes,
        "applied_offset": v.applied_offset,
        "stale": v.stale,
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
    let req = st.api.name_request(RecommendRequest {
        user,
        k,
        category,
        exclude,
        weights,
        request_id: String::new(),
        now_ms: 0,
        min_offset: q.min_offset()?,
    });
    let reply = st.api.recommend(req).await?;
    let items: Vec<RecItemOut<'_>> = reply
        .items
        .iter()
        .map(|i| RecItemOut {
            item: &i.item,
            score: i.score,
            shares: SharesOut {
                als: i.share(Branch::Als),
                content: i.share(Branch::Content),
                popularity: i.share(Branch::Popularity),
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
        route: reply.route,
        branches: if explain {
            BranchesOut::Full(&reply.branches)
        } else {
            BranchesOut::Brief(
                reply
                    .branches
                    .iter()
                    .map(|b| BriefBranch {
                        name: b.name,
                        status: b.status,
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
    route: Route,
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
struct BriefBranch {
    name: Branch,
    status: BranchStatus,
}

/// Branch statuses, or with `explain` the full reports (candidates, time).
#[derive(Serialize)]
#[serde(untagged)]
enum BranchesOut<'a> {
    Brief(Vec<BriefBranch>),
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
    let v = st.api.item_stats(item, q.min_offset()?).await?;
    Ok(Json(json!({
        "item": v.item,
        "event_count": v.event_count,
        "node": v.node,
        "stale": v.stale,
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
    let r = st.api.similar(item, k, q.min_offset()?).await?;
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
    let UserRead {
        user,
        partition,
        view: v,
        stale,
    } = st.api.get_user(user, q.min_offset()?).await?;
    Ok(Json(json!({
        "user": user,
        "partition": partition,
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
    let w = st.api.erase_user(user).await?;
    let results: Vec<PositionOut> = w.positions.iter().map(|p| position_out(p, None)).collect();
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

async fn retrain(State(st): State<AppState>, _a: Admitted<Writes>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    // No leader, or one that did not answer: 503, nothing was trained; ask again in 5 s.
    let r = st.api.retrain().await?;
    Ok(Json(serde_json::to_value(&r).unwrap_or(Value::Null)).into_response())
}

async fn rollback(State(st): State<AppState>, _a: Admitted<Writes>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    let r = st.api.rollback().await?;
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
    let [(reads_in_flight, reads_full), (writes_in_flight, writes_full)] = st.api.in_flight();
    let body = json!({
        "ready": h.ready(),
        "recovering": h.recovering(),
        "escalated": h.escalated(),
        "journal_failed": h.journal_failed.load(Ordering::Relaxed),
        // Writes need the log; reads do not, so readiness ignores it (a load balancer
        // must not drop every node when the shared log is down).
        "log_writable": st.ctx.log.writable(),
        "draining": h.draining.load(Ordering::Relaxed),
        "saturated": {"reads": reads_full, "writes": writes_full},
        "in_flight": {"reads": reads_in_flight, "writes": writes_in_flight},
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
    fn items_have_limits_on_every_field() {
        let ok = ItemJson {
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
            ItemJson {
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
            ItemJson {
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
            ItemJson {
                id: None,
                text: None,
                categories: None,
                hidden: None,
                attributes: Some(big)
            }
        )
        .is_err());
        let e = serde_json::from_str::<ItemJson>(r#"{"id": null}"#).unwrap_err();
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
