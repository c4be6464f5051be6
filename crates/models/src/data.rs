//! Streaming readers for interaction events and item catalogues.
//!
//! Files are CSV (RFC 4180 quoting, UTF-8), optionally gzip-compressed (detected from the
//! magic bytes). Columns are picked by header name: either the name given in [`Columns`],
//! or the first header that matches a list of common names, so MovieLens
//! (`userId,movieId,rating,timestamp`; `movieId,title,genres`) and the usual
//! `user,item,value,ts` layouts load without flags. Timestamps are Unix seconds (integer or
//! decimal) or RFC 3339. Every malformed row becomes [`ModelError::BadRow`] naming file, line
//! and field, or is counted and skipped when the reader is told to skip bad rows.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

const USER_NAMES: &[&str] = &[
    "user",
    "user_id",
    "userid",
    "customer",
    "customer_id",
    "customerid",
    "visitorid",
];
const ITEM_NAMES: &[&str] = &[
    "item",
    "item_id",
    "itemid",
    "movieid",
    "product",
    "product_id",
    "sku",
    "stockcode",
];
const VALUE_NAMES: &[&str] = &["value", "rating", "quantity", "qty", "weight"];
const TS_NAMES: &[&str] = &["ts", "timestamp", "time", "event_time", "invoicedate"];
const KIND_NAMES: &[&str] = &["kind", "event", "event_type", "type", "action"];
const TEXT_NAMES: &[&str] = &["text", "description", "title", "name"];
const CATEGORY_NAMES: &[&str] = &["category", "categories", "genres", "genre"];
const TAG_NAMES: &[&str] = &["tag", "tags"];

/// Column names chosen by the caller; `None` means "pick by the usual names".
#[derive(Debug, Clone, Default)]
pub struct Columns {
    pub user: Option<String>,
    pub item: Option<String>,
    pub value: Option<String>,
    pub ts: Option<String>,
    pub kind: Option<String>,
    pub text: Option<String>,
    pub category: Option<String>,
}

/// One interaction as read from a file, before ids are mapped.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub user: String,
    pub item: String,
    /// Event kind (`view`, `purchase`, ...); `None` when the file has no kind column.
    pub kind: Option<String>,
    /// Rating, quantity or other value; `None` when the file has no value column.
    pub value: Option<f32>,
    /// Unix seconds; 0 when the file has no time column.
    pub ts: i64,
}

/// One catalogue entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ItemRecord {
    pub id: String,
    pub text: String,
    pub categories: Vec<String>,
}

impl ItemRecord {
    /// The text given to content encoders: the item text, then its categories and tags.
    pub fn content_text(&self, tags: &[String]) -> String {
        content_text(&self.text, &self.categories, tags)
    }
}

/// The text given to content encoders, served and evaluated alike: the item text, then
/// its categories, then its tags.
pub fn content_text(text: &str, categories: &[String], tags: &[String]) -> String {
    let mut s = text.to_string();
    if !categories.is_empty() {
        s.push_str(". ");
        s.push_str(&categories.join(", "));
    }
    if !tags.is_empty() {
        s.push_str(". ");
        s.push_str(&tags.join(", "));
    }
    s
}

/// A reader that counts the bytes it passed on (of the file itself, before any
/// decompression), for progress against the file's length.
struct Counted<R> {
    inner: R,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

fn open_maybe_gzip(
    path: &Path,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<Box<dyn Read + Send>> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = Counted {
        inner: File::open(path).map_err(io)?,
        read,
    };
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let magic = reader.fill_buf().map_err(io)?;
    if magic.len() >= 2 && magic[0] == 0x1f && magic[1] == 0x8b {
        Ok(Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(reader),
        )))
    } else {
        Ok(Box::new(reader))
    }
}

/// Writes events as CSV in the layout every reader here takes without flags:
/// `user,item[,value],ts[,kind]`, the value and kind columns only when some event has one.
pub fn write_events(path: &Path, events: &[Event]) -> Result<()> {
    let has_value = events.iter().any(|e| e.value.is_some());
    let has_kind = events.iter().any(|e| e.kind.is_some());
    let csv_err = |e: csv::Error| ModelError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    let mut w = csv::Writer::from_path(path).map_err(csv_err)?;
    let mut header = vec!["user", "item"];
    if has_value {
        header.push("value");
    }
    header.push("ts");
    if has_kind {
        header.push("kind");
    }
    w.write_record(&header).map_err(csv_err)?;
    for e in events {
        let mut row = vec![e.user.clone(), e.item.clone()];
        if has_value {
            row.push(e.value.map(|v| v.to_string()).unwrap_or_default());
        }
        row.push(e.ts.to_string());
        if has_kind {
            row.push(e.kind.clone().unwrap_or_default());
        }
        w.write_record(&row).map_err(csv_err)?;
    }
    w.flush().map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A gzip writer (fast compression) for generated files.
pub fn gzip_writer<W: std::io::Write>(w: W) -> flate2::write::GzEncoder<W> {
    flate2::write::GzEncoder::new(w, flate2::Compression::fast())
}

/// Parses a timestamp: Unix seconds (integer or decimal) or RFC 3339.
pub fn parse_timestamp(s: &str) -> std::result::Result<i64, String> {
    let s = s.trim();
    if let Ok(v) = s.parse::<i64>() {
        return Ok(v);
    }
    if let Ok(v) = s.parse::<f64>() {
        if v.is_finite() {
            return Ok(v.floor() as i64);
        }
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|d| d.timestamp())
        .map_err(|_| format!("`{s}` is neither Unix seconds nor an RFC 3339 time"))
}

/// A CSV file opened with its header read, positioned at the first data row.
struct CsvSource {
    file: String,
    /// Bytes of the file read so far (compressed bytes for a gzip file).
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    header: Vec<String>,
    reader: csv::Reader<Box<dyn Read + Send>>,
    record: csv::StringRecord,
}

impl CsvSource {
    fn open(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let read = std::sync::Arc::default();
        let input = open_maybe_gzip(path, std::sync::Arc::clone(&read))?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(input);
        let header = reader
            .headers()
            .map_err(|e| csv_error(&file, &[], e))?
            .iter()
            .map(|h| h.trim().trim_start_matches('\u{feff}').to_string())
            .collect::<Vec<_>>();
        if header.iter().all(|h| h.is_empty()) {
            return Err(ModelError::Empty(format!("{file}: no header row")));
        }
        Ok(CsvSource {
            file,
            read,
            header,
            reader,
            record: csv::StringRecord::new(),
        })
    }

    /// Index of the column named `wanted`, else of the first header matching `defaults`.
    fn column(&self, wanted: Option<&str>, defaults: &[&str], role: &str) -> Result<Option<usize>> {
        if let Some(w) = wanted {
            return match self.header.iter().position(|h| h == w) {
                Some(i) => Ok(Some(i)),
                None => Err(ModelError::MissingColumn {
                    file: self.file.clone(),
                    column: format!("{w} ({role})"),
                    header: self.header.join(","),
                }),
            };
        }
        Ok(defaults
            .iter()
            .find_map(|d| self.header.iter().position(|h| h.eq_ignore_ascii_case(d))))
    }

    fn required(&self, wanted: Option<&str>, defaults: &[&str], role: &str) -> Result<usize> {
        self.column(wanted, defaults, role)?
            .ok_or_else(|| ModelError::MissingColumn {
                file: self.file.clone(),
                column: format!("{role} (any of {})", defaults.join("/")),
                header: self.header.join(","),
            })
    }

    /// Reads the next row; `Ok(None)` at end of file.
    fn next_row(&mut self) -> Result<Option<u64>> {
        match self.reader.read_record(&mut self.record) {
            Ok(true) => {
                let line = self.record.position().map(|p| p.line()).unwrap_or(0);
                if self.record.len() != self.header.len() {
                    return Err(ModelError::BadRow {
                        file: self.file.clone(),
                        line,
                        field: "*".into(),
                        reason: format!(
                            "expected {} fields, found {}",
                            self.header.len(),
                            self.record.len()
                        ),
                    });
                }
                Ok(Some(line))
            }
            Ok(false) => Ok(None),
            Err(e) => Err(csv_error(&self.file, &self.header, e)),
        }
    }

    fn bad(&self, line: u64, col: usize, reason: impl Into<String>) -> ModelError {
        ModelError::BadRow {
            file: self.file.clone(),
            line,
            field: self.header.get(col).cloned().unwrap_or_default(),
            reason: reason.into(),
        }
    }

    fn field(&self, col: usize) -> &str {
        self.record.get(col).unwrap_or("")
    }

    fn non_empty(&self, line: u64, col: usize) -> Result<String> {
        let v = self.field(col).trim();
        if v.is_empty() {
            return Err(self.bad(line, col, "empty value"));
        }
        Ok(v.to_string())
    }
}

fn csv_error(file: &str, header: &[String], e: csv::Error) -> ModelError {
    let line = e.position().map(|p| p.line()).unwrap_or(0);
    match e.into_kind() {
        csv::ErrorKind::Utf8 { err, .. } => ModelError::BadRow {
            file: file.to_string(),
            line,
            field: header
                .get(err.field())
                .cloned()
                .unwrap_or_else(|| format!("#{}", err.field() + 1)),
            reason: "invalid UTF-8".into(),
        },
        csv::ErrorKind::Io(source) => ModelError::Io {
            path: PathBuf::from(file),
            source,
        },
        other => ModelError::BadRow {
            file: file.to_string(),
            line,
            field: "*".into(),
            reason: format!("{other:?}"),
        },
    }
}

/// Counts of rows skipped because they were malformed, with the first few reasons.
#[derive(Debug, Default, Clone)]
pub struct SkipReport {
    pub skipped: u64,
    pub examples: Vec<String>,
}

impl SkipReport {
    fn record(&mut self, e: &ModelError) {
        self.skipped += 1;
        if self.examples.len() < 5 {
            self.examples.push(e.to_string());
        }
    }
}

/// Streams [`Event`]s from a CSV file, one row at a time.
pub struct EventReader {
    src: CsvSource,
    user: usize,
    item: usize,
    value: Option<usize>,
    ts: Option<usize>,
    kind: Option<usize>,
    skip_bad_rows: bool,
    report: SkipReport,
    done: bool,
}

impl EventReader {
    /// Opens `path` and resolves the columns.
    pub fn open(path: &Path, cols: &Columns, skip_bad_rows: bool) -> Result<Self> {
        let src = CsvSource::open(path)?;
        let user = src.required(cols.user.as_deref(), USER_NAMES, "user")?;
        let item = src.required(cols.item.as_deref(), ITEM_NAMES, "item")?;
        let value = src.column(cols.value.as_deref(), VALUE_NAMES, "value")?;
        let ts = src.column(cols.ts.as_deref(), TS_NAMES, "timestamp")?;
        let kind = src.column(cols.kind.as_deref(), KIND_NAMES, "kind")?;
        Ok(EventReader {
            src,
            user,
            item,
            value,
            ts,
            kind,
            skip_bad_rows,
            report: SkipReport::default(),
            done: false,
        })
    }

    /// Rows skipped so far (only with `skip_bad_rows`).
    /// Bytes of the file read so far (of the compressed file for gzip), against its
    /// length on disk: progress with an ETA for any input.
    pub fn bytes_read(&self) -> u64 {
        self.src.read.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn skipped(&self) -> &SkipReport {
        &self.report
    }

    fn parse_row(&self, line: u64) -> Result<Event> {
        let s = &self.src;
        let user = s.non_empty(line, self.user)?;
        let item = s.non_empty(line, self.item)?;
        let value = match self.value {
            Some(c) => {
                let raw = s.field(c).trim();
                let v: f32 = raw
                    .parse()
                    .map_err(|_| s.bad(line, c, format!("`{raw}` is not a number")))?;
                if !v.is_finite() {
                    return Err(s.bad(line, c, "not a finite number"));
                }
                Some(v)
            }
            None => None,
        };
        let ts = match self.ts {
            Some(c) => parse_timestamp(s.field(c)).map_err(|r| s.bad(line, c, r))?,
            None => 0,
        };
        let kind = match self.kind {
            Some(c) => Some(s.non_empty(line, c)?.to_ascii_lowercase()),
            None => None,
        };
        Ok(Event {
            user,
            item,
            kind,
            value,
            ts,
        })
    }
}

impl Iterator for EventReader {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            let row = match self.src.next_row() {
                Ok(Some(line)) => self.parse_row(line),
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(e) => Err(e),
            };
            match row {
                Ok(ev) => return Some(Ok(ev)),
                Err(e @ ModelError::BadRow { .. }) if self.skip_bad_rows => {
                    self.report.record(&e);
                    continue;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Reads a whole item catalogue (catalogues fit in memory; events never need to).
/// Categories are split on `|` or `;`. A repeated id keeps its last row.
pub fn read_items(
    path: &Path,
    cols: &Columns,
    skip_bad_rows: bool,
) -> Result<(Vec<ItemRecord>, SkipReport)> {
    let mut src = CsvSource::open(path)?;
    let id = src.required(cols.item.as_deref(), ITEM_NAMES, "item")?;
    let text = src.column(cols.text.as_deref(), TEXT_NAMES, "text")?;
    let cat = src.column(cols.category.as_deref(), CATEGORY_NAMES, "category")?;
    let mut out = Vec::new();
    let mut report = SkipReport::default();
    loop {
        let row = match src.next_row() {
            Ok(Some(line)) => src.non_empty(line, id).map(|id| ItemRecord {
                id,
                text: text
                    .map(|c| src.field(c).trim().to_string())
                    .unwrap_or_default(),
                categories: cat
                    .map(|c| split_categories(src.field(c)))
                    .unwrap_or_default(),
            }),
            Ok(None) => break,
            Err(e) => Err(e),
        };
        match row {
            Ok(r) => out.push(r),
            Err(e @ ModelError::BadRow { .. }) if skip_bad_rows => report.record(&e),
            Err(e) => return Err(e),
        }
    }
    Ok((out, report))
}

/// Splits a category cell (`Action|Comedy`, `a;b`); MovieLens' "(no genres listed)" is none.
pub fn split_categories(s: &str) -> Vec<String> {
    s.split(['|', ';'])
        .map(str::trim)
        .filter(|c| !c.is_empty() && *c != "(no genres listed)")
        .map(str::to_string)
        .collect()
}

/// Reads a MovieLens-style tag file (`userId,movieId,tag,...`) into item id -> tags,
/// each distinct tag once per item, in first-seen order.
pub fn read_tags(
    path: &Path,
    skip_bad_rows: bool,
) -> Result<(rustc_hash::FxHashMap<String, Vec<String>>, SkipReport)> {
    let mut src = CsvSource::open(path)?;
    let item = src.required(None, ITEM_NAMES, "item")?;
    let tag = src.required(None, TAG_NAMES, "tag")?;
    let mut out: rustc_hash::FxHashMap<String, Vec<String>> = Default::default();
    let mut report = SkipReport::default();
    loop {
        let row = match src.next_row() {
            Ok(Some(line)) => src
                .non_empty(line, item)
                .and_then(|i| Ok((i, src.non_empty(line, tag)?))),
            Ok(None) => break,
            Err(e) => Err(e),
        };
        match row {
            Ok((i, t)) => {
                let tags = out.entry(i).or_default();
                let t = t.to_lowercase();
                if !tags.contains(&t) {
                    tags.push(t);
                }
            }
            Err(e @ ModelError::BadRow { .. }) if skip_bad_rows => report.record(&e),
            Err(e) => return Err(e),
        }
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &tempfile::TempDir, name: &str, body: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn reads_movielens_and_generic_layouts() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "r.csv",
            b"userId,movieId,rating,timestamp\n1,10,4.5,964982703\n2,11,3,964982704\n",
        );
        let evs: Vec<Event> = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].user, "1");
        assert_eq!(evs[0].item, "10");
        assert_eq!(evs[0].value, Some(4.5));
        assert_eq!(evs[0].ts, 964982703);

        let p = write(
            &d,
            "e.csv",
            b"user,item,quantity,ts,kind\n\"a,b\",X1,6,2010-12-01T08:26:00Z,Purchase\n",
        );
        let evs: Vec<Event> = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(evs[0].user, "a,b");
        assert_eq!(evs[0].ts, 1291191960);
        assert_eq!(evs[0].kind.as_deref(), Some("purchase"));
    }

    #[test]
    fn written_events_read_back_the_same() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.csv");
        let evs = vec![
            Event {
                user: "a,\"b\"".into(),
                item: "X1".into(),
                kind: Some("purchase".into()),
                value: Some(2.5),
                ts: 1291191960,
            },
            Event {
                user: "c".into(),
                item: "Y".into(),
                kind: Some("view".into()),
                value: Some(-1.0),
                ts: 7,
            },
        ];
        write_events(&p, &evs).unwrap();
        let back: Vec<Event> = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(back, evs);
        // Without values and kinds the columns are left out, not written empty.
        let bare: Vec<Event> = evs
            .iter()
            .map(|e| Event {
                kind: None,
                value: None,
                ..e.clone()
            })
            .collect();
        write_events(&p, &bare).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("user,item,ts\n"), "{text}");
        let back: Vec<Event> = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(back, bare);
    }

    #[test]
    fn reads_gzip() {
        let d = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"user,item\nu1,i1\nu2,i2\n").unwrap();
        let p = write(&d, "e.csv.gz", &gz.finish().unwrap());
        let n = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .count();
        assert_eq!(n, 2);
    }

    #[test]
    fn malformed_rows_name_file_line_and_field() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "bad.csv",
            b"user,item,rating,ts\nu1,i1,4,10\nu2,i2,abc,11\nu3,i3,5,12\n",
        );
        let res: Result<Vec<Event>> = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .collect();
        let msg = res.unwrap_err().to_string();
        assert!(msg.contains("bad.csv:3"), "{msg}");
        assert!(msg.contains("`rating`"), "{msg}");

        let mut r = EventReader::open(&p, &Columns::default(), true).unwrap();
        let ok: Vec<Event> = r.by_ref().collect::<Result<_>>().unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(r.skipped().skipped, 1);

        let p = write(&d, "short.csv", b"user,item,ts\nu1,i1\n");
        let msg = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("short.csv:2") && msg.contains("expected 3 fields"),
            "{msg}"
        );

        let p = write(&d, "time.csv", b"user,item,ts\nu1,i1,yesterday\n");
        let msg = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("time.csv:2") && msg.contains("`ts`"), "{msg}");

        let p = write(&d, "utf.csv", b"user,item\nu1,\xff\xfe\n");
        let msg = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("utf.csv:2") && msg.contains("UTF-8"), "{msg}");

        let p = write(&d, "empty.csv", b"user,item\n,i1\n");
        let msg = EventReader::open(&p, &Columns::default(), false)
            .unwrap()
            .next()
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`user`") && msg.contains("empty"), "{msg}");
    }

    #[test]
    fn missing_or_misnamed_columns_are_reported() {
        let d = tempfile::tempdir().unwrap();
        let p = write(&d, "x.csv", b"a,b\n1,2\n");
        let msg = EventReader::open(&p, &Columns::default(), false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("missing column") && msg.contains("user"),
            "{msg}"
        );
        let cols = Columns {
            user: Some("a".into()),
            item: Some("zzz".into()),
            ..Default::default()
        };
        let msg = EventReader::open(&p, &cols, false)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("zzz"), "{msg}");
    }

    #[test]
    fn items_and_tags() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "movies.csv",
            b"movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,\"Heat, The (1995)\",(no genres listed)\n",
        );
        let (items, _) = read_items(&p, &Columns::default(), false).unwrap();
        assert_eq!(items[0].categories, vec!["Adventure", "Animation"]);
        assert_eq!(items[1].text, "Heat, The (1995)");
        assert!(items[1].categories.is_empty());
        let t = write(
            &d,
            "tags.csv",
            b"userId,movieId,tag,timestamp\n1,1,Pixar,5\n2,1,pixar,6\n",
        );
        let (tags, _) = read_tags(&t, false).unwrap();
        assert_eq!(tags["1"], vec!["pixar"]);
        assert_eq!(
            items[0].content_text(&tags["1"]),
            "Toy Story (1995). Adventure, Animation. pixar"
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("10"), Ok(10));
        assert_eq!(parse_timestamp("10.7"), Ok(10));
        assert_eq!(parse_timestamp("1970-01-01T00:01:00+00:00"), Ok(60));
        assert!(parse_timestamp("nope").is_err());
    }

    proptest::proptest! {
        /// Any bytes as an event, item or tag file: rows or errors naming file and line,
        /// never a panic (gzip included: a 0x1f 0x8b prefix selects the decoder).
        #[test]
        fn any_bytes_are_rows_or_errors(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), header in 0usize..4) {
            let heads: [&[u8]; 4] = [b"", b"user,item,value,ts\n", b"item,title,genres\n", b"\x1f\x8b"];
            let mut bytes = heads[header].to_vec();
            bytes.extend_from_slice(&body);
            let d = tempfile::tempdir().unwrap();
            let p = write(&d, "x.csv", &bytes);
            for skip in [false, true] {
                if let Ok(r) = EventReader::open(&p, &Columns::default(), skip) {
                    for e in r.take(1000) {
                        if let Err(e) = e {
                            proptest::prop_assert!(e.to_string().contains("x.csv"), "{}", e);
                        }
                    }
                }
                drop(read_items(&p, &Columns::default(), skip));
            }
            drop(read_tags(&p, true));
            drop(read_tags(&p, false));
        }
    }
}
