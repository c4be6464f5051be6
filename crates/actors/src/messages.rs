//! Payloads shared by several actors' messages. Every struct here is cluster-ready:
//! serde + bincode `BytesConvertable`, fixed-width integers, a `version` field.

use serde::{Deserialize, Serialize};

use crate::record::{Payload, Record};
use crate::wire::WIRE_VERSION;
use crate::wire_payload;

/// Records committed to one stream, in offset order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordBatch {
    pub version: u16,
    pub stream: u32,
    pub records: Vec<(u64, Payload)>,
}

impl RecordBatch {
    pub fn new(stream: u32, records: Vec<(u64, Payload)>) -> Self {
        RecordBatch {
            version: WIRE_VERSION,
            stream,
            records,
        }
    }

    pub fn into_records(self) -> Vec<Record> {
        let stream = self.stream;
        self.records
            .into_iter()
            .map(|(offset, payload)| Record {
                stream,
                offset,
                payload,
            })
            .collect()
    }
}

/// A snapshot answered to `Observe`: the actor's name, incarnation, and a JSON document of
/// its offsets and counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Observation {
    pub version: u16,
    pub actor: String,
    pub json: String,
}

impl Observation {
    pub fn new(actor: &str, value: serde_json::Value) -> Self {
        Observation {
            version: WIRE_VERSION,
            actor: actor.to_string(),
            json: value.to_string(),
        }
    }

    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.json).unwrap_or(serde_json::Value::Null)
    }
}

/// Result of a forced checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckpointReply {
    pub version: u16,
    /// Offsets covered by the checkpoint, per stream.
    pub offsets: Vec<(u32, u64)>,
    pub error: Option<String>,
}

impl CheckpointReply {
    /// The answer to a forced checkpoint covering `offsets`.
    pub fn new<E: std::fmt::Display>(offsets: Vec<(u32, u64)>, result: Result<(), E>) -> Self {
        CheckpointReply {
            version: crate::wire::WIRE_VERSION,
            offsets,
            error: result.err().map(|e| e.to_string()),
        }
    }

    /// The same for a consumer of every partition (`applied[p]` for partition `p`).
    pub fn partitions<E: std::fmt::Display>(applied: &[u64], result: Result<(), E>) -> Self {
        let offsets = applied
            .iter()
            .enumerate()
            .map(|(s, &o)| (s as u32, o))
            .collect();
        Self::new(offsets, result)
    }
}

wire_payload!(RecordBatch, Observation, CheckpointReply);

/// Item texts to embed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ItemTexts {
    pub version: u16,
    /// `(item id, text)`.
    pub items: Vec<(String, String)>,
}

/// A list of item ids.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ItemIds {
    pub version: u16,
    pub ids: Vec<String>,
}

wire_payload!(ItemTexts, ItemIds);
