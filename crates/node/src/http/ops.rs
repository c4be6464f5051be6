//! Operations and admin routes: `/v1/cluster`, `/v1/admin/*`, the OpenAPI document,
//! `/healthz`, `/readyz`, `/metrics`, and the status page (`/`, `/ui`).

use super::*;

pub(super) async fn cluster(
    State(st): State<AppState>,
    _a: Admitted<Ops>,
    q: RawQuery,
) -> ApiResult {
    Params::none(q.0)?;
    // Every actor asked at once, each bounded: the page answers within about a second
    // whatever the log does (an actor stuck on it shows as not answering).
    let (actors, sups) = node::observe_all(&st.ctx, Duration::from_millis(800)).await;
    let actors: Vec<Value> = actors
        .into_iter()
        .map(|(name, r)| match r {
            Ok(o) => json!({"name": name, "alive": true, "state": o.value()}),
            Err(e) => json!({"name": name, "alive": false, "error": e.to_string()}),
        })
        .collect();
    let sups: Vec<Value> = sups
        .into_iter()
        .map(|(n, s)| json!({"name": n, "children": s.map(|s| s.children)}))
        .collect();
    let h = &st.ctx.health;
    let streams = |f: &dyn Fn(u32) -> u64| {
        st.ctx
            .streams()
            .iter()
            .map(|&s| json!({"stream": troupe_actors::stream_label(s), "offset": f(s)}))
            .collect::<Vec<_>>()
    };
    // One model for both fields, so they never describe two versions.
    let model = st.ctx.als.load_full();
    let content_index = {
        let c = st.ctx.content.read();
        let ann = c.ann();
        json!({
            "state": c.ann_state(st.ctx.settings.ranker.ann_min_items),
            "rows": c.len(),
            "sparse": c.sparse(),
            "items": ann.map(|a| a.rows()),
            "changed_since_build": c.changed_since_build(),
            "build_seconds": ann.map(|a| a.build_seconds()),
            "memory_bytes": ann.map(|a| a.memory_bytes()),
        })
    };
    Ok(Json(json!({
        "node": st.ctx.settings.node_name,
        "store_id": st.ctx.store.identity().unwrap_or_default(),
        "partitions": st.ctx.settings.partitions,
        "ready": h.ready(),
        "recovering": h.recovering(),
        "escalated": h.escalated(),
        "log": st.ctx.log.describe(),
        "state": {
            "backend": st.ctx.state.backend(),
            "owner": st.ctx.consumers.owner(),
            "claims": st.ctx.consumers.claims().into_iter().map(|(scope, epoch)| json!({"scope": scope, "epoch": epoch})).collect::<Vec<_>>(),
        },
        "cluster": st.ctx.cluster.as_ref().map(|c| c.describe(&st.ctx)),
        "journal_heads": streams(&|s| st.ctx.head(s)),
        "applied": streams(&|s| st.ctx.applied(s)),
        "als_model_version": model.as_ref().map(|m| m.version),
        "als_index": model.as_ref().map(|m| {
            let index = m.ann.load();
            json!({
                "state": match (index.as_ref(), m.wants_index(st.ctx.settings.ranker.ann_min_items)) {
                    (Some(_), _) => "ready",
                    (None, true) => "building",
                    (None, false) => "exact",
                },
                "items": index.as_ref().map(|i| i.rows()),
                "ranges": index.as_ref().map(|i| i.ranges().0),
                "graphs": index.as_ref().map(|i| i.ranges().1),
                "build_seconds": index.as_ref().map(|i| i.build_seconds()),
                "memory_bytes": index.as_ref().map(|i| i.memory_bytes()),
            })
        }),
        "content_index": content_index,
        "allocator": troupe_actors::allocator_stats(),
        "actors": actors,
        "supervisors": sups,
    }))
    .into_response())
}

pub(super) async fn dead_letters(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    q: RawQuery,
) -> ApiResult {
    Params::none(q.0)?;
    let docs = st.api.dead_letters().await?;
    let docs: Vec<Value> = docs
        .iter()
        .filter_map(|d| serde_json::from_slice(d).ok())
        .collect();
    Ok(Json(json!({"dead_letters": docs})).into_response())
}

pub(super) async fn retrain(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    q: RawQuery,
) -> ApiResult {
    Params::none(q.0)?;
    // No leader, or one that did not answer: 503, nothing was trained; ask again in 5 s.
    let r = st.api.retrain().await?;
    Ok(Json(serde_json::to_value(&r).unwrap_or(Value::Null)).into_response())
}

pub(super) async fn rollback(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    q: RawQuery,
) -> ApiResult {
    Params::none(q.0)?;
    let r = st.api.rollback().await?;
    Ok(Json(json!({"serving_version": r.serving_version})).into_response())
}

/// The status page: one HTML file built into the binary. Its script reads this node's
/// `/v1/cluster` and `/metrics` and calls the request routes; it loads nothing from
/// anywhere else.
pub(super) async fn status_page(q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
                 img-src 'self' data:; connect-src 'self'",
            ),
        ],
        include_str!("status.html"),
    )
        .into_response())
}

pub(super) async fn openapi_doc(State(st): State<AppState>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi.as_str().to_string(),
    )
        .into_response())
}

pub(super) async fn healthz(State(st): State<AppState>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    Ok(match st.ctx.health.escalated() {
        None => Json(json!({
            "status": "ok",
            "node": st.ctx.settings.node_name,
            "store_id": st.ctx.store.identity().unwrap_or_default(),
        }))
        .into_response(),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "escalated", "detail": e})),
        )
            .into_response(),
    })
}

pub(super) async fn readyz(State(st): State<AppState>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    let h = &st.ctx.health;
    let [(reads_in_flight, reads_full), (writes_in_flight, writes_full)] = st.api.in_flight();
    let body = json!({
        "ready": h.ready(),
        "recovering": h.recovering(),
        "escalated": h.escalated(),
        "journal_failed": h.journal_failed.load(Ordering::Relaxed),
        // Writes need the log; reads do not, so readiness ignores it (a load balancer
        // must not drop every node when the shared log is down).
        "log_writable": st.ctx.log.writable(),
        "draining": h.draining.load(Ordering::Relaxed),
        "saturated": {"reads": reads_full, "writes": writes_full},
        "in_flight": {"reads": reads_in_flight, "writes": writes_in_flight},
        // Cluster mode: what this node can do now. Reads are answered whatever the log
        // does: from here for the partitions it serves, through their owners for the
        // others, degraded when neither is possible.
        "cluster": st.ctx.cluster.as_ref().map(|c| {
            let parts = st.ctx.settings.partitions;
            let served: Vec<u32> = (0..parts).filter(|&p| st.ctx.serving(p)).collect();
            let peers_up = c.peers.lock().values().filter(|p| p.state == troupe_actors::PeerState::Up).count();
            json!({
                "log_reachable": c.log_reachable.load(Ordering::Relaxed),
                "leases_read_ms_ago": c.last_read.lock().map(|t| t.elapsed().as_millis() as u64),
                "partitions_served_here": served,
                "peers_up": peers_up,
                "accepts_writes": st.ctx.log.writable(),
                "joined": c.joined.load(Ordering::Relaxed),
            })
        }),
    });
    let status = if h.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(body)).into_response())
}

pub(super) async fn metrics(State(st): State<AppState>, q: RawQuery) -> ApiResult {
    Params::none(q.0)?;
    st.ctx.export_metrics();
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.ctx.metrics.render(),
    )
        .into_response())
}
