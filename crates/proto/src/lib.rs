//! Every type that crosses a Troupe process boundary, and nothing else.
//!
//! - [`record`]: log records as stored (format version, checksum, bincode body), the
//!   idempotency keys and the partition of a user.
//! - [`log`]: the log seam's types: what is appended, where it landed, batches read.
//! - [`api`]: the request and reply types of the operations a client may ask for.
//! - [`wire`]: the cross-node frame (protocol version + bincode envelope), the accepted
//!   version range, the trace context carried with every call, and the errors a caller
//!   sees.
//! - [`codec`]: bincode with a bound on what a decode may allocate.
//!
//! The crate depends on serde, bincode, crc32fast and thiserror only, so a client
//! program can speak to a cluster without the node's storage, runtime or models.

pub mod api;
pub mod codec;
pub mod log;
pub mod record;
pub mod wire;
