//! `POST /v1/events`: JSON arrays or NDJSON of events, each checked with the line or
//! element it came from, then appended by the request layer.

use super::*;

/// An event as clients send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an event object")]
pub(super) struct EventJson {
    #[serde(default, deserialize_with = "present")]
    event_id: Option<String>,
    user: String,
    item: String,
    kind: String,
    #[serde(default, deserialize_with = "present")]
    value: Option<f64>,
    /// Milliseconds since the epoch, or an RFC 3339 string; absent: now.
    #[serde(default, deserialize_with = "present")]
    ts: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    request_id: Option<String>,
}

/// An event of a body, its `ts` read (milliseconds or an RFC 3339 string), then checked
/// by the request layer; the bool says whether it carried its own identity.
pub(super) fn to_event(e: EventJson, now: i64, skew_ms: i64) -> Result<(Event, bool), String> {
    let mut event = proto::EventIn {
        event_id: e.event_id,
        user: e.user,
        item: e.item,
        kind: e.kind,
        value: e.value,
        ts_ms: None,
        request_id: e.request_id,
    };
    // The identifiers first, so the reasons keep the request layer's order.
    troupe_actors::api::check_event_ids(&event)?;
    event.ts_ms = match &e.ts {
        None => None,
        // JSON has one number type: 1000.0 is the integer 1000.
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && (0.0..9.0e18).contains(f))
                        .map(|f| f as i64)
                })
                .filter(|&t| t >= 0)
                .ok_or_else(|| {
                    format!("ts {n} must be a whole number of milliseconds since 1970")
                })?,
        ),
        Some(Value::Null) => {
            return Err("ts is null: leave the field out to use the node's clock".into())
        }
        Some(Value::String(s)) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|err| format!("ts `{s}` is not an RFC 3339 date-time: {err}"))?
                .timestamp_millis(),
        ),
        Some(_) => {
            return Err("ts must be milliseconds since the epoch or an RFC 3339 string".into())
        }
    };
    troupe_actors::api::check_event_rest(event, now, skew_ms)
}

/// Parses a JSON array or NDJSON body into events; every problem names its event or line.
pub(super) fn parse_events(
    text: &str,
    now: i64,
    skew_ms: i64,
    max: usize,
) -> Result<Vec<(Event, bool)>, ApiError> {
    let trimmed = text.trim_start();
    let array = trimmed.starts_with('[');
    let raw: Vec<(usize, Result<EventJson, String>)> = if array {
        // Well-formed arrays decode in one pass; the element-by-element pass below only
        // runs to name the bad elements.
        if let Ok(events) = serde_json::from_str::<Vec<Obj<EventJson>>>(text) {
            events.into_iter().map(|e| Ok(e.0)).enumerate().collect()
        } else {
            let values: Vec<Value> = serde_json::from_str(text)
                .map_err(|e| ApiError::bad(format!("body is not a JSON array of events: {e}")))?;
            values
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    (
                        i,
                        serde_json::from_value::<Obj<EventJson>>(v)
                            .map(|e| e.0)
                            .map_err(|e| e.to_string()),
                    )
                })
                .collect()
        }
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                (
                    i,
                    serde_json::from_str::<Obj<EventJson>>(l)
                        .map(|e| e.0)
                        .map_err(|e| e.to_string()),
                )
            })
            .collect()
    };
    if raw.is_empty() {
        return Err(ApiError::bad("no events in the body"));
    }
    troupe_actors::api::check_count(raw.len(), max, "too_many_events", "events")?;
    let what = if array { "event" } else { "line" };
    let mut out = Vec::with_capacity(raw.len());
    let mut problems = Vec::new();
    for (i, r) in raw {
        match r.and_then(|e| to_event(e, now, skew_ms)) {
            Ok(e) => out.push(e),
            Err(e) => problems.push(format!("{what} {}: {e}", i + 1)),
        }
    }
    troupe_actors::api::refuse_problems(problems)?;
    Ok(out)
}

#[derive(Serialize)]
pub(super) struct EventsOut {
    acked: usize,
    duplicates: usize,
    results: Vec<PositionOut>,
}

pub(super) async fn post_events(
    State(st): State<AppState>,
    _a: Admitted<Writes>,
    q: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    Params::none(q.0)?;
    let idem = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v.to_str().map_err(|_| {
                ApiError::bad(format!(
                    "Idempotency-Key must be 1..={} visible ASCII characters (no spaces)",
                    limits::MAX_ID_CHARS
                ))
            })?;
            troupe_actors::api::check_request_key(k)?;
            Some(k.to_string())
        }
    };
    let bytes = read_body(&st, body).await?;
    let text = body_text(&bytes)?;
    let skew = st.ctx.settings.max_future_skew.as_millis() as i64;
    let events = parse_events(text, now_ms(), skew, st.opts.max_events_per_request)
        .inspect_err(|_| st.api.count_invalid_events())?;
    // Events without their own identity are keyed by the request: its
    // Idempotency-Key, else its whole body.
    let request: Vec<u8> = match &idem {
        Some(k) => troupe_actors::api::request_key_bytes(k),
        None => hash128(&[b"body", &bytes]).to_le_bytes().to_vec(),
    };
    let w = st.api.append_events(events, &request).await?;
    Ok(Json(EventsOut {
        acked: w.acked as usize,
        duplicates: w.duplicates as usize,
        results: w.positions.iter().map(|p| position_out(p, None)).collect(),
    })
    .into_response())
}

impl Expecting for EventJson {
    const WHAT: &'static str = "an event object";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<(Event, bool)>, ApiError> {
        parse_events(text, 1_700_000_000_000, 1000, 10)
    }

    #[test]
    fn events_parse_array_and_ndjson_with_located_errors() {
        let a = parse(r#"[{"user":"u","item":"i","kind":"View","ts":5}]"#).unwrap();
        assert_eq!(
            (a[0].0.kind.as_str(), a[0].0.ts_ms, a[0].1),
            ("view", 5, true)
        );
        let n = parse(
            "{\"user\":\"u\",\"item\":\"i\",\"kind\":\"v\",\"ts\":\"2023-11-14T22:13:20Z\"}\n\n",
        )
        .unwrap();
        assert_eq!(n[0].0.ts_ms, 1_700_000_000_000);
        let e = parse(
            "{\"user\":\"u\",\"item\":\"i\",\"kind\":\"v\"}\n{\"user\":\"u\",\"kind\":\"v\"}",
        )
        .unwrap_err();
        assert!(
            e.detail.contains("line 2") && e.detail.contains("item"),
            "{}",
            e.detail
        );
        let e = parse(r#"[{"user":"u","item":"i","kind":"v","extra":1}]"#).unwrap_err();
        assert!(e.detail.contains("extra"), "{}", e.detail);
        let e = parse(r#"[{"user":"u","item":"i","kind":"v","ts":9999999999999}]"#).unwrap_err();
        assert!(e.detail.contains("after the node's clock"), "{}", e.detail);
        let e = parse(r#"[{"user":1,"item":"i","kind":"v"}]"#).unwrap_err();
        assert!(e.detail.contains("event 1"), "{}", e.detail);
    }

    #[test]
    fn more_events_than_the_limit_are_refused_naming_it() {
        let one = r#"{"user":"u","item":"i","kind":"v"}"#;
        let body = format!("[{}]", [one; 11].join(","));
        let e = parse(&body).unwrap_err();
        assert_eq!(
            (e.status, e.code.as_ref(), e.detail.as_str()),
            (
                StatusCode::BAD_REQUEST,
                "too_many_events",
                "11 events in one request; the limit is 10"
            )
        );
        assert_eq!(
            parse(&format!("[{}]", [one; 10].join(","))).unwrap().len(),
            10
        );
    }

    #[test]
    fn errors_name_limits_not_internal_types() {
        let e = parse(r#"[{"user":"u","item":"i","kind":"v","value":1e308}]"#).unwrap_err();
        assert!(
            e.detail.contains("out of range") && e.detail.contains("32-bit"),
            "{}",
            e.detail
        );
        let e = parse("[5]").unwrap_err();
        assert!(
            !e.detail.contains("EventIn") && e.detail.contains("an event object"),
            "{}",
            e.detail
        );
        for field in ["event_id", "value", "ts", "request_id"] {
            let body = format!(r#"[{{"user":"u","item":"i","kind":"v","{field}":null}}]"#);
            let e = parse(&body).unwrap_err();
            assert!(e.detail.contains("null"), "{field}: {}", e.detail);
        }
        let long = "x".repeat(limits::MAX_ID_CHARS + 1);
        let e = parse(&format!(
            r#"[{{"user":"u","item":"i","kind":"v","request_id":"{long}"}}]"#
        ))
        .unwrap_err();
        assert!(e.detail.contains("request_id"), "{}", e.detail);
    }

    proptest::proptest! {
        /// Any body text: events or a 4xx with a reason, never a panic.
        #[test]
        fn any_body_parses_or_is_refused(text in "(\\PC|\\n|[\\[\\]{}\",:])*") {
            if let Err(e) = parse(&text) {
                proptest::prop_assert!(e.status.is_client_error());
                proptest::prop_assert!(!e.detail.is_empty());
            }
        }
    }
}
