//! The HTTP/JSON API (axum on a hyper server configured here) under `/v1`, plus
//! `/healthz`, `/readyz` and `/metrics`: a thin adapter over the request layer
//! (`troupe_actors::api`), which owns access, admission, checks, partitioning,
//! idempotency keys, freshness waits and routing for HTTP and the client API alike. This
//! file holds the server, errors, extractors and query parsing; one file per group of
//! routes parses bodies and renders answers: `events`, `items`, `recommend`,
//! `users`, `ops`.
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
use troupe_actors::log::Position;
use troupe_actors::node::{self, CallError};
use troupe_actors::proto::api::{self as proto, ErrorKind, UserRead};
use troupe_actors::proto::api::{Branch, BranchReport, BranchStatus, RecommendRequest, Route};
use troupe_actors::record::{hash128, Event, Item, CATALOG_STREAM};
use troupe_actors::Ctx;

use crate::limits::{self, check_id, check_text};

mod events;
mod items;
mod ops;
mod recommend;
mod users;

use crate::openapi::{self, ApiShape};
use events::*;
use items::*;
use ops::*;
use recommend::*;
use users::*;

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
        .route("/", get(status_page))
        .route("/ui", get(status_page))
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
        .get_or_create(&troupe_actors::labels2(
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

/// A field that may be absent but never null: `null` is refused with serde's "invalid
/// type: null" error.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
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

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
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
