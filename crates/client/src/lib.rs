//! A Rust client of a Troupe cluster, without HTTP.
//!
//! [`Client::connect`] joins the cluster as a *client node* over ractor_cluster (the
//! cluster's cookie, a node name starting with [`CLIENT_PREFIX`]): members admit such a
//! session without making it a member (it owns nothing and is never asked for anything),
//! and the only actors a member advertises to it are the gateways. Every call is one
//! versioned frame (`troupe_proto::wire`) to a member's gateway, answered by that
//! member's request layer exactly as an HTTP request to it would be: the same checks and
//! reasons, the same admission limits, the same routing to the partition's owner.
//!
//! A call goes to the member used last; when that member is unreachable (its session
//! closed) or does not answer in time, the call is sent to another live member. Writes
//! are safe to resend: events are stored once by their id (or, without one, by the
//! request's key or content), item and user writes are last-write-wins. A retrain is not
//! resent after a timeout (it may still be running). Members whose session closed are
//! dialled again in the background.
//!
//! Cluster traffic is plain TCP: run clients and members on a private network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{ActorRef, RpcReplyPort};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};
use ractor_cluster_derive::RactorClusterMessage;
use tokio::sync::Mutex;
use troupe_proto::api::{
    ApiError, ClusterStatus, ErrorKind, EventIn, ItemIn, ItemStatsView, ItemView, Op, OpReply,
    RecommendQuery, RecommendReply, RetrainReport, RollbackReply, SimilarReply, UserRead, Written,
};
use troupe_proto::wire::{self, Envelope, RemoteError, Request, Response, TraceContext};

pub use troupe_proto as proto;

/// Node names of clients start with this; members admit such sessions as clients.
pub const CLIENT_PREFIX: &str = "client.";

/// The process group of a member's gateway: `troupe.gateway.<member name>`.
pub const GATEWAY_GROUP_PREFIX: &str = "troupe.gateway.";

/// The one remote message of a Troupe cluster, shared by members and clients. Its
/// variant name is the wire tag: never rename it, never add a variant (a peer without it
/// would drop the frame silently); the versioned frame inside carries everything else.
#[derive(RactorClusterMessage)]
pub enum GatewayMsg {
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// Why a call produced no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// No member answered within the call's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Too many requests of this class in flight on the member: retry after the delay.
    #[error("overloaded: {detail} (retry after {retry_after:?})")]
    Overloaded {
        detail: String,
        retry_after: Duration,
    },
    /// The member cannot answer now (log unreachable, no trainer leader, shutting down):
    /// retry after the delay.
    #[error("unavailable: {detail} (retry after {retry_after:?})")]
    Unavailable {
        detail: String,
        retry_after: Duration,
    },
    /// The member speaks a protocol version this client does not (or the reverse).
    #[error("protocol version mismatch: {0}")]
    Version(String),
    /// The input was refused; nothing was accepted. `code` and `detail` are what HTTP
    /// answers for the same input.
    #[error("{code}: {detail}")]
    Invalid { code: String, detail: String },
    /// A valid token is required (see [`Client::with_token`]).
    #[error("unauthorised: {0}")]
    Unauthorized(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The operation conflicts with the state (a rollback with nothing to roll back to).
    #[error("conflict: {0}")]
    Conflict(String),
    /// No member could be reached (the detail lists what each attempt met).
    #[error("no member reachable: {0}")]
    NoMember(String),
    /// The member failed to answer for another reason.
    #[error("{0}")]
    Failed(String),
}

impl From<ApiError> for ClientError {
    fn from(e: ApiError) -> Self {
        let retry_after = Duration::from_secs(e.retry_after_s.unwrap_or(1));
        match e.kind {
            ErrorKind::Invalid | ErrorKind::TooLarge => ClientError::Invalid {
                code: e.code,
                detail: e.detail,
            },
            ErrorKind::Unauthorized => ClientError::Unauthorized(e.detail),
            ErrorKind::NotFound => ClientError::NotFound(e.detail),
            ErrorKind::Conflict => ClientError::Conflict(e.detail),
            ErrorKind::Overloaded => ClientError::Overloaded {
                detail: e.detail,
                retry_after,
            },
            ErrorKind::Unavailable => ClientError::Unavailable {
                detail: e.detail,
                retry_after,
            },
        }
    }
}

/// Where the client connects and how it calls.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Cluster addresses (`host:port`) of some or all members.
    pub seeds: Vec<String>,
    /// The cluster's cookie.
    pub cookie: String,
    /// This client's name (after [`CLIENT_PREFIX`]); made unique per process.
    pub name: String,
    /// How long one call may take, failovers included.
    pub call_timeout: Duration,
    /// How long [`Client::connect`] waits for a first gateway.
    pub connect_timeout: Duration,
    /// Bearer token for operations that need one (writes, admin, user data).
    pub token: Option<String>,
}

impl ClientConfig {
    pub fn new(seeds: &[&str], cookie: &str) -> Self {
        ClientConfig {
            seeds: seeds.iter().map(|s| s.to_string()).collect(),
            cookie: cookie.to_string(),
            name: "app".into(),
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            token: None,
        }
    }
}

/// Peer addresses of the open sessions (so only seeds without one are dialled).
type Sessions = Arc<std::sync::Mutex<std::collections::HashMap<u64, String>>>;

struct Events(Sessions);

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        if let Ok(mut s) = self.0.lock() {
            s.insert(ses.node_id, ses.peer_addr);
        }
    }
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        if let Ok(mut s) = self.0.lock() {
            s.remove(&ses.node_id);
        }
    }
    fn node_session_authenticated(&self, _ses: NodeServerSessionInformation) {}
    fn node_session_ready(&self, _ses: NodeServerSessionInformation) {}
}

struct Inner {
    cfg: ClientConfig,
    server: ActorRef<NodeServerMessage>,
    sessions: Sessions,
    /// The member called last (calls stick to it while it answers).
    current: Mutex<Option<String>>,
    calls: std::sync::atomic::AtomicU64,
}

/// A connection to a Troupe cluster (cheap to clone; one node server per client).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _redial: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The members whose gateway this process sees now, by name.
pub fn members_seen() -> Vec<String> {
    let mut v: Vec<String> = ractor::pg::which_groups()
        .into_iter()
        .filter_map(|g| g.strip_prefix(GATEWAY_GROUP_PREFIX).map(str::to_string))
        .filter(|m| gateway_of(m).is_some())
        .collect();
    v.sort();
    v
}

/// The gateway of `member` (a remote actor: never one of this process's own).
fn gateway_of(member: &str) -> Option<ActorRef<GatewayMsg>> {
    ractor::pg::get_members(&format!("{GATEWAY_GROUP_PREFIX}{member}"))
        .into_iter()
        .find(|c| !c.get_id().is_local())
        .map(ActorRef::from)
}

impl Client {
    /// Joins the cluster through `seeds` (members' cluster addresses) with `cookie` and
    /// waits until a member's gateway is reachable.
    pub async fn connect(seeds: &[&str], cookie: &str) -> Result<Client, ClientError> {
        Self::connect_with(ClientConfig::new(seeds, cookie)).await
    }

    /// Joins with every option of `cfg`.
    pub async fn connect_with(cfg: ClientConfig) -> Result<Client, ClientError> {
        let name = format!(
            "{CLIENT_PREFIX}{}.{}.{}",
            cfg.name,
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() % 1_000_000_000)
        );
        // A listener is part of a ractor_cluster node; the client's takes any loopback
        // port and is never dialled (members never call clients).
        let server = NodeServer::new(
            0,
            cfg.cookie.clone(),
            name,
            "localhost".into(),
            None,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into());
        let (server, _) = ractor::Actor::spawn(None, server, ())
            .await
            .map_err(|e| ClientError::Failed(format!("starting the client node: {e}")))?;
        let sessions: Sessions = Default::default();
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "troupe.client".into(),
                subscription: Box::new(Events(sessions.clone())),
            })
            .map_err(|e| ClientError::Failed(format!("starting the client node: {e}")))?;
        let inner = Arc::new(Inner {
            cfg,
            server,
            sessions,
            current: Mutex::new(None),
            calls: Default::default(),
        });
        let deadline = Instant::now() + inner.cfg.connect_timeout;
        let mut errors = dial_all(&inner).await;
        loop {
            if !members_seen().is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                if errors.is_empty() {
                    errors.push("sessions opened but no gateway advertised (a wrong cookie closes the session without a word)".into());
                }
                return Err(ClientError::NoMember(errors.join("; ")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            if errors.len() == inner.cfg.seeds.len() {
                errors = dial_all(&inner).await;
            }
        }
        let redial = {
            let inner = inner.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    dial_all(&inner).await;
                }
            })
        };
        Ok(Client {
            inner,
            _redial: Arc::new(AbortOnDrop(redial)),
        })
    }

    /// The same client with a bearer token for operations that need one.
    pub fn with_token(self, token: &str) -> Client {
        let mut cfg = self.inner.cfg.clone();
        cfg.token = Some(token.to_string());
        Client {
            inner: Arc::new(Inner {
                cfg,
                server: self.inner.server.clone(),
                sessions: self.inner.sessions.clone(),
                current: Mutex::new(None),
                calls: Default::default(),
            }),
            _redial: self._redial.clone(),
        }
    }

    /// The member the last call went to.
    pub async fn current_member(&self) -> Option<String> {
        self.inner.current.lock().await.clone()
    }

    /// One operation, failing over to another member when the one asked is gone.
    pub async fn call(&self, op: Op) -> Result<OpReply, ClientError> {
        let timeout = self.inner.cfg.call_timeout;
        let deadline = Instant::now() + timeout;
        let resend_after_timeout = !matches!(op, Op::Retrain);
        let id = format!(
            "{}-{}",
            std::process::id(),
            self.inner
                .calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut tried: Vec<String> = Vec::new();
        let mut met: Vec<String> = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(if met.is_empty() {
                    ClientError::Timeout(timeout)
                } else {
                    ClientError::NoMember(met.join("; "))
                });
            }
            let Some(member) = self.pick(&tried).await else {
                // Nobody left to try now: wait for a session to come back.
                if tried.len() >= members_seen().len() {
                    tried.clear();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let left = deadline - now;
            // Half of what is left (at least 200 ms) per attempt: a member that hangs
            // leaves time to ask another.
            let attempt = if resend_after_timeout {
                (left / 2).max(Duration::from_millis(200)).min(left)
            } else {
                left
            };
            let env = Envelope {
                id: id.clone(),
                budget_ms: attempt.as_millis() as u64,
                trace: TraceContext::default(),
                request: Request::Api {
                    token: self.inner.cfg.token.clone(),
                    op: op.clone(),
                },
            };
            match call_gateway(&member, &env, attempt).await {
                Ok(Response::Api(r)) => {
                    *self.inner.current.lock().await = Some(member);
                    return r.map_err(ClientError::from);
                }
                Ok(other) => {
                    return Err(ClientError::Failed(format!(
                        "{member} answered with {}",
                        other.kind()
                    )))
                }
                Err(RemoteError::Version { got, accepted }) => {
                    return Err(ClientError::Version(format!(
                        "{member} and this client share no protocol version (version {got} refused; the refusing side accepts {}..={}; this client speaks {}..={})",
                        accepted.0,
                        accepted.1,
                        wire::OLDEST,
                        wire::speaks()
                    )))
                }
                Err(e @ RemoteError::TooNew { .. }) => {
                    return Err(ClientError::Version(format!("{member}: {e}")))
                }
                Err(RemoteError::Timeout(_)) if !resend_after_timeout => {
                    return Err(ClientError::Timeout(timeout))
                }
                Err(e @ (RemoteError::Unreachable(_) | RemoteError::Timeout(_))) => {
                    met.push(format!("{member}: {e}"));
                    let mut cur = self.inner.current.lock().await;
                    if cur.as_deref() == Some(member.as_str()) {
                        *cur = None;
                    }
                    tried.push(member);
                }
                Err(e) => return Err(ClientError::Failed(format!("{member}: {e}"))),
            }
        }
    }

    /// The member to call: the last one while it is seen, else the first not tried.
    async fn pick(&self, tried: &[String]) -> Option<String> {
        let seen = members_seen();
        let cur = self.inner.current.lock().await.clone();
        if let Some(c) = cur.filter(|c| seen.contains(c) && !tried.contains(c)) {
            return Some(c);
        }
        seen.into_iter().find(|m| !tried.contains(m))
    }

    /// Appends events. Without `event_id` or `ts_ms`, an event is identified by
    /// `request_key` (or, without one, the whole call's content) and its place in the
    /// call, so resending the same call stores nothing twice.
    pub async fn ingest(
        &self,
        events: Vec<EventIn>,
        request_key: Option<String>,
    ) -> Result<Written, ClientError> {
        match self
            .call(Op::Events {
                events,
                request_key,
            })
            .await?
        {
            OpReply::Written(w) => Ok(w),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn recommend(&self, q: RecommendQuery) -> Result<RecommendReply, ClientError> {
        match self.call(Op::Recommend(q)).await? {
            OpReply::Recommend(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn similar(
        &self,
        item: &str,
        k: u32,
        min_offset: Option<u64>,
    ) -> Result<SimilarReply, ClientError> {
        let op = Op::Similar {
            item: item.to_string(),
            k,
            min_offset,
        };
        match self.call(op).await? {
            OpReply::Similar(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn upsert_items(&self, items: Vec<ItemIn>) -> Result<Written, ClientError> {
        match self.call(Op::UpsertItems(items)).await? {
            OpReply::Written(w) => Ok(w),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn delete_item(&self, id: &str) -> Result<Written, ClientError> {
        match self.call(Op::DeleteItem { id: id.to_string() }).await? {
            OpReply::Written(w) => Ok(w),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn get_item(
        &self,
        id: &str,
        min_offset: Option<u64>,
    ) -> Result<ItemView, ClientError> {
        let op = Op::GetItem {
            id: id.to_string(),
            min_offset,
        };
        match self.call(op).await? {
            OpReply::Item(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn item_stats(
        &self,
        item: &str,
        min_offset: Option<u64>,
    ) -> Result<ItemStatsView, ClientError> {
        let op = Op::ItemStats {
            item: item.to_string(),
            min_offset,
        };
        match self.call(op).await? {
            OpReply::ItemStats(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn get_user(
        &self,
        user: &str,
        min_offset: Option<u64>,
    ) -> Result<UserRead, ClientError> {
        let op = Op::GetUser {
            user: user.to_string(),
            min_offset,
        };
        match self.call(op).await? {
            OpReply::User(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn erase_user(&self, user: &str) -> Result<Written, ClientError> {
        match self
            .call(Op::EraseUser {
                user: user.to_string(),
            })
            .await?
        {
            OpReply::Written(w) => Ok(w),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn retrain(&self) -> Result<RetrainReport, ClientError> {
        match self.call(Op::Retrain).await? {
            OpReply::Retrain(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// The cluster as the member asked sees it: members, partitions with their owners
    /// and epochs, the trainer leader, the model version.
    /// Records the consumers gave up on, one JSON document each (admin token; members
    /// of protocol 5 and later).
    pub async fn dead_letters(&self) -> Result<Vec<String>, ClientError> {
        match self.call(Op::DeadLetters).await? {
            OpReply::DeadLetters(d) => Ok(d),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        match self.call(Op::ClusterStatus).await? {
            OpReply::Cluster(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn rollback(&self) -> Result<RollbackReply, ClientError> {
        match self.call(Op::Rollback).await? {
            OpReply::Rollback(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(r: &OpReply) -> ClientError {
    ClientError::Failed(format!("unexpected answer: {r:?}"))
}

/// Dials every seed that has no session now; the reasons of the failures.
async fn dial_all(inner: &Inner) -> Vec<String> {
    let mut errors = Vec::new();
    for addr in &inner.cfg.seeds {
        let target = match tokio::net::lookup_host(addr.as_str()).await {
            Ok(mut a) => match a.next() {
                Some(t) => t,
                None => {
                    errors.push(format!("{addr} resolves to no address"));
                    continue;
                }
            },
            Err(e) => {
                errors.push(format!("resolving {addr}: {e}"));
                continue;
            }
        };
        let open = inner
            .sessions
            .lock()
            .map(|s| s.values().any(|a| *a == target.to_string()))
            .unwrap_or(false);
        if open {
            continue;
        }
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            ractor_cluster::client_connect(&inner.server, target),
        )
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!("{addr}: connecting timed out")),
        }
    }
    errors
}

/// One frame to `member`'s gateway under `timeout`.
async fn call_gateway(
    member: &str,
    env: &Envelope,
    timeout: Duration,
) -> Result<Response, RemoteError> {
    let gw = gateway_of(member).ok_or_else(|| RemoteError::Unreachable(member.to_string()))?;
    exchange_with(&gw, member, env, timeout).await
}

/// One request to the gateway `gw` of `peer` under `timeout`, in the newest protocol
/// version both speak ([`wire::exchange`]: a peer of the previous version is asked
/// again in it; the two attempts share `timeout`). Members call each other through it too.
pub async fn exchange_with(
    gw: &ActorRef<GatewayMsg>,
    peer: &str,
    env: &Envelope,
    timeout: Duration,
) -> Result<Response, RemoteError> {
    let started = Instant::now();
    wire::exchange(peer, env, |frame| {
        let gw = gw.clone();
        let left = timeout.saturating_sub(started.elapsed());
        async move {
            match gw
                .call(|port| GatewayMsg::Call(frame, port), Some(left))
                .await
            {
                Ok(ractor::rpc::CallResult::Success(bytes)) => Ok(bytes),
                Ok(ractor::rpc::CallResult::Timeout) => {
                    Err(RemoteError::Timeout(timeout.as_millis() as u64))
                }
                Ok(ractor::rpc::CallResult::SenderError) | Err(_) => {
                    Err(RemoteError::Unreachable(peer.to_string()))
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_errors_become_typed_client_errors() {
        let e = |kind, code: &str| ApiError {
            retry_after_s: Some(3),
            ..ApiError::new(kind, code, "why")
        };
        assert_eq!(
            ClientError::from(e(ErrorKind::Invalid, "too_many_events")),
            ClientError::Invalid {
                code: "too_many_events".into(),
                detail: "why".into()
            }
        );
        assert_eq!(
            ClientError::from(e(ErrorKind::Unauthorized, "unauthorized")),
            ClientError::Unauthorized("why".into())
        );
        assert_eq!(
            ClientError::from(e(ErrorKind::Overloaded, "overloaded")),
            ClientError::Overloaded {
                detail: "why".into(),
                retry_after: Duration::from_secs(3)
            }
        );
        assert_eq!(
            ClientError::from(e(ErrorKind::Unavailable, "unavailable")),
            ClientError::Unavailable {
                detail: "why".into(),
                retry_after: Duration::from_secs(3)
            }
        );
        assert_eq!(
            ClientError::from(e(ErrorKind::NotFound, "not_found")),
            ClientError::NotFound("why".into())
        );
        assert_eq!(
            ClientError::from(e(ErrorKind::Conflict, "conflict")),
            ClientError::Conflict("why".into())
        );
    }
}
