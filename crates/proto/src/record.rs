//! Journal records: what is appended, how it is encoded on disk, and idempotency keys.
//!
//! On disk a record is `[format version: u16 LE][crc32 of body: u32 LE][body]` where the
//! body is the bincode (serde, standard config) encoding of [`Payload`]. A record whose
//! version is unknown is refused with [`RecordError::Version`], never guessed at.

use std::collections::BTreeMap;
use std::hash::Hasher;

use serde::{Deserialize, Serialize};

/// Version of the on-disk record format written by this build.
pub const RECORD_FORMAT: u16 = 1;

/// Stream id of the catalog log (item upserts and deletes). Event partitions are
/// `0..partitions`.
pub const CATALOG_STREAM: u32 = u32::MAX;

/// One interaction, as accepted from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Client-chosen idempotency key; when absent, a hash of the event is used.
    pub event_id: Option<String>,
    pub user: String,
    pub item: String,
    pub kind: String,
    /// Optional value (rating, quantity).
    pub value: Option<f32>,
    /// Event time, milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// The recommendation this event came from, if any.
    pub request_id: Option<String>,
}

/// A catalog item.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub text: String,
    pub categories: Vec<String>,
    pub hidden: bool,
    pub attributes: BTreeMap<String, String>,
}

/// What a record carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Payload {
    Event(Event),
    /// Erases everything known about a user (journaled in the user's partition).
    EraseUser {
        user: String,
    },
    ItemUpsert(Item),
    ItemDelete {
        id: String,
    },
}

impl Payload {
    /// The idempotency key: the client's event id when given, else a hash of the content.
    pub fn idempotency_key(&self) -> u128 {
        match self {
            Payload::Event(e) => match &e.event_id {
                Some(id) => hash128(&[b"id", id.as_bytes()]),
                None => {
                    let value = e.value.map(f32::to_bits).unwrap_or(u32::MAX);
                    hash128(&[
                        b"ev",
                        e.user.as_bytes(),
                        e.item.as_bytes(),
                        e.kind.as_bytes(),
                        &value.to_le_bytes(),
                        &e.ts_ms.to_le_bytes(),
                    ])
                }
            },
            // Catalog and erase operations are not deduplicated: applying them twice is
            // harmless (last write wins), and a client may legitimately repeat them.
            _ => 0,
        }
    }
}

/// A decoded record with its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub stream: u32,
    /// Position in the stream. Offsets increase within a stream but need not be
    /// consecutive: "the next record" is whatever the log holds after a position.
    pub offset: u64,
    /// Idempotency key the record was appended with (0: none).
    pub key: u128,
    /// When the log appended it (ms since the epoch; 0 when unknown).
    pub at_ms: i64,
    pub payload: Payload,
    /// W3C `traceparent` of the sampled request that appended it (`None`: not traced),
    /// kept beside the record by the log (a JetStream header; a side table of the
    /// embedded journal), so the record's apply joins the writer's trace.
    #[serde(default)]
    pub trace: Option<String>,
}

/// Why a stored record could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordError {
    #[error("record too short ({0} bytes)")]
    Short(usize),
    #[error("unknown record format version {0} (this build reads {RECORD_FORMAT})")]
    Version(u16),
    #[error("record checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("record body does not decode: {0}")]
    Body(String),
}

/// Encodes a payload for the journal.
pub fn encode(payload: &Payload) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    encode_into(payload, &mut out);
    out
}

/// Appends the encoded record to `out` (no intermediate buffer).
pub fn encode_into(payload: &Payload, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&RECORD_FORMAT.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    // Writing into a Vec cannot fail, and every payload type serialises; were it to
    // fail anyway, the record keeps an empty body that readers refuse.
    if crate::codec::encode_into(payload, out).is_err() {
        out.truncate(start + 6);
    }
    let crc = crc32fast::hash(&out[start + 6..]);
    out[start + 2..start + 6].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a stored record.
pub fn decode(bytes: &[u8]) -> Result<Payload, RecordError> {
    if bytes.len() < 6 {
        return Err(RecordError::Short(bytes.len()));
    }
    let version = u16::from_le_bytes([bytes[0], bytes[1]]);
    if version != RECORD_FORMAT {
        return Err(RecordError::Version(version));
    }
    let stored = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
    let body = &bytes[6..];
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    crate::codec::decode(body).map_err(RecordError::Body)
}

/// 128-bit hash of byte strings (two independent 64-bit FNV-1a style lanes with
/// length-prefixed parts), stable across builds and machines.
pub fn hash128(parts: &[&[u8]]) -> u128 {
    let mut a = StableHasher::new(0xcbf2_9ce4_8422_2325);
    let mut b = StableHasher::new(0x6c62_272e_07bb_0142);
    for p in parts {
        for h in [&mut a, &mut b] {
            h.write(&(p.len() as u64).to_le_bytes());
            h.write(p);
        }
    }
    ((a.finish() as u128) << 64) | b.finish() as u128
}

/// FNV-1a 64 with a configurable basis; stable by definition (unlike `DefaultHasher`).
struct StableHasher(u64);

impl StableHasher {
    fn new(basis: u64) -> Self {
        StableHasher(basis)
    }
}

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        // Final avalanche (splitmix64) so nearby inputs spread over all bits.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The partition of a user: stable 64-bit hash of the id, modulo `partitions`.
pub fn partition_of(user: &str, partitions: u32) -> u32 {
    let mut h = StableHasher::new(0xcbf2_9ce4_8422_2325);
    h.write(user.as_bytes());
    (h.finish() % partitions.max(1) as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(id: Option<&str>) -> Payload {
        Payload::Event(Event {
            event_id: id.map(str::to_string),
            user: "u1".into(),
            item: "i1".into(),
            kind: "view".into(),
            value: Some(2.5),
            ts_ms: 1_700_000_000_000,
            request_id: None,
        })
    }

    #[test]
    fn round_trip_and_refusals() {
        let p = ev(Some("e-1"));
        let bytes = encode(&p);
        assert_eq!(decode(&bytes).unwrap(), p);
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert_eq!(decode(&bad), Err(RecordError::Version(9)));
        let mut torn = bytes.clone();
        torn.truncate(bytes.len() - 3);
        assert!(matches!(decode(&torn), Err(RecordError::Checksum { .. })));
        assert_eq!(decode(&bytes[..3]), Err(RecordError::Short(3)));
    }

    #[test]
    fn keys_follow_event_id_or_content() {
        assert_eq!(
            ev(Some("a")).idempotency_key(),
            ev(Some("a")).idempotency_key()
        );
        assert_ne!(
            ev(Some("a")).idempotency_key(),
            ev(Some("b")).idempotency_key()
        );
        assert_eq!(ev(None).idempotency_key(), ev(None).idempotency_key());
        assert_ne!(ev(None).idempotency_key(), ev(Some("a")).idempotency_key());
    }

    #[test]
    fn partition_is_stable() {
        // Pinned values: changing the hash would move every user to another partition.
        assert_eq!(partition_of("alice", 64), partition_of("alice", 64));
        let spread: std::collections::HashSet<u32> = (0..1000)
            .map(|i| partition_of(&format!("u{i}"), 8))
            .collect();
        assert_eq!(spread.len(), 8);
    }

    proptest! {
        #[test]
        fn any_event_round_trips(user in ".{0,20}", item in ".{0,20}", ts in any::<i64>(), v in proptest::option::of(-1e6f32..1e6)) {
            let p = Payload::Event(Event { event_id: None, user, item, kind: "k".into(), value: v, ts_ms: ts, request_id: Some("r".into()) });
            prop_assert_eq!(decode(&encode(&p)).unwrap(), p);
        }

        /// Any stored bytes: a payload or an error, never a panic; a valid checksum over
        /// garbage still only yields an error.
        #[test]
        fn any_bytes_decode_or_fail(mut bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            drop(decode(&bytes));
            if bytes.len() >= 6 {
                bytes[0..2].copy_from_slice(&RECORD_FORMAT.to_le_bytes());
                let crc = crc32fast::hash(&bytes[6..]);
                bytes[2..6].copy_from_slice(&crc.to_le_bytes());
                drop(decode(&bytes));
            }
        }
    }
}
