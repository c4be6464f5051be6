//! The one actor peers call, with one message: `Call(frame, reply)`. Frames are
//! [`troupe_proto::wire`]'s: a protocol version (`u16`, little endian) followed by a
//! bincode envelope; the reply is the answering node's version followed by a bincode
//! `Result<Response, RemoteError>`. Liveness pings are calls too (`Request::Ping`).
//!
//! ractor_cluster drops a remote message it cannot decode without telling anyone, and
//! decodes by variant name. With one variant whose name never changes and an opaque
//! byte payload, every frame that reaches this node reaches this code: a frame that is
//! too short, of a version outside [`ACCEPTED`], or does not decode is answered with an
//! explicit [`RemoteError`], never dropped or defaulted. A reply of another version is
//! reported as [`RemoteError::Version`] without decoding its body. Remote requests are
//! idempotent reads (a call that timed out at the caller may still run here).
//!
//! Every call carries the caller's trace context; the answer runs in a `gateway` span
//! that is its child, so a forwarded request is one trace across both processes.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;
use troupe_proto::wire::{open_request, reply_frame, Envelope, Request, Response};

use crate::ctx::Ctx;
use crate::Discard;

pub use troupe_proto::wire::RemoteError;

/// The remote message, defined once for members and client programs: its variant name
/// is the wire tag (never renamed, never joined by another); extend [`Request`] and raise
/// [`PROTOCOL`] instead.
pub use troupe_client::GatewayMsg;

/// The process group every node's gateway joins: `troupe.gateway.<member name>`.
pub fn group(member: &str) -> String {
    format!("{}{member}", troupe_client::GATEWAY_GROUP_PREFIX)
}

/// The ractor_cluster node ids of each member's authenticated sessions. A gateway is
/// looked up among the actors of its member's own sessions only: any connected node
/// (a client program too) could join a process group named after a member.
static MEMBER_NODES: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());

/// Records that `member`'s session has node id `node` (membership, on authentication).
pub fn member_session_opened(member: &str, node: u64) {
    if let Ok(mut m) = MEMBER_NODES.lock() {
        m.push((member.to_string(), node));
    }
}

/// Forgets every session (a new node server starts).
pub fn forget_sessions() {
    if let Ok(mut m) = MEMBER_NODES.lock() {
        m.clear();
    }
}

/// Forgets a closed session's node id.
pub fn session_closed(node: u64) {
    if let Ok(mut m) = MEMBER_NODES.lock() {
        m.retain(|(_, n)| *n != node);
    }
}

pub struct Gateway;

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = Arc<Ctx>;
    type Arguments = Arc<Ctx>;

    async fn pre_start(
        &self,
        myself: ActorRef<GatewayMsg>,
        ctx: Arc<Ctx>,
    ) -> Result<Arc<Ctx>, ActorProcessingErr> {
        ractor::pg::join(group(&ctx.settings.node_name), vec![myself.get_cell()]);
        Ok(ctx)
    }

    async fn handle(
        &self,
        _myself: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        ctx: &mut Arc<Ctx>,
    ) -> Result<(), ActorProcessingErr> {
        let GatewayMsg::Call(bytes, port) = msg;
        crate::faults::fire(&ctx.faults, "gateway").await?;
        match open_request(&bytes) {
            Ok((
                version,
                Envelope {
                    request: Request::Ping { .. },
                    ..
                },
            )) => {
                port.send(reply_frame(version, &Ok(pong(ctx)))).discard();
            }
            Ok((version, env)) => {
                // Answered on its own task: a slow request never delays liveness calls.
                let ctx = ctx.clone();
                let span = tracing::info_span!(
                    "gateway",
                    request = env.request.kind(),
                    id = %env.id,
                    node = %ctx.settings.node_name,
                    trace_id = tracing::field::Empty,
                    span_id = tracing::field::Empty,
                );
                crate::trace::adopt(&span, &env.trace);
                crate::trace::record_ids(&span);
                tokio::spawn(
                    async move {
                        port.send(reply_frame(version, &answer(&ctx, env).await))
                            .discard();
                    }
                    .instrument(span),
                );
            }
            Err((version, e)) => {
                tracing::warn!(error = %e, bytes = bytes.len(), "a cluster frame refused");
                port.send(reply_frame(version, &Err(e))).discard();
            }
        }
        Ok(())
    }
}

/// This node's answer to a liveness call.
fn pong(ctx: &Ctx) -> Response {
    Response::Pong {
        name: ctx.settings.node_name.clone(),
    }
}

async fn answer(ctx: &Arc<Ctx>, env: Envelope) -> Result<Response, RemoteError> {
    let budget = Duration::from_millis(env.budget_ms.max(1));
    let request = match env.request {
        // A client program's operation: answered here as an HTTP request to this node
        // would be (the request layer routes it to the owner when needed).
        Request::Api { token, op } => {
            let api = ctx.api.get().and_then(std::sync::Weak::upgrade);
            let reply = match api {
                Some(api) => api.call(token.as_deref(), op).await,
                None => Err(troupe_proto::api::ApiError::unavailable(
                    "the node is starting: its request layer is not up yet",
                )),
            };
            return Ok(Response::Api(reply));
        }
        other => other,
    };
    let p = match &request {
        Request::Recommend(r) => crate::record::partition_of(&r.user, ctx.settings.partitions),
        Request::User { query, .. } => {
            crate::record::partition_of(&query.user, ctx.settings.partitions)
        }
        Request::Ping { .. } => return Ok(pong(ctx)),
        Request::Api { .. } => return Err(RemoteError::Failed("answered above".into())),
        Request::Retrain => {
            // Only the leader trains: a node that is not leading says so (the caller
            // asked a node it believed to lead).
            let leads = ctx
                .cluster
                .as_ref()
                .is_some_and(|c| c.trainer_epoch().is_some());
            if !leads {
                return Err(RemoteError::Failed(format!(
                    "{} does not lead the training",
                    ctx.settings.node_name
                )));
            }
            let report = crate::handles::als_trainer()
                .call(budget, crate::trainer::AlsTrainerMsg::Retrain)
                .await
                .map_err(|e| RemoteError::Failed(e.to_string()))?;
            return Ok(Response::Retrain(report));
        }
    };
    if !ctx.serving(p) {
        return Err(RemoteError::NotOwner {
            partition: p,
            node: ctx.settings.node_name.clone(),
        });
    }
    match request {
        Request::Recommend(req) => {
            let reply = crate::handles::ranker()
                .call(budget, |port| {
                    crate::ranker::RankerMsg::Recommend(req, port)
                })
                .await
                .map_err(|e| RemoteError::Failed(e.to_string()))?;
            Ok(Response::Recommend(reply))
        }
        Request::Ping { .. } | Request::Retrain | Request::Api { .. } => Ok(pong(ctx)),
        Request::User { query, min_offset } => {
            let target = min_offset.unwrap_or_else(|| ctx.head(p));
            let fresh = ctx
                .wait_applied(p, target, ctx.settings.ranker.freshness_wait.min(budget))
                .await;
            let view = crate::handles::user_features(p)
                .call(budget, |port| {
                    crate::features::UserFeaturesMsg::GetUser(query, port)
                })
                .await
                .map_err(|e| RemoteError::Failed(e.to_string()))?;
            Ok(Response::User {
                view,
                stale: !fresh || !ctx.log.writable(),
            })
        }
    }
}

/// The gateway of `peer`, if a session to it is up: an actor of the group named after
/// `peer` that runs on one of `peer`'s own sessions.
fn gateway_of(peer: &str) -> Option<ActorRef<GatewayMsg>> {
    let nodes: Vec<u64> = MEMBER_NODES
        .lock()
        .map(|m| {
            m.iter()
                .filter(|(p, _)| p == peer)
                .map(|(_, n)| *n)
                .collect()
        })
        .unwrap_or_default();
    ractor::pg::get_members(&group(peer))
        .into_iter()
        .find(|c| nodes.contains(&c.get_id().node()))
        .map(ActorRef::from)
}

/// A timed call to `peer`'s gateway, in the newest version both speak. A refusal of every version is
/// [`RemoteError::Version`]; one that does not decode is an error, as is a timeout.
async fn rpc(peer: &str, env: &Envelope, timeout: Duration) -> Result<Response, RemoteError> {
    let gw = gateway_of(peer).ok_or_else(|| RemoteError::Unreachable(peer.to_string()))?;
    troupe_client::exchange_with(&gw, peer, env, timeout)
        .await
        .map_err(|e| match e {
            RemoteError::Decode(why) => RemoteError::Decode(format!("{peer}: {why}")),
            other => other,
        })
}

/// A liveness call to `peer`: its name as it answers.
pub async fn ping(from: &str, peer: &str, timeout: Duration) -> Result<String, RemoteError> {
    let env = Envelope {
        id: String::new(),
        budget_ms: timeout.as_millis() as u64,
        trace: Default::default(),
        request: Request::Ping {
            from: from.to_string(),
        },
    };
    match rpc(peer, &env, timeout).await? {
        Response::Pong { name } if name == peer => Ok(name),
        Response::Pong { name } => Err(RemoteError::Failed(format!(
            "the gateway reached as {peer} answers as {name}"
        ))),
        other => Err(RemoteError::Decode(format!(
            "{peer} answered a ping with {}",
            other.kind()
        ))),
    }
}

/// A request to `peer` (the owner of the request's partition, or the trainer leader)
/// under `timeout`, in a `call` span whose context travels with the request.
pub async fn call(
    peer: &str,
    id: &str,
    request: Request,
    timeout: Duration,
) -> Result<Response, RemoteError> {
    let span = tracing::info_span!("call", peer, request = request.kind());
    let env = Envelope {
        id: id.to_string(),
        budget_ms: timeout.as_millis() as u64,
        trace: crate::trace::context_of(&span),
        request,
    };
    rpc(peer, &env, timeout).instrument(span).await
}

/// The versions this node answers, for status pages and refusals.
pub fn accepted_versions() -> (u16, u16) {
    let a = troupe_proto::wire::accepted();
    (*a.start(), *a.end())
}
