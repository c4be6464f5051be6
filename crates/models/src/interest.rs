//! A user's interactions as the personal branches read them, in one definition shared by
//! the serving path and `troupe eval`: positive weights summed per item, with the time of
//! the item's latest positive; a negative signal (a kind or value whose weight is `None`)
//! cancels what the item had gathered. ALS (training and fold-in) and the content profile
//! read this aggregate, never a capped display history.

use std::hash::Hash;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// What one user gathered on one item.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Interest {
    /// Sum of the positive weights.
    pub weight: f32,
    /// Time of the latest positive (the caller's unit).
    pub ts: i64,
}

/// Applies one interaction of weight `weight` (`None`: negative) at `ts` to a user's
/// interests. Zero and non-finite weights change nothing.
pub fn record<K, Q>(interests: &mut FxHashMap<K, Interest>, item: &Q, weight: Option<f32>, ts: i64)
where
    K: Eq + Hash + std::borrow::Borrow<Q>,
    Q: Eq + Hash + ToOwned<Owned = K> + ?Sized,
{
    match weight {
        None => {
            interests.remove(item);
        }
        Some(w) if w > 0.0 && w.is_finite() => match interests.get_mut(item) {
            Some(i) => {
                i.weight += w;
                i.ts = i.ts.max(ts);
            }
            None => {
                interests.insert(item.to_owned(), Interest { weight: w, ts });
            }
        },
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positives_sum_negatives_cancel() {
        let mut m: FxHashMap<String, Interest> = FxHashMap::default();
        record(&mut m, "a", Some(1.0), 10);
        record(&mut m, "a", Some(2.0), 5);
        assert_eq!(
            m["a"],
            Interest {
                weight: 3.0,
                ts: 10
            }
        );
        record(&mut m, "b", Some(0.0), 7);
        record(&mut m, "b", Some(f32::NAN), 7);
        assert!(!m.contains_key("b"));
        record(&mut m, "a", None, 11);
        assert!(m.is_empty());
        let mut n: FxHashMap<u32, Interest> = FxHashMap::default();
        record(&mut n, &3, Some(1.5), 1);
        assert_eq!(n[&3].weight, 1.5);
    }
}
