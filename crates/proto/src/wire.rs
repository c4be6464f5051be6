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

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::api::{
    ApiError, Op, OpReply, RecommendReply, RecommendRequest, RetrainReport, UserQuery, UserView,
};

/// The protocol version this build speaks.
pub const PROTOCOL: u16 = 4;

/// The request versions this build answers.
pub const ACCEPTED: RangeInclusive<u16> = 4..=4;

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
}

impl RemoteError {
    /// The refusal of a frame of version `got`.
    pub fn version(got: u16) -> Self {
        RemoteError::Version {
            got,
            accepted: (*ACCEPTED.start(), *ACCEPTED.end()),
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

/// A request frame of this build's version.
pub fn request_frame(env: &Envelope) -> Result<Vec<u8>, String> {
    Ok(frame(PROTOCOL, &crate::codec::encode(env)?))
}

/// A received request frame, checked and decoded. `Err` carries the version to answer
/// in (the caller's when it is one this build can still write, else this build's) and
/// the error.
pub fn open_request(f: &[u8]) -> Result<Envelope, (u16, RemoteError)> {
    let (version, body) = unframe(f).ok_or_else(|| {
        (
            PROTOCOL,
            RemoteError::Decode("frame shorter than its header".into()),
        )
    })?;
    if !ACCEPTED.contains(&version) {
        return Err((PROTOCOL, RemoteError::version(version)));
    }
    crate::codec::decode(body).map_err(|e| (version, RemoteError::Decode(e)))
}

/// This node's reply frame for `r`, in protocol `version`.
pub fn reply_frame(version: u16, r: &Result<Response, RemoteError>) -> Vec<u8> {
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
    if !ACCEPTED.contains(&version) {
        // Another version's body cannot be read with this build's types: name the
        // versions instead.
        return Err(RemoteError::version(version));
    }
    crate::codec::decode::<Result<Response, RemoteError>>(body)
        .map_err(|e| RemoteError::Decode(format!("reply: {e}")))?
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
    fn frames_round_trip_and_bad_ones_are_explicit_errors() {
        let good = request_frame(&env()).unwrap();
        assert_eq!(open_request(&good).unwrap(), env());
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
        let old = frame(3, &good[2..]);
        let (_, e) = open_request(&old).unwrap_err();
        assert!(e.to_string().contains("version 3 is not accepted"), "{e}");
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
}
