//! Popularity and trending: exponentially decayed interaction counts per item, global and
//! per category, on the events' own clock (never the wall clock).

use rustc_hash::FxHashMap;

use crate::topk::{Scored, TopK};

/// Exponentially decayed sums, one per slot, with a moving anchor so values never
/// overflow however long the stream runs. Late events (older than the anchor) are fine.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DecayedCounter {
    half_life: f64,
    anchor: i64,
    values: Vec<f64>,
}

impl DecayedCounter {
    /// `half_life_seconds <= 0` means plain (undecayed) sums.
    pub fn new(slots: usize, half_life_seconds: f64) -> Self {
        DecayedCounter {
            half_life: half_life_seconds,
            anchor: 0,
            values: vec![0.0; slots],
        }
    }

    fn factor(&self, from: i64, to: i64) -> f64 {
        if self.half_life <= 0.0 {
            1.0
        } else {
            ((to - from) as f64 / self.half_life).exp2()
        }
    }

    /// Grows the slot count to at least `slots`.
    pub fn ensure(&mut self, slots: usize) {
        if self.values.len() < slots {
            self.values.resize(slots, 0.0);
        }
    }

    /// Adds `weight` at time `ts` to `slot`.
    pub fn add(&mut self, slot: usize, weight: f64, ts: i64) {
        self.ensure(slot + 1);
        if self.half_life > 0.0 && (ts - self.anchor) as f64 / self.half_life > 512.0 {
            // Re-anchor at ts: scale everything down so exponents stay small.
            let f = self.factor(ts, self.anchor);
            self.values.iter_mut().for_each(|v| *v *= f);
            self.anchor = ts;
        }
        self.values[slot] += weight * self.factor(self.anchor, ts);
    }

    /// The decayed value of `slot` as seen at time `now`.
    pub fn value(&self, slot: usize, now: i64) -> f64 {
        self.values.get(slot).copied().unwrap_or(0.0) * self.factor(now, self.anchor)
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when there are no slots.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Raw values relative to the anchor; the ranking at any `now` is the ranking of these.
    pub fn relative_values(&self) -> &[f64] {
        &self.values
    }

    /// The time the raw values are relative to (it moves when values would grow too big).
    pub fn anchor(&self) -> i64 {
        self.anchor
    }

    /// Sets a slot's raw value (relative to the current anchor), growing the slots.
    pub fn set_relative(&mut self, slot: usize, value: f64) {
        self.ensure(slot + 1);
        self.values[slot] = value;
    }
}

/// Popularity model: decayed counts per item plus an index of items per category.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Popularity {
    counts: DecayedCounter,
    categories: FxHashMap<String, Vec<u32>>,
    /// The categories each item is listed under (so a change can unlist it).
    of_item: FxHashMap<u32, Vec<String>>,
}

impl Popularity {
    pub fn new(items: usize, half_life_seconds: f64) -> Self {
        Popularity {
            counts: DecayedCounter::new(items, half_life_seconds),
            categories: Default::default(),
            of_item: Default::default(),
        }
    }

    /// Records an interaction.
    pub fn add(&mut self, item: u32, weight: f64, ts: i64) {
        self.counts.add(item as usize, weight, ts);
    }

    /// Sets `item`'s categories, replacing what it had (an empty list unlists it).
    pub fn set_categories(&mut self, item: u32, categories: &[String]) {
        if let Some(old) = self.of_item.remove(&item) {
            for c in old.iter().filter(|c| !categories.contains(c)) {
                if let Some(v) = self.categories.get_mut(c) {
                    v.retain(|&i| i != item);
                    if v.is_empty() {
                        self.categories.remove(c);
                    }
                }
            }
        }
        let mut listed = Vec::with_capacity(categories.len());
        for c in categories {
            if listed.contains(c) {
                continue;
            }
            let v = self.categories.entry(c.clone()).or_default();
            if !v.contains(&item) {
                v.push(item);
            }
            listed.push(c.clone());
        }
        if !listed.is_empty() {
            self.of_item.insert(item, listed);
        }
        self.counts.ensure(item as usize + 1);
    }

    /// The anchor of the decayed counts ([`DecayedCounter::anchor`]).
    pub fn anchor(&self) -> i64 {
        self.counts.anchor()
    }

    /// An item's raw count relative to the anchor, and a setter for restoring it (both
    /// for incremental checkpoints: the raw values of the items that changed).
    pub fn relative(&self, item: u32) -> f64 {
        self.counts
            .relative_values()
            .get(item as usize)
            .copied()
            .unwrap_or(0.0)
    }

    pub fn set_relative(&mut self, item: u32, value: f64) {
        self.counts.set_relative(item as usize, value);
    }

    /// The categories `item` is listed under.
    pub fn categories_of(&self, item: u32) -> &[String] {
        self.of_item.get(&item).map_or(&[], Vec::as_slice)
    }

    /// Decayed score of one item at `now`.
    pub fn score(&self, item: u32, now: i64) -> f64 {
        self.counts.value(item as usize, now)
    }

    /// The `k` most popular items, globally or within `category`. Decay shrinks every
    /// item by the same factor, so the ranking is the same at any time after the events;
    /// scores are relative to the most popular item (1.0), which keeps them finite and
    /// distinct however far the clock is from the events (absolute decayed counts of
    /// events years old underflow an `f32`).
    pub fn top_k(
        &self,
        k: usize,
        category: Option<&str>,
        excluded: impl Fn(u32) -> bool,
    ) -> Vec<Scored> {
        let mut top = TopK::new(k);
        let rel = self.counts.relative_values();
        let max = rel.iter().copied().fold(0.0f64, f64::max);
        if max <= 0.0 || !max.is_finite() {
            return Vec::new();
        }
        let mut offer = |i: u32| {
            if let Some(&v) = rel.get(i as usize) {
                if v > 0.0 && !excluded(i) {
                    top.push(i, (v / max) as f32);
                }
            }
        };
        match category {
            Some(c) => self
                .categories
                .get(c)
                .into_iter()
                .flatten()
                .for_each(|&i| offer(i)),
            None => (0..rel.len() as u32).for_each(offer),
        }
        top.into_sorted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decays_on_the_data_clock_and_handles_late_events() {
        let mut p = Popularity::new(3, 10.0);
        p.add(0, 1.0, 0);
        p.add(1, 1.0, 10);
        p.add(1, 1.0, 5); // late event
        assert!((p.score(0, 10) - 0.5).abs() < 1e-9);
        assert!((p.score(1, 10) - (1.0 + 2f64.powf(-0.5))).abs() < 1e-9);
        let top = p.top_k(5, None, |_| false);
        assert_eq!(top.iter().map(|s| s.item).collect::<Vec<_>>(), vec![1, 0]);
        // Read long after the events (a wall clock years past a data set), the ranking
        // and distinct scores stay.
        let late = p.top_k(5, None, |_| false);
        assert_eq!(late[0].score, 1.0);
        assert!(late[1].score > 0.0 && late[1].score < 1.0);
        // Far-future events re-anchor without overflow.
        p.add(2, 1.0, 1_000_000);
        assert!((p.score(2, 1_000_000) - 1.0).abs() < 1e-9);
        assert!(p.score(0, 1_000_000).is_finite());
    }

    #[test]
    fn per_category_and_exclusions() {
        let mut p = Popularity::new(4, 0.0);
        for (i, n) in [(0u32, 5), (1, 3), (2, 9), (3, 1)] {
            for _ in 0..n {
                p.add(i, 1.0, 0);
            }
        }
        p.set_categories(0, &["a".into()]);
        p.set_categories(3, &["a".into()]);
        p.set_categories(2, &["b".into()]);
        let a: Vec<u32> = p
            .top_k(5, Some("a"), |_| false)
            .iter()
            .map(|s| s.item)
            .collect();
        assert_eq!(a, vec![0, 3]);
        let g: Vec<u32> = p
            .top_k(2, None, |i| i == 2)
            .iter()
            .map(|s| s.item)
            .collect();
        assert_eq!(g, vec![0, 1]);
        assert!(p.top_k(2, Some("zzz"), |_| false).is_empty());
        // A change of categories unlists the item from the old ones.
        p.set_categories(0, &["b".into()]);
        let a: Vec<u32> = p
            .top_k(5, Some("a"), |_| false)
            .iter()
            .map(|s| s.item)
            .collect();
        assert_eq!(a, vec![3]);
        let b: Vec<u32> = p
            .top_k(5, Some("b"), |_| false)
            .iter()
            .map(|s| s.item)
            .collect();
        assert_eq!(b, vec![2, 0]);
        p.set_categories(3, &[]);
        assert!(p.top_k(5, Some("a"), |_| false).is_empty());
    }
}
