//! A trained, in-memory recommender: the three branches plus the blend, answering
//! "top-k for this user" from the user's interaction history. The evaluation uses the
//! same pieces in bulk; the serving actors wrap this per request.

use ndarray::{Array2, ArrayView2};

use crate::als::{AlsModel, FoldIn};
use crate::blend::{self, Blended, BranchList, Filters};
use crate::content;
use crate::evaluate::BlendSettings;
use crate::popularity::Popularity;
use crate::topk::{self, Scored};

const DAY: f64 = 86_400.0;

/// Everything needed to answer a request.
pub struct Recommender {
    pub als: AlsModel,
    pub fold_in: FoldIn,
    pub embeddings: Array2<f32>,
    pub popularity: Popularity,
    pub blend: BlendSettings,
    pub content_half_life_days: f64,
}

/// A recommendation with the per-branch lists it was blended from.
pub struct Answer {
    pub items: Vec<Blended>,
    /// Best-first candidates of `als`, `content`, `popularity`.
    pub branches: [Vec<Scored>; 3],
}

impl Recommender {
    /// Builds from trained parts (precomputes the fold-in Gram matrix).
    pub fn new(
        als: AlsModel,
        embeddings: Array2<f32>,
        popularity: Popularity,
        blend: BlendSettings,
        content_half_life_days: f64,
    ) -> Self {
        let fold_in = FoldIn::new(als.item_factors.view(), &als.params);
        Recommender {
            als,
            fold_in,
            embeddings,
            popularity,
            blend,
            content_half_life_days,
        }
    }

    /// The user's ALS vector folded in from their history `(item, weight, ts)`.
    pub fn user_vector(&self, history: &[(u32, f32, i64)]) -> Vec<f32> {
        let inter: Vec<(u32, f32)> = history.iter().map(|&(i, w, _)| (i, w)).collect();
        self.fold_in.solve(self.als.item_factors.view(), &inter)
    }

    /// Top-k for a user with the given interests `(item, weight, latest ts)` (see
    /// [`crate::interest`]), after `filters`.
    pub fn recommend(
        &self,
        history: &[(u32, f32, i64)],
        k: usize,
        filters: &Filters<'_>,
    ) -> Answer {
        let n = self.blend.candidates.max(k);
        let mut scratch = Vec::new();
        let allowed = |i: u32| filters.allows(i);
        let user = self.user_vector(history);
        let als = if user.iter().all(|v| *v == 0.0) {
            Vec::new()
        } else {
            topk::top_k_dense(
                self.als.item_factors.view(),
                &user,
                n,
                |i| !allowed(i),
                &mut scratch,
            )
        };
        let content = match content::user_profile(
            self.embeddings.view(),
            history,
            self.content_half_life_days * DAY,
        ) {
            Some(p) => {
                content::score_profile(self.embeddings.view(), &p, n, |i| !allowed(i), &mut scratch)
            }
            None => Vec::new(),
        };
        let popularity = self.popularity.top_k(n, None, |i| !allowed(i));
        let lists = [
            BranchList {
                weight: self.blend.weights[0],
                items: &als,
            },
            BranchList {
                weight: self.blend.weights[1],
                items: &content,
            },
            BranchList {
                weight: self.blend.weights[2],
                items: &popularity,
            },
        ];
        let items = blend::blend(&lists, self.blend.normalization, k, allowed);
        Answer {
            items,
            branches: [als, content, popularity],
        }
    }

    /// Items most similar to `item` by content embedding.
    pub fn similar_items(&self, item: u32, k: usize) -> Vec<Scored> {
        let e: ArrayView2<f32> = self.embeddings.view();
        if item as usize >= e.nrows() {
            return Vec::new();
        }
        let q = e.row(item as usize).to_vec();
        let mut scratch = Vec::new();
        topk::top_k_dense(e, &q, k, |i| i == item, &mut scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::als::{fit, AlsParams};
    use crate::blend::Normalization;
    use crate::sparse::Csr;
    use ndarray::Array2;

    #[test]
    fn answers_respect_filters_and_explain_shares() {
        // Two groups of items; user 0 likes group A (even items).
        let triples: Vec<(u32, u32, f32)> = (0..40u32)
            .flat_map(|u| {
                (0..20u32)
                    .filter(move |i| i % 2 == u % 2)
                    .map(move |i| (u, i, 1.0))
            })
            .collect();
        let m = Csr::from_triples(40, 20, &triples);
        let als = fit(
            &m,
            &AlsParams {
                factors: 4,
                iterations: 5,
                ..Default::default()
            },
            false,
            |_, _| {},
        )
        .unwrap();
        let emb = Array2::from_shape_fn(
            (20, 2),
            |(i, j)| if (i % 2 == 0) == (j == 0) { 1.0 } else { 0.0 },
        );
        let mut pop = Popularity::new(20, 0.0);
        for &(_, i, w) in &triples {
            pop.add(i, w as f64, 0);
        }
        let blend = BlendSettings {
            weights: [0.6, 0.2, 0.2],
            normalization: Normalization::Rrf { k0: 60.0 },
            candidates: 10,
        };
        let rec = Recommender::new(als, emb, pop, blend, 0.0);
        let history = vec![(0u32, 1.0f32, 0i64), (2, 1.0, 0), (4, 1.0, 0)];
        let seen = |i: u32| history.iter().any(|h| h.0 == i);
        let hidden = |i: u32| i == 6;
        let f = Filters {
            seen: &seen,
            hidden: &hidden,
            in_category: None,
            exclude: &[8],
        };
        let ans = rec.recommend(&history, 5, &f);
        assert_eq!(ans.items.len(), 5);
        for b in &ans.items {
            assert!(
                ![0, 2, 4, 6, 8].contains(&b.item),
                "filtered item {} returned",
                b.item
            );
            let s: f32 = b.shares().iter().sum();
            assert!((s - 1.0).abs() < 1e-5);
        }
        // The user's taste (even items) dominates the top of the list.
        assert!(
            ans.items.iter().take(3).all(|b| b.item % 2 == 0),
            "{:?}",
            ans.items
        );
        // A user with no history still gets popularity (cold start).
        let cold = rec.recommend(&[], 3, &f);
        assert_eq!(cold.items.len(), 3);
        assert!(cold.branches[0].is_empty() && cold.branches[1].is_empty());
        let sim = rec.similar_items(0, 3);
        assert!(sim.iter().all(|s| s.item % 2 == 0 && s.item != 0));
    }
}
