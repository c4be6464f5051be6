//! The node's embedded store (redb, see `docs/adr/005-embedded-store.md`): journal,
//! idempotency window, checkpoints, poison-record counts, dead letters, the embedding
//! cache and model snapshots, all in one file so one commit (one fsync) covers them.
//!
//! Keys are chosen so that a partition's records are one contiguous, ordered range: one
//! row per stream per commit, `journal_batches[(stream, last offset)]`, holding that
//! commit's records of the stream. Offsets start at 1; an `applied_offset` of 0 means
//! nothing was applied yet.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::record::{self, Payload, Record, RecordError};

/// `(stream, last offset in the batch)` -> a [`JournalBatch`]: the records of one stream
/// from one commit. Keying by the last offset makes "the batch holding offset `o`" the
/// first row at or after `(stream, o)`.
const JOURNAL: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("journal_batches");
/// Layout 1 and 2 kept one row per record, keyed `(stream, offset)`; read only to migrate.
const JOURNAL_V2: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("journal");
/// stream -> the highest offset ever assigned (acked or not). Written in the same commit
/// as the records, never lowered: cutting a torn tail or retention cannot make an offset
/// be handed out twice.
const HEADS: TableDefinition<u32, u64> = TableDefinition::new("journal_heads");
/// stream -> the highest offset deleted by retention. A consumer whose position is below
/// it has lost records and must stop (see `consumer.rs`).
const TRUNCATED: TableDefinition<u32, u64> = TableDefinition::new("journal_truncated");
/// The W3C `traceparent` of journal records written by sampled requests, by
/// `(stream, offset)`: beside the records, so the batch format stays as it is and
/// unsampled writes cost nothing.
const TRACES: TableDefinition<(u32, u64), &str> = TableDefinition::new("journal_traces");
/// Version of the batch container written by this build:
/// `[format u16][first offset u64][count u32][appended at ms i64]`, then per record
/// `[length u32][idempotency key u128][record]`, each record carrying its own format and
/// checksum. Format 1 (read only) had no time and no keys: `[format][first][count]` then
/// `[length][record]`.
const BATCH_FORMAT: u16 = 2;
const BATCH_FORMAT_1: u16 = 1;
const BATCH_HEADER_1: usize = 2 + 8 + 4;
const BATCH_HEADER: usize = BATCH_HEADER_1 + 8;
const KEY_BYTES: usize = 16;

/// Records of one stream with consecutive offsets from one commit, encoded as one
/// journal row.
pub struct JournalBatch {
    stream: u32,
    first: u64,
    count: u32,
    bytes: Vec<u8>,
}

impl JournalBatch {
    /// An empty batch whose first record will have offset `first`, appended at `at_ms`.
    pub fn new(stream: u32, first: u64, at_ms: i64) -> Self {
        let mut bytes = Vec::with_capacity(4096);
        bytes.extend_from_slice(&BATCH_FORMAT.to_le_bytes());
        bytes.extend_from_slice(&first.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&at_ms.to_le_bytes());
        JournalBatch {
            stream,
            first,
            count: 0,
            bytes,
        }
    }

    /// Appends the next record (offset `first + len`) with its idempotency key.
    pub fn push(&mut self, key: u128, payload: &Payload) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        self.bytes.extend_from_slice(&key.to_le_bytes());
        record::encode_into(payload, &mut self.bytes);
        self.seal(at);
    }

    /// Appends an already encoded record.
    pub fn push_encoded(&mut self, key: u128, rec: &[u8]) {
        let at = self.bytes.len();
        self.bytes
            .extend_from_slice(&((rec.len() + KEY_BYTES) as u32).to_le_bytes());
        self.bytes.extend_from_slice(&key.to_le_bytes());
        self.bytes.extend_from_slice(rec);
        self.seal(at);
    }

    fn seal(&mut self, at: usize) {
        let len = (self.bytes.len() - at - 4) as u32;
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
        self.bytes[10..14].copy_from_slice(&self.count.to_le_bytes());
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// Offset of the last record (of the first one to come while empty).
    pub fn last(&self) -> u64 {
        self.first + u64::from(self.count.max(1)) - 1
    }

    /// The row key: `(stream, offset of the last record)`.
    fn key(&self) -> (u32, u64) {
        (self.stream, self.last())
    }
}

/// What the torn-tail check does with a batch row, looking from the stream's end.
enum TailRow {
    /// Sound at its end: stop here.
    Keep,
    /// Nothing good in it: delete it (listing its offsets) and look at the row before.
    Remove(Vec<u64>),
    /// Good records then bad ones: keep the good prefix (cutting the rest) and stop.
    Trim(JournalBatch, Vec<u64>),
}

fn check_tail_row(stream: u32, last: u64, bytes: &[u8]) -> TailRow {
    let f = match frame(bytes) {
        Ok(f) => f,
        // A header too short to parse is one torn record (at the row's key).
        Err(_) if bytes.len() < BATCH_HEADER_1 => return TailRow::Remove(vec![last]),
        // An unknown format is refused by readers, not cut.
        Err(_) => return TailRow::Keep,
    };
    // A record of an unknown version is kept (readers refuse it clearly).
    let good = f
        .records
        .iter()
        .rposition(|r| matches!(record::decode(r.body), Ok(_) | Err(RecordError::Version(_))))
        .map_or(0, |i| i + 1);
    let total = (f.declared as usize).max(f.records.len());
    let cut: Vec<u64> = (good..total).map(|i| f.first + i as u64).collect();
    if good == 0 {
        TailRow::Remove(cut)
    } else if good < total || f.torn {
        let mut b = JournalBatch::new(stream, f.first, f.at_ms);
        for r in &f.records[..good] {
            b.push_encoded(r.key.unwrap_or_else(|| legacy_key(r.body)), r.body);
        }
        TailRow::Trim(b, cut)
    } else {
        TailRow::Keep
    }
}

/// The key a format-1 record had: derived from its payload (0 when it does not decode).
fn legacy_key(body: &[u8]) -> u128 {
    record::decode(body).map_or(0, |p| p.idempotency_key())
}

/// One record of a stored batch, not yet decoded.
struct RawRecord<'a> {
    /// `None` in format-1 batches (derive it from the payload).
    key: Option<u128>,
    body: &'a [u8],
}

/// A stored batch split into its records.
struct Framed<'a> {
    first: u64,
    /// When the batch was appended (0 for format-1 batches: unknown).
    at_ms: i64,
    /// Records the header announces.
    declared: u32,
    records: Vec<RawRecord<'a>>,
    /// The bytes end before the announced records do (or run past them).
    torn: bool,
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Splits a stored batch. `Err` for a header that is too short or of an unknown format.
fn frame(b: &[u8]) -> Result<Framed<'_>, String> {
    if b.len() < BATCH_HEADER_1 {
        return Err(format!(
            "batch of {} bytes, shorter than its header",
            b.len()
        ));
    }
    let format = u16::from_le_bytes([b[0], b[1]]);
    let (header, keyed, at_ms) = match format {
        BATCH_FORMAT if b.len() >= BATCH_HEADER => (BATCH_HEADER, true, le_u64(&b[14..22]) as i64),
        BATCH_FORMAT => {
            return Err(format!(
                "batch of {} bytes, shorter than its header",
                b.len()
            ))
        }
        BATCH_FORMAT_1 => (BATCH_HEADER_1, false, 0),
        _ => {
            let known = [BATCH_FORMAT_1, BATCH_FORMAT];
            return Err(format!(
                "journal batch format {format} (this build reads {known:?})"
            ));
        }
    };
    let first = le_u64(&b[2..10]);
    let declared = u32::from_le_bytes([b[10], b[11], b[12], b[13]]);
    // The declared count is outside input: it bounds the loop, never an allocation.
    let mut records = Vec::with_capacity((declared as usize).min(b.len() / 4));
    let mut rest = &b[header..];
    let mut torn = false;
    while records.len() < declared as usize && rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() - 4 < len || (keyed && len < KEY_BYTES) {
            torn = true;
            break;
        }
        let entry = &rest[4..4 + len];
        records.push(if keyed {
            let mut k = [0u8; KEY_BYTES];
            k.copy_from_slice(&entry[..KEY_BYTES]);
            RawRecord {
                key: Some(u128::from_le_bytes(k)),
                body: &entry[KEY_BYTES..],
            }
        } else {
            RawRecord {
                key: None,
                body: entry,
            }
        });
        rest = &rest[4 + len..];
    }
    let torn = torn || records.len() < declared as usize || !rest.is_empty();
    Ok(Framed {
        first,
        at_ms,
        declared,
        records,
        torn,
    })
}

/// Records read after a position, with what retention has deleted.
#[derive(Debug, Default)]
pub struct ReadAfter {
    /// Shared, not copied: the tail of recent records hands the same ones to every
    /// consumer that reads them.
    pub records: Vec<std::sync::Arc<Record>>,
    /// The highest offset of the stream deleted by retention (0: none), read in the same
    /// snapshot as `records`.
    pub truncated: u64,
}

/// key -> (stream, offset, appended at, ms)
/// Layout 1 kept one row per key (random inserts); read only to migrate.
const IDEM_V1: TableDefinition<u128, (u32, u64, i64)> = TableDefinition::new("idempotency");
/// One row per commit: `(acked at ms, first stream, first offset)` -> packed
/// `(key, stream, offset)` entries. Appends stay sequential, and expiry is a range delete.
const IDEM: TableDefinition<(i64, u32, u64), &[u8]> = TableDefinition::new("idempotency_groups");
/// Version of the packed idempotency group.
const IDEM_GROUP_FORMAT: u16 = 1;
const IDEM_ENTRY_BYTES: usize = 16 + 4 + 8;

fn encode_idem_group(entries: &[(u128, u32, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + entries.len() * IDEM_ENTRY_BYTES);
    out.extend_from_slice(&IDEM_GROUP_FORMAT.to_le_bytes());
    for (k, s, o) in entries {
        out.extend_from_slice(&k.to_le_bytes());
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&o.to_le_bytes());
    }
    out
}

fn decode_idem_group(b: &[u8]) -> Result<Vec<(u128, u32, u64)>, String> {
    let (head, body) = b.split_at_checked(2).ok_or("idempotency group too short")?;
    let format = u16::from_le_bytes([head[0], head[1]]);
    if format != IDEM_GROUP_FORMAT {
        return Err(format!(
            "idempotency group format {format} (this build reads {IDEM_GROUP_FORMAT})"
        ));
    }
    if body.len() % IDEM_ENTRY_BYTES != 0 {
        return Err("idempotency group of a partial length".into());
    }
    Ok(body
        .chunks_exact(IDEM_ENTRY_BYTES)
        .map(|e| {
            let mut k = [0u8; 16];
            k.copy_from_slice(&e[..16]);
            let mut s = [0u8; 4];
            s.copy_from_slice(&e[16..20]);
            let mut o = [0u8; 8];
            o.copy_from_slice(&e[20..]);
            (
                u128::from_le_bytes(k),
                u32::from_le_bytes(s),
                u64::from_le_bytes(o),
            )
        })
        .collect())
}
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
/// (consumer, stream, offset) -> failures seen
const FAILURES: TableDefinition<(&str, u32, u64), u32> = TableDefinition::new("failures");
/// (consumer, stream, offset) -> JSON description
const DEAD: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("dead_letters");
/// (encoder name, text hash) -> f32 little-endian
const EMBEDDINGS: TableDefinition<(&str, u128), &[u8]> = TableDefinition::new("embeddings");
/// model version -> snapshot bytes
const MODELS: TableDefinition<u64, &[u8]> = TableDefinition::new("als_models");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The state store's records (`state/embedded.rs`): key -> `[revision u64 LE][value]`.
/// Revisions come from one counter (`meta["state_revision"]`), so a key's revision only
/// grows, even across a delete and a re-create.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state_records");
/// The state store's blobs (checkpoints, snapshots): name -> bytes, written whole.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("state_blobs");

/// Version of the store layout written by this build (tables and value formats).
pub const STORE_FORMAT: u32 = 4;

/// Errors of the store. Any of them on a write means the write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("store {path} has layout version {found}, this build reads {STORE_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("journal record {stream}/{offset}: {source}")]
    Record {
        stream: u32,
        offset: u64,
        #[source]
        source: RecordError,
    },
    #[error("checkpoint {name}: {reason}")]
    Checkpoint { name: String, reason: String },
    #[error("idempotency group acked at {at_ms} ms: {reason}")]
    IdempotencyGroup { at_ms: i64, reason: String },
    #[error("journal batch {stream}/..{last}: {reason}")]
    Batch {
        stream: u32,
        last: u64,
        reason: String,
    },
}

/// What opening the store found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OpenReport {
    /// The file was not closed cleanly and redb rolled back to its last complete commit.
    pub repaired: bool,
    /// Records at the end of a stream that failed their checksum and were cut.
    pub torn_records_cut: u64,
}

/// A shared handle to the store.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

fn db_err<E: Into<redb::Error>>(path: &Path) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Db {
        path: path.to_path_buf(),
        source: Box::new(e.into()),
    }
}

/// A new store's identity: unique per creation (time, process, path), not secret.
fn new_store_id(path: &Path) -> u128 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let thread = format!("{:?}", std::thread::current().id());
    record::hash128(&[
        &nanos.to_le_bytes(),
        &std::process::id().to_le_bytes(),
        path.as_os_str().as_encoded_bytes(),
        thread.as_bytes(),
    ])
}

/// The streams with at least one row in a journal table (one range probe per stream).
fn journal_streams(
    t: &impl ReadableTable<(u32, u64), &'static [u8]>,
) -> Result<Vec<u32>, redb::StorageError> {
    let mut out = Vec::new();
    let mut next = Some(0u32);
    while let Some(s) = next {
        match t.range((s, 0)..=(u32::MAX, u64::MAX))?.next() {
            Some(row) => {
                let stream = row?.0.value().0;
                out.push(stream);
                next = stream.checked_add(1);
            }
            None => next = None,
        }
    }
    Ok(out)
}

/// The store's default page cache. The journal is written once and read mostly right
/// after it was written (consumers apply notified batches without reading the store), so
/// a cache beyond the B-tree's interior pages buys little and, at redb's own default of
/// 1 GiB, used to be most of a loaded node's memory.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

impl Store {
    /// Opens (or creates) the store at `path` with the default page cache.
    pub fn open(path: &Path) -> Result<(Store, OpenReport), StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store at `path` with a page cache of at most `cache_bytes`,
    /// repairing it after an unclean shutdown and cutting records at a stream's tail that
    /// fail their checksum.
    pub fn open_with_cache(
        path: &Path,
        cache_bytes: usize,
    ) -> Result<(Store, OpenReport), StoreError> {
        let repaired = Arc::new(AtomicBool::new(false));
        let flag = repaired.clone();
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .set_repair_callback(move |_| flag.store(true, Ordering::Relaxed))
            .create(path)
            .map_err(db_err(path))?;
        let store = Store {
            db: Arc::new(db),
            path: path.to_path_buf(),
        };
        store.init_tables()?;
        let torn = store.cut_torn_tails()?;
        Ok((
            store,
            OpenReport {
                repaired: repaired.load(Ordering::Relaxed),
                torn_records_cut: torn,
            },
        ))
    }

    fn err<E: Into<redb::Error>>(&self) -> impl FnOnce(E) -> StoreError + '_ {
        db_err(&self.path)
    }

    fn init_tables(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            tx.open_table(JOURNAL).map_err(self.err())?;
            tx.open_table(HEADS).map_err(self.err())?;
            tx.open_table(TRUNCATED).map_err(self.err())?;
            tx.open_table(TRACES).map_err(self.err())?;
            tx.open_table(IDEM).map_err(self.err())?;
            tx.open_table(CHECKPOINTS).map_err(self.err())?;
            tx.open_table(FAILURES).map_err(self.err())?;
            tx.open_table(DEAD).map_err(self.err())?;
            tx.open_table(EMBEDDINGS).map_err(self.err())?;
            tx.open_table(MODELS).map_err(self.err())?;
            tx.open_table(STATE).map_err(self.err())?;
            tx.open_table(BLOBS).map_err(self.err())?;
            let mut meta = tx.open_table(META).map_err(self.err())?;
            let found = meta.get("format").map_err(self.err())?.map(|v| {
                let b = v.value();
                u32::from_le_bytes(b.try_into().unwrap_or([0; 4]))
            });
            match found {
                None => {
                    meta.insert("format", STORE_FORMAT.to_le_bytes().as_slice())
                        .map_err(self.err())?;
                }
                Some(v) if v == STORE_FORMAT => {}
                Some(v @ 1..=3) => {
                    if v == 1 {
                        self.migrate_idempotency_v1(&tx)?;
                    }
                    if v <= 2 {
                        self.migrate_journal_v2(&tx)?;
                    }
                    self.migrate_heads_v3(&tx)?;
                    meta.insert("format", STORE_FORMAT.to_le_bytes().as_slice())
                        .map_err(self.err())?;
                }
                Some(v) => {
                    return Err(StoreError::Format {
                        path: self.path.clone(),
                        found: v,
                    })
                }
            }
            if meta.get("store_id").map_err(self.err())?.is_none() {
                let id = new_store_id(&self.path);
                meta.insert("store_id", id.to_le_bytes().as_slice())
                    .map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    /// The identity given to this store when it was created (32 hex digits): tells one
    /// node's data from another's, and a fresh data directory from the one it replaced.
    pub fn identity(&self) -> Result<String, StoreError> {
        let bytes = self.get_meta("store_id")?.unwrap_or_default();
        Ok(bytes.iter().rev().map(|b| format!("{b:02x}")).collect())
    }

    /// Layout 2 -> 3: one row per record becomes one single-record batch per row.
    fn migrate_journal_v2(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        {
            let old = tx.open_table(JOURNAL_V2).map_err(self.err())?;
            for row in old.iter().map_err(self.err())? {
                let (k, v) = row.map_err(self.err())?;
                let (s, o) = k.value();
                let mut b = JournalBatch::new(s, o, 0);
                b.push_encoded(legacy_key(v.value()), v.value());
                rows.push(b);
            }
        }
        tx.delete_table(JOURNAL_V2).map_err(self.err())?;
        let mut j = tx.open_table(JOURNAL).map_err(self.err())?;
        for b in rows {
            j.insert(b.key(), b.bytes.as_slice()).map_err(self.err())?;
        }
        Ok(())
    }

    /// Layout 3 -> 4: the head of every stream is recorded (from its last row, before any
    /// torn tail is cut, so no offset of the old layout is handed out again).
    fn migrate_heads_v3(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut heads = Vec::new();
        {
            let j = tx.open_table(JOURNAL).map_err(self.err())?;
            for s in journal_streams(&j).map_err(self.err())? {
                let last = j
                    .range((s, 0)..=(s, u64::MAX))
                    .map_err(self.err())?
                    .next_back();
                if let Some(row) = last {
                    heads.push((s, row.map_err(self.err())?.0.value().1));
                }
            }
        }
        let mut t = tx.open_table(HEADS).map_err(self.err())?;
        for (s, o) in heads {
            t.insert(s, o).map_err(self.err())?;
        }
        Ok(())
    }

    /// Layout 1 -> 2: per-key idempotency rows become per-time groups.
    fn migrate_idempotency_v1(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut groups: std::collections::BTreeMap<i64, Vec<(u128, u32, u64)>> = Default::default();
        {
            let old = tx.open_table(IDEM_V1).map_err(self.err())?;
            for row in old.iter().map_err(self.err())? {
                let (k, v) = row.map_err(self.err())?;
                let (s, o, at) = v.value();
                groups.entry(at).or_default().push((k.value(), s, o));
            }
        }
        tx.delete_table(IDEM_V1).map_err(self.err())?;
        let mut idem = tx.open_table(IDEM).map_err(self.err())?;
        for (at, entries) in groups {
            let (_, s, o) = entries[0];
            idem.insert((at, s, o), encode_idem_group(&entries).as_slice())
                .map_err(self.err())?;
        }
        Ok(())
    }

    /// Cuts, per stream, trailing records that fail to decode (a torn or corrupt tail):
    /// whole batches at the end, and the bad end of the last batch that still holds a good
    /// record. Stops at the first good record from the end: corruption in the middle is
    /// reported by readers, never silently dropped.
    ///
    /// The heads stay where they were, so the offsets of cut records are never handed
    /// out again; their idempotency entries are deleted, so a client that retries one of
    /// them has it appended anew instead of being told it is a duplicate.
    fn cut_torn_tails(&self) -> Result<u64, StoreError> {
        let streams = self.streams()?;
        // Rows to delete, rows to rewrite with their good prefix, offsets cut.
        let mut remove = Vec::new();
        let mut rewrite = Vec::new();
        let mut cut: rustc_hash::FxHashSet<(u32, u64)> = Default::default();
        {
            let tx = self.db.begin_read().map_err(self.err())?;
            let t = tx.open_table(JOURNAL).map_err(self.err())?;
            for s in streams {
                let range = t.range((s, 0)..=(s, u64::MAX)).map_err(self.err())?;
                for row in range.rev() {
                    let (k, v) = row.map_err(self.err())?;
                    let (_, last) = k.value();
                    match check_tail_row(s, last, v.value()) {
                        TailRow::Keep => break,
                        TailRow::Remove(offsets) => {
                            cut.extend(offsets.into_iter().map(|o| (s, o)));
                            remove.push(k.value());
                        }
                        TailRow::Trim(b, offsets) => {
                            cut.extend(offsets.into_iter().map(|o| (s, o)));
                            remove.push(k.value());
                            rewrite.push(b);
                            break;
                        }
                    }
                }
            }
        }
        if remove.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = tx.open_table(JOURNAL).map_err(self.err())?;
            let mut heads = tx.open_table(HEADS).map_err(self.err())?;
            for &(s, last) in &remove {
                let head = heads.get(s).map_err(self.err())?.map_or(0, |v| v.value());
                if last > head {
                    heads.insert(s, last).map_err(self.err())?;
                }
                t.remove((s, last)).map_err(self.err())?;
            }
            for b in &rewrite {
                t.insert(b.key(), b.bytes.as_slice()).map_err(self.err())?;
            }
            // Idempotency entries of cut records: rewrite the groups that hold any.
            let mut idem = tx.open_table(IDEM).map_err(self.err())?;
            let mut changed = Vec::new();
            for row in idem.iter().map_err(self.err())? {
                let (k, v) = row.map_err(self.err())?;
                let (at, _, _) = k.value();
                let entries = decode_idem_group(v.value())
                    .map_err(|reason| StoreError::IdempotencyGroup { at_ms: at, reason })?;
                if entries.iter().any(|&(_, s, o)| cut.contains(&(s, o))) {
                    let kept: Vec<_> = entries
                        .into_iter()
                        .filter(|&(_, s, o)| !cut.contains(&(s, o)))
                        .collect();
                    changed.push((k.value(), kept));
                }
            }
            for (k, kept) in changed {
                if kept.is_empty() {
                    idem.remove(k).map_err(self.err())?;
                } else {
                    idem.insert(k, encode_idem_group(&kept).as_slice())
                        .map_err(self.err())?;
                }
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(cut.len() as u64)
    }

    /// Streams that have at least one record.
    pub fn streams(&self) -> Result<Vec<u32>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(JOURNAL).map_err(self.err())?;
        journal_streams(&t).map_err(self.err())
    }

    /// The highest offset ever assigned in `stream` (0 when none): the next append
    /// continues after it.
    pub fn next_after(&self, stream: u32) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let heads = tx.open_table(HEADS).map_err(self.err())?;
        let head = heads
            .get(stream)
            .map_err(self.err())?
            .map_or(0, |v| v.value());
        Ok(head.max(self.last_row(&tx, stream)?))
    }

    /// Offset of the last record of `stream` that a consumer can reach: the last stored
    /// record, or the last one retention deleted when nothing newer is stored (0: none).
    pub fn last_offset(&self, stream: u32) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let truncated = tx.open_table(TRUNCATED).map_err(self.err())?;
        let cut = truncated
            .get(stream)
            .map_err(self.err())?
            .map_or(0, |v| v.value());
        Ok(cut.max(self.last_row(&tx, stream)?))
    }

    fn last_row(&self, tx: &redb::ReadTransaction, stream: u32) -> Result<u64, StoreError> {
        let t = tx.open_table(JOURNAL).map_err(self.err())?;
        let last = t
            .range((stream, 0)..=(stream, u64::MAX))
            .map_err(self.err())?
            .next_back();
        match last {
            Some(row) => Ok(row.map_err(self.err())?.0.value().1),
            None => Ok(0),
        }
    }

    /// Lowest offset still stored for `stream` (0 when empty).
    pub fn first_offset(&self, stream: u32) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(JOURNAL).map_err(self.err())?;
        let first = t
            .range((stream, 0)..=(stream, u64::MAX))
            .map_err(self.err())?
            .next();
        match first {
            Some(row) => {
                let (k, v) = row.map_err(self.err())?;
                let last = k.value().1;
                frame(v.value())
                    .map(|f| f.first)
                    .map_err(|reason| StoreError::Batch {
                        stream,
                        last,
                        reason,
                    })
            }
            None => Ok(0),
        }
    }

    /// The highest offset of `stream` deleted by retention (0: none).
    pub fn truncated(&self, stream: u32) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(TRUNCATED).map_err(self.err())?;
        Ok(t.get(stream).map_err(self.err())?.map_or(0, |v| v.value()))
    }

    /// The idempotency entries appended at or after `since_ms`.
    pub fn idempotency_window(
        &self,
        since_ms: i64,
    ) -> Result<Vec<(u128, u32, u64, i64)>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(IDEM).map_err(self.err())?;
        let mut out = Vec::new();
        for row in t.range((since_ms, 0, 0)..).map_err(self.err())? {
            let (k, v) = row.map_err(self.err())?;
            let (at, _, _) = k.value();
            let entries = decode_idem_group(v.value())
                .map_err(|reason| StoreError::IdempotencyGroup { at_ms: at, reason })?;
            out.extend(entries.into_iter().map(|(k, s, o)| (k, s, o, at)));
        }
        Ok(out)
    }

    /// Appends batches (each one row) plus the idempotency entries `(key, stream, offset)`
    /// of their records and the trace contexts `(stream, offset, traceparent)` of traced
    /// ones in one durable commit (one fsync), moves the heads past them, and drops
    /// idempotency groups acked before `expire_before_ms`.
    pub fn append(
        &self,
        batches: &[JournalBatch],
        keys: &[(u128, u32, u64)],
        traces: &[(u32, u64, String)],
        now_ms: i64,
        expire_before_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        if !traces.is_empty() {
            let mut t = tx.open_table(TRACES).map_err(self.err())?;
            for (s, o, tp) in traces {
                t.insert((*s, *o), tp.as_str()).map_err(self.err())?;
            }
        }
        {
            let mut j = tx.open_table(JOURNAL).map_err(self.err())?;
            let mut heads = tx.open_table(HEADS).map_err(self.err())?;
            let mut idem = tx.open_table(IDEM).map_err(self.err())?;
            for b in batches.iter().filter(|b| !b.is_empty()) {
                j.insert(b.key(), b.bytes.as_slice()).map_err(self.err())?;
                let head = heads
                    .get(b.stream)
                    .map_err(self.err())?
                    .map_or(0, |v| v.value());
                if b.last() > head {
                    heads.insert(b.stream, b.last()).map_err(self.err())?;
                }
            }
            if let Some(&(_, s, o)) = keys.first() {
                idem.insert((now_ms, s, o), encode_idem_group(keys).as_slice())
                    .map_err(self.err())?;
            }
            if let Some(before) = expire_before_ms {
                idem.retain_in(..(before, 0, 0), |_, _| false)
                    .map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    /// Reads up to `limit` records of `stream` with offsets `> after` and `<= upto`, in
    /// offset order (offsets may be sparse), and, from the same snapshot, how far
    /// retention has deleted.
    pub fn read_after(
        &self,
        stream: u32,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<ReadAfter, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let truncated = tx
            .open_table(TRUNCATED)
            .map_err(self.err())?
            .get(stream)
            .map_err(self.err())?
            .map_or(0, |v| v.value());
        let t = tx.open_table(JOURNAL).map_err(self.err())?;
        let mut out = Vec::new();
        if after >= upto || limit == 0 {
            return Ok(ReadAfter {
                records: out.into_iter().map(std::sync::Arc::new).collect(),
                truncated,
            });
        }
        'rows: for row in t
            .range((stream, after + 1)..=(stream, u64::MAX))
            .map_err(self.err())?
        {
            let (k, v) = row.map_err(self.err())?;
            let last = k.value().1;
            let bad = |reason: String| StoreError::Batch {
                stream,
                last,
                reason,
            };
            let f = frame(v.value()).map_err(bad)?;
            if f.torn {
                return Err(bad("records cut short inside the batch".into()));
            }
            for (i, r) in f.records.iter().enumerate() {
                let offset = f.first + i as u64;
                if offset <= after {
                    continue;
                }
                if offset > upto || out.len() >= limit {
                    break 'rows;
                }
                let payload = record::decode(r.body).map_err(|source| StoreError::Record {
                    stream,
                    offset,
                    source,
                })?;
                out.push(Record {
                    stream,
                    offset,
                    key: r.key.unwrap_or_else(|| payload.idempotency_key()),
                    at_ms: f.at_ms,
                    payload,
                    trace: None,
                });
            }
        }
        if let (Some(first), Some(last)) = (out.first(), out.last()) {
            let traces = tx.open_table(TRACES).map_err(self.err())?;
            for row in traces
                .range((stream, first.offset)..=(stream, last.offset))
                .map_err(self.err())?
            {
                let (k, v) = row.map_err(self.err())?;
                let offset = k.value().1;
                if let Ok(i) = out.binary_search_by_key(&offset, |r| r.offset) {
                    out[i].trace = Some(v.value().to_string());
                }
            }
        }
        Ok(ReadAfter {
            records: out.into_iter().map(std::sync::Arc::new).collect(),
            truncated,
        })
    }

    /// Deletes journal batches of `stream` whose records all have offsets `< before`
    /// (retention) and records the highest offset deleted; returns the number of records
    /// deleted.
    pub fn truncate(&self, stream: u32, before: u64) -> Result<u64, StoreError> {
        if before <= 1 {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(self.err())?;
        let mut n = 0;
        let mut highest = 0;
        {
            let mut t = tx.open_table(JOURNAL).map_err(self.err())?;
            t.retain_in((stream, 0)..(stream, before), |k, v| {
                n += frame(v).map_or(1, |f| u64::from(f.declared));
                highest = highest.max(k.1);
                false
            })
            .map_err(self.err())?;
            if highest > 0 {
                tx.open_table(TRACES)
                    .map_err(self.err())?
                    .retain_in((stream, 0)..=(stream, highest), |_, _| false)
                    .map_err(self.err())?;
                let mut cut = tx.open_table(TRUNCATED).map_err(self.err())?;
                let prev = cut
                    .get(stream)
                    .map_err(self.err())?
                    .map_or(0, |v| v.value());
                if highest > prev {
                    cut.insert(stream, highest).map_err(self.err())?;
                }
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(n)
    }

    /// Writes a checkpoint atomically (replacing the previous one of that name).
    pub fn put_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.put(CHECKPOINTS, name, bytes)
    }

    fn put(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = tx.open_table(def).map_err(self.err())?;
            t.insert(key, bytes).map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    /// Names of every checkpoint that starts with `prefix`, in name order.
    pub fn checkpoints_under(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.names_under(CHECKPOINTS, prefix)
    }

    /// Reads a checkpoint.
    pub fn get_checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(CHECKPOINTS).map_err(self.err())?;
        Ok(t.get(name).map_err(self.err())?.map(|v| v.value().to_vec()))
    }

    /// Deletes a checkpoint (used when an actor's state is reset).
    pub fn delete_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = tx.open_table(CHECKPOINTS).map_err(self.err())?;
            t.remove(name).map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    /// All dead letters as JSON documents.
    pub fn dead_letters(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(DEAD).map_err(self.err())?;
        let mut out = Vec::new();
        for row in t.iter().map_err(self.err())? {
            let (_, v) = row.map_err(self.err())?;
            out.push(v.value().to_vec());
        }
        Ok(out)
    }

    /// Cached values of `(namespace, key)` pairs (the embedding cache: namespace = encoder
    /// name, key = text hash); missing ones are `None`.
    pub fn cache_get(&self, ns: &str, keys: &[u128]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(EMBEDDINGS).map_err(self.err())?;
        let mut out = Vec::with_capacity(keys.len());
        for &k in keys {
            out.push(
                t.get((ns, k))
                    .map_err(self.err())?
                    .map(|v| v.value().to_vec()),
            );
        }
        Ok(out)
    }

    /// Stores cache values in one transaction without an fsync of its own (a lost entry
    /// is recomputed).
    pub fn cache_put(&self, ns: &str, entries: &[(u128, Vec<u8>)]) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(self.err())?;
        tx.set_durability(redb::Durability::None)
            .map_err(self.err())?;
        {
            let mut t = tx.open_table(EMBEDDINGS).map_err(self.err())?;
            for (k, v) in entries {
                t.insert((ns, *k), v.as_slice()).map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    /// Stores a model snapshot and keeps only the newest `keep` versions (the table older
    /// builds wrote; models now go to the state store, this writes test fixtures).
    #[cfg(test)]
    pub fn put_model(&self, version: u64, bytes: &[u8], keep: usize) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = tx.open_table(MODELS).map_err(self.err())?;
            t.insert(version, bytes).map_err(self.err())?;
            let mut versions = Vec::new();
            for row in t.iter().map_err(self.err())? {
                versions.push(row.map_err(self.err())?.0.value());
            }
            versions.sort_unstable();
            let drop = versions.len().saturating_sub(keep.max(1));
            for v in &versions[..drop] {
                t.remove(v).map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    /// Stored model versions, oldest first.
    pub fn model_versions(&self) -> Result<Vec<u64>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(MODELS).map_err(self.err())?;
        let mut out = Vec::new();
        for row in t.iter().map_err(self.err())? {
            out.push(row.map_err(self.err())?.0.value());
        }
        Ok(out)
    }

    /// One model snapshot.
    pub fn get_model(&self, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(MODELS).map_err(self.err())?;
        Ok(t.get(version)
            .map_err(self.err())?
            .map(|v| v.value().to_vec()))
    }

    /// Deletes a model snapshot.
    pub fn delete_model(&self, version: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = tx.open_table(MODELS).map_err(self.err())?;
            t.remove(version).map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    /// A small meta value.
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(META).map_err(self.err())?;
        Ok(t.get(key).map_err(self.err())?.map(|v| v.value().to_vec()))
    }

    /// Sets a small meta value.
    pub fn put_meta(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.put(META, key, bytes)
    }

    /// A state record and its revision.
    pub fn state_get(&self, key: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(STATE).map_err(self.err())?;
        Ok(t.get(key)
            .map_err(self.err())?
            .and_then(|v| split_revision(v.value())))
    }

    /// Writes a state record when its revision is `expected` (`Some(None)`: only if
    /// absent; `None`: whatever it is). `Ok(Err(found))` when the condition failed.
    pub fn state_write(
        &self,
        key: &str,
        value: &[u8],
        expected: Option<Option<u64>>,
    ) -> Result<Result<u64, Option<u64>>, StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        let rev;
        {
            let mut t = tx.open_table(STATE).map_err(self.err())?;
            let found = t
                .get(key)
                .map_err(self.err())?
                .and_then(|v| split_revision(v.value()).map(|(_, r)| r));
            if let Some(want) = expected {
                if want != found {
                    return Ok(Err(found));
                }
            }
            let mut meta = tx.open_table(META).map_err(self.err())?;
            let last = meta
                .get("state_revision")
                .map_err(self.err())?
                .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
                .unwrap_or(0);
            rev = last + 1;
            meta.insert("state_revision", rev.to_le_bytes().as_slice())
                .map_err(self.err())?;
            let mut row = Vec::with_capacity(8 + value.len());
            row.extend_from_slice(&rev.to_le_bytes());
            row.extend_from_slice(value);
            t.insert(key, row.as_slice()).map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(Ok(rev))
    }

    /// Deletes a state record (absent: nothing to do).
    pub fn state_delete(&self, key: &str) -> Result<(), StoreError> {
        self.remove_str(STATE, key)
    }

    /// Keys of the state records starting with `prefix`, in order.
    pub fn state_keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.names_under(STATE, prefix)
    }

    /// Writes a blob whole (replacing one of the same name).
    pub fn blob_put(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.put(BLOBS, name, bytes)
    }

    pub fn blob_get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(BLOBS).map_err(self.err())?;
        Ok(t.get(name).map_err(self.err())?.map(|v| v.value().to_vec()))
    }

    pub fn blob_delete(&self, name: &str) -> Result<(), StoreError> {
        self.remove_str(BLOBS, name)
    }

    /// Names of the blobs starting with `prefix`, in order.
    pub fn blob_names(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.names_under(BLOBS, prefix)
    }

    fn remove_str(&self, def: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = tx.open_table(def).map_err(self.err())?;
            t.remove(key).map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    fn names_under(
        &self,
        def: TableDefinition<&str, &[u8]>,
        prefix: &str,
    ) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(def).map_err(self.err())?;
        let mut out = Vec::new();
        for r in t.range(prefix..).map_err(self.err())? {
            let (k, _) = r.map_err(self.err())?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push(k.value().to_string());
        }
        Ok(out)
    }

    /// Path of the store file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Runs a store operation off the async runtime (redb blocks on I/O); a join failure
/// and a store error both come back as their message.
pub async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// `[revision u64 LE][value]` -> (value, revision).
fn split_revision(row: &[u8]) -> Option<(Vec<u8>, u64)> {
    let (rev, value) = row.split_first_chunk::<8>()?;
    Some((value.to_vec(), u64::from_le_bytes(*rev)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Event;
    use proptest::prelude::*;

    fn ev(i: u32) -> Payload {
        Payload::Event(Event {
            event_id: Some(format!("e{i}")),
            user: format!("u{}", i % 3),
            item: format!("i{i}"),
            kind: "view".into(),
            value: None,
            ts_ms: 1000 + i as i64,
            request_id: None,
        })
    }

    /// One batch per stream for `(stream, payload)` pairs, offsets from `next`, and the
    /// idempotency entries of the records.
    fn batches(
        items: impl IntoIterator<Item = (u32, Payload)>,
        next: &mut std::collections::BTreeMap<u32, u64>,
    ) -> (Vec<JournalBatch>, Vec<(u128, u32, u64)>) {
        let mut out: std::collections::BTreeMap<u32, JournalBatch> = Default::default();
        let mut keys = Vec::new();
        for (stream, p) in items {
            let o = next.entry(stream).or_insert(0);
            *o += 1;
            let key = p.idempotency_key();
            out.entry(stream)
                .or_insert_with(|| JournalBatch::new(stream, *o, 77))
                .push(key, &p);
            keys.push((key, stream, *o));
        }
        (out.into_values().collect(), keys)
    }

    /// Writes a store file as an older build left it: `fill` writes its tables.
    fn old_layout(path: &Path, format: u32, fill: impl FnOnce(&redb::WriteTransaction)) {
        let db = redb::Database::create(path).unwrap();
        let tx = db.begin_write().unwrap();
        fill(&tx);
        tx.open_table(META)
            .unwrap()
            .insert("format", format.to_le_bytes().as_slice())
            .unwrap();
        tx.commit().unwrap();
    }

    /// A format-1 batch row (no time, no keys), as layout 3 wrote it.
    fn batch_v1(first: u64, payloads: &[Payload]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&BATCH_FORMAT_1.to_le_bytes());
        b.extend_from_slice(&first.to_le_bytes());
        b.extend_from_slice(&(payloads.len() as u32).to_le_bytes());
        for p in payloads {
            let r = record::encode(p);
            b.extend_from_slice(&(r.len() as u32).to_le_bytes());
            b.extend_from_slice(&r);
        }
        b
    }

    fn offsets(r: &ReadAfter) -> Vec<u64> {
        r.records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn identity_is_kept_across_opens_and_new_for_a_new_store() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.redb");
        let first = Store::open(&a).unwrap().0.identity().unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(Store::open(&a).unwrap().0.identity().unwrap(), first);
        let b = dir.path().join("b.redb");
        assert_ne!(Store::open(&b).unwrap().0.identity().unwrap(), first);
    }

    /// Trace contexts written beside records come back on their records (and only
    /// theirs), survive a reopen, and go with the records retention deletes.
    #[test]
    fn traces_are_kept_beside_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let tp = |i: u64| format!("00-{:032x}-{:016x}-01", i + 1, i + 1);
        {
            let (s, _) = Store::open(&path).unwrap();
            let mut next = Default::default();
            for c in 0..2u32 {
                let (b, keys) = batches((5 * c..5 * c + 5).map(|i| (0, ev(i))), &mut next);
                // Records 2 and 7 (offsets 3 and 8) were written by traced requests.
                let traces = vec![(0, u64::from(5 * c) + 3, tp(u64::from(c)))];
                s.append(&b, &keys, &traces, 5, None).unwrap();
            }
        }
        let (s, _) = Store::open(&path).unwrap();
        let traced = |r: &ReadAfter| -> Vec<(u64, String)> {
            r.records
                .iter()
                .filter_map(|r| r.trace.clone().map(|t| (r.offset, t)))
                .collect()
        };
        let all = s.read_after(0, 0, u64::MAX, 100).unwrap();
        assert_eq!(traced(&all), vec![(3, tp(0)), (8, tp(1))]);
        // A read that starts after the first traced record sees only the second.
        assert_eq!(
            traced(&s.read_after(0, 3, 9, 100).unwrap()),
            vec![(8, tp(1))]
        );
        assert!(traced(&s.read_after(0, 3, 7, 100).unwrap()).is_empty());
        // Retention deletes the first commit, and its trace with it.
        assert_eq!(s.truncate(0, 6).unwrap(), 5);
        assert_eq!(
            traced(&s.read_after(0, 5, u64::MAX, 100).unwrap()),
            vec![(8, tp(1))]
        );
        let tx = s.db.begin_read().unwrap();
        assert_eq!(
            redb::ReadableTableMetadata::len(&tx.open_table(TRACES).unwrap()).unwrap(),
            1
        );
    }

    #[test]
    fn append_read_truncate_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let (s, rep) = Store::open(&path).unwrap();
            assert!(!rep.repaired);
            let mut next = Default::default();
            // Two commits: 5 + 5 records per stream.
            for c in 0..2 {
                let (b, keys) = batches((10 * c..10 * c + 10).map(|i| (i % 2, ev(i))), &mut next);
                s.append(&b, &keys, &[], 5, None).unwrap();
            }
            assert_eq!(s.streams().unwrap(), vec![0, 1]);
            assert_eq!(
                (s.last_offset(0).unwrap(), s.next_after(0).unwrap()),
                (10, 10)
            );
            let r = s.read_after(1, 0, u64::MAX, 100).unwrap();
            assert_eq!(r.records.len(), 10);
            assert_eq!(r.records[2].payload, ev(5));
            assert_eq!(r.records[2].key, ev(5).idempotency_key());
            assert_eq!(r.records[2].at_ms, 77);
            // From the middle of a batch, a limit inside the next one, and an upper bound.
            let r = s.read_after(1, 3, u64::MAX, 3).unwrap();
            assert_eq!(offsets(&r), vec![4, 5, 6]);
            assert_eq!(r.records[0].payload, ev(7));
            assert_eq!(offsets(&s.read_after(1, 3, 5, 100).unwrap()), vec![4, 5]);
            assert!(s
                .read_after(1, 10, u64::MAX, 100)
                .unwrap()
                .records
                .is_empty());
            // Retention drops whole batches only: nothing below 5 is needed, batch 1..=5
            // still holds 5.
            assert_eq!(s.truncate(1, 5).unwrap(), 0);
            assert_eq!(s.truncated(1).unwrap(), 0);
            assert_eq!(s.truncate(1, 6).unwrap(), 5);
            assert_eq!(s.first_offset(1).unwrap(), 6);
            let r = s.read_after(1, 0, u64::MAX, 100).unwrap();
            assert_eq!((r.records[0].offset, r.truncated), (6, 5));
            assert_eq!(s.idempotency_window(0).unwrap().len(), 20);
            s.put_checkpoint("x", b"abc").unwrap();
            // Everything retained away: the last offset stays where the records ended.
            assert_eq!(s.truncate(1, 11).unwrap(), 5);
            assert_eq!(s.last_offset(1).unwrap(), 10);
        }
        let (s, _) = Store::open(&path).unwrap();
        assert_eq!(s.get_checkpoint("x").unwrap().unwrap(), b"abc");
        s.put_checkpoint("x/d/1", b"1").unwrap();
        s.put_checkpoint("x/d/2", b"2").unwrap();
        s.put_checkpoint("y", b"y").unwrap();
        assert_eq!(s.checkpoints_under("x/d/").unwrap(), ["x/d/1", "x/d/2"]);
        assert_eq!(s.get_checkpoint("y").unwrap().unwrap(), b"y");
        assert_eq!(
            (s.last_offset(1).unwrap(), s.next_after(1).unwrap()),
            (10, 10)
        );
        assert_eq!(s.truncated(1).unwrap(), 10);
    }

    #[test]
    fn idempotency_groups_expire_by_time_and_layout_1_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        // A layout-1 store: one idempotency row per key.
        old_layout(&path, 1, |tx| {
            let mut t = tx.open_table(IDEM_V1).unwrap();
            t.insert(7u128, (0u32, 1u64, 100i64)).unwrap();
            t.insert(8u128, (1u32, 1u64, 200i64)).unwrap();
        });
        let (s, _) = Store::open(&path).unwrap();
        let mut w = s.idempotency_window(0).unwrap();
        w.sort_unstable();
        assert_eq!(w, vec![(7, 0, 1, 100), (8, 1, 1, 200)]);
        // New keys land in one group per commit; expiry drops whole groups by time.
        let (batch, keys) = batches((1..=4).map(|i| (0, ev(i))), &mut Default::default());
        s.append(&batch, &keys, &[], 300, Some(150)).unwrap();
        let w = s.idempotency_window(0).unwrap();
        assert!(!w.iter().any(|e| e.0 == 7), "older than the horizon: gone");
        assert!(w.iter().any(|e| e.0 == 8));
        let fresh: Vec<_> = w.iter().filter(|e| e.3 == 300).collect();
        assert_eq!(fresh.len(), 4);
        assert!(fresh
            .iter()
            .all(|e| e.0 == ev(e.2 as u32).idempotency_key()));
        assert_eq!(s.idempotency_window(250).unwrap().len(), 4);
        drop(s);
        let (s, _) = Store::open(&path).unwrap();
        assert_eq!(s.idempotency_window(0).unwrap().len(), 5);
    }

    #[test]
    fn torn_tail_is_cut_on_open_without_reusing_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let torn = {
            let mut t = record::encode(&ev(4));
            t.truncate(t.len() - 2);
            t
        };
        {
            let (s, _) = Store::open(&path).unwrap();
            let mut next = Default::default();
            let (b, keys) = batches((1..=2).map(|i| (0, ev(i))), &mut next);
            s.append(&b, &keys, &[], 0, None).unwrap();
            // The last commit: a good record, then one whose body was cut short (as a
            // torn write would leave it), then a batch that ends inside its framing.
            // Its keys were acked (idempotency entries written with it).
            let mut b = JournalBatch::new(0, 3, 0);
            b.push(ev(3).idempotency_key(), &ev(3));
            b.push_encoded(ev(4).idempotency_key(), &torn);
            b.push(ev(5).idempotency_key(), &ev(5));
            b.bytes.truncate(b.bytes.len() - 3);
            let keys: Vec<_> = (3..=5)
                .map(|i| (ev(i).idempotency_key(), 0, i as u64))
                .collect();
            s.append(&[b], &keys, &[], 0, None).unwrap();
            // Stream 1: a whole batch of bad records goes, the batch before it stays.
            let (b, keys) = batches([(1, ev(6))], &mut Default::default());
            s.append(&b, &keys, &[], 0, None).unwrap();
            let mut b = JournalBatch::new(1, 2, 0);
            b.push_encoded(ev(7).idempotency_key(), &torn);
            s.append(&[b], &[(ev(7).idempotency_key(), 1, 2)], &[], 0, None)
                .unwrap();
        }
        let (s, rep) = Store::open(&path).unwrap();
        assert_eq!(rep.torn_records_cut, 3);
        assert_eq!(s.last_offset(0).unwrap(), 3);
        let r = s.read_after(0, 0, u64::MAX, 10).unwrap();
        assert_eq!(r.records.len(), 3);
        assert_eq!(r.records[2].payload, ev(3));
        assert_eq!(s.last_offset(1).unwrap(), 1);
        // The heads stay: offsets 4, 5 (stream 0) and 2 (stream 1) are never reused.
        assert_eq!((s.next_after(0).unwrap(), s.next_after(1).unwrap()), (5, 2));
        // The cut records' keys are forgotten (a retry is appended anew); others stay.
        let keys: Vec<u128> = s
            .idempotency_window(-1)
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect();
        for i in [4, 5, 7] {
            assert!(
                !keys.contains(&ev(i).idempotency_key()),
                "key of cut record {i}"
            );
        }
        for i in [1, 2, 3, 6] {
            assert!(
                keys.contains(&ev(i).idempotency_key()),
                "key of kept record {i}"
            );
        }
        // Appends continue after the head; readers see a sparse stream.
        let (b, keys) = batches([(0, ev(8))], &mut [(0, 5)].into_iter().collect());
        s.append(&b, &keys, &[], 0, None).unwrap();
        let r = s.read_after(0, 3, u64::MAX, 10).unwrap();
        assert_eq!(offsets(&r), vec![6]);
        assert_eq!(r.records[0].payload, ev(8));
        drop(s);
        let (s, rep) = Store::open(&path).unwrap();
        assert_eq!(rep.torn_records_cut, 0);
        assert_eq!(s.next_after(0).unwrap(), 6);
    }

    #[test]
    fn older_layouts_migrate_and_format_1_batches_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        // Layout 2: one journal row per record.
        let path = dir.path().join("v2.redb");
        old_layout(&path, 2, |tx| {
            let mut t = tx.open_table(JOURNAL_V2).unwrap();
            for i in 1..=3u32 {
                t.insert((0u32, i as u64), record::encode(&ev(i)).as_slice())
                    .unwrap();
            }
        });
        let (s, rep) = Store::open(&path).unwrap();
        assert_eq!(rep.torn_records_cut, 0);
        assert_eq!(
            (s.first_offset(0).unwrap(), s.next_after(0).unwrap()),
            (1, 3)
        );
        let r = s.read_after(0, 1, u64::MAX, 10).unwrap();
        assert_eq!(
            r.records.iter().map(|r| &r.payload).collect::<Vec<_>>(),
            vec![&ev(2), &ev(3)]
        );
        assert_eq!(r.records[0].key, ev(2).idempotency_key());
        drop(s);
        // Layout 3: format-1 batches; the heads are recorded from them.
        let path = dir.path().join("v3.redb");
        old_layout(&path, 3, |tx| {
            let mut t = tx.open_table(JOURNAL).unwrap();
            t.insert((0u32, 2u64), batch_v1(1, &[ev(1), ev(2)]).as_slice())
                .unwrap();
            t.insert((5u32, 7u64), batch_v1(7, &[ev(7)]).as_slice())
                .unwrap();
        });
        let (s, _) = Store::open(&path).unwrap();
        assert_eq!((s.next_after(0).unwrap(), s.next_after(5).unwrap()), (2, 7));
        let r = s.read_after(5, 0, u64::MAX, 10).unwrap();
        assert_eq!((r.records[0].offset, r.records[0].at_ms), (7, 0));
        assert_eq!(r.records[0].key, ev(7).idempotency_key());
        // New batches (format 2) follow the old ones in the same stream.
        let (b, keys) = batches([(0, ev(3))], &mut [(0, 2)].into_iter().collect());
        s.append(&b, &keys, &[], 0, None).unwrap();
        assert_eq!(
            offsets(&s.read_after(0, 0, u64::MAX, 10).unwrap()),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn models_keep_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(&dir.path().join("s.redb")).unwrap();
        for v in 1..=5 {
            s.put_model(v, &[v as u8], 3).unwrap();
        }
        assert_eq!(s.model_versions().unwrap(), vec![3, 4, 5]);
    }

    proptest! {
        /// A stored batch of any bytes splits or is refused; never a panic.
        #[test]
        fn any_batch_bytes_frame_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(f) = frame(&bytes) {
                prop_assert!(f.records.len() <= f.declared as usize);
                for r in &f.records {
                    drop(record::decode(r.body));
                }
            }
            let _ = check_tail_row(0, 1, &bytes);
            drop(decode_idem_group(&bytes));
        }

        /// Batches round trip: what is pushed is what frames back, keys and time included.
        #[test]
        fn batches_round_trip(first in 1u64..1_000_000, at in any::<i64>(), n in 1usize..20, key in any::<u128>()) {
            let mut b = JournalBatch::new(3, first, at);
            for i in 0..n {
                b.push(key ^ i as u128, &ev(i as u32));
            }
            let f = frame(&b.bytes).unwrap();
            prop_assert!(!f.torn);
            prop_assert_eq!((f.first, f.at_ms, f.records.len()), (first, at, n));
            for (i, r) in f.records.iter().enumerate() {
                prop_assert_eq!(r.key, Some(key ^ i as u128));
                prop_assert_eq!(record::decode(r.body).unwrap(), ev(i as u32));
            }
            prop_assert_eq!(b.key(), (3, first + n as u64 - 1));
        }
    }
}
