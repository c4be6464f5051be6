//! The per-user branch pipeline: how each branch turns one user's interests into its
//! candidate list. The serving ranker (troupe-actors) calls these functions per request;
//! `troupe eval` ([`crate::evaluate`]) calls the same per-user steps and only batches the
//! ALS and content searches over many users, so what is evaluated is what is served.
//!
//! Everything is by row index of the model at hand (ALS item factors, item-item rows,
//! content rows). `excluded` says which rows never come back (seen items, hidden ones,
//! other categories). The nearest-neighbour search is the caller's: an exact scan
//! offline; an exact scan or an HNSW graph when serving.

use ndarray::ArrayView2;

use crate::als::FoldIn;
use crate::ease::EaseModel;
use crate::topk::Scored;

pub use troupe_proto::api::Branch;

/// Number of blended branches.
pub const BRANCHES: usize = Branch::ALL.len();

/// A user's interests as `(row, weight)` pairs of a model that names its rows by id
/// (`row`); items the model does not know are left out.
pub fn rows_of<'a>(
    interests: impl IntoIterator<Item = (&'a str, f32)>,
    row: impl Fn(&str) -> Option<u32>,
) -> Vec<(u32, f32)> {
    interests
        .into_iter()
        .filter_map(|(id, w)| row(id).map(|r| (r, w)))
        .collect()
}

/// ALS: the user's vector folded in from every interest against the item factors;
/// `None` when the fold-in gives the zero vector (no known item: no candidates). The
/// caller searches it: the ranker one user at a time (an exact scan or a graph), the
/// evaluation many users at once (one GEMM per block).
pub fn als_vector(
    fold: &FoldIn,
    factors: ArrayView2<f32>,
    interests: &[(u32, f32)],
) -> Option<Vec<f32>> {
    let v = fold.solve(factors, interests);
    (!v.iter().all(|x| *x == 0.0)).then_some(v)
}

/// Content: the user's profile (a weighted mean of the rows they touched, built by the
/// caller's content rows with [`crate::content::user_profile_with`]) `search`ed; nothing
/// without a profile. The evaluation builds the same profiles and searches them at once.
pub fn content(
    profile: Option<Vec<f32>>,
    search: impl FnOnce(&[f32]) -> Vec<Scored>,
) -> Vec<Scored> {
    match profile {
        Some(p) => search(&p),
        None => Vec::new(),
    }
}

/// Item-item: the user's items times the item-item rows, the best `n` by score. No
/// fold-in and no model state per user, so a new event changes the next answer at once.
pub fn item_item(
    model: &EaseModel,
    interests: &[(u32, f32)],
    n: usize,
    excluded: impl Fn(u32) -> bool,
) -> Vec<Scored> {
    if interests.is_empty() {
        return Vec::new();
    }
    model.top_k(interests, n, excluded)
}

/// Popularity: the first `n` of a ranked list (shared between users) that the user may
/// see.
pub fn popularity<T: Clone>(ranked: &[T], n: usize, excluded: impl Fn(&T) -> bool) -> Vec<T> {
    ranked
        .iter()
        .filter(|x| !excluded(x))
        .take(n)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::Csr;

    #[test]
    fn item_item_follows_the_users_items_and_skips_the_excluded() {
        // 0 -> 1 strongly, 0 -> 2 weakly; 3 -> 2 strongly.
        let rows = Csr::from_triples(4, 4, &[(0, 1, 0.9), (0, 2, 0.1), (3, 2, 1.0)]);
        let m = EaseModel {
            rows,
            fitted_items: 4,
            ..Default::default()
        };
        let top = item_item(&m, &[(0, 1.0)], 10, |_| false);
        assert_eq!(top.iter().map(|s| s.item).collect::<Vec<_>>(), vec![1, 2]);
        // A new interest changes the order at once: 2 scores 0.1 + 1.0.
        let top = item_item(&m, &[(0, 1.0), (3, 1.0)], 10, |_| false);
        assert_eq!(top.iter().map(|s| s.item).collect::<Vec<_>>(), vec![2, 1]);
        assert!((top[0].score - 1.1).abs() < 1e-6);
        let top = item_item(&m, &[(0, 1.0)], 10, |i| i == 1);
        assert_eq!(top.iter().map(|s| s.item).collect::<Vec<_>>(), vec![2]);
        assert!(item_item(&m, &[], 10, |_| false).is_empty());
    }

    #[test]
    fn unknown_ids_are_left_out_and_popularity_skips_the_excluded() {
        let row = |id: &str| id.strip_prefix('i').and_then(|x| x.parse().ok());
        assert_eq!(rows_of([("i3", 1.0), ("zz", 2.0)], row), vec![(3, 1.0)]);
        assert_eq!(popularity(&[5, 6, 7, 8], 2, |x| *x == 6), vec![5, 7]);
    }

    #[test]
    fn content_without_a_profile_has_no_candidates() {
        assert!(content(None, |_| vec![Scored {
            item: 0,
            score: 1.0
        }])
        .is_empty());
        assert_eq!(
            content(Some(vec![1.0]), |q| vec![Scored {
                item: 1,
                score: q[0]
            }])
            .len(),
            1
        );
    }
}
