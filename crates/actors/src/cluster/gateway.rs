//! The one actor peers call, with one message: `Call(frame, reply)`. A frame is the
//! cluster protocol version (`u16`, little endian) followed by a bincode [`Envelope`];
//! the reply is the answering node's version followed by a bincode
//! `Result<Response, RemoteError>`. Liveness pings are calls too (`Request::Ping`).
//!
//! ractor_cluster drops a remote message it cannot decode without telling anyone, and
//! decodes by variant name. With one variant whose name never changes and an opaque
//! byte payload, every frame that reaches this node reaches this code: a frame that is
//! too short, of another version, or does not decode is answered with an explicit
//! [`RemoteError`], never dropped or defaulted. A reply of another version is reported
//! as [`RemoteError::Version`] without decoding its body. Remote requests are
//! idempotent reads (a call that timed out at the caller may still run here).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorClusterMessage;
use serde::{Deserialize, Serialize};

use crate::ctx::Ctx;
use crate::features::{UserQuery, UserView};
use crate::ranker::{RecommendReply, RecommendRequest};
use crate::Discard;

use super::CLUSTER_PROTOCOL;

/// The process group every node's gateway joins: `troupe.gateway.<member name>`.
pub fn group(member: &str) -> String {
    format!("troupe.gateway.{member}")
}

/// The remote message. Its variant name is the wire tag: never rename it, never add a
/// variant (a peer without it would drop the frame silently); extend [`Request`] and
/// raise [`CLUSTER_PROTOCOL`] instead.
#[derive(RactorClusterMessage)]
pub enum GatewayMsg {
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// A request to a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Liveness: answered at once by the gateway itself.
    Ping { from: String },
    /// For the owner of the user's partition.
    Recommend(RecommendRequest),
    /// A user's features, after the partition has applied `min_offset` (or flagged stale).
    User {
        query: UserQuery,
        min_offset: Option<u64>,
    },
    /// For the trainer leader: retrain now (answered with the validation report).
    Retrain,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// The caller's request id (logs; the requests are reads, so a repeat is harmless).
    pub id: String,
    /// Time the caller still waits, ms: work past it is wasted.
    pub budget_ms: u64,
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Pong { name: String },
    Recommend(RecommendReply),
    User { view: UserView, stale: bool },
    Retrain(crate::trainer::RetrainReport),
}

/// Why a remote call did not produce an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteError {
    #[error("the payload did not decode: {0}")]
    Decode(String),
    #[error("protocol version {0} is not this node's ({CLUSTER_PROTOCOL})")]
    Version(u16),
    #[error("partition {partition} is not served by {node} (lease not held or still replaying)")]
    NotOwner { partition: u32, node: String },
    #[error("{0}")]
    Failed(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("peer {0} is unreachable")]
    Unreachable(String),
}

/// `version` then `body`.
fn frame(version: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(2 + body.len());
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(body);
    f
}

/// The version and body of a frame (`None`: shorter than its header).
fn unframe(f: &[u8]) -> Option<(u16, &[u8])> {
    let (head, body) = f.split_at_checked(2)?;
    Some((u16::from_le_bytes([head[0], head[1]]), body))
}

/// This node's reply frame for `r`.
fn reply_frame(r: &Result<Response, RemoteError>) -> Vec<u8> {
    let body = crate::codec::encode(r).unwrap_or_else(|e| {
        crate::codec::encode(&Err::<Response, _>(RemoteError::Failed(format!(
            "the reply did not encode: {e}"
        ))))
        .unwrap_or_default()
    });
    frame(CLUSTER_PROTOCOL, &body)
}

/// A received request frame, checked and decoded.
fn open(f: &[u8]) -> Result<Envelope, RemoteError> {
    let (version, body) =
        unframe(f).ok_or_else(|| RemoteError::Decode("frame shorter than its header".into()))?;
    if version != CLUSTER_PROTOCOL {
        return Err(RemoteError::Version(version));
    }
    crate::codec::decode(body).map_err(RemoteError::Decode)
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
        match open(&bytes) {
            Ok(Envelope {
                request: Request::Ping { .. },
                ..
            }) => {
                port.send(reply_frame(&Ok(pong(ctx)))).discard();
            }
            Ok(env) => {
                // Answered on its own task: a slow request never delays liveness calls.
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    port.send(reply_frame(&answer(&ctx, env).await)).discard();
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, bytes = bytes.len(), "a cluster frame refused");
                port.send(reply_frame(&Err(e))).discard();
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
    let p = match &env.request {
        Request::Recommend(r) => crate::record::partition_of(&r.user, ctx.settings.partitions),
        Request::User { query, .. } => {
            crate::record::partition_of(&query.user, ctx.settings.partitions)
        }
        Request::Ping { .. } => return Ok(pong(ctx)),
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
            let report = crate::node::call(crate::names::ALS_TRAINER, budget, |port| {
                crate::trainer::AlsTrainerMsg::Retrain(port)
            })
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
    match env.request {
        Request::Recommend(req) => {
            let reply = crate::node::call(crate::names::RANKER, budget, |port| {
                crate::ranker::RankerMsg::Recommend(req, port)
            })
            .await
            .map_err(|e| RemoteError::Failed(e.to_string()))?;
            Ok(Response::Recommend(reply))
        }
        Request::Ping { .. } | Request::Retrain => Ok(pong(ctx)),
        Request::User { query, min_offset } => {
            let target = min_offset.unwrap_or_else(|| ctx.head(p));
            let fresh = ctx
                .wait_applied(p, target, ctx.settings.ranker.freshness_wait.min(budget))
                .await;
            let view = crate::node::call(&crate::names::user_features(p), budget, |port| {
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

/// The gateway of `peer`, if a session to it is up.
fn gateway_of(peer: &str) -> Option<ActorRef<GatewayMsg>> {
    ractor::pg::get_members(&group(peer))
        .into_iter()
        .next()
        .map(ActorRef::from)
}

/// A timed call to `peer`'s gateway. A reply of another protocol version is
/// [`RemoteError::Version`]; one that does not decode is an error, as is a timeout.
async fn rpc(peer: &str, env: &Envelope, timeout: Duration) -> Result<Response, RemoteError> {
    let body = crate::codec::encode(env).map_err(RemoteError::Failed)?;
    let request = frame(CLUSTER_PROTOCOL, &body);
    let gw = gateway_of(peer).ok_or_else(|| RemoteError::Unreachable(peer.to_string()))?;
    let bytes = match gw
        .call(|port| GatewayMsg::Call(request, port), Some(timeout))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(b)) => b,
        Ok(ractor::rpc::CallResult::Timeout) => {
            return Err(RemoteError::Timeout(timeout.as_millis() as u64))
        }
        Ok(ractor::rpc::CallResult::SenderError) | Err(_) => {
            return Err(RemoteError::Unreachable(peer.to_string()))
        }
    };
    let (version, body) = unframe(&bytes)
        .ok_or_else(|| RemoteError::Decode(format!("reply of {peer} shorter than its header")))?;
    if version != CLUSTER_PROTOCOL {
        return Err(RemoteError::Version(version));
    }
    crate::codec::decode::<Result<Response, RemoteError>>(body)
        .map_err(|e| RemoteError::Decode(format!("reply of {peer}: {e}")))?
}

/// A liveness call to `peer`: its name as it answers.
pub async fn ping(from: &str, peer: &str, timeout: Duration) -> Result<String, RemoteError> {
    let env = Envelope {
        id: String::new(),
        budget_ms: timeout.as_millis() as u64,
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

/// A request to `peer`, the owner of the request's partition, under `timeout`.
pub async fn call(
    peer: &str,
    id: &str,
    request: Request,
    timeout: Duration,
) -> Result<Response, RemoteError> {
    let env = Envelope {
        id: id.to_string(),
        budget_ms: timeout.as_millis() as u64,
        request,
    };
    rpc(peer, &env, timeout).await
}

impl Response {
    fn kind(&self) -> &'static str {
        match self {
            Response::Pong { .. } => "a pong",
            Response::Recommend(_) => "recommendations",
            Response::User { .. } => "a user",
            Response::Retrain(_) => "a retrain report",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_frame(version: u16, env: &Envelope) -> Vec<u8> {
        frame(version, &crate::codec::encode(env).unwrap())
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_explicit_errors() {
        let env = Envelope {
            id: "r1".into(),
            budget_ms: 50,
            request: Request::Recommend(RecommendRequest {
                user: "u1".into(),
                k: 5,
                ..Default::default()
            }),
        };
        let good = request_frame(CLUSTER_PROTOCOL, &env);
        let back = open(&good).unwrap();
        assert!(matches!(back.request, Request::Recommend(r) if r.user == "u1" && r.k == 5));
        assert!(matches!(open(&good[..1]), Err(RemoteError::Decode(_))));
        assert!(matches!(
            open(&good[..good.len() / 2]),
            Err(RemoteError::Decode(_))
        ));
        assert!(matches!(
            open(&frame(CLUSTER_PROTOCOL, &[0xff; 7])),
            Err(RemoteError::Decode(_))
        ));
        assert_eq!(
            open(&request_frame(CLUSTER_PROTOCOL + 1, &env)).unwrap_err(),
            RemoteError::Version(CLUSTER_PROTOCOL + 1)
        );
        // Replies carry the answering node's version, then the result.
        let err = RemoteError::NotOwner {
            partition: 3,
            node: "b".into(),
        };
        let reply = reply_frame(&Err(err.clone()));
        let (v, body) = unframe(&reply).unwrap();
        assert_eq!(v, CLUSTER_PROTOCOL);
        let back: Result<Response, RemoteError> = crate::codec::decode(body).unwrap();
        assert_eq!(back.unwrap_err(), err);
    }
}
