//! Request and reply types of the operations a caller (another node, a client program)
//! may ask a node for. Names of branches, their statuses and routes are enums; serde
//! renders them as the lower-case strings the HTTP API documents.

use serde::{Deserialize, Serialize};

/// A scoring branch of the ranker, in blend order (shares and weights are indexed by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Branch {
    #[default]
    Als,
    Content,
    Popularity,
    /// The item-item model (EASE): the user's items times one item-item matrix.
    ItemItem,
}

impl Branch {
    /// Every branch, in blend order.
    pub const ALL: [Branch; 4] = [
        Branch::Als,
        Branch::Content,
        Branch::Popularity,
        Branch::ItemItem,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Branch::Als => "als",
            Branch::Content => "content",
            Branch::Popularity => "popularity",
            Branch::ItemItem => "item_item",
        }
    }

    /// Position in the blend (weights, shares).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What became of one branch in one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchStatus {
    /// Answered with candidates.
    #[default]
    Ok,
    /// Answered with none (no model yet, nothing known about the user).
    Empty,
    /// Returned an error.
    Failed,
    /// Did not answer within its deadline.
    Timeout,
    /// Its circuit breaker is open: not asked.
    Open,
    /// Not available on this node for this request (no model loaded, the user's
    /// features not reachable).
    Unavailable,
}

impl BranchStatus {
    pub const ALL: [BranchStatus; 6] = [
        BranchStatus::Ok,
        BranchStatus::Empty,
        BranchStatus::Failed,
        BranchStatus::Timeout,
        BranchStatus::Open,
        BranchStatus::Unavailable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BranchStatus::Ok => "ok",
            BranchStatus::Empty => "empty",
            BranchStatus::Failed => "failed",
            BranchStatus::Timeout => "timeout",
            BranchStatus::Open => "open",
            BranchStatus::Unavailable => "unavailable",
        }
    }

    /// A status that makes the answer `degraded` (the branch should have answered).
    pub fn is_fault(self) -> bool {
        matches!(
            self,
            BranchStatus::Failed | BranchStatus::Timeout | BranchStatus::Open
        )
    }
}

/// How a request reached the node that answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// The node asked serves the user's partition.
    #[default]
    Local,
    /// Answered by the partition's owner, one hop away.
    Forwarded,
    /// Answered by the node asked without the user's features: the owner did not answer.
    OwnerUnreachable,
    /// Answered by the node asked without the user's features: the partition is moving.
    NoOwner,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Forwarded => "forwarded",
            Route::OwnerUnreachable => "owner_unreachable",
            Route::NoOwner => "no_owner",
        }
    }
}

/// Top-k for a user.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecommendRequest {
    pub user: String,
    pub k: u32,
    pub category: Option<String>,
    pub exclude: Vec<String>,
    /// Per-request blend weights, one per [`Branch`] in blend order.
    pub weights: Option<Vec<f32>>,
    pub request_id: String,
    /// Clock for decays (ms); 0 = the node's clock.
    pub now_ms: i64,
    /// Read-your-writes: the answer reflects the user's partition up to this offset (the
    /// offset a write of this user was acked with), or is flagged `stale`. `None`: up to
    /// the partition's head when the request arrived.
    pub min_offset: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecommendedItem {
    pub item: String,
    pub score: f32,
    /// Share of the score from each [`Branch`], in blend order.
    pub shares: Vec<f32>,
    /// Category filter aside: categories of the item (for explanations).
    pub categories: Vec<String>,
}

impl RecommendedItem {
    /// The share of `b` in this item's score.
    pub fn share(&self, b: Branch) -> f32 {
        self.shares.get(b.index()).copied().unwrap_or(0.0)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BranchReport {
    pub name: Branch,
    pub status: BranchStatus,
    pub candidates: u32,
    pub micros: u64,
}

/// What an answer fell back to (see [`RecommendReply::fallback`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Fallback {
    /// The weights the request (or config) asked for.
    pub requested: Vec<f32>,
    /// The weights the answer used.
    pub used: Vec<f32>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecommendReply {
    pub request_id: String,
    pub user: String,
    pub items: Vec<RecommendedItem>,
    pub als_model_version: u64,
    pub content_encoder: String,
    pub applied_offset: u64,
    /// Partition offset the answer waited for (`min_offset`, or the head at arrival).
    pub awaited_offset: u64,
    pub degraded: bool,
    pub stale: bool,
    pub cold_start: bool,
    /// ALS and content candidates came from the per-user cache.
    pub cached: bool,
    pub branches: Vec<BranchReport>,
    /// Set when every branch the weights select had no candidate for this user: the
    /// answer then blends with the configured weights instead (shares show it), and this
    /// says so. `None` for a normal answer.
    pub fallback: Option<Fallback>,
    pub error: Option<String>,
    /// The node that computed the answer.
    pub served_by: String,
    pub route: Route,
}

/// Items like an item.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimilarRequest {
    pub item: String,
    pub k: u32,
}

/// Where similar items came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimilarSource {
    Content,
    Als,
    /// The item is unknown to both.
    #[default]
    None,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimilarReply {
    pub item: String,
    pub source: SimilarSource,
    pub items: Vec<(String, f32)>,
}

/// One touch as a view shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Touch {
    pub item: String,
    pub kind: String,
    pub weight: f32,
    pub ts_ms: i64,
}

/// A user to read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserQuery {
    pub user: String,
    /// When non-zero and equal to the user's `last_offset`, the answer carries only the
    /// positions (`unchanged: true`): the caller's copy is current.
    pub unchanged_since: u64,
}

/// What the owner of a user's partition knows about the user.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserView {
    pub known: bool,
    /// The query's `unchanged_since` equals `last_offset`: only the positions are filled.
    pub unchanged: bool,
    pub history: Vec<Touch>,
    /// `(item, summed weight, latest ts ms)` of every positive item.
    pub interests: Vec<(String, f32, i64)>,
    pub seen: Vec<String>,
    pub disliked: Vec<String>,
    pub kind_counts: Vec<(String, u64)>,
    pub events: u64,
    pub last_ts_ms: i64,
    /// Offset of the user's last applied event (0: none).
    pub last_offset: u64,
    /// Partition offset applied when this view was taken.
    pub applied_offset: u64,
}

/// Outcome of one retrain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetrainReport {
    pub model_version: u64,
    pub accepted: bool,
    pub reason: String,
    pub candidate_ndcg: f64,
    pub serving_ndcg: f64,
    pub validation_users: u32,
    pub interactions: u64,
    pub users: u32,
    pub items: u32,
    pub train_ms: u64,
    pub serving_version: u64,
    /// Held-out users the candidate was compared with the serving model on (interactions
    /// newer than the serving model's training set).
    pub compared_users: u32,
    /// The node that trained (the leader).
    pub leader: String,
    /// True when the request could not be served now (no node leads, the leader did not
    /// answer, or its training set could not be read): answered 503 with Retry-After.
    pub no_leader: bool,
}

/// Result of a rollback.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RollbackReply {
    pub serving_version: u64,
    pub error: Option<String>,
}

/// An interaction event as a client sends it; the node checks it exactly as it checks
/// an event posted over HTTP (same limits, same reasons).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventIn {
    /// The client's idempotency key: a retry with the same id is stored once.
    pub event_id: Option<String>,
    pub user: String,
    pub item: String,
    pub kind: String,
    pub value: Option<f64>,
    /// Event time, milliseconds since 1970; `None`: the node's clock.
    pub ts_ms: Option<i64>,
    /// The recommendation this event came from, if any.
    pub request_id: Option<String>,
}

/// A catalog item as a client sends it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemIn {
    pub id: String,
    pub text: String,
    pub categories: Vec<String>,
    pub hidden: bool,
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// Top-k for a user, as a client asks it (the node names the request).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecommendQuery {
    pub user: String,
    /// 1..=`ranker.max_k`.
    pub k: u32,
    pub category: Option<String>,
    pub exclude: Vec<String>,
    /// One weight per [`Branch`], in blend order.
    pub weights: Option<Vec<f32>>,
    /// Read-your-writes: the offset a write of this user was acknowledged with.
    pub min_offset: Option<u64>,
}

/// Where written records landed, in the order they were sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Written {
    /// Records stored now (not duplicates).
    pub acked: u32,
    /// Records that had been stored before (same idempotency key): their positions.
    pub duplicates: u32,
    pub positions: Vec<crate::log::Position>,
}

/// A catalog item as the node holds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemView {
    pub item: crate::record::Item,
    pub applied_offset: u64,
    pub stale: bool,
}

/// Interaction events naming an item that the node's item statistics applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemStatsView {
    pub item: String,
    pub event_count: u64,
    /// The node that counted.
    pub node: String,
    pub stale: bool,
}

/// A user as the owner of their partition knows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRead {
    pub user: String,
    pub partition: u32,
    pub view: UserView,
    pub stale: bool,
}

/// How a node sees a member of its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// No authenticated session yet (dialling, or waiting to be dialled).
    Connecting,
    /// Session up and liveness calls answered.
    Up,
    /// Session open but `heartbeat_misses` liveness calls in a row went unanswered (a
    /// hung or overloaded peer, or a socket that died silently). After twice that many
    /// misses this node closes the session, so a redial replaces it.
    Unresponsive,
    /// The session closed; reconnecting.
    Down,
    /// The handshake failed (cookie mismatch, or not a Troupe node).
    Refused,
    /// The peer speaks another cluster protocol version.
    Incompatible,
}

/// Where a partition stands on the node that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Owned here and answered from here.
    Serving,
    /// Owned here; the checkpoint is loading or the log is replaying (not answered yet).
    Replaying,
    /// Owned here and being handed over (final checkpoint, then release).
    Moving,
    /// Held here, but its time ran out before a renewal succeeded (the state store did
    /// not answer): not answered; re-adopted by the next renewal if nobody took it, else
    /// lost and stopped.
    Lapsed,
    /// Owned by another node (see `owner`), or by nobody yet.
    Remote,
    /// Given up after repeated failures of its actors; nobody claims it until an
    /// operator resets it.
    Failed,
}

/// One member as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    /// The answering node itself.
    pub this_node: bool,
    pub state: PeerState,
    /// The ALS model version the member serves (0: none, or not known yet).
    pub model_version: u64,
}

/// One partition as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// The lease holder ("" when nobody holds it).
    pub owner: String,
    pub epoch: u64,
    pub state: SlotState,
    /// Applied offset, when the answering node serves the partition.
    pub applied_offset: Option<u64>,
}

/// The cluster as one node sees it (a single node reports itself serving everything).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The answering node.
    pub node: String,
    pub ready: bool,
    pub members: Vec<MemberStatus>,
    pub partitions: Vec<PartitionStatus>,
    /// The trainer leader, when one is known.
    pub trainer_leader: Option<String>,
    /// The ALS model version the answering node serves (0: none).
    pub model_version: u64,
}

/// An operation of the API (what HTTP routes and client calls ask for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Append events; `request_key` identifies the request for events that carry neither
    /// `event_id` nor `ts_ms` (a retry of the same request maps to the same keys).
    Events {
        events: Vec<EventIn>,
        request_key: Option<String>,
    },
    Recommend(RecommendQuery),
    Similar {
        item: String,
        k: u32,
        min_offset: Option<u64>,
    },
    UpsertItems(Vec<ItemIn>),
    DeleteItem {
        id: String,
    },
    GetItem {
        id: String,
        min_offset: Option<u64>,
    },
    ItemStats {
        item: String,
        min_offset: Option<u64>,
    },
    GetUser {
        user: String,
        min_offset: Option<u64>,
    },
    EraseUser {
        user: String,
    },
    Retrain,
    Rollback,
    /// The cluster as the node asked sees it.
    ClusterStatus,
    /// Records consumers gave up on (admin; protocol 5).
    DeadLetters,
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Events { .. } => "events",
            Op::Recommend(_) => "recommend",
            Op::Similar { .. } => "similar",
            Op::UpsertItems(_) => "upsert_items",
            Op::DeleteItem { .. } => "delete_item",
            Op::GetItem { .. } => "get_item",
            Op::ItemStats { .. } => "item_stats",
            Op::GetUser { .. } => "get_user",
            Op::EraseUser { .. } => "erase_user",
            Op::Retrain => "retrain",
            Op::Rollback => "rollback",
            Op::ClusterStatus => "cluster_status",
            Op::DeadLetters => "dead_letters",
        }
    }

    /// The first protocol version that has this operation.
    pub fn since(&self) -> u16 {
        match self {
            Op::DeadLetters => 5,
            _ => 4,
        }
    }
}

/// The answer to an [`Op`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpReply {
    Written(Written),
    Recommend(RecommendReply),
    Similar(SimilarReply),
    Item(ItemView),
    ItemStats(ItemStatsView),
    User(UserRead),
    Retrain(RetrainReport),
    Rollback(RollbackReply),
    Cluster(ClusterStatus),
    /// One JSON document per dead letter (consumer, stream, offset, attempts, record).
    DeadLetters(Vec<String>),
}

/// Why an operation was refused: the same classes and reasons as the HTTP API's errors
/// (`code` is the HTTP body's `error`, `detail` its `detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: the input is invalid; nothing was accepted.
    Invalid,
    /// 401: a valid token is required.
    Unauthorized,
    /// 404.
    NotFound,
    /// 409: the operation conflicts with the state (nothing to roll back to).
    Conflict,
    /// 413.
    TooLarge,
    /// 503 with a retry-after: too many requests of this class in flight.
    Overloaded,
    /// 503 with a retry-after: the log, a leader or an actor is not available now.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct ApiError {
    pub kind: ErrorKind,
    /// Machine-readable reason (`bad_request`, `too_many_events`, `overloaded`, ...).
    pub code: String,
    pub detail: String,
    /// Seconds to wait before a retry (overload, unavailability).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, code: &str, detail: impl Into<String>) -> Self {
        ApiError {
            kind,
            code: code.to_string(),
            detail: detail.into(),
            retry_after_s: None,
        }
    }
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, "bad_request", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, "not_found", detail)
    }
    pub fn unavailable(detail: impl Into<String>) -> Self {
        ApiError {
            retry_after_s: Some(1),
            ..Self::new(ErrorKind::Unavailable, "unavailable", detail)
        }
    }
    pub fn overloaded(detail: impl Into<String>) -> Self {
        ApiError {
            retry_after_s: Some(1),
            ..Self::new(ErrorKind::Overloaded, "overloaded", detail)
        }
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, "unauthorized", detail)
    }
}
