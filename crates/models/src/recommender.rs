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

    /// Top-k for a user with the given history at time `now`, after `filters`.
    pub fn recommend(
        &self,
        history: &[(u32, f32, i64)],
        now: i64,
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
            now,
            self.content_half_life_days * DAY,
        ) {
            Some(p) => {
                content::score_profile(self.embeddings.view(), &p, n, |i| !allowed(i), &mut scratch)
            }
            None => Vec::new(),
        };
        let popularity = self.popularity.top_k(n, now, None, |i| !allowed(i));
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
