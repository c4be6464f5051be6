//! Offline evaluation of every branch and of the blended ensemble.
//!
//! [`Evaluation::run`] fits popularity, ALS and the content model on the train rows,
//! ranks the top-K for every user with at least one test row (train items removed), and
//! reports the protocol's metrics per branch and for the ensemble. With tuning on, it first
//! carves a validation split out of train, searches hyper-parameters and blend weights on
//! it, then refits on the whole of train: test rows are never looked at before the final
//! scoring. All time decays use the data's clock (the latest train timestamp).

use std::time::Instant;

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use rustc_hash::FxHashSet;
use serde::Serialize;

use crate::als::{self, AlsParams, RegScaling};
use crate::blend::{self, BranchList, Normalization};
use crate::content;
use crate::dataset::{split_per_user, Interaction, SplitKind, WeightConfig};
use crate::error::{ModelError, Result};
use crate::interest;
use crate::metrics::{MetricsAccumulator, RankMetrics};
use crate::pipeline::{self, Branch};
use crate::popularity::Popularity;
use crate::sparse::Csr;
use crate::topk::{self, Scored};

const DAY: f64 = 86_400.0;

/// Number of blended branches (weights and shares are in [`Branch`] order).
pub const NB: usize = pipeline::BRANCHES;

/// Blend settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BlendSettings {
    /// Weights of `als`, `content`, `popularity`, `item_item`.
    pub weights: [f32; NB],
    pub normalization: Normalization,
    /// Candidates each branch proposes to the blend.
    pub candidates: usize,
}

impl Default for BlendSettings {
    /// Chosen on validation splits carved out of the MovieLens and Online Retail train
    /// parts, never on test (`bench/blend-defaults.sh`, `docs/adr/003-default-blend.md`).
    fn default() -> Self {
        BlendSettings {
            weights: [0.3, 0.2, 0.05, 0.45],
            normalization: Normalization::ZScore,
            candidates: 100,
        }
    }
}

/// Everything an evaluation run needs besides the data.
#[derive(Debug, Clone, Serialize)]
pub struct EvalConfig {
    pub k: usize,
    pub als: AlsParams,
    pub weights: WeightConfig,
    pub blend: BlendSettings,
    /// Half-life of the popularity decay in days (<= 0: no decay).
    pub popularity_half_life_days: f64,
    /// Half-life of the content profile's decay in days (<= 0: no decay).
    pub content_half_life_days: f64,
    pub tune: bool,
    /// With `tune`: keep the ALS hyper-parameters as given and search only decays and the
    /// blend (how the default blend settings were chosen).
    pub tune_blend_only: bool,
    /// Fraction of each user's train rows used for validation when tuning.
    pub validation_fraction: f64,
    /// How the validation split is carved (follows the outer split).
    pub validation_split: SplitKind,
    pub seed: u64,
    /// When > 0: also NDCG@k for k = 1..=curve_to per model (`details.ndcg_curve`).
    pub curve_to: usize,
    /// The item-item branch (EASE): reported as its own model, not yet blended.
    pub ease: crate::ease::EaseParams,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            k: 10,
            als: AlsParams::default(),
            weights: WeightConfig::default(),
            blend: BlendSettings::default(),
            popularity_half_life_days: 0.0,
            content_half_life_days: 0.0,
            tune: false,
            tune_blend_only: false,
            validation_fraction: 0.2,
            validation_split: SplitKind::Random,
            seed: 42,
            curve_to: 0,
            ease: Default::default(),
        }
    }
}

/// One model's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub precision: f64,
    pub recall: f64,
    pub map: f64,
    pub ndcg: f64,
    pub coverage: f64,
    pub fit_seconds: f64,
}

/// The models: the three blended branches, the item-item branch (EASE, evaluated on its
/// own; not in the blend yet) and the ensemble.
#[derive(Debug, Clone, Serialize)]
pub struct Models {
    pub popularity: ModelReport,
    pub als: ModelReport,
    pub content: ModelReport,
    pub item_item: ModelReport,
    pub ensemble: ModelReport,
}

/// The full report (`troupe eval --json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub schema: u32,
    pub k: usize,
    pub users: usize,
    pub encoder: String,
    pub models: Models,
    pub details: serde_json::Value,
}

/// Inputs of one evaluation.
pub struct Evaluation<'a> {
    /// [`als::row_key`] of every user id, by user index.
    pub user_keys: &'a [u64],
    /// [`als::row_key`] of every item id, by item index.
    pub item_keys: &'a [u64],
    pub train: &'a [Interaction],
    pub test: &'a [Interaction],
    /// Kind name of an interaction's kind index.
    pub kind_name: &'a (dyn Fn(u16) -> Option<String> + Sync),
    /// Unit-length item embeddings (zero rows for items without text).
    pub embeddings: ArrayView2<'a, f32>,
    pub encoder_name: String,
    /// Seconds spent embedding the catalogue (part of the content model's fit time).
    pub embed_seconds: f64,
    /// Told (phase, done, total) as long steps advance (the tuning grids), for a
    /// progress display.
    pub progress: &'a (dyn Fn(&str, u64, u64) + Sync),
}

/// Per-user training view: weighted positives and filtered items.
struct UserData {
    /// (item, weight, ts) of positive rows (popularity counts every row).
    positives: Vec<Vec<(u32, f32, i64)>>,
    /// (item, summed weight, latest ts) per item, as [`crate::interest`] defines them:
    /// what ALS and the content profile read, served and evaluated alike.
    interests: Vec<Vec<(u32, f32, i64)>>,
    /// Sorted items to exclude from this user's lists (all train rows, negatives included).
    seen: Vec<Vec<u32>>,
    now: i64,
}

impl UserData {
    /// User `u`'s (item, weight) interests, as ALS fold-in and the item-item branch read them.
    fn weights(&self, u: u32) -> Vec<(u32, f32)> {
        self.interests[u as usize]
            .iter()
            .map(|&(i, w, _)| (i, w))
            .collect()
    }
}

fn user_data(
    rows: &[Interaction],
    n_users: usize,
    w: &WeightConfig,
    kind_name: &(dyn Fn(u16) -> Option<String> + Sync),
) -> UserData {
    let mut positives = vec![Vec::new(); n_users];
    let mut interests: Vec<rustc_hash::FxHashMap<u32, interest::Interest>> =
        vec![Default::default(); n_users];
    let mut seen: Vec<Vec<u32>> = vec![Vec::new(); n_users];
    let mut now = i64::MIN;
    for r in rows {
        now = now.max(r.ts);
        seen[r.user as usize].push(r.item);
        let weight = w.weight(kind_name(r.kind).as_deref(), r.value);
        interest::record(&mut interests[r.user as usize], &r.item, weight, r.ts);
        if let Some(wt) = weight {
            if wt > 0.0 {
                positives[r.user as usize].push((r.item, wt, r.ts));
            }
        }
    }
    seen.par_iter_mut().for_each(|s| {
        s.sort_unstable();
        s.dedup();
    });
    let interests = interests
        .into_par_iter()
        .map(|m| {
            let mut v: Vec<(u32, f32, i64)> =
                m.into_iter().map(|(i, x)| (i, x.weight, x.ts)).collect();
            v.sort_unstable_by_key(|x| x.0);
            v
        })
        .collect();
    UserData {
        positives,
        interests,
        seen,
        now: if now == i64::MIN { 0 } else { now },
    }
}

fn weight_matrix(ud: &UserData, n_items: usize) -> Csr {
    let triples: Vec<(u32, u32, f32)> = ud
        .interests
        .iter()
        .enumerate()
        .flat_map(|(u, v)| v.iter().map(move |&(i, w, _)| (u as u32, i, w)))
        .collect();
    Csr::from_triples(ud.interests.len(), n_items, &triples)
}

/// Relevant test items per evaluated user (positives only), in user order.
fn relevant(
    rows: &[Interaction],
    n_users: usize,
    w: &WeightConfig,
    kind_name: &(dyn Fn(u16) -> Option<String> + Sync),
) -> Vec<(u32, FxHashSet<u32>)> {
    let mut sets: Vec<FxHashSet<u32>> = vec![FxHashSet::default(); n_users];
    for r in rows {
        if w.weight(kind_name(r.kind).as_deref(), r.value)
            .is_some_and(|x| x > 0.0)
        {
            sets[r.user as usize].insert(r.item);
        }
    }
    sets.into_iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(u, s)| (u as u32, s))
        .collect()
}

/// Candidate lists per evaluated user and branch.
struct Candidates {
    /// [user][branch] -> best-first list, seen items removed.
    lists: Vec<[Vec<Scored>; NB]>,
}

impl Candidates {
    /// Per-user lists from one list per branch (each in user order).
    fn zip(
        als: Vec<Vec<Scored>>,
        content: Vec<Vec<Scored>>,
        popularity: Vec<Vec<Scored>>,
        item_item: Vec<Vec<Scored>>,
    ) -> Candidates {
        Candidates {
            lists: als
                .into_iter()
                .zip(content)
                .zip(popularity)
                .zip(item_item)
                .map(|(((a, c), p), i)| [a, c, p, i])
                .collect(),
        }
    }
}

/// `{branch name: value}` in blend order.
fn by_branch(v: [f64; NB]) -> serde_json::Value {
    Branch::ALL
        .iter()
        .zip(v)
        .map(|(b, x)| (b.name().to_string(), serde_json::json!(x)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn is_zero(v: ndarray::ArrayView1<f32>) -> bool {
    v.iter().all(|x| *x == 0.0)
}

/// ALS candidates per user. With `fold_in`, each user's vector is solved from their
/// interests against the item factors, as the serving path does
/// ([`pipeline::als_vector`]); otherwise the trained user factors are used (the ALS
/// benchmark, comparable with other ALS libraries). Every user's vector is then searched
/// at once (GEMM blocks); a user without a vector gets no candidates.
fn als_candidates(
    model: &als::AlsModel,
    users: &[u32],
    ud: &UserData,
    n: usize,
    fold_in: bool,
) -> Vec<Vec<Scored>> {
    let q = if fold_in {
        let fold = als::FoldIn::new(model.item_factors.view(), &model.params);
        let rows: Vec<Option<Vec<f32>>> = users
            .par_iter()
            .map(|&u| pipeline::als_vector(&fold, model.item_factors.view(), &ud.weights(u)))
            .collect();
        let mut q = Array2::<f32>::zeros((users.len(), model.item_factors.ncols()));
        for (r, v) in rows.iter().enumerate() {
            if let Some(v) = v.as_ref().filter(|v| v.len() == q.ncols()) {
                q.row_mut(r)
                    .assign(&ndarray::ArrayView1::from(v.as_slice()));
            }
        }
        q
    } else {
        model.user_factors.select(
            ndarray::Axis(0),
            &users.iter().map(|&u| u as usize).collect::<Vec<_>>(),
        )
    };
    let lists = topk::top_k_batch(model.item_factors.view(), q.view(), n, |r, i| {
        ud.seen[users[r] as usize].binary_search(&i).is_ok()
    });
    lists
        .into_iter()
        .enumerate()
        .map(|(r, l)| if is_zero(q.row(r)) { Vec::new() } else { l })
        .collect()
}

/// Content candidates per user: the profiles [`pipeline::content`] searches when serving
/// (`content::user_profile`), searched at once (GEMM blocks); no profile, no candidates.
fn content_candidates(
    emb: ArrayView2<f32>,
    users: &[u32],
    ud: &UserData,
    n: usize,
    half_life_days: f64,
) -> Vec<Vec<Scored>> {
    let dim = emb.ncols();
    let profiles: Vec<Option<Vec<f32>>> = users
        .par_iter()
        .map(|&u| content::user_profile(emb, &ud.interests[u as usize], half_life_days * DAY))
        .collect();
    let mut q = Array2::<f32>::zeros((users.len(), dim));
    for (r, p) in profiles.iter().enumerate() {
        if let Some(p) = p {
            q.row_mut(r)
                .assign(&ndarray::ArrayView1::from(p.as_slice()));
        }
    }
    let lists = topk::top_k_batch(emb, q.view(), n, |r, i| {
        ud.seen[users[r] as usize].binary_search(&i).is_ok()
    });
    lists
        .into_iter()
        .zip(&profiles)
        .map(|(l, p)| if p.is_some() { l } else { Vec::new() })
        .collect()
}

/// Item-item candidates per user through the shared [`pipeline::item_item`].
fn item_item_candidates(
    model: &crate::ease::EaseModel,
    users: &[u32],
    ud: &UserData,
    n: usize,
) -> Vec<Vec<Scored>> {
    users
        .par_iter()
        .map(|&u| {
            let seen = &ud.seen[u as usize];
            pipeline::item_item(model, &ud.weights(u), n, |i| seen.binary_search(&i).is_ok())
        })
        .collect()
}

fn popularity_model(ud: &UserData, n_items: usize, half_life_days: f64) -> Popularity {
    let mut pop = Popularity::new(n_items, half_life_days * DAY);
    for v in &ud.positives {
        for &(i, w, ts) in v {
            pop.add(i, w as f64, ts);
        }
    }
    pop
}

fn popularity_candidates(
    pop: &Popularity,
    users: &[u32],
    ud: &UserData,
    n: usize,
) -> Vec<Vec<Scored>> {
    let max_seen = users
        .iter()
        .map(|&u| ud.seen[u as usize].len())
        .max()
        .unwrap_or(0);
    let global = pop.top_k(n + max_seen, None, |_| false);
    users
        .par_iter()
        .map(|&u| {
            let s = &ud.seen[u as usize];
            pipeline::popularity(&global, n, |x| s.binary_search(&x.item).is_ok())
        })
        .collect()
}

fn score_lists(
    lists: impl Iterator<Item = Vec<u32>>,
    rel: &[(u32, FxHashSet<u32>)],
    k: usize,
    universe: usize,
) -> (RankMetrics, f64) {
    let mut acc = MetricsAccumulator::new(universe);
    for (l, (_, r)) in lists.zip(rel) {
        acc.add(&l, r, k);
    }
    (acc.mean(), acc.coverage())
}

fn branch_only(
    c: &Candidates,
    b: Branch,
    rel: &[(u32, FxHashSet<u32>)],
    k: usize,
    universe: usize,
) -> (RankMetrics, f64) {
    score_lists(
        c.lists
            .iter()
            .map(|l| l[b.index()].iter().take(k).map(|s| s.item).collect()),
        rel,
        k,
        universe,
    )
}

/// Blends every user's candidates; returns ranked lists and the mean share per branch.
fn ensemble_lists(
    c: &Candidates,
    blend_cfg: &BlendSettings,
    k: usize,
) -> (Vec<Vec<u32>>, [f64; NB]) {
    let results: Vec<(Vec<u32>, [f64; NB], usize)> = c
        .lists
        .par_iter()
        .map(|l| {
            let branch_lists: Vec<BranchList> = (0..NB)
                .map(|b| BranchList {
                    weight: blend_cfg.weights[b],
                    items: &l[b][..l[b].len().min(blend_cfg.candidates)],
                })
                .collect();
            let r = blend::blend(&branch_lists, blend_cfg.normalization, k, |_| true);
            let mut share = [0f64; NB];
            for x in &r {
                for (s, v) in share.iter_mut().zip(x.shares()) {
                    *s += v as f64;
                }
            }
            (r.iter().map(|x| x.item).collect(), share, r.len())
        })
        .collect();
    let mut shares = [0f64; NB];
    let mut n = 0usize;
    let mut lists = Vec::with_capacity(results.len());
    for (l, s, len) in results {
        for (t, v) in shares.iter_mut().zip(s) {
            *t += v;
        }
        n += len;
        lists.push(l);
    }
    if n > 0 {
        shares.iter_mut().for_each(|s| *s /= n as f64);
    }
    (lists, shares)
}

/// NDCG@k for k = 1..=kmax of each branch alone and of the blend.
fn ndcg_curves(
    c: &Candidates,
    blend_cfg: &BlendSettings,
    rel: &[(u32, FxHashSet<u32>)],
    kmax: usize,
) -> serde_json::Value {
    let sets = || rel.iter().map(|(_, r)| r);
    let branch = |b: Branch| {
        let lists: Vec<Vec<u32>> = c
            .lists
            .iter()
            .map(|l| l[b.index()].iter().take(kmax).map(|s| s.item).collect())
            .collect();
        crate::metrics::ndcg_curve(lists.iter().map(Vec::as_slice), sets(), kmax)
    };
    let (ens, _) = ensemble_lists(c, blend_cfg, kmax);
    serde_json::json!({
        "k": (1..=kmax).collect::<Vec<_>>(),
        "als": branch(Branch::Als),
        "content": branch(Branch::Content),
        "popularity": branch(Branch::Popularity),
        "item_item": branch(Branch::ItemItem),
        "ensemble": crate::metrics::ndcg_curve(ens.iter().map(Vec::as_slice), sets(), kmax),
    })
}

fn report(m: RankMetrics, coverage: f64, fit: f64) -> ModelReport {
    ModelReport {
        precision: m.precision,
        recall: m.recall,
        map: m.map,
        ndcg: m.ndcg,
        coverage,
        fit_seconds: fit.max(0.0),
    }
}

/// What tuning chose, with its validation scores.
#[derive(Debug, Clone, Serialize)]
struct TuneResult {
    als: AlsParams,
    popularity_half_life_days: f64,
    content_half_life_days: f64,
    blend: BlendSettings,
    item_item_lambda: f32,
    validation_ndcg: serde_json::Value,
    configs_tried: usize,
    seconds: f64,
}

impl Evaluation<'_> {
    /// Runs the evaluation and builds the report.
    pub fn run(&self, cfg: &EvalConfig, mut log: impl FnMut(&str)) -> Result<EvalReport> {
        if cfg.k == 0 {
            return Err(ModelError::param("k", "must be >= 1"));
        }
        let rel = relevant(
            self.test,
            self.user_keys.len(),
            &cfg.weights,
            self.kind_name,
        );
        if rel.is_empty() {
            return Err(ModelError::Empty(
                "no user has a test row (after --min-value)".into(),
            ));
        }
        let universe = self.item_keys.len();
        let mut cfg = cfg.clone();
        let mut tune_details = serde_json::Value::Null;
        if cfg.tune {
            log("tuning on a validation split carved out of train");
            let t = self.tune(&cfg, &mut log)?;
            cfg.als = t.als.clone();
            cfg.popularity_half_life_days = t.popularity_half_life_days;
            cfg.content_half_life_days = t.content_half_life_days;
            cfg.blend = t.blend;
            cfg.ease.lambda = t.item_item_lambda;
            tune_details = serde_json::to_value(&t).unwrap_or_default();
        }

        let ud = user_data(
            self.train,
            self.user_keys.len(),
            &cfg.weights,
            self.kind_name,
        );
        let users: Vec<u32> = rel.iter().map(|(u, _)| *u).collect();
        let n_cand = cfg.blend.candidates.max(cfg.k).max(cfg.curve_to);

        let t = Instant::now();
        let pop = popularity_model(&ud, self.item_keys.len(), cfg.popularity_half_life_days);
        let pop_fit = t.elapsed().as_secs_f64();

        log(&format!(
            "fitting ALS: {} users x {} items, {} non-zeros",
            self.user_keys.len(),
            self.item_keys.len(),
            ud.positives.iter().map(Vec::len).sum::<usize>()
        ));
        let t = Instant::now();
        let m = weight_matrix(&ud, self.item_keys.len());
        let model = als::fit_keyed(&m, &cfg.als, self.user_keys, self.item_keys)?;
        let als_fit = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let ease = crate::ease::fit(&m, &cfg.ease)?;
        let ease_fit = t.elapsed().as_secs_f64();
        let ease_lists = item_item_candidates(&ease, &users, &ud, n_cand);

        let t = Instant::now();
        let content_lists = content_candidates(
            self.embeddings,
            &users,
            &ud,
            n_cand,
            cfg.content_half_life_days,
        );
        let content_fit = self.embed_seconds + t.elapsed().as_secs_f64();

        let t = Instant::now();
        let als_lists = als_candidates(&model, &users, &ud, n_cand, true);
        let als_rank = t.elapsed().as_secs_f64();
        let pop_lists = popularity_candidates(&pop, &users, &ud, n_cand);

        let cands = Candidates::zip(als_lists, content_lists, pop_lists, ease_lists);
        let (als_m, als_cov) = branch_only(&cands, Branch::Als, &rel, cfg.k, universe);
        let (con_m, con_cov) = branch_only(&cands, Branch::Content, &rel, cfg.k, universe);
        let (pop_m, pop_cov) = branch_only(&cands, Branch::Popularity, &rel, cfg.k, universe);
        let (ii_m, ii_cov) = branch_only(&cands, Branch::ItemItem, &rel, cfg.k, universe);
        let (ens_lists, shares) = ensemble_lists(&cands, &cfg.blend, cfg.k);
        let (ens_m, ens_cov) = score_lists(ens_lists.into_iter(), &rel, cfg.k, universe);
        let curve = (cfg.curve_to > 0).then(|| ndcg_curves(&cands, &cfg.blend, &rel, cfg.curve_to));

        let details = serde_json::json!({
            "blend": {
                "weights": by_branch(cfg.blend.weights.map(f64::from)),
                "normalization": cfg.blend.normalization,
                "candidates": cfg.blend.candidates,
            },
            "ensemble_mean_share": by_branch(shares),
            "als": cfg.als,
            "als_rank_seconds": als_rank,
            "item_item": {
                "params": cfg.ease,
                "fitted_items": ease.fitted_items,
                "tail_items": ease.tail_items,
                "fit_bytes": crate::ease::EaseParams::fit_bytes(ease.fitted_items),
                "memory_bytes": ease.memory_bytes(),
            },
            "popularity_half_life_days": cfg.popularity_half_life_days,
            "content_half_life_days": cfg.content_half_life_days,
            "weights": {"transform": cfg.weights.transform, "kinds": cfg.weights.kind_weights, "negative_kinds": cfg.weights.negative_kinds},
            "data": {
                "users": self.user_keys.len(),
                "items": self.item_keys.len(),
                "train_rows": self.train.len(),
                "test_rows": self.test.len(),
                "now": ud.now,
            },
            "tuning": tune_details,
            "ndcg_curve": curve,
        });
        Ok(EvalReport {
            schema: 1,
            k: cfg.k,
            users: rel.len(),
            encoder: self.encoder_name.clone(),
            models: Models {
                popularity: report(pop_m, pop_cov, pop_fit),
                als: report(als_m, als_cov, als_fit),
                content: report(con_m, con_cov, content_fit),
                item_item: report(ii_m, ii_cov, ease_fit),
                ensemble: report(ens_m, ens_cov, pop_fit + als_fit + content_fit + ease_fit),
            },
            details,
        })
    }

    /// Searches ALS hyper-parameters, decays and blend weights on a validation split of
    /// train (test is not touched).
    fn tune(&self, cfg: &EvalConfig, log: &mut impl FnMut(&str)) -> Result<TuneResult> {
        let started = Instant::now();
        let (sub, val) = split_per_user(
            self.train,
            cfg.validation_fraction.max(0.05),
            cfg.validation_split,
            cfg.seed ^ 0x5eed,
        )?;
        let rel = relevant(&val, self.user_keys.len(), &cfg.weights, self.kind_name);
        if rel.is_empty() {
            return Err(ModelError::Empty(
                "validation split has no users; too little train data to tune".into(),
            ));
        }
        let users: Vec<u32> = rel.iter().map(|(u, _)| *u).collect();
        let ud = user_data(&sub, self.user_keys.len(), &cfg.weights, self.kind_name);
        let n_cand = cfg.blend.candidates.max(cfg.k);
        let k = cfg.k;
        let universe = self.item_keys.len();
        let m = weight_matrix(&ud, self.item_keys.len());
        let mut tried = 0usize;
        let ndcg_of = |lists: &[Vec<Scored>]| {
            score_lists(
                lists
                    .iter()
                    .map(|l| l.iter().take(k).map(|s| s.item).collect()),
                &rel,
                k,
                universe,
            )
            .0
            .ndcg
        };

        // ALS: regularisation (plain and count-scaled), confidence scale, width.
        let mut grid: Vec<AlsParams> = Vec::new();
        let factor_grid: &[usize] = if cfg.tune_blend_only { &[] } else { &[64, 128] };
        if cfg.tune_blend_only {
            grid.push(cfg.als.clone());
        }
        for &factors in factor_grid {
            for &alpha in &[1.0f32, 4.0] {
                for &reg in &[0.05f32, 1.0, 5.0, 20.0, 50.0] {
                    grid.push(AlsParams {
                        factors,
                        alpha,
                        reg,
                        reg_scaling: RegScaling::None,
                        ..cfg.als.clone()
                    });
                }
                for &reg in &[0.02f32, 0.1, 0.3, 1.0] {
                    grid.push(AlsParams {
                        factors,
                        alpha,
                        reg,
                        reg_scaling: RegScaling::Count,
                        ..cfg.als.clone()
                    });
                }
            }
        }
        let mut best_als: Option<(f64, AlsParams, Vec<Vec<Scored>>)> = None;
        let grid_len = grid.len() as u64;
        (self.progress)("tuning ALS", 0, grid_len);
        for (done, p) in grid.into_iter().enumerate() {
            let model = als::fit_keyed(&m, &p, self.user_keys, self.item_keys)?;
            let lists = als_candidates(&model, &users, &ud, n_cand, true);
            let s = ndcg_of(&lists);
            tried += 1;
            log(&format!(
                "tune als factors={} alpha={} reg={} scaling={:?}: ndcg@{k}={s:.4}",
                p.factors, p.alpha, p.reg, p.reg_scaling
            ));
            if best_als.as_ref().is_none_or(|b| s > b.0) {
                best_als = Some((s, p, lists));
            }
            (self.progress)("tuning ALS", done as u64 + 1, grid_len);
        }
        let (als_ndcg, als_params, als_lists) =
            best_als.ok_or_else(|| ModelError::Empty("no ALS configuration".into()))?;

        let half_lives = [0.0f64, 30.0, 180.0, 730.0];
        let mut best_pop: Option<(f64, f64, Vec<Vec<Scored>>)> = None;
        for &h in &half_lives {
            let pop = popularity_model(&ud, self.item_keys.len(), h);
            let lists = popularity_candidates(&pop, &users, &ud, n_cand);
            let s = ndcg_of(&lists);
            tried += 1;
            if best_pop.as_ref().is_none_or(|b| s > b.0) {
                best_pop = Some((s, h, lists));
            }
        }
        let (pop_ndcg, pop_h, pop_lists) =
            best_pop.ok_or_else(|| ModelError::Empty("no popularity setting".into()))?;

        let mut best_con: Option<(f64, f64, Vec<Vec<Scored>>)> = None;
        for &h in &half_lives {
            let lists = content_candidates(self.embeddings, &users, &ud, n_cand, h);
            let s = ndcg_of(&lists);
            tried += 1;
            if best_con.as_ref().is_none_or(|b| s > b.0) {
                best_con = Some((s, h, lists));
            }
        }
        let (con_ndcg, con_h, con_lists) =
            best_con.ok_or_else(|| ModelError::Empty("no content setting".into()))?;

        let mut best_ease: Option<(f64, f32, Vec<Vec<Scored>>)> = None;
        for &lambda in &[100.0f32, 300.0, 1000.0] {
            let p = crate::ease::EaseParams {
                lambda,
                ..cfg.ease.clone()
            };
            let model = crate::ease::fit(&m, &p)?;
            let lists = item_item_candidates(&model, &users, &ud, n_cand);
            let s = ndcg_of(&lists);
            tried += 1;
            log(&format!("tune item_item lambda={lambda}: ndcg@{k}={s:.4}"));
            if best_ease.as_ref().is_none_or(|b| s > b.0) {
                best_ease = Some((s, lambda, lists));
            }
        }
        let (ii_ndcg, ii_lambda, ii_lists) =
            best_ease.ok_or_else(|| ModelError::Empty("no item-item setting".into()))?;

        let cands = Candidates::zip(als_lists, con_lists, pop_lists, ii_lists);
        let mut best_blend = (f64::MIN, cfg.blend);
        // Every weight vector on a 0.1 grid of the simplex (weights sum to 1).
        let mut simplex: Vec<[f32; NB]> = Vec::new();
        for a in 0..=10u32 {
            for c in 0..=10 - a {
                for p in 0..=10 - a - c {
                    let i = 10 - a - c - p;
                    simplex.push([a, c, p, i].map(|x| x as f32 / 10.0));
                }
            }
        }
        let norms = [
            Normalization::Rrf { k0: 60.0 },
            Normalization::Rrf { k0: 10.0 },
            Normalization::ZScore,
        ];
        let total = (simplex.len() * norms.len()) as u64;
        let mut done = 0u64;
        (self.progress)("tuning the blend", 0, total);
        for norm in norms {
            for &weights in &simplex {
                let b = BlendSettings {
                    weights,
                    normalization: norm,
                    candidates: cfg.blend.candidates,
                };
                let (lists, _) = ensemble_lists(&cands, &b, k);
                let (mm, _) = score_lists(lists.into_iter(), &rel, k, universe);
                tried += 1;
                done += 1;
                if mm.ndcg > best_blend.0 + 1e-9 {
                    best_blend = (mm.ndcg, b);
                }
                (self.progress)("tuning the blend", done, total);
            }
        }
        log(&format!(
            "tuned: als {als_ndcg:.4}, content {con_ndcg:.4}, popularity {pop_ndcg:.4}, item_item {ii_ndcg:.4}, ensemble {:.4} with weights {:?}",
            best_blend.0, best_blend.1.weights
        ));
        Ok(TuneResult {
            als: als_params,
            popularity_half_life_days: pop_h,
            content_half_life_days: con_h,
            blend: best_blend.1,
            item_item_lambda: ii_lambda,
            validation_ndcg: serde_json::json!({"als": als_ndcg, "content": con_ndcg, "popularity": pop_ndcg, "item_item": ii_ndcg, "ensemble": best_blend.0}),
            configs_tried: tried,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Result of [`evaluate_als`]: ALS alone, timed in its two phases.
#[derive(Debug, Clone, Serialize)]
pub struct AlsOnlyReport {
    pub users: usize,
    pub k: usize,
    pub precision: f64,
    pub recall: f64,
    pub map: f64,
    pub ndcg: f64,
    pub coverage: f64,
    pub fit_seconds: f64,
    /// Top-k (train items removed) for every evaluated user.
    pub recommend_seconds: f64,
    pub nnz: usize,
    pub params: AlsParams,
}

/// Fits ALS on `train` and scores top-k for every user with a test row: the comparison
/// with other ALS implementations, without the content and popularity branches.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_als(
    n_users: usize,
    n_items: usize,
    train: &[Interaction],
    test: &[Interaction],
    kind_name: &(dyn Fn(u16) -> Option<String> + Sync),
    weights: &WeightConfig,
    params: &AlsParams,
    k: usize,
    on_iteration: &dyn Fn(usize, usize),
) -> Result<AlsOnlyReport> {
    let rel = relevant(test, n_users, weights, kind_name);
    if rel.is_empty() {
        return Err(ModelError::Empty(
            "no user has a test row (after --min-value)".into(),
        ));
    }
    let ud = user_data(train, n_users, weights, kind_name);
    let t = Instant::now();
    let m = weight_matrix(&ud, n_items);
    let model = als::fit(&m, params, false, |it, _| {
        on_iteration(it + 1, params.iterations)
    })?;
    let fit_seconds = t.elapsed().as_secs_f64();
    let users: Vec<u32> = rel.iter().map(|(u, _)| *u).collect();
    let t = Instant::now();
    let lists = als_candidates(&model, &users, &ud, k, false);
    let recommend_seconds = t.elapsed().as_secs_f64();
    let (mm, coverage) = score_lists(
        lists.iter().map(|l| l.iter().map(|s| s.item).collect()),
        &rel,
        k,
        n_items,
    );
    Ok(AlsOnlyReport {
        users: rel.len(),
        k,
        precision: mm.precision,
        recall: mm.recall,
        map: mm.map,
        ndcg: mm.ndcg,
        coverage,
        fit_seconds,
        recommend_seconds,
        nnz: m.nnz(),
        params: params.clone(),
    })
}
