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
/// Version of the batch container (`[format u16][first offset u64][count u32]` then per
/// record `[length u32][record]`, each record carrying its own format and checksum).
const BATCH_FORMAT: u16 = 1;
const BATCH_HEADER: usize = 2 + 8 + 4;

/// Records of one stream with consecutive offsets, encoded as one journal row.
pub struct JournalBatch {
    stream: u32,
    first: u64,
    count: u32,
    bytes: Vec<u8>,
}

impl JournalBatch {
    /// An empty batch whose first record will have offset `first`.
    pub fn new(stream: u32, first: u64) -> Self {
        let mut bytes = Vec::with_capacity(4096);
        bytes.extend_from_slice(&BATCH_FORMAT.to_le_bytes());
        bytes.extend_from_slice(&first.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        JournalBatch {
            stream,
            first,
            count: 0,
            bytes,
        }
    }

    /// Appends the next record (offset `first + len`).
    pub fn push(&mut self, payload: &Payload) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        record::encode_into(payload, &mut self.bytes);
        self.seal(at);
    }

    /// Appends an already encoded record.
    pub fn push_encoded(&mut self, rec: &[u8]) {
        let at = self.bytes.len();
        self.bytes
            .extend_from_slice(&(rec.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(rec);
        self.seal(at);
    }

    fn seal(&mut self, at: usize) {
        let len = (self.bytes.len() - at - 4) as u32;
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
        self.bytes[10..BATCH_HEADER].copy_from_slice(&self.count.to_le_bytes());
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The row key: `(stream, offset of the last record)`.
    fn key(&self) -> (u32, u64) {
        (self.stream, self.first + u64::from(self.count.max(1)) - 1)
    }
}

/// What the torn-tail check does with a batch row, looking from the stream's end.
enum TailRow {
    /// Sound at its end: stop here.
    Keep,
    /// Nothing good in it: delete it (counting its records) and look at the row before.
    Remove(u64),
    /// Good records then bad ones: keep the good prefix (cutting the rest) and stop.
    Trim(JournalBatch, u64),
}

fn check_tail_row(stream: u32, bytes: &[u8]) -> TailRow {
    let f = match frame(bytes) {
        Ok(f) => f,
        // A header too short to parse is one torn record.
        Err(_) if bytes.len() < BATCH_HEADER => return TailRow::Remove(1),
        // An unknown format is refused by readers, not cut.
        Err(_) => return TailRow::Keep,
    };
    // A record of an unknown version is kept (readers refuse it clearly).
    let good = f
        .records
        .iter()
        .rposition(|r| matches!(record::decode(r), Ok(_) | Err(RecordError::Version(_))))
        .map_or(0, |i| i + 1);
    let total = (f.declared as usize).max(f.records.len());
    let cut = (total - good) as u64;
    if good == 0 {
        TailRow::Remove(cut)
    } else if good < total || f.torn {
        let mut b = JournalBatch::new(stream, f.first);
        f.records[..good].iter().for_each(|r| b.push_encoded(r));
        TailRow::Trim(b, cut)
    } else {
        TailRow::Keep
    }
}

/// A stored batch split into its records.
struct Framed<'a> {
    first: u64,
    /// Records the header announces.
    declared: u32,
    records: Vec<&'a [u8]>,
    /// The bytes end before the announced records do (or run past them).
    torn: bool,
}

/// Splits a stored batch. `Err` for a header that is too short or of an unknown format.
fn frame(b: &[u8]) -> Result<Framed<'_>, String> {
    if b.len() < BATCH_HEADER {
        return Err(format!(
            "batch of {} bytes, shorter than its header",
            b.len()
        ));
    }
    let format = u16::from_le_bytes([b[0], b[1]]);
    if format != BATCH_FORMAT {
        return Err(format!(
            "journal batch format {format} (this build reads {BATCH_FORMAT})"
        ));
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&b[2..10]);
    let declared = u32::from_le_bytes([b[10], b[11], b[12], b[13]]);
    let mut records = Vec::with_capacity(declared as usize);
    let mut rest = &b[BATCH_HEADER..];
    while records.len() < declared as usize && rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() - 4 < len {
            break;
        }
        records.push(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
    let torn = records.len() < declared as usize || !rest.is_empty();
    Ok(Framed {
        first: u64::from_le_bytes(first),
        declared,
        records,
        torn,
    })
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

/// Version of the store layout written by this build (tables and value formats).
pub const STORE_FORMAT: u32 = 3;

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

/// Failures counted against one record: `((stream, offset), count)`.
pub type FailureCount = ((u32, u64), u32);

fn db_err<E: Into<redb::Error>>(path: &Path) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Db {
        path: path.to_path_buf(),
        source: Box::new(e.into()),
    }
}

impl Store {
    /// Opens (or creates) the store at `path`, repairing it after an unclean shutdown and
    /// cutting records at a stream's tail that fail their checksum.
    pub fn open(path: &Path) -> Result<(Store, OpenReport), StoreError> {
        let repaired = Arc::new(AtomicBool::new(false));
        let flag = repaired.clone();
        let db = Database::builder()
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
            tx.open_table(IDEM).map_err(self.err())?;
            tx.open_table(CHECKPOINTS).map_err(self.err())?;
            tx.open_table(FAILURES).map_err(self.err())?;
            tx.open_table(DEAD).map_err(self.err())?;
            tx.open_table(EMBEDDINGS).map_err(self.err())?;
            tx.open_table(MODELS).map_err(self.err())?;
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
                Some(v @ (1 | 2)) => {
                    if v == 1 {
                        self.migrate_idempotency_v1(&tx)?;
                    }
                    self.migrate_journal_v2(&tx)?;
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
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    /// Layout 2 -> 3: one row per record becomes one single-record batch per row.
    fn migrate_journal_v2(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        {
            let old = tx.open_table(JOURNAL_V2).map_err(self.err())?;
            for row in old.iter().map_err(self.err())? {
                let (k, v) = row.map_err(self.err())?;
                let (s, o) = k.value();
                let mut b = JournalBatch::new(s, o);
                b.push_encoded(v.value());
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
    fn cut_torn_tails(&self) -> Result<u64, StoreError> {
        let streams = self.streams()?;
        // Rows to delete, and rows to rewrite with their good prefix.
        let mut remove = Vec::new();
        let mut rewrite = Vec::new();
        let mut cut = 0u64;
        {
            let tx = self.db.begin_read().map_err(self.err())?;
            let t = tx.open_table(JOURNAL).map_err(self.err())?;
            for s in streams {
                let range = t.range((s, 0)..=(s, u64::MAX)).map_err(self.err())?;
                for row in range.rev() {
                    let (k, v) = row.map_err(self.err())?;
                    match check_tail_row(s, v.value()) {
                        TailRow::Keep => break,
                        TailRow::Remove(n) => {
                            cut += n;
                            remove.push(k.value());
                        }
                        TailRow::Trim(b, n) => {
                            cut += n;
                            remove.push(k.value());
                            rewrite.push(b);
                            break;
                        }
                    }
                }
            }
        }
        if !remove.is_empty() {
            let tx = self.db.begin_write().map_err(self.err())?;
            {
                let mut t = tx.open_table(JOURNAL).map_err(self.err())?;
                for k in &remove {
                    t.remove(k).map_err(self.err())?;
                }
                for b in &rewrite {
                    t.insert(b.key(), b.bytes.as_slice()).map_err(self.err())?;
                }
            }
            tx.commit().map_err(self.err())?;
        }
        Ok(cut)
    }

    /// Streams that have at least one record.
    pub fn streams(&self) -> Result<Vec<u32>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(JOURNAL).map_err(self.err())?;
        let mut out = Vec::new();
        let mut next = Some(0u32);
        while let Some(s) = next {
            let first = t
                .range((s, 0)..=(u32::MAX, u64::MAX))
                .map_err(self.err())?
                .next();
            match first {
                Some(row) => {
                    let (k, _) = row.map_err(self.err())?;
                    let stream = k.value().0;
                    out.push(stream);
                    next = stream.checked_add(1);
                }
                None => next = None,
            }
        }
        Ok(out)
    }

    /// Highest offset of `stream` (0 when empty).
    pub fn last_offset(&self, stream: u32) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
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
    /// of their records in one durable commit (one fsync), and drops idempotency entries
    /// older than `expire_before_ms`.
    pub fn append(
        &self,
        batches: &[JournalBatch],
        keys: &[(u128, u32, u64)],
        now_ms: i64,
        expire_before_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut j = tx.open_table(JOURNAL).map_err(self.err())?;
            let mut idem = tx.open_table(IDEM).map_err(self.err())?;
            for b in batches.iter().filter(|b| !b.is_empty()) {
                j.insert(b.key(), b.bytes.as_slice()).map_err(self.err())?;
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

    /// Reads up to `limit` records of `stream` with offsets `>= from`.
    pub fn read(&self, stream: u32, from: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(JOURNAL).map_err(self.err())?;
        let mut out = Vec::new();
        for row in t
            .range((stream, from)..=(stream, u64::MAX))
            .map_err(self.err())?
        {
            if out.len() >= limit {
                break;
            }
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
                if offset < from {
                    continue;
                }
                if out.len() >= limit {
                    break;
                }
                let payload = record::decode(r).map_err(|source| StoreError::Record {
                    stream,
                    offset,
                    source,
                })?;
                out.push(Record {
                    stream,
                    offset,
                    payload,
                });
            }
        }
        Ok(out)
    }

    /// Deletes journal batches of `stream` whose records all have offsets `< before`
    /// (retention); returns the number of records deleted.
    pub fn truncate(&self, stream: u32, before: u64) -> Result<u64, StoreError> {
        if before <= 1 {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(self.err())?;
        let mut n = 0;
        {
            let mut t = tx.open_table(JOURNAL).map_err(self.err())?;
            t.retain_in((stream, 0)..(stream, before), |_, v| {
                n += frame(v).map_or(1, |f| u64::from(f.declared));
                false
            })
            .map_err(self.err())?;
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

    /// Counts one more failure of `consumer` on record `stream/offset`; returns the total.
    pub fn count_failure(
        &self,
        consumer: &str,
        stream: u32,
        offset: u64,
    ) -> Result<u32, StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        let n;
        {
            let mut t = tx.open_table(FAILURES).map_err(self.err())?;
            let prev = t
                .get((consumer, stream, offset))
                .map_err(self.err())?
                .map(|v| v.value())
                .unwrap_or(0);
            n = prev + 1;
            t.insert((consumer, stream, offset), n)
                .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(n)
    }

    /// Failure counts of `consumer`, by (stream, offset).
    pub fn failures(&self, consumer: &str) -> Result<Vec<FailureCount>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(FAILURES).map_err(self.err())?;
        let mut out = Vec::new();
        for row in t
            .range((consumer, 0, 0)..=(consumer, u32::MAX, u64::MAX))
            .map_err(self.err())?
        {
            let (k, v) = row.map_err(self.err())?;
            let (_, s, o) = k.value();
            out.push(((s, o), v.value()));
        }
        Ok(out)
    }

    /// Moves a record to the dead letters of `consumer`.
    pub fn dead_letter(
        &self,
        consumer: &str,
        stream: u32,
        offset: u64,
        json: &[u8],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = tx.open_table(DEAD).map_err(self.err())?;
            t.insert((consumer, stream, offset), json)
                .map_err(self.err())?;
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

    /// Cached embeddings for `(encoder, text hash)` pairs; missing ones are `None`.
    pub fn embeddings(
        &self,
        encoder: &str,
        hashes: &[u128],
    ) -> Result<Vec<Option<Vec<f32>>>, StoreError> {
        let tx = self.db.begin_read().map_err(self.err())?;
        let t = tx.open_table(EMBEDDINGS).map_err(self.err())?;
        let mut out = Vec::with_capacity(hashes.len());
        for &h in hashes {
            out.push(t.get((encoder, h)).map_err(self.err())?.map(|v| {
                v.value()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }));
        }
        Ok(out)
    }

    /// Stores embeddings (no fsync of its own: the cache is rebuilt if lost).
    pub fn put_embeddings(
        &self,
        encoder: &str,
        rows: &[(u128, Vec<f32>)],
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(self.err())?;
        tx.set_durability(redb::Durability::None)
            .map_err(self.err())?;
        {
            let mut t = tx.open_table(EMBEDDINGS).map_err(self.err())?;
            let mut buf = Vec::new();
            for (h, v) in rows {
                buf.clear();
                v.iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                t.insert((encoder, *h), buf.as_slice())
                    .map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(())
    }

    /// Stores a model snapshot and keeps only the newest `keep` versions.
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

    /// Path of the store file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Event;

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
            out.entry(stream)
                .or_insert_with(|| JournalBatch::new(stream, *o))
                .push(&p);
            keys.push((p.idempotency_key(), stream, *o));
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
                s.append(&b, &keys, 5, None).unwrap();
            }
            assert_eq!(s.streams().unwrap(), vec![0, 1]);
            assert_eq!(s.last_offset(0).unwrap(), 10);
            let r = s.read(1, 0, 100).unwrap();
            assert_eq!(r.len(), 10);
            assert_eq!(r[2].payload, ev(5));
            // From the middle of a batch, and a limit inside the next one.
            let r = s.read(1, 4, 3).unwrap();
            assert_eq!(
                r.iter().map(|r| r.offset).collect::<Vec<_>>(),
                vec![4, 5, 6]
            );
            assert_eq!(r[0].payload, ev(7));
            // Retention drops whole batches only: nothing below 5 is needed, batch 1..=5
            // still holds 5.
            assert_eq!(s.truncate(1, 5).unwrap(), 0);
            assert_eq!(s.truncate(1, 6).unwrap(), 5);
            assert_eq!(s.first_offset(1).unwrap(), 6);
            assert_eq!(s.read(1, 0, 100).unwrap()[0].offset, 6);
            assert_eq!(s.idempotency_window(0).unwrap().len(), 20);
            s.put_checkpoint("x", b"abc").unwrap();
            assert_eq!(s.count_failure("c", 1, 5).unwrap(), 1);
            assert_eq!(s.count_failure("c", 1, 5).unwrap(), 2);
        }
        let (s, _) = Store::open(&path).unwrap();
        assert_eq!(s.get_checkpoint("x").unwrap().unwrap(), b"abc");
        assert_eq!(s.failures("c").unwrap(), vec![((1, 5), 2)]);
        assert_eq!(s.last_offset(1).unwrap(), 10);
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
        s.append(&batch, &keys, 300, Some(150)).unwrap();
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
    fn torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let (s, _) = Store::open(&path).unwrap();
            let mut next = Default::default();
            let (b, keys) = batches((1..=2).map(|i| (0, ev(i))), &mut next);
            s.append(&b, &keys, 0, None).unwrap();
            // The last commit: a good record, then one whose body was cut short (as a
            // torn write would leave it), then a batch that ends inside its framing.
            let mut b = JournalBatch::new(0, 3);
            b.push(&ev(3));
            let mut torn = record::encode(&ev(4));
            torn.truncate(torn.len() - 2);
            b.push_encoded(&torn);
            b.push_encoded(&record::encode(&ev(5)));
            b.bytes.truncate(b.bytes.len() - 3);
            s.append(&[b], &[], 0, None).unwrap();
            // Stream 1: a whole batch of bad records goes, the batch before it stays.
            let (b, keys) = batches([(1, ev(6))], &mut Default::default());
            s.append(&b, &keys, 0, None).unwrap();
            let mut b = JournalBatch::new(1, 2);
            b.push_encoded(&torn);
            s.append(&[b], &[], 0, None).unwrap();
        }
        let (s, rep) = Store::open(&path).unwrap();
        assert_eq!(rep.torn_records_cut, 3);
        assert_eq!(s.last_offset(0).unwrap(), 3);
        let r = s.read(0, 1, 10).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[2].payload, ev(3));
        assert_eq!(s.last_offset(1).unwrap(), 1);
        // Appends continue after the cut.
        let (b, keys) = batches([(0, ev(7))], &mut [(0, 3)].into_iter().collect());
        s.append(&b, &keys, 0, None).unwrap();
        assert_eq!(s.read(0, 4, 10).unwrap()[0].payload, ev(7));
    }

    #[test]
    fn layout_2_journal_rows_migrate_to_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        // A layout-2 store: one journal row per record.
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
            (s.first_offset(0).unwrap(), s.last_offset(0).unwrap()),
            (1, 3)
        );
        let r = s.read(0, 2, 10).unwrap();
        assert_eq!(
            r.iter().map(|r| &r.payload).collect::<Vec<_>>(),
            vec![&ev(2), &ev(3)]
        );
        drop(s);
        let (s, _) = Store::open(&path).unwrap();
        assert_eq!(s.read(0, 0, 10).unwrap().len(), 3);
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
}
