//! The cross-node frame. A frame is the sender's protocol version (`u16`, little endian)
//! followed by a bincode body: an [`Envelope`] for a request, a
//! `Result<Response, RemoteError>` for a reply.
//!
//! A node accepts request frames whose version lies in [`ACCEPTED`] and answers any other
//! with [`RemoteError::Version`] naming the version it got and the range it accepts, in a
//! frame of the version the caller spoke when it can (a caller of an older version can
//! still read why it was refused). A frame that is too short or does not decode is
//! answered with [`RemoteError::Decode`]: never dropped, never defaulted.
//!
//! Versions: 3 was the envelope without trace context (nodes of that protocol refuse
//! this build's frames and are refused by it, each with an explicit error); 4 adds
//! [`TraceContext`]. Golden bytes of every message of each accepted version live under
//! `tests/golden/` and must keep decoding.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::api::{
    ApiError, Op, OpReply, RecommendQuery, RecommendReply, RecommendRequest, RetrainReport,
    UserQuery, UserView,
};

/// The newest protocol version this build speaks. Version 5 added the client's
/// dead-letter read ([`crate::api::Op::DeadLetters`]) and [`RemoteError::TooNew`]; every
/// message of version 4 encodes to the same bytes in 5. Version 6 added the item-item
/// branch ([`crate::api::Branch::ItemItem`]): its report in an answer's branches and a
/// fourth blend weight. A reply in an older version leaves them out ([`downgrade`]), and
/// a request in an older version carries the first three weights only.
pub const PROTOCOL: u16 = 6;

/// The first version with the item-item branch.
const ITEM_ITEM_SINCE: u16 = 6;

/// The oldest version this build reads and writes.
pub const OLDEST: u16 = 4;

/// The versions this build can speak.
pub const ACCEPTED: RangeInclusive<u16> = OLDEST..=PROTOCOL;

/// The newest version this process speaks: [`PROTOCOL`] unless pinned lower by
/// [`speak_as`] (a node configured to speak as the previous build until every member is
/// upgraded, so nothing that needs the new version is used while one could be rolled
/// back).
static SPEAKS: AtomicU16 = AtomicU16::new(PROTOCOL);

/// The version last agreed with each peer (by node name): requests go out in it.
static PEERS: Mutex<BTreeMap<String, u16>> = Mutex::new(BTreeMap::new());

/// Pins the newest version this process speaks and accepts to `version`.
pub fn speak_as(version: u16) -> Result<(), String> {
    if !ACCEPTED.contains(&version) {
        return Err(format!(
            "protocol {version} cannot be spoken by this build (it speaks {OLDEST}..={PROTOCOL})"
        ));
    }
    SPEAKS.store(version, Ordering::Relaxed);
    Ok(())
}

/// The newest version this process speaks.
pub fn speaks() -> u16 {
    SPEAKS.load(Ordering::Relaxed)
}

/// The versions this process accepts now: [`OLDEST`] to [`speaks`].
pub fn accepted() -> RangeInclusive<u16> {
    OLDEST..=speaks()
}

/// The version requests to `peer` go out in: the one last agreed with it, or this
/// process's newest before the first exchange.
pub fn peer_version(peer: &str) -> u16 {
    PEERS
        .lock()
        .ok()
        .and_then(|m| m.get(peer).copied())
        .unwrap_or_else(speaks)
}

fn remember(peer: &str, version: u16) {
    if let Ok(mut m) = PEERS.lock() {
        m.insert(peer.to_string(), version);
    }
}

/// W3C trace context of the caller's span (`traceparent`, `tracestate` headers), so the
/// callee's spans join the caller's trace. Empty strings: not traced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: String,
}

impl TraceContext {
    pub fn is_empty(&self) -> bool {
        self.traceparent.is_empty()
    }
}

/// A request to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// An API operation from a client program, answered by the node asked as an HTTP
    /// request to it would be (same checks, admission and routing). `token`: the bearer
    /// token the operation's class needs, when the node has one configured.
    Api { token: Option<String>, op: Op },
}

impl Request {
    /// The first protocol version that has this request.
    pub fn since(&self) -> u16 {
        match self {
            Request::Api { op, .. } => op.since(),
            _ => OLDEST,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Request::Ping { .. } => "ping",
            Request::Recommend(_) => "recommend",
            Request::User { .. } => "user",
            Request::Retrain => "retrain",
            Request::Api { op, .. } => op.kind(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The caller's request id (logs; the requests are reads, so a repeat is harmless).
    pub id: String,
    /// Time the caller still waits, ms: work past it is wasted.
    pub budget_ms: u64,
    /// The caller's span, so the answer's spans join its trace.
    pub trace: TraceContext,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Pong { name: String },
    Recommend(RecommendReply),
    User { view: UserView, stale: bool },
    Retrain(RetrainReport),
    Api(Result<OpReply, ApiError>),
}

impl Response {
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Pong { .. } => "a pong",
            Response::Recommend(_) => "recommendations",
            Response::User { .. } => "a user",
            Response::Retrain(_) => "a retrain report",
            Response::Api(_) => "an API answer",
        }
    }
}

/// Why a remote call did not produce an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteError {
    #[error("the payload did not decode: {0}")]
    Decode(String),
    #[error("protocol version {got} is not accepted (this node speaks {}..={})", accepted.0, accepted.1)]
    Version { got: u16, accepted: (u16, u16) },
    #[error("partition {partition} is not served by {node} (lease not held or still replaying)")]
    NotOwner { partition: u32, node: String },
    #[error("{0}")]
    Failed(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("peer {0} is unreachable")]
    Unreachable(String),
    /// The request exists only from protocol `needs`; the peer speaks up to `peer`.
    #[error("this request needs protocol {needs}; the node asked speaks up to {peer} (upgrade it, or unpin its protocol, first)")]
    TooNew { needs: u16, peer: u16 },
}

impl RemoteError {
    /// The refusal of a frame of version `got`.
    pub fn version(got: u16) -> Self {
        RemoteError::Version {
            got,
            accepted: (OLDEST, speaks()),
        }
    }
}

/// `version` then `body`.
pub fn frame(version: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(2 + body.len());
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(body);
    f
}

/// The version and body of a frame (`None`: shorter than its header).
pub fn unframe(f: &[u8]) -> Option<(u16, &[u8])> {
    let (head, body) = f.split_at_checked(2)?;
    Some((u16::from_le_bytes([head[0], head[1]]), body))
}

/// A request frame in the newest version this process speaks.
pub fn request_frame(env: &Envelope) -> Result<Vec<u8>, String> {
    request_frame_in(env, speaks()).map_err(|e| e.to_string())
}

/// A request frame in protocol `version`; [`RemoteError::TooNew`] when the request does
/// not exist in it. (Versions differ only by added variants, so the body's bytes are the
/// same in every version that has the request.)
pub fn request_frame_in(env: &Envelope, version: u16) -> Result<Vec<u8>, RemoteError> {
    if env.request.since() > version {
        return Err(RemoteError::TooNew {
            needs: env.request.since(),
            peer: version,
        });
    }
    let body = if version < ITEM_ITEM_SINCE {
        // Older builds read three weights: the item-item branch's is left out.
        let mut env = env.clone();
        match &mut env.request {
            Request::Recommend(RecommendRequest {
                weights: Some(w), ..
            })
            | Request::Api {
                op:
                    Op::Recommend(RecommendQuery {
                        weights: Some(w), ..
                    }),
                ..
            } => w.truncate(crate::api::Branch::ItemItem.index()),
            _ => {}
        }
        crate::codec::encode(&env)
    } else {
        crate::codec::encode(env)
    }
    .map_err(RemoteError::Failed)?;
    Ok(frame(version, &body))
}

/// A received request frame, checked and decoded, with its version (the reply goes out
/// in it). `Err` carries the version to answer in (the caller's when this process
/// speaks it, else its own newest) and the error.
pub fn open_request(f: &[u8]) -> Result<(u16, Envelope), (u16, RemoteError)> {
    let (version, body) = unframe(f).ok_or_else(|| {
        (
            speaks(),
            RemoteError::Decode("frame shorter than its header".into()),
        )
    })?;
    if !accepted().contains(&version) {
        return Err((speaks(), RemoteError::version(version)));
    }
    let env: Envelope =
        crate::codec::decode(body).map_err(|e| (version, RemoteError::Decode(e)))?;
    if env.request.since() > version {
        // What a build of that version makes of it: a variant it does not know.
        return Err((
            version,
            RemoteError::Decode(format!(
                "a {} request does not exist in protocol {version}",
                env.request.kind()
            )),
        ));
    }
    Ok((version, env))
}

/// `reply` as a build of protocol `version` can read it: before version 6, without the
/// item-item branch's report, share and weights (a reader of those versions does not know
/// the branch).
pub fn downgrade(version: u16, reply: &mut RecommendReply) {
    if version >= ITEM_ITEM_SINCE {
        return;
    }
    let old = crate::api::Branch::ItemItem.index();
    reply
        .branches
        .retain(|b| b.name != crate::api::Branch::ItemItem);
    for i in &mut reply.items {
        i.shares.truncate(old);
    }
    if let Some(f) = &mut reply.fallback {
        f.requested.truncate(old);
        f.used.truncate(old);
    }
}

/// This node's reply frame for `r`, in protocol `version`.
pub fn reply_frame(version: u16, r: &Result<Response, RemoteError>) -> Vec<u8> {
    let older;
    let r = match r {
        Ok(Response::Recommend(rep)) if version < ITEM_ITEM_SINCE => {
            let mut rep = rep.clone();
            downgrade(version, &mut rep);
            older = Ok(Response::Recommend(rep));
            &older
        }
        Ok(Response::Api(Ok(OpReply::Recommend(rep)))) if version < ITEM_ITEM_SINCE => {
            let mut rep = rep.clone();
            downgrade(version, &mut rep);
            older = Ok(Response::Api(Ok(OpReply::Recommend(rep))));
            &older
        }
        _ => r,
    };
    let body = crate::codec::encode(r).unwrap_or_else(|e| {
        crate::codec::encode(&Err::<Response, _>(RemoteError::Failed(format!(
            "the reply did not encode: {e}"
        ))))
        .unwrap_or_default()
    });
    frame(version, &body)
}

/// A received reply frame: the answer, or why there is none. A reply of a version this
/// build does not read is [`RemoteError::Version`]; a reply that does not decode is
/// [`RemoteError::Decode`].
pub fn open_reply(f: &[u8]) -> Result<Response, RemoteError> {
    let (version, body) =
        unframe(f).ok_or_else(|| RemoteError::Decode("reply shorter than its header".into()))?;
    if !accepted().contains(&version) {
        // Another version's body cannot be read with this build's types: name the
        // versions instead.
        return Err(RemoteError::version(version));
    }
    crate::codec::decode::<Result<Response, RemoteError>>(body)
        .map_err(|e| RemoteError::Decode(format!("reply: {e}")))?
}

/// One request to `peer` through `send` (a request frame out, the reply frame back), in
/// the newest version both sides speak: the version last agreed with `peer` (pings, and
/// requests that version lacks, try this process's newest, so an upgraded peer is
/// noticed). A refusal that names an older range is answered by sending again in that
/// range's newest version, which is then remembered for `peer`; a request that does not
/// exist there is [`RemoteError::TooNew`], never sent in it.
pub async fn exchange<F, Fut>(
    peer: &str,
    env: &Envelope,
    mut send: F,
) -> Result<Response, RemoteError>
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>, RemoteError>>,
{
    let agreed = peer_version(peer).min(speaks());
    let mut version = match env.request {
        Request::Ping { .. } => speaks(),
        ref r if r.since() > agreed => speaks(),
        _ => agreed,
    };
    loop {
        let reply = open_reply(&send(request_frame_in(env, version)?).await?);
        match &reply {
            Err(RemoteError::Version {
                accepted: (lo, hi), ..
            }) if *hi < version && *hi >= OLDEST && lo <= hi => {
                version = *hi;
                remember(peer, version);
                continue;
            }
            Err(RemoteError::Version { .. }) => {}
            _ => remember(peer, version),
        }
        return reply;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope {
            id: "r1".into(),
            budget_ms: 50,
            trace: TraceContext::default(),
            request: Request::Recommend(RecommendRequest {
                user: "u1".into(),
                k: 5,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn older_versions_get_no_item_item_branch() {
        use crate::api::{Branch, BranchReport, Fallback, RecommendedItem};
        let reply = RecommendReply {
            items: vec![RecommendedItem {
                item: "i".into(),
                shares: vec![0.4, 0.1, 0.0, 0.5],
                ..Default::default()
            }],
            branches: Branch::ALL
                .iter()
                .map(|b| BranchReport {
                    name: *b,
                    ..Default::default()
                })
                .collect(),
            fallback: Some(Fallback {
                requested: vec![0.0, 0.0, 0.0, 1.0],
                used: vec![0.3, 0.2, 0.05, 0.45],
                reason: "r".into(),
            }),
            ..Default::default()
        };
        let current = Ok(Response::Recommend(reply.clone()));
        assert_eq!(open_reply(&reply_frame(PROTOCOL, &current)), current);
        let old = open_reply(&reply_frame(PROTOCOL - 1, &current)).unwrap();
        let Response::Recommend(old) = old else {
            panic!("{old:?}")
        };
        assert_eq!(old.branches.len(), 3);
        assert!(old.branches.iter().all(|b| b.name != Branch::ItemItem));
        assert_eq!(old.items[0].shares, vec![0.4, 0.1, 0.0]);
        let fb = old.fallback.unwrap();
        assert_eq!((fb.requested.len(), fb.used.len()), (3, 3));
        // A request in an older version carries three weights.
        let mut e = env();
        if let Request::Recommend(r) = &mut e.request {
            r.weights = Some(vec![0.3, 0.2, 0.05, 0.45]);
        }
        let (_, back) = open_request(&request_frame_in(&e, PROTOCOL - 1).unwrap()).unwrap();
        let Request::Recommend(r) = back.request else {
            panic!()
        };
        assert_eq!(r.weights, Some(vec![0.3, 0.2, 0.05]));
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_explicit_errors() {
        let good = request_frame(&env()).unwrap();
        assert_eq!(open_request(&good).unwrap(), (PROTOCOL, env()));
        assert!(matches!(
            open_request(&good[..1]),
            Err((_, RemoteError::Decode(_)))
        ));
        assert!(matches!(
            open_request(&good[..good.len() / 2]),
            Err((_, RemoteError::Decode(_)))
        ));
        assert!(matches!(
            open_request(&frame(PROTOCOL, &[0xff; 7])),
            Err((_, RemoteError::Decode(_)))
        ));
        let next = frame(PROTOCOL + 1, &good[2..]);
        assert_eq!(
            open_request(&next).unwrap_err(),
            (PROTOCOL, RemoteError::version(PROTOCOL + 1))
        );
        let old = frame(OLDEST - 1, &good[2..]);
        let (_, e) = open_request(&old).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("version {} is not accepted", OLDEST - 1)),
            "{e}"
        );
        // The previous version is read, and answered in.
        assert_eq!(
            open_request(&frame(OLDEST, &good[2..])).unwrap(),
            (OLDEST, env())
        );
        // Replies carry the answering node's version, then the result.
        let err = RemoteError::NotOwner {
            partition: 3,
            node: "b".into(),
        };
        assert_eq!(
            open_reply(&reply_frame(PROTOCOL, &Err(err.clone()))),
            Err(err)
        );
        let pong = Response::Pong { name: "a".into() };
        assert_eq!(
            open_reply(&reply_frame(PROTOCOL, &Ok(pong.clone()))),
            Ok(pong)
        );
        assert_eq!(
            open_reply(&reply_frame(
                PROTOCOL + 1,
                &Ok(Response::Pong { name: "a".into() })
            )),
            Err(RemoteError::version(PROTOCOL + 1))
        );
    }

    fn dead_letters() -> Envelope {
        Envelope {
            request: Request::Api {
                token: None,
                op: crate::api::Op::DeadLetters,
            },
            ..env()
        }
    }

    #[test]
    fn a_request_newer_than_the_version_is_never_sent_nor_read() {
        let e = dead_letters();
        assert_eq!(
            request_frame_in(&e, OLDEST),
            Err(RemoteError::TooNew {
                needs: 5,
                peer: OLDEST
            })
        );
        // Written as version 4 anyway (a confused peer): refused as a build of 4 would.
        let body = &request_frame_in(&e, PROTOCOL).unwrap()[2..];
        let (answer_in, err) = open_request(&frame(OLDEST, body)).unwrap_err();
        assert_eq!(answer_in, OLDEST);
        assert!(
            err.to_string().contains("does not exist in protocol 4"),
            "{err}"
        );
    }

    /// A caller of the newest version and a callee that speaks only the previous one:
    /// the refusal names the callee's range, the request goes again in it, and the
    /// version is remembered for that peer; a request the old version lacks is never sent
    /// in it.
    #[test]
    fn exchange_falls_back_to_the_peers_version_and_remembers_it() {
        // The callee: a build that accepts only OLDEST.
        let old_peer = |f: Vec<u8>| async move {
            let (v, body) = unframe(&f).unwrap();
            if v != OLDEST {
                let refusal = RemoteError::Version {
                    got: v,
                    accepted: (OLDEST, OLDEST),
                };
                return Ok(reply_frame(OLDEST, &Err(refusal)));
            }
            let env: Envelope = crate::codec::decode(body).unwrap();
            Ok(reply_frame(OLDEST, &Ok(Response::Pong { name: env.id })))
        };
        let sent = std::sync::Mutex::new(Vec::new());
        let send = |f: Vec<u8>| {
            sent.lock().unwrap().push(unframe(&f).unwrap().0);
            old_peer(f)
        };
        let r = block_on(exchange("old-peer", &env(), send));
        assert_eq!(r, Ok(Response::Pong { name: "r1".into() }));
        assert_eq!(*sent.lock().unwrap(), vec![PROTOCOL, OLDEST]);
        assert_eq!(peer_version("old-peer"), OLDEST);
        // Next time straight in the remembered version.
        sent.lock().unwrap().clear();
        let send = |f: Vec<u8>| {
            sent.lock().unwrap().push(unframe(&f).unwrap().0);
            old_peer(f)
        };
        block_on(exchange("old-peer", &env(), send)).unwrap();
        assert_eq!(*sent.lock().unwrap(), vec![OLDEST]);
        // A request that needs the new version is tried in it (the peer may have been
        // upgraded since), and is never sent in the old one.
        let r = block_on(exchange("old-peer", &dead_letters(), |f| {
            sent.lock().unwrap().push(unframe(&f).unwrap().0);
            old_peer(f)
        }));
        assert_eq!(
            r,
            Err(RemoteError::TooNew {
                needs: 5,
                peer: OLDEST
            })
        );
        assert_eq!(*sent.lock().unwrap(), vec![OLDEST, PROTOCOL]);
    }

    /// Polls a future that never waits to completion (the test peers answer at once).
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        use std::task::{Context, Poll, Waker};
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }
}
