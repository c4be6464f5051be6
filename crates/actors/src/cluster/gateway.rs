//! The actor peers call: `Ping` (liveness and protocol version) and `Call` (a request for
//! a partition this node owns). Both carry bincode payloads with the protocol version;
//! a payload that does not decode, or of another version, is answered with an explicit
//! [`RemoteError`], never dropped or defaulted. Remote requests are idempotent reads (a
//! call that timed out at the caller may still run here).

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

/// Remote messages. Variant names are wire tags: never rename one.
#[derive(RactorClusterMessage)]
pub enum GatewayMsg {
    #[rpc]
    Ping(Vec<u8>, RpcReplyPort<Vec<u8>>),
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ping {
    pub protocol: u16,
    pub from: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pong {
    pub protocol: u16,
    pub name: String,
}

/// A request for a partition's owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Recommend(RecommendRequest),
    /// A user's features, after the partition has applied `min_offset` (or flagged stale).
    User {
        query: UserQuery,
        min_offset: Option<u64>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub protocol: u16,
    /// The caller's request id (logs; the requests are reads, so a repeat is harmless).
    pub id: String,
    /// Time the caller still waits, ms: work past it is wasted.
    pub budget_ms: u64,
    pub request: Request,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Recommend(RecommendReply),
    User { view: UserView, stale: bool },
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
        match msg {
            GatewayMsg::Ping(bytes, port) => {
                let r: Result<Pong, RemoteError> = match crate::codec::decode::<Ping>(&bytes) {
                    Err(e) => Err(RemoteError::Decode(e)),
                    Ok(p) if p.protocol != CLUSTER_PROTOCOL => {
                        Err(RemoteError::Version(p.protocol))
                    }
                    Ok(_) => Ok(Pong {
                        protocol: CLUSTER_PROTOCOL,
                        name: ctx.settings.node_name.clone(),
                    }),
                };
                port.send(crate::codec::encode(&r).unwrap_or_default())
                    .discard();
            }
            GatewayMsg::Call(bytes, port) => {
                // Answered on its own task: a slow request never delays liveness calls.
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let r = answer(&ctx, &bytes).await;
                    port.send(crate::codec::encode(&r).unwrap_or_default())
                        .discard();
                });
            }
        }
        Ok(())
    }
}

async fn answer(ctx: &Arc<Ctx>, bytes: &[u8]) -> Result<Response, RemoteError> {
    let env: Envelope = crate::codec::decode(bytes).map_err(RemoteError::Decode)?;
    if env.protocol != CLUSTER_PROTOCOL {
        return Err(RemoteError::Version(env.protocol));
    }
    let budget = Duration::from_millis(env.budget_ms.max(1));
    let p = match &env.request {
        Request::Recommend(r) => crate::record::partition_of(&r.user, ctx.settings.partitions),
        Request::User { query, .. } => {
            crate::record::partition_of(&query.user, ctx.settings.partitions)
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

/// A timed RPC to `peer`'s gateway; the reply decoded (a reply that does not decode is
/// an error, as is a timeout).
async fn rpc<T: serde::de::DeserializeOwned>(
    peer: &str,
    timeout: Duration,
    build: impl FnOnce(RpcReplyPort<Vec<u8>>) -> GatewayMsg,
) -> Result<T, RemoteError> {
    let gw = gateway_of(peer).ok_or_else(|| RemoteError::Unreachable(peer.to_string()))?;
    let bytes = match gw.call(build, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(b)) => b,
        Ok(ractor::rpc::CallResult::Timeout) => {
            return Err(RemoteError::Timeout(timeout.as_millis() as u64))
        }
        Ok(ractor::rpc::CallResult::SenderError) | Err(_) => {
            return Err(RemoteError::Unreachable(peer.to_string()))
        }
    };
    let r: Result<T, RemoteError> = crate::codec::decode(&bytes)
        .map_err(|e| RemoteError::Decode(format!("reply of {peer}: {e}")))?;
    r
}

/// A liveness call to `peer`.
pub async fn ping(from: &str, peer: &str, timeout: Duration) -> Result<Pong, RemoteError> {
    let ping = Ping {
        protocol: CLUSTER_PROTOCOL,
        from: from.to_string(),
    };
    let bytes = crate::codec::encode(&ping).map_err(RemoteError::Failed)?;
    let pong: Pong = rpc(peer, timeout, |port| GatewayMsg::Ping(bytes, port)).await?;
    if pong.protocol != CLUSTER_PROTOCOL {
        return Err(RemoteError::Version(pong.protocol));
    }
    Ok(pong)
}

/// A request to `peer`, the owner of the request's partition, under `timeout`.
pub async fn call(
    peer: &str,
    id: &str,
    request: Request,
    timeout: Duration,
) -> Result<Response, RemoteError> {
    let env = Envelope {
        protocol: CLUSTER_PROTOCOL,
        id: id.to_string(),
        budget_ms: timeout.as_millis() as u64,
        request,
    };
    let bytes = crate::codec::encode(&env).map_err(RemoteError::Failed)?;
    rpc(peer, timeout, |port| GatewayMsg::Call(bytes, port)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_garbage_is_an_error() {
        let env = Envelope {
            protocol: CLUSTER_PROTOCOL,
            id: "r1".into(),
            budget_ms: 50,
            request: Request::Recommend(RecommendRequest {
                user: "u1".into(),
                k: 5,
                ..Default::default()
            }),
        };
        let bytes = crate::codec::encode(&env).unwrap();
        let back: Envelope = crate::codec::decode(&bytes).unwrap();
        assert!(matches!(back.request, Request::Recommend(r) if r.user == "u1" && r.k == 5));
        assert!(crate::codec::decode::<Envelope>(&bytes[..bytes.len() / 2]).is_err());
        assert!(crate::codec::decode::<Envelope>(&[0xff; 7]).is_err());
        let err = RemoteError::NotOwner {
            partition: 3,
            node: "b".into(),
        };
        let b = crate::codec::encode(&Err::<Response, _>(err.clone())).unwrap();
        let back: Result<Response, RemoteError> = crate::codec::decode(&b).unwrap();
        assert_eq!(back.unwrap_err(), err);
    }
}
