//! The compact interaction store of one partition: every applied event of every user, in
//! apply order, with ids interned to dense integers. Everything that needs a user's
//! interactions reads it: the displayed history, the seen and disliked filters, kind
//! counts, ALS fold-in and the content profile (through the interests), and the trainer's
//! input.
//!
//! Layout: user, item and kind ids live once each in a [`Dict`] (one string per id, a hash
//! table of indices into it); a user's events are one contiguous run of 18-byte records
//! (time, raw value, item index, kind code). Nothing derived is stored: weights come from
//! the current event-weight settings when a query runs, so one definition serves every
//! reader and a settings change applies to past events too. The history cap limits only
//! what a view shows.
//!
//! Checkpoints are incremental: the store tracks what changed since the last one (users
//! whose runs grew and how long they were, new users, items and kinds), and
//! [`UserStore::delta`] turns that into a [`DeltaWire`] holding only the new events, which
//! [`UserStore::apply_delta`] replays on top of the previous checkpoint. An erasure
//! cannot be expressed as a delta (the erased user's events sit in earlier checkpoints),
//! so after one the next checkpoint must be a full one, which replaces every delta.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};
use serde::{Deserialize, Serialize};
use troupe_models::dataset::WeightConfig;
use troupe_models::interest::{self, Interest};

/// Ids interned to dense `u32` indices; each id's text is stored once. Removed ids leave a
/// free slot that the next new id reuses.
#[derive(Debug, Default, Clone)]
pub struct Dict {
    names: Vec<Box<str>>,
    table: HashTable<u32>,
    free: Vec<u32>,
}

/// Makes room for `len` elements, growing by a quarter rather than doubling: the store's
/// per-id vectors are large, and a doubling leaves up to half of one unused.
fn grow<T>(v: &mut Vec<T>, len: usize) {
    if len > v.capacity() {
        let want = len.max(v.capacity() + v.capacity() / 4 + 16);
        v.reserve_exact(want - v.len());
    }
}

fn hash_str(s: &str) -> u64 {
    FxBuildHasher.hash_one(s)
}

impl Dict {
    pub fn get(&self, name: &str) -> Option<u32> {
        let names = &self.names;
        self.table
            .find(hash_str(name), |&i| &*names[i as usize] == name)
            .copied()
    }

    /// Index of `name`, inserting it if new.
    pub fn intern(&mut self, name: &str) -> u32 {
        let h = hash_str(name);
        if let Some(&i) = self.table.find(h, |&i| &*self.names[i as usize] == name) {
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.names[i as usize] = name.into();
                i
            }
            None => {
                let len = self.names.len() + 1;
                grow(&mut self.names, len);
                self.names.push(name.into());
                (self.names.len() - 1) as u32
            }
        };
        let names = &self.names;
        self.table
            .insert_unique(h, i, |&j| hash_str(&names[j as usize]));
        i
    }

    /// Forgets `name` (its text is dropped); returns its index.
    pub fn remove(&mut self, name: &str) -> Option<u32> {
        let names = &self.names;
        let entry = self
            .table
            .find_entry(hash_str(name), |&i| &*names[i as usize] == name)
            .ok()?;
        let (i, _) = entry.remove();
        self.names[i as usize] = Box::from("");
        self.free.push(i);
        Some(i)
    }

    pub fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map_or("", |s| s)
    }

    /// Ids held (removed ones not counted).
    pub fn len(&self) -> usize {
        self.names.len() - self.free.len()
    }

    /// Bytes on the heap: texts, the index vector and the hash table.
    pub fn heap_bytes(&self) -> usize {
        let texts: usize = self.names.iter().map(|n| n.len()).sum();
        texts
            + self.names.capacity() * std::mem::size_of::<Box<str>>()
            + self.table.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.free.capacity() * 4
    }

    fn from_wire(w: DictWire) -> Result<Dict, String> {
        let mut d = Dict {
            names: w.names.into_iter().map(String::into_boxed_str).collect(),
            table: HashTable::with_capacity(0),
            free: w.free,
        };
        let mut is_free = vec![false; d.names.len()];
        for &f in &d.free {
            let slot = is_free
                .get_mut(f as usize)
                .ok_or_else(|| format!("free slot {f} beyond {} ids", d.names.len()))?;
            if std::mem::replace(slot, true) {
                return Err(format!("free slot {f} listed twice"));
            }
            if !d.names[f as usize].is_empty() {
                return Err(format!("free slot {f} still has an id"));
            }
        }
        d.table.reserve(d.names.len(), |_| 0);
        for (i, n) in d.names.iter().enumerate() {
            if is_free[i] {
                continue;
            }
            let h = hash_str(n);
            if d.table.find(h, |&j| d.names[j as usize] == *n).is_some() {
                return Err(format!("id `{n}` listed twice"));
            }
            let names = &d.names;
            d.table
                .insert_unique(h, i as u32, |&j| hash_str(&names[j as usize]));
        }
        Ok(d)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct DictWire {
    names: Vec<String>,
    free: Vec<u32>,
}

/// One applied event, 18 bytes: no padding, no pointers.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed)]
struct Ev {
    ts_ms: i64,
    /// The event's value; NaN when it had none.
    value: f32,
    item: u32,
    kind: u16,
}

/// Wire form of one event: `(time code, value code, item, kind)`. Times are differences
/// from the previous event of the run (the first from a base), in whole seconds when
/// they are ([`ts_code`]); values are small codes ([`value_code`]). A typical event then
/// encodes in about ten bytes.
type EvWire = (u128, u64, u32, u16);

fn zigzag(v: i128) -> u128 {
    ((v << 1) ^ (v >> 127)) as u128
}

fn unzigzag(u: u128) -> i128 {
    ((u >> 1) as i128) ^ -((u & 1) as i128)
}

/// A time difference: even codes count whole seconds, odd codes milliseconds.
fn ts_code(diff: i128) -> u128 {
    if diff % 1000 == 0 {
        zigzag(diff / 1000) << 1
    } else {
        (zigzag(diff) << 1) | 1
    }
}

fn ts_decode(prev: i64, code: u128) -> Result<i64, String> {
    let d = unzigzag(code >> 1);
    let d = if code & 1 == 0 {
        d.checked_mul(1000)
    } else {
        Some(d)
    };
    d.and_then(|d| i64::try_from(prev as i128 + d).ok())
        .ok_or_else(|| format!("time code {code} out of range"))
}

/// A value: 0 for none, small whole numbers as `n << 2 | 1`, anything else as its bits
/// (`bits << 2 | 2`).
fn value_code(v: f32) -> u64 {
    if v.is_nan() {
        0
    } else if (0.0..16_777_216.0).contains(&v) && (v as u32 as f32).to_bits() == v.to_bits() {
        ((v as u64) << 2) | 1
    } else {
        ((v.to_bits() as u64) << 2) | 2
    }
}

fn value_decode(c: u64) -> Result<f32, String> {
    match (c & 3, c >> 2) {
        (0, 0) => Ok(f32::NAN),
        (1, n) if n < 16_777_216 => Ok(n as f32),
        (2, b) if b <= u32::MAX as u64 => Ok(f32::from_bits(b as u32)),
        _ => Err(format!("value code {c} is not valid")),
    }
}

fn ev_wire(e: &Ev, prev: i64) -> EvWire {
    (
        ts_code(e.ts_ms as i128 - prev as i128),
        value_code(e.value),
        e.item,
        e.kind,
    )
}

/// Decodes a run's events (times chained from `base`), checking item and kind indices.
fn decode_run(
    w: Vec<EvWire>,
    base: i64,
    items: usize,
    kinds: usize,
    out: &mut Vec<Ev>,
) -> Result<(), String> {
    let mut prev = base;
    out.reserve_exact(w.len());
    for (t, v, item, kind) in w {
        if item as usize >= items || kind as usize >= kinds {
            return Err(format!("item {item} or kind {kind} unknown"));
        }
        prev = ts_decode(prev, t)?;
        out.push(Ev {
            ts_ms: prev,
            value: value_decode(v)?,
            item,
            kind,
        });
    }
    Ok(())
}

/// The run of one user's events in apply order.
#[derive(Debug, Default, Clone)]
struct Row {
    events: Vec<Ev>,
    /// Journal offset of the user's last applied event.
    last_offset: u64,
}

pub use troupe_proto::api::Touch;

/// How queries read the stored events: the node's current settings.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    pub weights: &'a WeightConfig,
    /// Kinds that mark an item as seen (empty: every positive kind).
    pub seen_kinds: &'a [String],
    /// How many touches a view shows.
    pub history_len: usize,
}

/// Everything a query derives for one user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserSummary {
    /// The latest positive touches by time (at most `history_len`, oldest first); touches
    /// of an item a later negative cancelled are left out.
    pub history: Vec<Touch>,
    /// `(item, summed weight, latest ts ms)` per positive item ([`interest`]), by item id.
    pub interests: Vec<(String, f32, i64)>,
    /// Items with a positive touch of a seen kind, by id.
    pub seen: Vec<String>,
    /// Items whose latest signal is negative, by id.
    pub disliked: Vec<String>,
    pub kind_counts: Vec<(String, u64)>,
    pub events: u64,
    /// Latest event time (0 when every event is older than the epoch).
    pub last_ts_ms: i64,
    pub last_offset: u64,
}

/// Memory held by one store, by structure (bytes, heap included).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Footprint {
    pub users: usize,
    pub events: usize,
    pub user_ids: usize,
    pub item_ids: usize,
    pub kind_ids: usize,
    pub rows: usize,
    pub event_runs: usize,
}

impl Footprint {
    pub fn total(&self) -> usize {
        self.user_ids + self.item_ids + self.kind_ids + self.rows + self.event_runs
    }
}

/// The interactions of one partition.
#[derive(Debug, Default, Clone)]
pub struct UserStore {
    users: Dict,
    items: Dict,
    kinds: Dict,
    /// By user index; a removed user's row is empty.
    rows: Vec<Row>,
    events: usize,
    changes: Changes,
}

/// What changed since the last checkpoint.
#[derive(Debug, Default, Clone)]
struct Changes {
    /// Users whose runs grew, with their run length at the last checkpoint (0: a user
    /// new since then).
    grown: FxHashMap<u32, u32>,
    /// Slots of users new since the last checkpoint, in the order they took them.
    new_users: Vec<u32>,
    /// Item and kind ids held at the last checkpoint (ids are only ever appended).
    items_from: u32,
    kinds_from: u32,
    /// A user was erased: only a full checkpoint can say so.
    erased: bool,
}

/// The changes of a store since its last checkpoint: new ids and the events appended to
/// each grown run. Each row's times chain from `ts_base` and offsets count from
/// `offset_base` (the smallest of each); rows are in slot order, each slot given as the
/// gap from the previous one; so they encode short.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeltaWire {
    items_from: u32,
    items: Vec<String>,
    kinds_from: u32,
    kinds: Vec<String>,
    new_users: Vec<(u32, String)>,
    ts_base: i64,
    offset_base: u64,
    rows: Vec<DeltaRow>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct DeltaRow {
    slot_gap: u32,
    /// Run length before these events (checked when the delta is replayed).
    from: u32,
    last_offset: u64,
    events: Vec<EvWire>,
}

impl DeltaWire {
    /// Events the delta appends.
    pub fn events(&self) -> usize {
        self.rows.iter().map(|r| r.events.len()).sum()
    }
}

impl UserStore {
    pub fn users(&self) -> usize {
        self.users.len()
    }

    pub fn events(&self) -> usize {
        self.events
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.get(user).is_some()
    }

    /// Applies one event at journal `offset`.
    pub fn apply(
        &mut self,
        user: &str,
        item: &str,
        kind: &str,
        value: Option<f32>,
        ts_ms: i64,
        offset: u64,
    ) {
        let u = match self.users.get(user) {
            Some(u) => u,
            None => {
                let u = self.users.intern(user);
                self.changes.new_users.push(u);
                u
            }
        };
        let u = u as usize;
        if self.rows.len() <= u {
            grow(&mut self.rows, u + 1);
            self.rows.resize_with(u + 1, Row::default);
        }
        let ev = Ev {
            ts_ms,
            value: value.unwrap_or(f32::NAN),
            item: self.items.intern(item),
            kind: self.kinds.intern(kind).min(u16::MAX as u32) as u16,
        };
        let row = &mut self.rows[u];
        self.changes
            .grown
            .entry(u as u32)
            .or_insert(row.events.len() as u32);
        // Grow by a quarter, not by doubling: runs are many and mostly short.
        if row.events.len() == row.events.capacity() {
            row.events.reserve_exact((row.events.len() / 4).max(2));
        }
        row.events.push(ev);
        row.last_offset = offset;
        self.events += 1;
    }

    /// Removes every trace of `user`; true when the user was known.
    pub fn erase(&mut self, user: &str) -> bool {
        let Some(u) = self.users.remove(user) else {
            return false;
        };
        let row = std::mem::take(&mut self.rows[u as usize]);
        self.events -= row.events.len();
        self.changes.erased = true;
        true
    }

    /// True when the changes since the last checkpoint include an erasure: the next
    /// checkpoint must be a full one.
    pub fn needs_full_checkpoint(&self) -> bool {
        self.changes.erased
    }

    /// Events applied since the last checkpoint.
    pub fn changed_events(&self) -> usize {
        self.changes
            .grown
            .iter()
            .map(|(&u, &from)| self.rows[u as usize].events.len() - from as usize)
            .sum()
    }

    /// The changes since the last checkpoint as a delta; `None` after an erasure (see
    /// [`UserStore::needs_full_checkpoint`]). Does not reset the tracking.
    pub fn delta(&self) -> Option<DeltaWire> {
        let c = &self.changes;
        if c.erased {
            return None;
        }
        let mut slots: Vec<u32> = c.grown.keys().copied().collect();
        slots.sort_unstable();
        let fresh = |u: u32| &self.rows[u as usize].events[c.grown[&u] as usize..];
        let ts_base = slots
            .iter()
            .flat_map(|&u| fresh(u).iter().map(|e| e.ts_ms))
            .min()
            .unwrap_or(0);
        let offset_base = slots
            .iter()
            .map(|&u| self.rows[u as usize].last_offset)
            .min()
            .unwrap_or(0);
        let mut prev_slot = 0;
        let rows = slots
            .iter()
            .map(|&u| {
                let mut prev = ts_base;
                let row = DeltaRow {
                    slot_gap: u - prev_slot,
                    from: c.grown[&u],
                    last_offset: self.rows[u as usize].last_offset - offset_base,
                    events: fresh(u)
                        .iter()
                        .map(|e| {
                            let w = ev_wire(e, prev);
                            prev = e.ts_ms;
                            w
                        })
                        .collect(),
                };
                prev_slot = u;
                row
            })
            .collect();
        let names = |d: &Dict, from: u32| {
            d.names[from as usize..]
                .iter()
                .map(|n| n.to_string())
                .collect()
        };
        Some(DeltaWire {
            items_from: c.items_from,
            items: names(&self.items, c.items_from),
            kinds_from: c.kinds_from,
            kinds: names(&self.kinds, c.kinds_from),
            new_users: c
                .new_users
                .iter()
                .map(|&u| (u, self.users.name(u).to_string()))
                .collect(),
            ts_base,
            offset_base,
            rows,
        })
    }

    /// Marks the current state as checkpointed: the next delta starts here.
    pub fn mark_checkpointed(&mut self) {
        self.changes = Changes {
            items_from: self.items.names.len() as u32,
            kinds_from: self.kinds.names.len() as u32,
            ..Changes::default()
        };
    }

    /// Replays a delta written by [`UserStore::delta`] on top of the checkpoint it
    /// followed, checking that it continues exactly from this state. The result counts
    /// as checkpointed.
    pub fn apply_delta(&mut self, d: DeltaWire) -> Result<(), String> {
        fn extend(
            dict: &mut Dict,
            from: u32,
            names: Vec<String>,
            what: &str,
        ) -> Result<(), String> {
            if from as usize != dict.names.len() {
                return Err(format!(
                    "the delta's {what} ids start at {from}, the store holds {}",
                    dict.names.len()
                ));
            }
            for n in names {
                let at = dict.names.len() as u32;
                if dict.get(&n).is_some() || !dict.free.is_empty() || dict.intern(&n) != at {
                    return Err(format!("the delta's {what} id `{n}` is not new"));
                }
            }
            Ok(())
        }
        extend(&mut self.items, d.items_from, d.items, "item")?;
        extend(&mut self.kinds, d.kinds_from, d.kinds, "kind")?;
        let new_slots: Vec<u32> = d.new_users.iter().map(|p| p.0).collect();
        for (slot, name) in d.new_users {
            if self.users.get(&name).is_some() {
                return Err(format!("the delta's new user `{name}` is already known"));
            }
            let u = self.users.intern(&name);
            if u != slot {
                return Err(format!(
                    "the delta's new user `{name}` took slot {u}, not {slot}"
                ));
            }
            if self.rows.len() <= u as usize {
                self.rows.resize_with(u as usize + 1, Row::default);
            }
        }
        let (items, kinds) = (self.items.names.len(), self.kinds.names.len());
        let mut slot = 0u32;
        for (k, r) in d.rows.into_iter().enumerate() {
            slot = match slot.checked_add(r.slot_gap) {
                Some(s) if k == 0 || r.slot_gap > 0 => s,
                _ => return Err(format!("the delta's row {k} has a bad slot gap")),
            };
            let live = self
                .users
                .names
                .get(slot as usize)
                .is_some_and(|n| !n.is_empty());
            let row = match self.rows.get_mut(slot as usize) {
                Some(row) if live && row.events.len() == r.from as usize => row,
                _ => {
                    return Err(format!(
                        "the delta continues user slot {slot} from {} events, which this store does not hold",
                        r.from
                    ))
                }
            };
            decode_run(r.events, d.ts_base, items, kinds, &mut row.events)
                .map_err(|e| format!("user slot {slot}: {e}"))?;
            self.events += row.events.len() - r.from as usize;
            row.last_offset = d.offset_base.saturating_add(r.last_offset);
        }
        if new_slots
            .iter()
            .any(|&u| self.rows[u as usize].events.is_empty())
        {
            return Err("the delta names a new user without events".into());
        }
        self.mark_checkpointed();
        Ok(())
    }

    /// Journal offset of the user's last applied event.
    pub fn last_offset(&self, user: &str) -> Option<u64> {
        self.users
            .get(user)
            .map(|u| self.rows[u as usize].last_offset)
    }

    fn run(&self, user: &str) -> Option<&Row> {
        self.users.get(user).map(|u| &self.rows[u as usize])
    }

    fn weight(&self, rules: &Rules<'_>, e: &Ev) -> Option<f32> {
        rules
            .weights
            .weight(Some(self.kinds.name(e.kind as u32)), e.value)
    }

    /// A run's interests by partition item index ([`interest`] over the events in apply
    /// order), from each event's weight.
    fn aggregate(
        row: &Row,
        weights: impl Iterator<Item = Option<f32>>,
    ) -> FxHashMap<u32, Interest> {
        let mut m: FxHashMap<u32, Interest> = FxHashMap::default();
        for (e, w) in row.events.iter().zip(weights) {
            interest::record(&mut m, &{ e.item }, w, e.ts_ms);
        }
        m
    }

    /// The user's interests with item ids, by id.
    pub fn interests(&self, rules: &Rules<'_>, user: &str) -> Vec<(String, f32, i64)> {
        let Some(row) = self.run(user) else {
            return Vec::new();
        };
        let weights = row.events.iter().map(|e| self.weight(rules, e));
        self.named_interests(Self::aggregate(row, weights))
    }

    fn named_interests(&self, m: FxHashMap<u32, Interest>) -> Vec<(String, f32, i64)> {
        let mut v: Vec<(String, f32, i64)> = m
            .into_iter()
            .map(|(i, x)| (self.items.name(i).to_string(), x.weight, x.ts))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Everything a view of `user` shows; `None` for an unknown user.
    pub fn summary(&self, rules: &Rules<'_>, user: &str) -> Option<UserSummary> {
        let row = self.run(user)?;
        let n = row.events.len();
        // Per event: its weight, and whether a later negative of its item cancels it.
        let weights: Vec<Option<f32>> = row.events.iter().map(|e| self.weight(rules, e)).collect();
        let mut cancelled = vec![false; n];
        let mut negative_after: rustc_hash::FxHashSet<u32> = Default::default();
        for k in (0..n).rev() {
            let item = row.events[k].item;
            if weights[k].is_none() {
                negative_after.insert(item);
            } else if negative_after.contains(&item) {
                cancelled[k] = true;
            }
        }
        let mut history: Vec<usize> = (0..n)
            .filter(|&k| weights[k].is_some() && !cancelled[k])
            .collect();
        history.sort_by_key(|&k| row.events[k].ts_ms);
        let skip = history.len().saturating_sub(rules.history_len.max(1));
        let history = history[skip..]
            .iter()
            .map(|&k| {
                let e = row.events[k];
                Touch {
                    item: self.items.name(e.item).to_string(),
                    kind: self.kinds.name(e.kind as u32).to_string(),
                    weight: weights[k].unwrap_or(0.0),
                    ts_ms: e.ts_ms,
                }
            })
            .collect();
        // Latest signal per item decides `disliked`; any positive of a seen kind, `seen`.
        let mut latest_negative: FxHashMap<u32, bool> = FxHashMap::default();
        let mut seen: Vec<u32> = Vec::new();
        let mut counts: FxHashMap<u16, u64> = FxHashMap::default();
        let mut last_ts_ms = 0i64;
        for (e, w) in row.events.iter().zip(&weights) {
            latest_negative.insert(e.item, w.is_none());
            *counts.entry(e.kind).or_default() += 1;
            last_ts_ms = last_ts_ms.max(e.ts_ms);
            if w.is_some() {
                let kind = self.kinds.name(e.kind as u32);
                if rules.seen_kinds.is_empty() || rules.seen_kinds.iter().any(|k| k == kind) {
                    seen.push(e.item);
                }
            }
        }
        seen.sort_unstable();
        seen.dedup();
        let mut disliked: Vec<String> = latest_negative
            .into_iter()
            .filter(|p| p.1)
            .map(|p| self.items.name(p.0).to_string())
            .collect();
        disliked.sort_unstable();
        let mut kind_counts: Vec<(String, u64)> = counts
            .into_iter()
            .map(|(k, c)| (self.kinds.name(k as u32).to_string(), c))
            .collect();
        kind_counts.sort_unstable();
        let interests = self.named_interests(Self::aggregate(row, weights.iter().copied()));
        let mut seen: Vec<String> = seen
            .into_iter()
            .map(|i| self.items.name(i).to_string())
            .collect();
        seen.sort_unstable();
        Some(UserSummary {
            history,
            interests,
            seen,
            disliked,
            kind_counts,
            events: n as u64,
            last_ts_ms,
            last_offset: row.last_offset,
        })
    }

    /// Every user's interests as `(user id, item id, weight, latest ts ms)`: the trainer's
    /// input from this partition.
    pub fn for_each_interest(&self, rules: &Rules<'_>, mut f: impl FnMut(&str, &str, Interest)) {
        for (u, row) in self.rows.iter().enumerate() {
            if row.events.is_empty() {
                continue;
            }
            let user = self.users.name(u as u32);
            let m = Self::aggregate(row, row.events.iter().map(|e| self.weight(rules, e)));
            for (i, x) in m {
                f(user, self.items.name(i), x);
            }
        }
    }

    /// Memory by structure.
    pub fn footprint(&self) -> Footprint {
        let event_runs = self
            .rows
            .iter()
            .map(|r| r.events.capacity() * std::mem::size_of::<Ev>())
            .sum();
        Footprint {
            users: self.users.len(),
            events: self.events,
            user_ids: self.users.heap_bytes(),
            item_ids: self.items.heap_bytes(),
            kind_ids: self.kinds.heap_bytes(),
            rows: self.rows.capacity() * std::mem::size_of::<Row>(),
            event_runs,
        }
    }

    /// Rebuilds a store from its checkpoint form, checking every index.
    pub fn from_wire(w: StoreWire) -> Result<UserStore, String> {
        let users = Dict::from_wire(w.users)?;
        let items = Dict::from_wire(w.items)?;
        let kinds = Dict::from_wire(w.kinds)?;
        if w.rows.len() > users.names.len() {
            return Err(format!(
                "{} rows for {} user slots",
                w.rows.len(),
                users.names.len()
            ));
        }
        let mut events = 0;
        let mut rows = Vec::with_capacity(w.rows.len());
        for (u, r) in w.rows.into_iter().enumerate() {
            if !r.events.is_empty() && users.names[u].is_empty() {
                return Err(format!("events for the removed user slot {u}"));
            }
            let mut run = Vec::new();
            decode_run(
                r.events,
                w.ts_base,
                items.names.len(),
                kinds.names.len(),
                &mut run,
            )
            .map_err(|e| format!("user slot {u}: {e}"))?;
            events += run.len();
            rows.push(Row {
                events: run,
                last_offset: r.last_offset,
            });
        }
        let mut store = UserStore {
            users,
            items,
            kinds,
            rows,
            events,
            changes: Changes::default(),
        };
        store.mark_checkpointed();
        Ok(store)
    }
}

/// Checkpoint form of a [`UserStore`] as read back; a store serialises itself in this
/// shape without copying (see its `Serialize`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoreWire {
    users: DictWire,
    items: DictWire,
    kinds: DictWire,
    /// Where every run's time chain starts: the earliest event time.
    ts_base: i64,
    rows: Vec<RowWire>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct RowWire {
    last_offset: u64,
    events: Vec<EvWire>,
}

/// Writes the [`StoreWire`] shape straight from the store: a checkpoint of many events
/// does not first build a second copy of them.
impl Serialize for UserStore {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        struct DictRef<'a>(&'a Dict);
        impl Serialize for DictRef<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut st = s.serialize_struct("DictWire", 2)?;
                st.serialize_field("names", &self.0.names)?;
                st.serialize_field("free", &self.0.free)?;
                st.end()
            }
        }
        struct EventsRef<'a>(&'a [Ev], i64);
        impl Serialize for EventsRef<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                let mut prev = self.1;
                for e in self.0 {
                    seq.serialize_element(&ev_wire(e, prev))?;
                    prev = e.ts_ms;
                }
                seq.end()
            }
        }
        struct RowRef<'a>(&'a Row, i64);
        impl Serialize for RowRef<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut st = s.serialize_struct("RowWire", 2)?;
                st.serialize_field("last_offset", &self.0.last_offset)?;
                st.serialize_field("events", &EventsRef(&self.0.events, self.1))?;
                st.end()
            }
        }
        struct RowsRef<'a>(&'a [Row], i64);
        impl Serialize for RowsRef<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for r in self.0 {
                    seq.serialize_element(&RowRef(r, self.1))?;
                }
                seq.end()
            }
        }
        let ts_base = self
            .rows
            .iter()
            .flat_map(|r| r.events.iter().map(|e| e.ts_ms))
            .min()
            .unwrap_or(0);
        let mut st = s.serialize_struct("StoreWire", 5)?;
        st.serialize_field("users", &DictRef(&self.users))?;
        st.serialize_field("items", &DictRef(&self.items))?;
        st.serialize_field("kinds", &DictRef(&self.kinds))?;
        st.serialize_field("ts_base", &ts_base)?;
        st.serialize_field("rows", &RowsRef(&self.rows, ts_base))?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// A straightforward model: every user's events as strings, updated per event the
    /// way the feature store always defined them.
    #[derive(Default, Clone)]
    struct Reference {
        users: BTreeMap<String, RefUser>,
    }

    #[derive(Default, Clone)]
    struct RefUser {
        touches: Vec<Touch>,
        interests: FxHashMap<String, Interest>,
        seen: BTreeSet<String>,
        disliked: BTreeSet<String>,
        kinds: BTreeMap<String, u64>,
        events: u64,
        last_ts_ms: i64,
        last_offset: u64,
    }

    impl Reference {
        #[allow(clippy::too_many_arguments)]
        fn apply(
            &mut self,
            rules: &Rules<'_>,
            user: &str,
            item: &str,
            kind: &str,
            value: Option<f32>,
            ts: i64,
            offset: u64,
        ) {
            let u = self.users.entry(user.to_string()).or_default();
            let w = rules.weights.weight(Some(kind), value.unwrap_or(f32::NAN));
            *u.kinds.entry(kind.to_string()).or_default() += 1;
            u.events += 1;
            u.last_ts_ms = u.last_ts_ms.max(ts);
            u.last_offset = offset;
            interest::record(&mut u.interests, item, w, ts);
            match w {
                None => {
                    u.disliked.insert(item.to_string());
                    u.touches.retain(|t| t.item != item);
                }
                Some(w) => {
                    u.disliked.remove(item);
                    if rules.seen_kinds.is_empty() || rules.seen_kinds.iter().any(|k| k == kind) {
                        u.seen.insert(item.to_string());
                    }
                    u.touches.push(Touch {
                        item: item.to_string(),
                        kind: kind.to_string(),
                        weight: w,
                        ts_ms: ts,
                    });
                }
            }
        }

        fn summary(&self, rules: &Rules<'_>, user: &str) -> Option<UserSummary> {
            let u = self.users.get(user)?;
            let mut history = u.touches.clone();
            history.sort_by_key(|t| t.ts_ms);
            let skip = history.len().saturating_sub(rules.history_len.max(1));
            let mut interests: Vec<(String, f32, i64)> = u
                .interests
                .iter()
                .map(|(i, x)| (i.clone(), x.weight, x.ts))
                .collect();
            interests.sort_by(|a, b| a.0.cmp(&b.0));
            Some(UserSummary {
                history: history[skip..].to_vec(),
                interests,
                seen: u.seen.iter().cloned().collect(),
                disliked: u.disliked.iter().cloned().collect(),
                kind_counts: u.kinds.iter().map(|(k, c)| (k.clone(), *c)).collect(),
                events: u.events,
                last_ts_ms: u.last_ts_ms,
                last_offset: u.last_offset,
            })
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Event {
            user: u8,
            item: u8,
            kind: u8,
            value: Option<f32>,
            ts: i64,
        },
        Erase(u8),
        /// A checkpoint: a delta unless `full` (or an erasure forces a full one).
        Checkpoint {
            full: bool,
        },
        /// A restart: the store rebuilt from its last full checkpoint and the deltas
        /// after it, then the operations since the last checkpoint replayed.
        Restart,
    }

    const KINDS: [&str; 4] = ["view", "click", "purchase", "dislike"];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u8..6, 0u8..8, 0u8..4, proptest::option::of(-1.0f32..5.0), 0i64..40)
                .prop_map(|(user, item, kind, value, ts)| Op::Event { user, item, kind, value, ts }),
            1 => (0u8..6).prop_map(Op::Erase),
            2 => proptest::bool::weighted(0.2).prop_map(|full| Op::Checkpoint { full }),
            1 => Just(Op::Restart),
        ]
    }

    fn weights(raw: bool) -> WeightConfig {
        let base = WeightConfig::default();
        WeightConfig {
            negative_kinds: ["dislike".to_string()].into_iter().collect(),
            transform: if raw {
                troupe_models::dataset::ValueTransform::Raw
            } else {
                base.transform
            },
            ..base
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn answers_like_the_reference_through_erasures_and_restarts(
            ops in proptest::collection::vec(op(), 0..80),
            raw in any::<bool>(),
            only_views in any::<bool>(),
            history_len in 1usize..6,
        ) {
            let w = weights(raw);
            let seen_kinds = if only_views { vec!["view".to_string()] } else { Vec::new() };
            let rules = Rules { weights: &w, seen_kinds: &seen_kinds, history_len };
            let mut store = UserStore::default();
            let mut reference = Reference::default();
            // What is durable: the last full checkpoint and the deltas after it, and the
            // operations since the last checkpoint (the journal a restart replays).
            let mut base: Option<Vec<u8>> = None;
            let mut deltas: Vec<Vec<u8>> = Vec::new();
            let mut since: Vec<(u64, Op)> = Vec::new();
            let replay = |store: &mut UserStore, offset: u64, op: &Op| match op {
                Op::Event { user, item, kind, value, ts } => {
                    let (u, i, k) = (format!("u{user}"), format!("i{item}"), KINDS[*kind as usize]);
                    store.apply(&u, &i, k, *value, *ts, offset);
                    true
                }
                Op::Erase(user) => store.erase(&format!("u{user}")),
                _ => true,
            };
            for (offset, op) in ops.into_iter().enumerate() {
                let offset = offset as u64 + 1;
                match op {
                    Op::Event { user, item, kind, value, ts } => {
                        let (u, i, k) = (format!("u{user}"), format!("i{item}"), KINDS[kind as usize]);
                        reference.apply(&rules, &u, &i, k, value, ts, offset);
                        replay(&mut store, offset, &op);
                        since.push((offset, op));
                    }
                    Op::Erase(user) => {
                        let known = reference.users.remove(&format!("u{user}")).is_some();
                        prop_assert_eq!(replay(&mut store, offset, &op), known);
                        since.push((offset, op));
                    }
                    Op::Checkpoint { full } => {
                        let changed: usize = since.iter().filter(|p| matches!(p.1, Op::Event { .. })).count();
                        if base.is_none() || full || store.needs_full_checkpoint() {
                            base = Some(crate::codec::encode(&store).unwrap());
                            deltas.clear();
                        } else {
                            let d = store.delta().unwrap();
                            prop_assert_eq!(d.events(), changed);
                            prop_assert_eq!(store.changed_events(), changed);
                            deltas.push(crate::codec::encode(&d).unwrap());
                        }
                        store.mark_checkpointed();
                        prop_assert_eq!(store.changed_events(), 0);
                        since.clear();
                    }
                    Op::Restart => {
                        store = match &base {
                            Some(b) => UserStore::from_wire(crate::codec::decode(b).unwrap()).unwrap(),
                            None => UserStore::default(),
                        };
                        for d in &deltas {
                            store.apply_delta(crate::codec::decode(d).unwrap()).unwrap();
                        }
                        for (o, op) in &since {
                            replay(&mut store, *o, op);
                        }
                    }
                }
            }
            let mut trainer_input = Vec::new();
            store.for_each_interest(&rules, |u, i, x| trainer_input.push((u.to_string(), i.to_string(), x.weight, x.ts)));
            trainer_input.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            let mut expected_input = Vec::new();
            for (u, r) in &reference.users {
                for (i, x) in &r.interests {
                    expected_input.push((u.clone(), i.clone(), x.weight, x.ts));
                }
            }
            expected_input.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            prop_assert_eq!(trainer_input, expected_input);
            let mut events = 0;
            for user in 0..6 {
                let u = format!("u{user}");
                let got = store.summary(&rules, &u);
                let want = reference.summary(&rules, &u);
                events += want.as_ref().map_or(0, |s| s.events as usize);
                prop_assert_eq!(store.contains(&u), want.is_some());
                prop_assert_eq!(store.last_offset(&u), want.as_ref().map(|s| s.last_offset));
                prop_assert_eq!(got, want);
            }
            prop_assert_eq!(store.events(), events);
            prop_assert_eq!(store.users(), reference.users.len());
        }

        #[test]
        fn wire_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(w) = crate::codec::decode::<StoreWire>(&bytes) {
                drop(UserStore::from_wire(w));
            }
            if let Ok(d) = crate::codec::decode::<DeltaWire>(&bytes) {
                let mut s = UserStore::default();
                s.apply("u", "i", "view", None, 1, 1);
                s.mark_checkpointed();
                drop(s.apply_delta(d));
            }
        }
    }

    #[test]
    fn an_erased_user_leaves_no_id_and_its_slot_is_reused() {
        let mut s = UserStore::default();
        s.apply("alice", "i1", "view", None, 1, 1);
        s.apply("bob", "i2", "view", None, 2, 2);
        assert!(s.erase("alice"));
        assert!(!s.erase("alice"));
        let bytes = crate::codec::encode(&s).unwrap();
        assert!(!bytes.windows(5).any(|w| w == b"alice"));
        s.apply("carol", "i1", "view", None, 3, 3);
        assert_eq!(s.users(), 2);
        assert_eq!(s.footprint().users, 2);
        assert_eq!(s.events(), 2);
        assert_eq!(s.users.get("carol"), Some(0));
    }

    #[test]
    fn a_delta_holds_only_what_changed_and_refuses_a_store_it_does_not_continue() {
        let mut s = UserStore::default();
        for u in 0..1000 {
            s.apply(
                &format!("user{u}"),
                "i1",
                "view",
                None,
                1_700_000_000_000,
                u + 1,
            );
        }
        s.mark_checkpointed();
        let base = crate::codec::encode(&s).unwrap();
        s.apply("user7", "i2", "click", Some(2.0), 1_700_000_000_500, 1001);
        s.apply("newcomer", "i1", "view", None, 1_700_000_000_900, 1002);
        let d = s.delta().unwrap();
        assert_eq!((d.events(), d.rows.len(), d.new_users.len()), (2, 2, 1));
        assert_eq!(d.rows[0].slot_gap, 7);
        let bytes = crate::codec::encode(&d).unwrap();
        // A delta's size follows the change, not the 1,000 users untouched.
        assert!(
            bytes.len() < 80 && bytes.len() * 100 < base.len(),
            "{} bytes",
            bytes.len()
        );
        let mut back = UserStore::from_wire(crate::codec::decode(&base).unwrap()).unwrap();
        back.apply_delta(d.clone()).unwrap();
        assert_eq!(
            crate::codec::encode(&back).unwrap(),
            crate::codec::encode(&s).unwrap()
        );
        // Replaying it twice, or on a store it does not follow, is refused.
        assert!(back.apply_delta(d.clone()).is_err());
        assert!(UserStore::default().apply_delta(d).is_err());
        // An erasure cannot be a delta.
        s.mark_checkpointed();
        s.erase("user3");
        assert!(s.needs_full_checkpoint() && s.delta().is_none());
    }

    proptest! {
        #[test]
        fn time_and_value_codes_round_trip(prev in any::<i64>(), ts in any::<i64>(), bits in any::<u32>(), n in 0u32..100) {
            prop_assert_eq!(ts_decode(prev, ts_code(ts as i128 - prev as i128)), Ok(ts));
            for v in [f32::from_bits(bits), n as f32, -(n as f32)] {
                let back = value_decode(value_code(v)).unwrap();
                prop_assert!(back.to_bits() == v.to_bits() || (v.is_nan() && back.is_nan()));
            }
        }

        #[test]
        fn bad_codes_are_errors(prev in any::<i64>(), code in any::<u128>(), v in any::<u64>()) {
            drop(ts_decode(prev, code));
            drop(value_decode(v));
        }
    }

    #[test]
    fn small_values_and_whole_seconds_encode_in_a_byte() {
        let one = crate::codec::encode(&value_code(1.0)).unwrap();
        let none = crate::codec::encode(&value_code(f32::NAN)).unwrap();
        let minute = crate::codec::encode(&ts_code(60_000)).unwrap();
        assert_eq!((one.len(), none.len(), minute.len()), (1, 1, 1));
    }

    #[test]
    fn an_event_costs_eighteen_bytes_in_its_run() {
        assert_eq!(std::mem::size_of::<Ev>(), 18);
    }
}
