//! Payloads shared by several actors' messages. Every struct here is cluster-ready:
//! serde + bincode `BytesConvertable`, fixed-width integers, a `version` field.

use serde::{Deserialize, Serialize};

use crate::record::Record;
use crate::wire::WIRE_VERSION;
use crate::wire_payload;

/// Records committed to one stream by one commit, in offset order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordBatch {
    pub version: u16,
    pub stream: u32,
    /// Offset of the stream's record before the first of these (0: none): a consumer
    /// whose position is `prev` can apply the batch directly.
    pub prev: u64,
    pub records: Vec<Record>,
}

impl RecordBatch {
    pub fn new(stream: u32, prev: u64, records: Vec<Record>) -> Self {
        RecordBatch {
            version: WIRE_VERSION,
            stream,
            prev,
            records,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{UserQuery, UserView};
    use crate::journal::{AppendEntry, AppendReply, AppendRequest};
    use crate::ranker::{RecommendReply, RecommendRequest};
    use crate::record::{Event, Payload};
    use proptest::prelude::*;
    use ractor::BytesConvertable;

    fn batch() -> RecordBatch {
        let payload = Payload::Event(Event {
            event_id: Some("e".into()),
            user: "u".into(),
            item: "i".into(),
            kind: "view".into(),
            value: Some(2.0),
            ts_ms: 5,
            request_id: None,
        });
        RecordBatch::new(
            3,
            9,
            vec![Record {
                stream: 3,
                offset: 10,
                key: 77,
                at_ms: 12,
                payload,
            }],
        )
    }

    #[test]
    fn payloads_round_trip() {
        let b = batch();
        let back = RecordBatch::from_bytes(b.clone().into_bytes());
        assert_eq!(
            (back.version, back.prev, &back.records),
            (WIRE_VERSION, 9, &b.records)
        );
        let req = AppendRequest::new(vec![AppendEntry::new(3, b.records[0].payload.clone())]);
        let back = AppendRequest::from_bytes(req.clone().into_bytes());
        assert_eq!(back.entries, req.entries);
    }

    proptest! {
        /// A payload that does not decode becomes version 0 (refused by every handler),
        /// never a panic.
        #[test]
        fn any_bytes_decode_or_become_version_0(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let b = RecordBatch::from_bytes(bytes.clone());
            if b.version != 0 {
                // What decodes encodes back to something that decodes the same way.
                let again = RecordBatch::from_bytes(b.clone().into_bytes());
                prop_assert_eq!((again.stream, again.prev, again.records), (b.stream, b.prev, b.records));
            }
            Observation::from_bytes(bytes.clone());
            CheckpointReply::from_bytes(bytes.clone());
            ItemTexts::from_bytes(bytes.clone());
            AppendRequest::from_bytes(bytes.clone());
            AppendReply::from_bytes(bytes.clone());
            UserQuery::from_bytes(bytes.clone());
            UserView::from_bytes(bytes.clone());
            RecommendRequest::from_bytes(bytes.clone());
            RecommendReply::from_bytes(bytes);
        }
    }
}
