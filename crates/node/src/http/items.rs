//! Catalog routes: `POST /v1/items`, `PUT`/`GET`/`DELETE /v1/items/{id}`,
//! `/v1/items/{id}/similar` and `/v1/items/{id}/stats`.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an item object")]
pub(super) struct ItemJson {
    #[serde(default, deserialize_with = "present")]
    id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    text: Option<String>,
    #[serde(default, deserialize_with = "present")]
    categories: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    hidden: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    attributes: Option<BTreeMap<String, String>>,
}

/// An item of a body (its id given apart), checked by the request layer.
pub(super) fn to_item(id: String, i: ItemJson) -> Result<Item, String> {
    troupe_actors::api::check_item(proto::ItemIn {
        id,
        text: i.text.unwrap_or_default(),
        categories: i.categories.unwrap_or_default(),
        hidden: i.hidden.unwrap_or(false),
        attributes: i.attributes.unwrap_or_default(),
    })
}

pub(super) fn items_out(positions: &[Position], ids: Vec<String>) -> Response {
    let results: Vec<PositionOut> = positions
        .iter()
        .zip(ids)
        .map(|(p, id)| position_out(p, Some(id)))
        .collect();
    Json(json!({ "results": results })).into_response()
}

pub(super) async fn put_item(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
    body: Body,
) -> ApiResult {
    let id = path_id("id", path)?;
    Params::none(q.0)?;
    let bytes = read_body(&st, body).await?;
    let Obj(item): Obj<ItemJson> = serde_json::from_str(body_text(&bytes)?)
        .map_err(|e| ApiError::bad(format!("item: {e}")))?;
    if item.id.is_some() {
        return Err(ApiError::bad(
            "the item id is the path's: leave `id` out of the body",
        ));
    }
    let item = to_item(id.clone(), item).map_err(ApiError::bad)?;
    let w = st.api.upsert_items(vec![item]).await?;
    Ok(items_out(&w.positions, vec![id]))
}

pub(super) async fn post_items(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    q: RawQuery,
    body: Body,
) -> ApiResult {
    Params::none(q.0)?;
    let bytes = read_body(&st, body).await?;
    let items: Vec<Obj<ItemJson>> = serde_json::from_str(body_text(&bytes)?)
        .map_err(|e| ApiError::bad(format!("body is not a JSON array of items: {e}")))?;
    if items.is_empty() {
        return Err(ApiError::bad("no items in the body"));
    }
    troupe_actors::api::check_count(
        items.len(),
        st.opts.max_events_per_request,
        "too_many_items",
        "items",
    )?;
    let mut checked = Vec::with_capacity(items.len());
    let mut ids = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    for (n, Obj(mut i)) in items.into_iter().enumerate() {
        let Some(id) = i.id.take() else {
            problems.push(format!("item {}: id is required", n + 1));
            continue;
        };
        match to_item(id, i) {
            Ok(it) => {
                ids.push(it.id.clone());
                checked.push(it);
            }
            Err(e) => problems.push(format!("item {}: {e}", n + 1)),
        }
    }
    if !problems.is_empty() {
        problems.truncate(20);
        return Err(ApiError::bad(format!(
            "nothing was accepted: {}",
            problems.join("; ")
        )));
    }
    let w = st.api.upsert_items(checked).await?;
    Ok(items_out(&w.positions, ids))
}

pub(super) async fn delete_item(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let id = path_id("id", path)?;
    Params::none(q.0)?;
    let w = st.api.delete_item(id.clone()).await?;
    Ok(items_out(&w.positions, vec![id]))
}

pub(super) async fn get_item(
    State(st): State<AppState>,
    _a: Admitted<Reads>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let id = path_id("id", path)?;
    let q = Params::parse(q.0, &["min_offset"], &[])?;
    let v = st.api.get_item(&id, q.min_offset()?).await?;
    Ok(Json(json!({
        "id": v.item.id,
        "text": v.item.text,
        "categories": v.item.categories,
        "hidden": v.item.hidden,
        "attributes": v.item.attributes,
        "applied_offset": v.applied_offset,
        "stale": v.stale,
    }))
    .into_response())
}

/// The interaction events naming an item that this node's item statistics have applied
/// (every kind, undecayed): 0 for a catalog item nobody touched yet; 404 for a deleted
/// item and for an id neither the catalog nor any event named.
pub(super) async fn item_stats(
    State(st): State<AppState>,
    _a: Admitted<Reads>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let item = path_id("id", path)?;
    let q = Params::parse(q.0, &["min_offset"], &[])?;
    let v = st.api.item_stats(item, q.min_offset()?).await?;
    Ok(Json(json!({
        "item": v.item,
        "event_count": v.event_count,
        "node": v.node,
        "stale": v.stale,
    }))
    .into_response())
}

pub(super) async fn similar(
    State(st): State<AppState>,
    _a: Admitted<Reads>,
    path: Result<Path<String>, PathRejection>,
    q: RawQuery,
) -> ApiResult {
    let item = path_id("id", path)?;
    let q = Params::parse(q.0, &["k", "min_offset"], &[])?;
    let k = q.k(st.ctx.settings.ranker.max_k)?;
    let r = st.api.similar(item, k, q.min_offset()?).await?;
    Ok(Json(json!({
        "item": r.item,
        "source": r.source,
        "items": r.items.iter().map(|(i, s)| json!({"item": i, "score": s})).collect::<Vec<_>>(),
    }))
    .into_response())
}

impl Expecting for ItemJson {
    const WHAT: &'static str = "an item object";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_have_limits_on_every_field() {
        let ok = ItemJson {
            id: None,
            text: Some("t".into()),
            categories: Some(vec!["a".into(), "a".into()]),
            hidden: None,
            attributes: Some([("k".to_string(), "v".to_string())].into()),
        };
        assert_eq!(to_item("x".into(), ok).unwrap().categories, vec!["a"]);
        let many: Vec<String> = (0..=limits::MAX_CATEGORIES)
            .map(|i| i.to_string())
            .collect();
        let e = to_item(
            "x".into(),
            ItemJson {
                id: None,
                text: None,
                categories: Some(many),
                hidden: None,
                attributes: None,
            },
        )
        .unwrap_err();
        assert!(e.contains("categories"), "{e}");
        let attrs: BTreeMap<String, String> = (0..=limits::MAX_ATTRIBUTES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(to_item(
            "x".into(),
            ItemJson {
                id: None,
                text: None,
                categories: None,
                hidden: None,
                attributes: Some(attrs)
            }
        )
        .is_err());
        let big: BTreeMap<String, String> = [(
            "k".to_string(),
            "v".repeat(limits::MAX_ATTRIBUTE_VALUE_CHARS + 1),
        )]
        .into();
        assert!(to_item(
            "x".into(),
            ItemJson {
                id: None,
                text: None,
                categories: None,
                hidden: None,
                attributes: Some(big)
            }
        )
        .is_err());
        let e = serde_json::from_str::<ItemJson>(r#"{"id": null}"#).unwrap_err();
        assert!(e.to_string().contains("null"), "{e}");
    }
}
