//! Golden bytes of every cross-process message: the cross-node frames of each accepted
//! protocol version (`tests/golden/proto-v<N>/`) and the log's stored records
//! (`tests/golden/record-v<N>/`).
//!
//! - Every committed file of an accepted version must keep decoding, to the value it was
//!   written from.
//! - The current version's samples must encode to exactly the committed bytes: a change
//!   of any type on the wire without a new protocol (or record format) version fails
//!   here. After bumping the version on purpose, write the new version's files with
//!   `TROUPE_BLESS=1 cargo test -p troupe-tests --test wire_golden` and commit them
//!   (keep the old directories while their versions are accepted).

use std::collections::BTreeMap;
use std::path::PathBuf;

use troupe_proto::api::*;
use troupe_proto::log::Position;
use troupe_proto::record::{self, Event, Item, Payload, RECORD_FORMAT};
use troupe_proto::wire::{self, Envelope, RemoteError, Request, Response, TraceContext};

fn golden_dir(kind: &str, version: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{kind}-v{version}"))
}

fn bless() -> bool {
    std::env::var("TROUPE_BLESS").is_ok_and(|v| v == "1")
}

fn envelope(request: Request) -> Envelope {
    Envelope {
        id: "node-a-1f-7".into(),
        budget_ms: 2500,
        trace: TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: "vendor=1".into(),
        },
        request,
    }
}

fn recommend_request() -> RecommendRequest {
    RecommendRequest {
        user: "u-42".into(),
        k: 10,
        category: Some("Drama".into()),
        exclude: vec!["i1".into(), "i2".into()],
        weights: Some(vec![0.5, 0.3, 0.2]),
        request_id: "node-a-1f-7".into(),
        now_ms: 1_700_000_000_000,
        min_offset: Some(1234),
    }
}

fn recommend_reply() -> RecommendReply {
    RecommendReply {
        request_id: "node-a-1f-7".into(),
        user: "u-42".into(),
        items: vec![RecommendedItem {
            item: "i9".into(),
            score: 0.75,
            shares: vec![0.6, 0.3, 0.1, 0.0],
            categories: vec!["Drama".into()],
        }],
        als_model_version: 3,
        content_encoder: "minilm-l6".into(),
        applied_offset: 1240,
        awaited_offset: 1234,
        degraded: false,
        stale: false,
        cold_start: false,
        cached: true,
        branches: Branch::ALL
            .iter()
            .zip(BranchStatus::ALL)
            .map(|(b, s)| BranchReport {
                name: *b,
                status: s,
                candidates: 200,
                micros: 850,
            })
            .collect(),
        fallback: Some(Fallback {
            requested: vec![1.0, 0.0, 0.0, 0.0],
            used: vec![0.5, 0.3, 0.2, 0.0],
            reason: "no ALS candidates".into(),
        }),
        error: None,
        served_by: "b".into(),
        route: Route::Forwarded,
    }
}

fn user_view() -> UserView {
    UserView {
        known: true,
        unchanged: false,
        history: vec![Touch {
            item: "i9".into(),
            kind: "view".into(),
            weight: 1.0,
            ts_ms: 1_700_000_000_000,
        }],
        interests: vec![("i9".into(), 1.0, 1_700_000_000_000)],
        seen: vec!["i9".into()],
        disliked: vec!["i3".into()],
        kind_counts: vec![("view".into(), 1)],
        events: 1,
        last_ts_ms: 1_700_000_000_000,
        last_offset: 1200,
        applied_offset: 1240,
    }
}

fn retrain_report() -> RetrainReport {
    RetrainReport {
        model_version: 4,
        accepted: true,
        reason: "accepted".into(),
        candidate_ndcg: 0.31,
        serving_ndcg: 0.29,
        validation_users: 500,
        interactions: 100_000,
        users: 600,
        items: 9000,
        train_ms: 2800,
        serving_version: 3,
        compared_users: 120,
        leader: "a".into(),
        no_leader: false,
    }
}

/// Request frames of the current version, by file name.
fn requests() -> Vec<(&'static str, Envelope)> {
    vec![
        ("request-ping", envelope(Request::Ping { from: "a".into() })),
        (
            "request-recommend",
            envelope(Request::Recommend(recommend_request())),
        ),
        (
            "request-user",
            envelope(Request::User {
                query: UserQuery {
                    user: "u-42".into(),
                    unchanged_since: 1200,
                },
                min_offset: Some(1234),
            }),
        ),
        ("request-retrain", envelope(Request::Retrain)),
    ]
    .into_iter()
    .chain(ops().into_iter().map(|(name, op)| {
        (
            name,
            envelope(Request::Api {
                token: Some("secret".into()),
                op,
            }),
        )
    }))
    .collect()
}

/// One client operation of each kind, by file name.
fn ops() -> Vec<(&'static str, Op)> {
    vec![
        (
            "request-api-events",
            Op::Events {
                events: vec![EventIn {
                    event_id: Some("e-1".into()),
                    user: "u-42".into(),
                    item: "i9".into(),
                    kind: "view".into(),
                    value: Some(1.5),
                    ts_ms: Some(1_700_000_000_000),
                    request_id: None,
                }],
                request_key: Some("batch-7".into()),
            },
        ),
        (
            "request-api-recommend",
            Op::Recommend(RecommendQuery {
                user: "u-42".into(),
                k: 10,
                category: Some("Drama".into()),
                exclude: vec!["i1".into()],
                weights: Some(vec![0.5, 0.3, 0.2]),
                min_offset: Some(1234),
            }),
        ),
        (
            "request-api-similar",
            Op::Similar {
                item: "i9".into(),
                k: 5,
                min_offset: None,
            },
        ),
        (
            "request-api-upsert-items",
            Op::UpsertItems(vec![ItemIn {
                id: "i9".into(),
                text: "A film about trains".into(),
                categories: vec!["Drama".into()],
                hidden: true,
                attributes: BTreeMap::from([("year".into(), "1999".into())]),
            }]),
        ),
        (
            "request-api-delete-item",
            Op::DeleteItem { id: "i9".into() },
        ),
        (
            "request-api-get-item",
            Op::GetItem {
                id: "i9".into(),
                min_offset: Some(7),
            },
        ),
        (
            "request-api-item-stats",
            Op::ItemStats {
                item: "i9".into(),
                min_offset: None,
            },
        ),
        (
            "request-api-get-user",
            Op::GetUser {
                user: "u-42".into(),
                min_offset: Some(1234),
            },
        ),
        (
            "request-api-erase-user",
            Op::EraseUser {
                user: "u-42".into(),
            },
        ),
        ("request-api-retrain", Op::Retrain),
        ("request-api-rollback", Op::Rollback),
        ("request-api-cluster-status", Op::ClusterStatus),
        ("request-api-dead-letters", Op::DeadLetters),
    ]
}

/// The protocol version that added the message `name` (files of older versions lack it).
fn since(name: &str) -> u16 {
    match name {
        "request-api-dead-letters" | "reply-api-dead-letters" | "error-too-new" => 5,
        _ => 4,
    }
}

/// Reply frames of the current version, by file name.
fn replies() -> Vec<(&'static str, Result<Response, RemoteError>)> {
    vec![
        ("reply-pong", Ok(Response::Pong { name: "b".into() })),
        (
            "reply-recommend",
            Ok(Response::Recommend(recommend_reply())),
        ),
        (
            "reply-user",
            Ok(Response::User {
                view: user_view(),
                stale: true,
            }),
        ),
        ("reply-retrain", Ok(Response::Retrain(retrain_report()))),
        ("error-decode", Err(RemoteError::Decode("bad".into()))),
        ("error-version", Err(RemoteError::version(9))),
        (
            "error-not-owner",
            Err(RemoteError::NotOwner {
                partition: 3,
                node: "b".into(),
            }),
        ),
        (
            "error-failed",
            Err(RemoteError::Failed("ranker down".into())),
        ),
        ("error-timeout", Err(RemoteError::Timeout(2500))),
        (
            "error-unreachable",
            Err(RemoteError::Unreachable("c".into())),
        ),
        (
            "reply-api-written",
            Ok(Response::Api(Ok(OpReply::Written(Written {
                acked: 1,
                duplicates: 1,
                positions: vec![
                    Position {
                        stream: 2,
                        offset: 77,
                        duplicate: false,
                    },
                    Position {
                        stream: record::CATALOG_STREAM,
                        offset: 5,
                        duplicate: true,
                    },
                ],
            })))),
        ),
        (
            "reply-api-recommend",
            Ok(Response::Api(Ok(OpReply::Recommend(recommend_reply())))),
        ),
        (
            "reply-api-similar",
            Ok(Response::Api(Ok(OpReply::Similar(SimilarReply {
                item: "i9".into(),
                source: SimilarSource::Content,
                items: vec![("i10".into(), 0.9)],
            })))),
        ),
        (
            "reply-api-item",
            Ok(Response::Api(Ok(OpReply::Item(ItemView {
                item: Item {
                    id: "i9".into(),
                    text: "A film about trains".into(),
                    categories: vec!["Drama".into()],
                    hidden: false,
                    attributes: BTreeMap::new(),
                },
                applied_offset: 5,
                stale: false,
            })))),
        ),
        (
            "reply-api-item-stats",
            Ok(Response::Api(Ok(OpReply::ItemStats(ItemStatsView {
                item: "i9".into(),
                event_count: 12,
                node: "a".into(),
                stale: false,
            })))),
        ),
        (
            "reply-api-user",
            Ok(Response::Api(Ok(OpReply::User(UserRead {
                user: "u-42".into(),
                partition: 2,
                view: user_view(),
                stale: false,
            })))),
        ),
        (
            "reply-api-retrain",
            Ok(Response::Api(Ok(OpReply::Retrain(retrain_report())))),
        ),
        (
            "reply-api-rollback",
            Ok(Response::Api(Ok(OpReply::Rollback(RollbackReply {
                serving_version: 2,
                error: None,
            })))),
        ),
        (
            "reply-api-cluster",
            Ok(Response::Api(Ok(OpReply::Cluster(ClusterStatus {
                node: "a".into(),
                ready: true,
                members: vec![
                    MemberStatus {
                        name: "a".into(),
                        this_node: true,
                        state: PeerState::Up,
                        model_version: 3,
                    },
                    MemberStatus {
                        name: "b".into(),
                        this_node: false,
                        state: PeerState::Unresponsive,
                        model_version: 2,
                    },
                ],
                partitions: vec![PartitionStatus {
                    partition: 0,
                    owner: "a".into(),
                    epoch: 7,
                    state: SlotState::Serving,
                    applied_offset: Some(1240),
                }],
                trainer_leader: Some("a".into()),
                model_version: 3,
            })))),
        ),
        (
            "reply-api-error",
            Ok(Response::Api(Err(ApiError {
                retry_after_s: Some(1),
                ..ApiError::overloaded("too many reads in flight")
            }))),
        ),
        (
            "reply-api-dead-letters",
            Ok(Response::Api(Ok(OpReply::DeadLetters(vec![
                r#"{"consumer":"user_features.0","stream":"0","offset":12,"attempts":3}"#.into(),
            ])))),
        ),
        (
            "error-too-new",
            Err(RemoteError::TooNew { needs: 5, peer: 4 }),
        ),
    ]
}

/// Stored records of the current record format, by file name.
fn records() -> Vec<(&'static str, Payload)> {
    vec![
        (
            "event",
            Payload::Event(Event {
                event_id: Some("e-1".into()),
                user: "u-42".into(),
                item: "i9".into(),
                kind: "purchase".into(),
                value: Some(2.5),
                ts_ms: 1_700_000_000_000,
                request_id: Some("node-a-1f-7".into()),
            }),
        ),
        (
            "erase-user",
            Payload::EraseUser {
                user: "u-42".into(),
            },
        ),
        (
            "item-upsert",
            Payload::ItemUpsert(Item {
                id: "i9".into(),
                text: "A film about trains".into(),
                categories: vec!["Drama".into()],
                hidden: false,
                attributes: BTreeMap::from([("year".into(), "1999".into())]),
            }),
        ),
        ("item-delete", Payload::ItemDelete { id: "i9".into() }),
    ]
}

/// Compares `bytes` with the committed file (or writes it when blessing); a difference
/// is named with the way out.
fn check(dir: &std::path::Path, name: &str, bytes: &[u8], what: &str) -> Option<String> {
    let path = dir.join(format!("{name}.bin"));
    if bless() {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(&path, bytes).unwrap();
        return None;
    }
    match std::fs::read(&path) {
        Ok(committed) if committed == bytes => None,
        Ok(_) => Some(format!(
            "{}: this build encodes {name} differently: a type on the wire changed without a new {what} version (raise it, then TROUPE_BLESS=1 to write the new version's files)",
            path.display()
        )),
        Err(e) => Some(format!(
            "{}: {e} (write the current version's files with TROUPE_BLESS=1)",
            path.display()
        )),
    }
}

#[test]
fn the_current_protocol_encodes_to_its_golden_bytes() {
    let dir = golden_dir("proto", wire::PROTOCOL);
    let mut problems = Vec::new();
    for (name, env) in requests() {
        let bytes = wire::request_frame(&env).unwrap();
        problems.extend(check(&dir, name, &bytes, "protocol"));
    }
    for (name, r) in replies() {
        let bytes = wire::reply_frame(wire::PROTOCOL, &r);
        problems.extend(check(&dir, name, &bytes, "protocol"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_accepted_protocol_version_still_decodes() {
    for version in wire::ACCEPTED {
        let dir = golden_dir("proto", version);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            assert!(
                since(&name) <= version,
                "{}: newer than its version",
                path.display()
            );
            if name.starts_with("request-") {
                let (v, env) = wire::open_request(&bytes)
                    .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                assert_eq!(v, version, "{}", path.display());
                // Versions only add messages: a request reads the same in every version
                // that has it.
                let want = requests().into_iter().find(|(n, _)| *n == name).unwrap().1;
                assert_eq!(env, want, "{}", path.display());
            } else {
                let reply = wire::open_reply(&bytes);
                let mut want = replies().into_iter().find(|(n, _)| *n == name).unwrap().1;
                // Older versions answer without what they lack (the item-item branch).
                match &mut want {
                    Ok(Response::Recommend(r)) | Ok(Response::Api(Ok(OpReply::Recommend(r)))) => {
                        wire::downgrade(version, r)
                    }
                    _ => {}
                }
                match (&reply, want) {
                    // A refusal names the refusing build's range, which grows.
                    (
                        Err(RemoteError::Version { got, accepted }),
                        Err(RemoteError::Version { got: g, .. }),
                    ) if version < wire::PROTOCOL => {
                        assert_eq!((*got, accepted.1), (g, version), "{}", path.display());
                    }
                    (_, want) => assert_eq!(reply, want, "{}", path.display()),
                }
            }
            n += 1;
        }
        let names: Vec<&str> = requests()
            .iter()
            .map(|(n, _)| *n)
            .chain(replies().iter().map(|(n, _)| *n))
            .filter(|n| since(n) <= version)
            .collect();
        assert_eq!(n, names.len(), "{}: one file per message", dir.display());
    }
}

#[test]
fn a_frame_of_an_unaccepted_version_is_an_explicit_error() {
    let env = requests().remove(1).1;
    let body = &wire::request_frame(&env).unwrap()[2..];
    for v in [
        0,
        wire::ACCEPTED.start() - 1,
        wire::ACCEPTED.end() + 1,
        u16::MAX,
    ] {
        let (answer_in, e) = wire::open_request(&wire::frame(v, body)).unwrap_err();
        assert_eq!(answer_in, wire::PROTOCOL);
        assert_eq!(e, RemoteError::version(v), "{e}");
        assert!(e
            .to_string()
            .contains(&format!("version {v} is not accepted")));
    }
}

#[test]
fn stored_records_keep_their_format() {
    let dir = golden_dir("record", RECORD_FORMAT);
    let mut problems = Vec::new();
    for (name, payload) in records() {
        let bytes = record::encode(&payload);
        problems.extend(check(&dir, name, &bytes, "record format"));
        if !bless() {
            let stored = std::fs::read(dir.join(format!("{name}.bin"))).unwrap_or_default();
            assert_eq!(record::decode(&stored).ok(), Some(payload), "{name}");
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
