//! The OpenAPI 3.1 document served at `/v1/openapi.json`, built from the node's own
//! limits and access rules, so it states exactly what this node enforces: id lengths and
//! characters, `k` up to `ranker.max_k`, events per request, which routes need which
//! token, and every status each route can answer.

use serde_json::{json, Map, Value};

use crate::limits::*;

/// What the document depends on.
pub struct ApiShape {
    pub max_k: usize,
    pub max_events_per_request: usize,
    pub max_body_bytes: usize,
    pub max_future_skew_secs: u64,
    /// When the document was built (the node's clock, ms since the epoch): the static
    /// bound of `ts` is taken from it.
    pub built_ms: i64,
    pub idempotency_window_secs: u64,
    /// On a JetStream log: the server's duplicate window (s) and the keys each consumer
    /// remembers per partition, which together are the dedupe horizon there.
    pub jetstream_dedupe: Option<(u64, usize)>,
    /// Writes and admin routes need the bearer token.
    pub writes_need_token: bool,
    /// `GET /v1/users/{id}` needs a token (write or read token).
    pub user_data_needs_token: bool,
    /// Recommendations, similar items and item reads need a token.
    pub reads_need_token: bool,
}

fn text(min: usize, max: usize, description: &str) -> Value {
    json!({
        "type": "string",
        "minLength": min,
        "maxLength": max,
        "pattern": NO_CONTROL_PATTERN,
        "description": description,
    })
}

fn id(description: &str) -> Value {
    text(1, MAX_ID_CHARS, description)
}

fn error_ref() -> Value {
    json!({"$ref": "#/components/responses/Error"})
}

/// Responses: `200` with `ok`, plus the listed error statuses.
fn responses(ok: Value, errors: &[u16]) -> Value {
    let mut m = Map::new();
    m.insert("200".into(), ok);
    for s in errors {
        m.insert(s.to_string(), error_ref());
    }
    Value::Object(m)
}

fn json_ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn path_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": id(description)})
}

fn min_offset_param(of: &str) -> Value {
    json!({
        "name": "min_offset",
        "in": "query",
        "required": false,
        "description": format!("Read-your-writes: the answer reflects {of} up to this offset (the `offset` a write was acked with), waiting up to `ranker.freshness_wait_ms`, or says `stale: true`. Without it the answer waits for the stream's head at arrival (same bound)."),
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
    })
}

fn k_param(max_k: usize) -> Value {
    json!({
        "name": "k",
        "in": "query",
        "required": false,
        "description": "number of items (default 10)",
        "schema": {"type": "integer", "minimum": 1, "maximum": max_k, "default": 10},
    })
}

/// The highest integer `ts` the schema states: the build time plus the allowed skew (any
/// value up to it stays acceptable, as the node's clock only moves on).
fn ts_max(s: &ApiShape) -> i64 {
    s.built_ms + (s.max_future_skew_secs as i64) * 1000
}

/// `(year, month, day)` of the UTC day `days_back` days before the one of `ms`.
fn day_before(ms: i64, days_back: i64) -> (i64, u32, u32) {
    use chrono::Datelike;
    let t =
        chrono::DateTime::from_timestamp_millis(ms - days_back * 86_400_000).unwrap_or_default();
    (i64::from(t.year()), t.month(), t.day())
}

fn date_before(ms: i64, days_back: i64) -> String {
    let (y, m, d) = day_before(ms, days_back);
    format!("{y:04}-{m:02}-{d:02}")
}

/// A regular expression matching exactly the numbers `lo..=hi`, written with `width`
/// digits (leading zeros): one alternative per run of numbers sharing all digits but the
/// last.
fn range_regex(lo: i64, hi: i64, width: usize) -> String {
    let mut parts = Vec::new();
    let mut n = lo;
    while n <= hi {
        let top = (n - n % 10 + 9).min(hi);
        let prefix = if width > 1 {
            format!("{:0w$}", n / 10, w = width - 1)
        } else {
            String::new()
        };
        parts.push(format!("{prefix}[{}-{}]", n % 10, top % 10));
        n = top + 1;
    }
    format!("(?:{})", parts.join("|"))
}

/// The RFC 3339 date-times from 1971-01-01 up to the end of the UTC day two days before
/// the build day: a static set the node accepts whatever the offset (up to ±23:59) and
/// whenever the request comes. Days run to 28 in every month, so each is a real date.
fn date_time_pattern(built_ms: i64) -> String {
    let (y, m, d) = day_before(built_ms, 2);
    let (y, m, d) = (y, i64::from(m), i64::from(d).min(28));
    let day = range_regex(1, 28, 2);
    let month = range_regex(1, 12, 2);
    let mut dates = vec![format!("{}-{month}-{day}", range_regex(1971, y - 1, 4))];
    if m > 1 {
        dates.push(format!("{y:04}-{}-{day}", range_regex(1, m - 1, 2)));
    }
    dates.push(format!("{y:04}-{m:02}-{}", range_regex(1, d, 2)));
    format!(
        "^(?:{})T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{{1,9}})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$",
        dates.join("|")
    )
}

/// An operation; `secured` adds the bearer requirement and its 401.
fn op(
    summary: &str,
    description: &str,
    params: Vec<Value>,
    mut resp: Value,
    secured: bool,
) -> Value {
    let mut o = json!({
        "summary": summary,
        "description": description,
        "parameters": params,
    });
    if secured {
        o["security"] = json!([{"bearer": []}]);
        resp["401"] = error_ref();
    }
    // The HTTP layer's own limits on the request line and headers (no JSON body).
    resp["414"] = json!({"description": "URI too long"});
    resp["431"] = json!({"description": "request header fields too large"});
    o["responses"] = resp;
    o
}

fn with_body(mut o: Value, body: Value) -> Value {
    o["requestBody"] = body;
    o
}

fn position_schema() -> Value {
    json!({
        "type": "object",
        "required": ["partition", "offset", "duplicate"],
        "properties": {
            "partition": {"oneOf": [{"type": "integer", "minimum": 0}, {"const": "catalog"}]},
            "offset": {"type": "integer", "minimum": 1},
            "duplicate": {"type": "boolean"},
        },
    })
}

/// Builds the document.
pub fn document(s: &ApiShape) -> Value {
    let event = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["user", "item", "kind"],
        "description": "An interaction. No field may be null.",
        "properties": {
            "event_id": id("idempotency key chosen by the client"),
            "user": id("user id"),
            "item": id("item id"),
            "kind": id("event kind (view, click, purchase, rating, dislike, ...); lower-cased"),
            "value": {"type": "number", "minimum": -MAX_ABS_VALUE, "maximum": MAX_ABS_VALUE, "description": "optional value (rating, quantity), stored as a 32-bit float"},
            "ts": {
                "description": format!("event time, milliseconds since the Unix epoch or an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`), from 1970 on and at most journal.max_future_skew_secs ({} s) after the node's clock at arrival. That rule moves with the clock; the schema states the bound as of when this document was built, which stays accepted: integers up to {} (the build time plus the skew), date-times up to {} (two days before the build day, whatever the offset); the node accepts every later time its rule allows. Default: the node's clock at arrival", s.max_future_skew_secs, ts_max(s), date_before(s.built_ms, 2)),
                "oneOf": [
                    {"type": "integer", "minimum": 0, "maximum": ts_max(s)},
                    {"type": "string", "pattern": date_time_pattern(s.built_ms)},
                ],
            },
            "request_id": id("the recommendation this event came from"),
        },
    });
    let item_props = json!({
        "text": text(0, MAX_TEXT_CHARS, "title and description, embedded by the content model"),
        "categories": {
            "type": "array",
            "maxItems": MAX_CATEGORIES,
            "items": text(1, MAX_CATEGORY_CHARS, "category"),
        },
        "hidden": {"type": "boolean", "description": "hidden items are never recommended"},
        "attributes": {
            "type": "object",
            "maxProperties": MAX_ATTRIBUTES,
            "propertyNames": text(1, MAX_ATTRIBUTE_KEY_CHARS, "attribute name"),
            "additionalProperties": text(0, MAX_ATTRIBUTE_VALUE_CHARS, "attribute value"),
        },
    });
    let mut item_in = json!({
        "type": "object",
        "additionalProperties": false,
        "description": "A catalog item. Absent fields take their defaults (empty text, no categories, not hidden, no attributes); no field may be null.",
        "properties": item_props.clone(),
    });
    let mut item_batch = item_in.clone();
    item_batch["properties"]["id"] = id("item id");
    item_batch["required"] = json!(["id"]);
    item_in["description"] = json!("A catalog item (its id is the path's; a body `id` is refused). Absent fields take their defaults (empty text, no categories, not hidden, no attributes); no field may be null.");
    let mut item_out = json!({
        "type": "object",
        "required": ["id", "text", "categories", "hidden", "attributes", "applied_offset", "stale"],
        "properties": item_props,
    });
    item_out["properties"]["id"] = json!({"type": "string"});
    item_out["properties"]["applied_offset"] = json!({"type": "integer"});
    item_out["properties"]["stale"] = json!({"type": "boolean"});
    let item_ack = json!({
        "type": "object",
        "required": ["results"],
        "properties": {"results": {"type": "array", "items": {
            "type": "object",
            "required": ["id", "partition", "offset", "duplicate"],
            "properties": {
                "id": {"type": "string"},
                "partition": {"const": "catalog"},
                "offset": {"type": "integer", "minimum": 1},
                "duplicate": {"type": "boolean"},
            },
        }}},
    });
    let events_ack = json!({
        "type": "object",
        "required": ["acked", "duplicates", "results"],
        "properties": {
            "acked": {"type": "integer", "minimum": 0},
            "duplicates": {"type": "integer", "minimum": 0},
            "results": {"type": "array", "items": position_schema()},
        },
    });
    let branch = json!({
        "type": "object",
        "required": ["name", "status"],
        "properties": {
            "name": {"enum": ["als", "content", "popularity", "item_item"]},
            "status": {"enum": ["ok", "empty", "failed", "timeout", "open", "unavailable"]},
            "candidates": {"type": "integer"},
            "micros": {"type": "integer"},
        },
    });
    let share = json!({"type": "number", "minimum": 0, "maximum": 1});
    let recs = json!({
        "type": "object",
        "required": ["request_id", "user", "items", "model_versions", "applied_offset", "awaited_offset", "degraded", "stale", "cold_start", "cached", "served_by", "route", "branches"],
        "properties": {
            "request_id": {"type": "string"},
            "user": {"type": "string"},
            "items": {"type": "array", "items": {
                "type": "object",
                "required": ["item", "score", "shares"],
                "properties": {
                    "item": {"type": "string"},
                    "score": {"type": "number"},
                    "shares": {"type": "object", "required": ["als", "content", "popularity", "item_item"], "properties": {"als": share, "content": share, "popularity": share, "item_item": share}},
                    "categories": {"type": "array", "items": {"type": "string"}},
                },
            }},
            "model_versions": {"type": "object", "required": ["als", "content"], "properties": {"als": {"type": "integer"}, "content": {"type": "string"}}},
            "applied_offset": {"type": "integer"},
            "awaited_offset": {"type": "integer"},
            "degraded": {"type": "boolean"},
            "stale": {"type": "boolean"},
            "cold_start": {"type": "boolean"},
            "cached": {"type": "boolean"},
            "served_by": {"type": "string", "description": "The node that computed the answer."},
            "route": {"type": "string", "enum": ["local", "forwarded", "owner_unreachable", "no_owner"], "description": "How the request reached the node that answered: `local`, `forwarded` to the partition's owner, or (cluster mode) answered here without the user's features because the owner is unreachable or the partition is moving."},
            "fallback": {
                "description": "Present when every branch the weights select had no candidate for this user: the answer used `used` instead (shares show it).",
                "type": "object",
                "required": ["requested", "used", "reason"],
                "properties": {
                    "requested": {"type": "array", "items": {"type": "number"}},
                    "used": {"type": "array", "items": {"type": "number"}},
                    "reason": {"type": "string"},
                },
            },
            "branches": {"type": "array", "items": branch},
        },
    });
    let similar = json!({
        "type": "object",
        "required": ["item", "source", "items"],
        "properties": {
            "item": {"type": "string"},
            "source": {"enum": ["content", "als"]},
            "items": {"type": "array", "items": {"type": "object", "required": ["item", "score"], "properties": {"item": {"type": "string"}, "score": {"type": "number"}}}},
        },
    });
    let user = json!({
        "type": "object",
        "required": ["user", "partition", "events", "last_event_ms", "last_offset", "applied_offset", "stale", "kind_counts", "history", "seen", "disliked"],
        "properties": {
            "user": {"type": "string"},
            "partition": {"type": "integer"},
            "events": {"type": "integer"},
            "last_event_ms": {"type": "integer"},
            "last_offset": {"type": "integer"},
            "applied_offset": {"type": "integer"},
            "stale": {"type": "boolean"},
            "kind_counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "history": {"type": "array", "items": {"type": "object", "required": ["item", "kind", "weight", "ts"], "properties": {"item": {"type": "string"}, "kind": {"type": "string"}, "weight": {"type": "number"}, "ts": {"type": "integer"}}}},
            "seen": {"type": "integer"},
            "disliked": {"type": "array", "items": {"type": "string"}},
        },
    });
    let erase_ack = json!({
        "type": "object",
        "required": ["results"],
        "properties": {"results": {"type": "array", "items": position_schema()}},
    });
    let json_body = |schema: Value, description: &str| json!({"required": true, "description": description, "content": {"application/json": {"schema": schema}}});
    let w = s.writes_need_token;
    let r = s.reads_need_token;
    let u = s.user_data_needs_token;
    // Statuses every route can answer: 400 (bad query or path), 503 (saturated, journal
    // recovering, shutting down, actor unavailable).
    let body_errors: &[u16] = &[400, 408, 413, 415, 503];
    let identity = "A retry is safe: an event with `event_id` is identified by it; one without `event_id` but with `ts` by its content; one with neither by the request's `Idempotency-Key` header (or, without it, the whole body) and its place in the request.";
    let retry_rule = match s.jetstream_dedupe {
        None => format!("{identity} A duplicate within journal.idempotency_window_secs ({} s; and among the newest journal.idempotency_max_keys keys) is not appended again: its result says `duplicate: true` with the original position. Past that horizon a retry counts as a new event.", s.idempotency_window_secs),
        Some((window, keys)) => format!("{identity} This node's log is NATS JetStream: a duplicate within the server's duplicate window (log.jetstream.duplicate_window_secs, {window} s) is not appended again: its result says `duplicate: true` with the original position. A later retry is stored again (`duplicate: false`) and applied once while its key is among the last journal.consumer_dedupe_keys ({keys}) keys of its partition and within journal.idempotency_window_secs ({} s); past both it counts as a new event. The metric troupe_consumer_dedupe_horizon_seconds shows how far back that reaches now.", s.idempotency_window_secs),
    };
    let events_op = with_body(
        op(
            "Append events; the answer comes once they are durable",
            &format!("Up to {} events per request (413 past that), body at most {} bytes (413, refused from Content-Length before it is read). Any invalid event refuses the whole request (400, every problem listed, nothing accepted). {retry_rule}", s.max_events_per_request, s.max_body_bytes),
            vec![json!({"name": "Idempotency-Key", "in": "header", "required": false, "description": "identifies the request for events without `event_id` and `ts` (see the retry rule)", "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "pattern": "^[!-~]+$"}})],
            responses(json_ok("durable: one position per event, in order", events_ack), body_errors),
            w,
        ),
        json!({
            "required": true,
            "description": "a JSON array of events, or NDJSON (one event per line) with Content-Type application/x-ndjson",
            "content": {
                "application/json": {"schema": {"type": "array", "minItems": 1, "maxItems": s.max_events_per_request, "items": {"$ref": "#/components/schemas/Event"}}},
                "application/x-ndjson": {"schema": {"$ref": "#/components/schemas/Event"}},
            },
        }),
    );
    let items_op = with_body(
        op(
            "Upsert items (batch)",
            &format!("Up to {} items per request. Journaled on the catalog stream; answered once durable.", s.max_events_per_request),
            vec![],
            responses(json_ok("durable", item_ack.clone()), body_errors),
            w,
        ),
        json_body(json!({"type": "array", "minItems": 1, "maxItems": s.max_events_per_request, "items": {"$ref": "#/components/schemas/ItemBatchEntry"}}), "items"),
    );
    let put_item = with_body(
        op(
            "Upsert one item",
            "Journaled on the catalog stream; answered once durable. The id is the path's; the body has no `id`.",
            vec![path_param("id", "item id")],
            responses(json_ok("durable", item_ack.clone()), body_errors),
            w,
        ),
        json_body(json!({"$ref": "#/components/schemas/Item"}), "the item"),
    );
    let delete_item = op(
        "Delete an item",
        "Journaled; once applied the item is filtered from every branch and reads of it answer 404. Deleting an unknown item is not an error.",
        vec![path_param("id", "item id")],
        responses(json_ok("durable", item_ack), &[400, 503]),
        w,
    );
    let get_item = op(
        "One catalog item",
        "Waits for the catalog stream like every read (see `min_offset`).",
        vec![
            path_param("id", "item id"),
            min_offset_param("the catalog stream"),
        ],
        responses(json_ok("the item", item_out), &[400, 404, 503]),
        r,
    );
    let similar_op = op(
        "Items similar to one item",
        "By content embedding, or by ALS factors when the item has no text. 404 for an item with neither, and for a deleted item.",
        vec![path_param("id", "item id"), k_param(s.max_k), min_offset_param("the catalog stream")],
        responses(json_ok("similar items, best first", similar), &[400, 404, 503]),
        r,
    );
    let item_stats_op = op(
        "An item's event count on this node",
        "Interaction events naming the item (every kind, undecayed) that this node's item statistics have applied; every node counts every partition's events. 0 for a catalog item nobody touched yet; 404 for a deleted item and for an id neither the catalog nor any event named. Waits for the catalog stream like every read (see `min_offset`).",
        vec![path_param("id", "item id"), min_offset_param("the catalog stream")],
        responses(
            json_ok(
                "the count",
                json!({
                    "type": "object",
                    "required": ["item", "event_count", "node", "stale"],
                    "properties": {
                        "item": {"type": "string"},
                        "event_count": {"type": "integer", "minimum": 0},
                        "node": {"type": "string", "description": "the node that counted"},
                        "stale": {"type": "boolean"},
                    },
                }),
            ),
            &[400, 404, 503],
        ),
        r,
    );
    let recs_op = op(
        "Top-k items for a user, with each branch's share",
        "Unknown users get popular items with `cold_start: true`. `degraded` means a branch failed, timed out or had its breaker open.",
        vec![
            path_param("user", "user id"),
            k_param(s.max_k),
            json!({"name": "category", "in": "query", "required": false, "description": "only items of this category", "schema": text(1, MAX_CATEGORY_CHARS, "category")}),
            json!({"name": "exclude", "in": "query", "required": false, "style": "form", "explode": true, "description": "items not to show: each value is a comma-separated list of item ids (empty entries ignored); the parameter may repeat", "schema": {"type": "array", "maxItems": MAX_EXCLUDE_PARAMS, "items": text(0, MAX_EXCLUDE_CHARS, "comma-separated item ids")}}),
            json!({"name": "explain", "in": "query", "required": false, "description": "add each item's categories and every branch's candidates and time", "schema": {"type": "boolean", "default": false}}),
            json!({"name": "weights", "in": "query", "required": false, "description": "blend weights for this request: als,content,popularity[,item_item] (three leave item_item at 0)", "schema": {"type": "string", "pattern": weights_pattern()}}),
            min_offset_param("the user's partition"),
        ],
        responses(json_ok("recommendations", recs), &[400, 503]),
        r,
    );
    let user_op = op(
        "A user's features and history",
        "Personal data: needs a token when the node has one (the write token or the read token).",
        vec![
            path_param("id", "user id"),
            min_offset_param("the user's partition"),
        ],
        responses(json_ok("the user", user), &[400, 404, 503]),
        u,
    );
    let erase_op = op(
        "Erase a user",
        "Journaled in the user's partition; once applied, history, features and trainer interactions of the user are gone and reads answer 404.",
        vec![path_param("id", "user id")],
        responses(json_ok("durable", erase_ack), &[400, 503]),
        w,
    );
    let cluster_op = op(
        "Actor tree, offsets, models, breakers",
        "",
        vec![],
        responses(
            json_ok(
                "node state",
                json!({"type": "object", "required": ["node", "partitions", "ready", "actors", "supervisors"]}),
            ),
            &[400, 503],
        ),
        false,
    );
    let dead_op = op(
        "Poison records moved to the dead letters",
        "",
        vec![],
        responses(
            json_ok(
                "dead letters",
                json!({"type": "object", "required": ["dead_letters"], "properties": {"dead_letters": {"type": "array", "items": {"type": "object"}}}}),
            ),
            &[400, 503],
        ),
        w,
    );
    let retrain_op = op(
        "Retrain ALS now",
        "Answers the validation report once training finished (the candidate is served only when it validates at least as well as the serving model on interactions neither has seen). In a cluster any node forwards the request to the trainer leader, which publishes the model every node then serves; 503 with Retry-After while no node leads or the leader cannot be reached.",
        vec![],
        responses(json_ok("validation report", json!({"type": "object", "required": ["accepted", "reason", "model_version", "serving_version"], "properties": {"accepted": {"type": "boolean"}, "reason": {"type": "string"}, "model_version": {"type": "integer"}, "serving_version": {"type": "integer"}}})), &[400, 503]),
        w,
    );
    let rollback_op = op(
        "Serve the previous ALS model version",
        "Every node (in a cluster) serves the previous kept version until the next publish. 409 when no older version is kept or no model is served.",
        vec![],
        responses(
            json_ok(
                "now serving",
                json!({"type": "object", "required": ["serving_version"], "properties": {"serving_version": {"type": "integer"}}}),
            ),
            &[400, 409, 503],
        ),
        w,
    );
    let probe = |summary: &str, schema: Value, errors: &[u16]| {
        op(
            summary,
            "",
            vec![],
            responses(json_ok("ok", schema), errors),
            false,
        )
    };
    let healthz = probe("Liveness, with the node's name and the identity of its store (new for every fresh data directory)", json!({"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}, "node": {"type": "string"}, "store_id": {"type": "string"}}}), &[400, 503]);
    let readyz = probe(
        "Readiness (false while recovering, after an escalation, while the journal recovers, while draining); shows admission saturation",
        json!({"type": "object", "required": ["ready", "saturated"], "properties": {"ready": {"type": "boolean"}, "saturated": {"type": "object", "required": ["reads", "writes"], "properties": {"reads": {"type": "boolean"}, "writes": {"type": "boolean"}}}}}),
        &[400, 503],
    );
    let metrics = op(
        "Prometheus metrics",
        "",
        vec![],
        json!({"200": {"description": "OpenMetrics text", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}, "400": error_ref()}),
        false,
    );
    let page = op(
        "The status page (HTML built into the binary; its script reads /v1/cluster and /metrics)",
        "",
        vec![],
        json!({"200": {"description": "HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}, "400": error_ref()}),
        false,
    );
    let openapi = probe("This document", json!({"type": "object"}), &[400]);
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Troupe",
            "version": "1",
            "description": "Real-time recommendations from supervised actors. Errors are JSON {error, detail}. Every route refuses unknown query parameters and repeats of single-valued ones (400). Reads and writes are admitted separately: past `http.max_in_flight` reads or `http.max_in_flight_writes` writes the node answers 503 with Retry-After. Headers must arrive within `http.header_read_timeout_ms` (else the connection closes) and bodies within `http.body_read_timeout_ms` (408). HEAD is answered like GET.",
        },
        "components": {
            "schemas": {
                "Event": event,
                "Item": item_in,
                "ItemBatchEntry": item_batch,
            },
            "responses": {
                "Error": {"description": "error", "content": {"application/json": {"schema": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                }}}},
            },
        },
        "paths": {
            "/v1/events": {"post": events_op},
            "/v1/items": {"post": items_op},
            "/v1/items/{id}": {"get": get_item, "put": put_item, "delete": delete_item},
            "/v1/items/{id}/similar": {"get": similar_op},
            "/v1/items/{id}/stats": {"get": item_stats_op},
            "/v1/recommendations/{user}": {"get": recs_op},
            "/v1/users/{id}": {"get": user_op, "delete": erase_op},
            "/v1/cluster": {"get": cluster_op},
            "/v1/admin/dead-letters": {"get": dead_op},
            "/v1/admin/retrain": {"post": retrain_op},
            "/v1/admin/rollback": {"post": rollback_op},
            "/v1/openapi.json": {"get": openapi},
            "/healthz": {"get": healthz},
            "/readyz": {"get": readyz},
            "/metrics": {"get": metrics},
            "/": {"get": page.clone()},
            "/ui": {"get": page},
        },
    });
    if w || r || u {
        doc["components"]["securitySchemes"] =
            json!({"bearer": {"type": "http", "scheme": "bearer"}});
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_the_date_time_bound() {
        assert_eq!(range_regex(1, 12, 2), "(?:0[1-9]|1[0-2])");
        assert_eq!(range_regex(1971, 1983, 4), "(?:197[1-9]|198[0-3])");
        // Built on 2026-12-05: dates up to 2026-12-03.
        let built = chrono::DateTime::parse_from_rfc3339("2026-12-05T10:00:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(date_before(built, 2), "2026-12-03");
        let p = date_time_pattern(built);
        assert!(p.contains("2026-(?:0[1-9]|1[0-1])-"), "{p}");
        assert!(p.contains("2026-12-(?:0[1-3])"), "{p}");
    }
}
