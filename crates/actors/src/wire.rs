//! Versioned message payloads: structs that may travel between nodes implement
//! `ractor::BytesConvertable` with bincode and carry a `version` field.
//!
//! Only the gateway ([`crate::cluster::gateway`]) has a remote message type. The local
//! actors' message enums are deliberately not serialisable: ractor_cluster advertises
//! every actor with a serialisable message type to each peer, which registers it there
//! under its name, colliding with the peer's own actor of that name (and unregistering
//! it when the session closes).
//!
//! ractor drops a remote message that fails to decode with only a debug log, and its
//! trait cannot return an error; so a payload that does not decode becomes its `Default`
//! with `version = 0`, which every handler refuses explicitly.

/// Version of the wire payloads defined by this build.
pub const WIRE_VERSION: u16 = 1;

/// Implements `ractor::BytesConvertable` via bincode for serde types with a `version`
/// field and a `Default`.
#[macro_export]
macro_rules! wire_payload {
    ($($t:ty),* $(,)?) => {$(
        impl ractor::BytesConvertable for $t {
            fn into_bytes(self) -> Vec<u8> {
                $crate::codec::encode(&self).unwrap_or_default()
            }
            fn from_bytes(bytes: Vec<u8>) -> Self {
                $crate::codec::decode(&bytes).unwrap_or_default()
            }
        }
    )*};
}

/// True when a received payload is one this build understands.
pub fn accepted(version: u16) -> bool {
    version == WIRE_VERSION
}
