//! Payloads shared by several actors' messages on one node. They never leave the
//! process: what crosses a process boundary lives in `troupe-proto`.

pub use troupe_proto::log::RecordBatch;

/// A snapshot answered to `Observe`: the actor's name, incarnation, and a JSON document of
/// its offsets and counters.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub actor: String,
    pub json: String,
}

impl Observation {
    pub fn new(actor: &str, value: serde_json::Value) -> Self {
        Observation {
            actor: actor.to_string(),
            json: value.to_string(),
        }
    }

    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.json).unwrap_or(serde_json::Value::Null)
    }
}

/// Result of a forced checkpoint.
#[derive(Debug, Clone, Default)]
pub struct CheckpointReply {
    /// Offsets covered by the checkpoint, per stream.
    pub offsets: Vec<(u32, u64)>,
    pub error: Option<String>,
}

impl CheckpointReply {
    /// The answer to a forced checkpoint covering `offsets`.
    pub fn new<E: std::fmt::Display>(offsets: Vec<(u32, u64)>, result: Result<(), E>) -> Self {
        CheckpointReply {
            offsets,
            error: result.err().map(|e| e.to_string()),
        }
    }
}

/// Item texts to embed.
#[derive(Debug, Clone, Default)]
pub struct ItemTexts {
    /// `(item id, text)`.
    pub items: Vec<(String, String)>,
}

/// A list of item ids.
#[derive(Debug, Clone, Default)]
pub struct ItemIds {
    pub ids: Vec<String>,
}
