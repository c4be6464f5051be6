//! Registered actor names (one place, so callers and supervisors agree).

pub const NODE_SUPERVISOR: &str = "node_supervisor";
pub const PARTITIONS_SUPERVISOR: &str = "partitions_supervisor";
/// Cluster mode: the supervisor of the control plane (gateway, membership, leases).
pub const CLUSTER_SUPERVISOR: &str = "cluster_supervisor";
pub const JOURNAL: &str = "journal";
pub const CATALOG: &str = "catalog";
pub const ITEM_STATS: &str = "item_stats";
pub const CONTENT_ENCODER: &str = "content_encoder";
pub const ALS_TRAINER: &str = "als_trainer";
pub const RANKER: &str = "ranker";

/// Prefix of every UserFeatures actor's name.
pub const USER_FEATURES_PREFIX: &str = "user_features-";

/// Name of the UserFeatures actor of partition `p`.
pub fn user_features(p: u32) -> String {
    format!("{USER_FEATURES_PREFIX}{p}")
}
