//! The log seam's types: what is appended, where it landed, and batches of records read.

use serde::{Deserialize, Serialize};

use crate::record::{Payload, Record};

/// One record to append: its stream, its idempotency key (0: not deduplicated) and what
/// it carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppendEntry {
    pub stream: u32,
    pub key: u128,
    pub payload: Payload,
    /// W3C `traceparent` of the sampled request that writes it (`None`: not traced).
    #[serde(default)]
    pub trace: Option<String>,
}

impl AppendEntry {
    /// An entry keyed by its payload's own key (the event id, or a hash of the event).
    pub fn new(stream: u32, payload: Payload) -> Self {
        AppendEntry {
            stream,
            key: payload.idempotency_key(),
            payload,
            trace: None,
        }
    }

    /// The entry carrying the trace context `trace` (a W3C `traceparent`).
    pub fn traced(mut self, trace: Option<String>) -> Self {
        self.trace = trace;
        self
    }
}

/// Where one record landed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Position {
    pub stream: u32,
    pub offset: u64,
    /// The record had been acked before (same idempotency key); this is its position.
    pub duplicate: bool,
}

/// Records committed to one stream by one commit, in offset order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordBatch {
    pub stream: u32,
    /// Offset of the stream's record before the first of these (0: none): a consumer
    /// whose position is `prev` can apply the batch directly.
    pub prev: u64,
    pub records: Vec<Record>,
}

impl RecordBatch {
    pub fn new(stream: u32, prev: u64, records: Vec<Record>) -> Self {
        RecordBatch {
            stream,
            prev,
            records,
        }
    }
}
