//! `GET /v1/users/{id}` (through the owner of the user's partition) and
//! `DELETE /v1/users/{id}` (erasure, journaled).

use super::*;

pub(super) async fn get_user(
    State(st): State<AppState>,
    _a: Admitted<UserData>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let user = path_id("id", path)?;
    let q = Params::parse(q.0, &["min_offset"], &[])?;
    let UserRead {
        user,
        partition,
        view: v,
        stale,
    } = st.api.get_user(user, q.min_offset()?).await?;
    Ok(Json(json!({
        "user": user,
        "partition": partition,
        "events": v.events,
        "last_event_ms": v.last_ts_ms,
        "last_offset": v.last_offset,
        "applied_offset": v.applied_offset,
        "stale": stale,
        "kind_counts": v.kind_counts.into_iter().collect::<BTreeMap<_, _>>(),
        "history": v.history.iter().map(|t| json!({"item": t.item, "kind": t.kind, "weight": t.weight, "ts": t.ts_ms})).collect::<Vec<_>>(),
        "seen": v.seen.len(),
        "disliked": v.disliked,
    }))
    .into_response())
}

pub(super) async fn delete_user(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let user = path_id("id", path)?;
    Params::none(q.0)?;
    let w = st.api.erase_user(user).await?;
    let results: Vec<PositionOut> = w.positions.iter().map(|p| position_out(p, None)).collect();
    Ok(Json(json!({ "results": results })).into_response())
}
