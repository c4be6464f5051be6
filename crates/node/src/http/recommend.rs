//! `GET /v1/recommendations/{user}`: parameters checked here, the answer from the request
//! layer, rendered with each branch's share.

use super::*;

pub(super) async fn recommend(
    State(st): State<AppState>,
    _a: Admitted<Reads>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let user = path_id("user", path)?;
    let q = Params::parse(
        q.0,
        &[
            "k",
            "category",
            "exclude",
            "explain",
            "weights",
            "min_offset",
        ],
        &["exclude"],
    )?;
    let k = q.k(st.ctx.settings.ranker.max_k)?;
    let explain = match q.get("explain") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ApiError::bad(format!(
                "explain must be true or false, got `{v}`"
            )))
        }
    };
    let weights = q
        .get("weights")
        .map(limits::parse_weights)
        .transpose()
        .map_err(ApiError::bad)?
        .map(|w| w.to_vec());
    let category = q
        .get("category")
        .map(|c| {
            check_text("category", c, 1, limits::MAX_CATEGORY_CHARS)
                .map(|_| c.to_string())
                .map_err(ApiError::bad)
        })
        .transpose()?;
    let mut exclude = Vec::new();
    for (n, v) in q.all("exclude").enumerate() {
        if n >= limits::MAX_EXCLUDE_PARAMS {
            return Err(ApiError::bad(format!(
                "more than {} exclude parameters",
                limits::MAX_EXCLUDE_PARAMS
            )));
        }
        check_text("exclude", v, 0, limits::MAX_EXCLUDE_CHARS).map_err(ApiError::bad)?;
        exclude.extend(v.split(',').filter(|x| !x.is_empty()).map(str::to_string));
    }
    let req = st.api.name_request(RecommendRequest {
        user,
        k,
        category,
        exclude,
        weights,
        request_id: String::new(),
        now_ms: 0,
        min_offset: q.min_offset()?,
    });
    let reply = st.api.recommend(req).await?;
    let items: Vec<RecItemOut<'_>> = reply
        .items
        .iter()
        .map(|i| RecItemOut {
            item: &i.item,
            score: i.score,
            shares: SharesOut {
                als: i.share(Branch::Als),
                content: i.share(Branch::Content),
                popularity: i.share(Branch::Popularity),
                item_item: i.share(Branch::ItemItem),
            },
            categories: explain.then_some(i.categories.as_slice()),
        })
        .collect();
    let body = RecommendationsOut {
        request_id: &reply.request_id,
        user: &reply.user,
        items,
        model_versions: ModelVersionsOut {
            als: reply.als_model_version,
            content: &reply.content_encoder,
        },
        applied_offset: reply.applied_offset,
        awaited_offset: reply.awaited_offset,
        degraded: reply.degraded,
        stale: reply.stale,
        cold_start: reply.cold_start,
        cached: reply.cached,
        fallback: reply.fallback.as_ref(),
        served_by: &reply.served_by,
        route: reply.route,
        branches: if explain {
            BranchesOut::Full(&reply.branches)
        } else {
            BranchesOut::Brief(
                reply
                    .branches
                    .iter()
                    .map(|b| BriefBranch {
                        name: b.name,
                        status: b.status,
                    })
                    .collect(),
            )
        },
    };
    Ok(Json(body).into_response())
}

/// Body of `GET /v1/recommendations/{user}` (serialised straight from borrowed fields).
#[derive(Serialize)]
pub(super) struct RecommendationsOut<'a> {
    request_id: &'a str,
    user: &'a str,
    items: Vec<RecItemOut<'a>>,
    model_versions: ModelVersionsOut<'a>,
    applied_offset: u64,
    awaited_offset: u64,
    degraded: bool,
    stale: bool,
    cold_start: bool,
    cached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback: Option<&'a troupe_actors::proto::api::Fallback>,
    served_by: &'a str,
    route: Route,
    branches: BranchesOut<'a>,
}

#[derive(Serialize)]
pub(super) struct RecItemOut<'a> {
    item: &'a str,
    score: f32,
    shares: SharesOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    categories: Option<&'a [String]>,
}

#[derive(Serialize)]
pub(super) struct SharesOut {
    als: f32,
    content: f32,
    popularity: f32,
    item_item: f32,
}

#[derive(Serialize)]
pub(super) struct ModelVersionsOut<'a> {
    als: u64,
    content: &'a str,
}

#[derive(Serialize)]
pub(super) struct BriefBranch {
    name: Branch,
    status: BranchStatus,
}

/// Branch statuses, or with `explain` the full reports (candidates, time).
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum BranchesOut<'a> {
    Brief(Vec<BriefBranch>),
    Full(&'a [BranchReport]),
}
