//! Assembles one node's supervision tree and offers the calls the HTTP layer needs.
//!
//! ```text
//! node_supervisor
//! ├── journal
//! ├── content_encoder
//! ├── catalog
//! ├── item_stats
//! ├── partitions_supervisor ── user_features-0 .. user_features-{P-1}
//! ├── als_trainer
//! └── ranker
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorRef, RpcReplyPort};
use troupe_models::content::TextEncoder;

use crate::catalog::{Catalog, CatalogMsg};
use crate::consumer;
use crate::ctx::Ctx;
use crate::encoder::{ContentEncoder, ContentEncoderArgs, ContentEncoderMsg};
use crate::features::{UserFeatures, UserFeaturesArgs, UserFeaturesMsg};
use crate::item_stats::{ItemStats, ItemStatsMsg};
use crate::journal::{Journal, JournalMsg};
use crate::messages::{CheckpointReply, Observation};
use crate::names;
use crate::ranker::{Ranker, RankerMsg};
use crate::supervisor::{ChildSpec, Supervisor, SupervisorArgs, SupervisorMsg, SupervisorSnapshot};
use crate::trainer::{AlsTrainer, AlsTrainerMsg};

/// A running node.
pub struct NodeHandle {
    pub ctx: Arc<Ctx>,
    pub root: ActorRef<SupervisorMsg>,
    pub root_done: tokio::task::JoinHandle<()>,
}

/// Errors calling into the node's actors.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("actor {0} is not running (restarting?)")]
    Unavailable(String),
    #[error("actor {0} did not answer in time")]
    Timeout(String),
    #[error("actor {name}: {reason}")]
    Failed { name: String, reason: String },
}

/// Resolves a registered actor by name (re-resolved on every call: restarts change refs).
pub fn resolve<M: ractor::Message>(name: &str) -> Result<ActorRef<M>, CallError> {
    ractor::registry::where_is(name)
        .map(ActorRef::from)
        .ok_or_else(|| CallError::Unavailable(name.to_string()))
}

/// A timed RPC to a named actor.
pub async fn call<M, T, F>(name: &str, timeout: Duration, build: F) -> Result<T, CallError>
where
    M: ractor::Message,
    T: Send + 'static,
    F: FnOnce(RpcReplyPort<T>) -> M,
{
    let actor: ActorRef<M> = resolve(name)?;
    match actor.call(build, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => Err(CallError::Timeout(name.to_string())),
        Ok(ractor::rpc::CallResult::SenderError) => Err(CallError::Failed {
            name: name.to_string(),
            reason: "the actor stopped before answering".into(),
        }),
        Err(e) => Err(CallError::Failed {
            name: name.to_string(),
            reason: e.to_string(),
        }),
    }
}

fn children(ctx: &Arc<Ctx>, encoder: Arc<dyn TextEncoder>, encoder_name: String) -> Vec<ChildSpec> {
    let policy = ctx.settings.restart.clone();
    let c = ctx.clone();
    let journal = ChildSpec::new(names::JOURNAL, policy.clone(), move || (Journal, c.clone()));
    let c = ctx.clone();
    let enc = ChildSpec::new(names::CONTENT_ENCODER, policy.clone(), move || {
        (
            ContentEncoder,
            ContentEncoderArgs {
                ctx: c.clone(),
                encoder: encoder.clone(),
                encoder_name: encoder_name.clone(),
            },
        )
    });
    // The consumers, from the one list: the singletons here, the partitions under
    // their own supervisor.
    let mut partitions = Vec::new();
    let mut singletons = Vec::new();
    for c in consumer::consumers(&ctx.settings) {
        let spec = consumer_child(ctx, &c, &policy);
        if c.kind == consumer::Kind::UserFeatures {
            partitions.push(spec);
        } else {
            singletons.push(spec);
        }
    }
    // In a cluster the partitions start and stop with their leases (`cluster::lease`),
    // and one that keeps failing is given up, not escalated.
    let on_give_up = ctx.cluster.clone().map(|cl| {
        let hook: crate::supervisor::GiveUpHook = Arc::new(move |child: &str, why: &str| {
            if let Some(p) = child
                .strip_prefix(names::USER_FEATURES_PREFIX)
                .and_then(|p| p.parse().ok())
            {
                cl.give_up(p, why);
            }
        });
        hook
    });
    if on_give_up.is_some() {
        partitions.clear();
    }
    let c = ctx.clone();
    let psup = ChildSpec::new(names::PARTITIONS_SUPERVISOR, policy.clone(), move || {
        let c2 = c.clone();
        (
            Supervisor,
            SupervisorArgs {
                children: partitions.clone(),
                on_failure: Some(failure_counter(&c2)),
                on_escalate: None,
                on_give_up: on_give_up.clone(),
                stop_timeout: crate::supervisor::STOP_TIMEOUT,
            },
        )
    });
    let c = ctx.clone();
    let trainer = ChildSpec::new(names::ALS_TRAINER, policy.clone(), move || {
        (AlsTrainer, c.clone())
    });
    let c = ctx.clone();
    let ranker = ChildSpec::new(names::RANKER, policy.clone(), move || (Ranker, c.clone()));
    let mut all = vec![enc];
    all.extend(singletons);
    all.push(psup);
    if ctx.cluster.is_some() {
        all.push(control_plane(ctx, &policy));
    }
    all.extend([trainer, ranker]);
    if ctx.embedded_log() {
        all.insert(0, journal);
    }
    all
}

/// Cluster mode: the control plane under its own supervisor, restarted like every
/// other actor: the gateway peers call, the membership (node server, dialling,
/// liveness), the lease renewer and the lease manager. The leases held live in
/// `Cluster`, so a restart of either lease actor loses none.
fn control_plane(ctx: &Arc<Ctx>, policy: &crate::settings::RestartPolicy) -> ChildSpec {
    use crate::cluster::{gateway::Gateway, leader, lease, membership};
    let c = ctx.clone();
    // The gateway is not registered by name: ractor_cluster registers the peers' remote
    // actors under their names here, which would collide with a local name.
    let gateway = ChildSpec {
        name: "gateway".to_string(),
        policy: policy.clone(),
        start: Arc::new(move |sup: ActorCell| {
            let c = c.clone();
            Box::pin(async move {
                let (r, _) = Actor::spawn_linked(None, Gateway, c, sup).await?;
                Ok(r.get_cell())
            })
        }),
    };
    let c = ctx.clone();
    let membership = ChildSpec::new(membership::NAME, policy.clone(), move || {
        (membership::Membership, c.clone())
    });
    let c = ctx.clone();
    let renewer = ChildSpec::new(lease::RENEWER, policy.clone(), move || {
        (lease::Renewer, c.clone())
    });
    let c = ctx.clone();
    let trainer_lease = ChildSpec::new(leader::NAME, policy.clone(), move || {
        (leader::TrainerLease, c.clone())
    });
    let c = ctx.clone();
    let p = policy.clone();
    let make: lease::MakeChild = Arc::new(move |part| {
        let spec = consumer::ConsumerSpec {
            scope: names::user_features(part),
            kind: consumer::Kind::UserFeatures,
            streams: vec![part],
        };
        consumer_child(&c, &spec, &p)
    });
    let c = ctx.clone();
    let manager = ChildSpec::new(lease::MANAGER, policy.clone(), move || {
        (
            lease::Manager,
            lease::ManagerArgs {
                ctx: c.clone(),
                make_child: make.clone(),
            },
        )
    });
    ChildSpec::new(names::CLUSTER_SUPERVISOR, policy.clone(), move || {
        (
            Supervisor,
            SupervisorArgs {
                children: vec![
                    gateway.clone(),
                    membership.clone(),
                    renewer.clone(),
                    manager.clone(),
                    trainer_lease.clone(),
                ],
                on_failure: None,
                on_escalate: None,
                on_give_up: None,
                stop_timeout: crate::supervisor::STOP_TIMEOUT,
            },
        )
    })
}

/// The supervised child that runs consumer `c`.
fn consumer_child(
    ctx: &Arc<Ctx>,
    c: &consumer::ConsumerSpec,
    policy: &crate::settings::RestartPolicy,
) -> ChildSpec {
    let ctx = ctx.clone();
    let policy = policy.clone();
    match c.kind {
        consumer::Kind::Catalog => ChildSpec::new(&c.scope, policy, move || (Catalog, ctx.clone())),
        consumer::Kind::ItemStats => {
            ChildSpec::new(&c.scope, policy, move || (ItemStats, ctx.clone()))
        }
        consumer::Kind::UserFeatures => {
            let partition = c.streams[0];
            ChildSpec::new(&c.scope, policy, move || {
                (
                    UserFeatures,
                    UserFeaturesArgs {
                        ctx: ctx.clone(),
                        partition,
                    },
                )
            })
        }
    }
}

/// The supervisors' failure hook ([`consumer::count_failure`]).
fn failure_counter(ctx: &Arc<Ctx>) -> crate::supervisor::FailureCounter {
    let ctx = ctx.clone();
    Arc::new(move |child: String| {
        let ctx = ctx.clone();
        Box::pin(async move { consumer::count_failure(&ctx, &child).await })
    })
}

/// Starts the node's supervision tree. Recovery (checkpoints, replay, model load) runs
/// inside the actors; `ctx.health.ready()` turns true when it is done.
pub async fn start(
    ctx: Arc<Ctx>,
    encoder: Arc<dyn TextEncoder>,
    encoder_name: String,
) -> Result<NodeHandle, ractor::SpawnErr> {
    let c = ctx.clone();
    let c2 = ctx.clone();
    let args = SupervisorArgs {
        children: children(&ctx, encoder, encoder_name),
        on_failure: Some(failure_counter(&c)),
        on_escalate: Some(Arc::new(move |reason: &str| {
            c2.health.escalate(reason.to_string())
        })),
        on_give_up: None,
        stop_timeout: crate::supervisor::STOP_TIMEOUT,
    };
    let (root, done) =
        Actor::spawn(Some(names::NODE_SUPERVISOR.to_string()), Supervisor, args).await?;
    tokio::spawn(trim_memory());
    tokio::spawn(watch_log_fault(ctx.clone(), root.clone()));
    tokio::spawn(build_content_graphs(Arc::downgrade(&ctx)));
    if ctx.settings.retention {
        tokio::spawn(retain(ctx.clone()));
    }
    Ok(NodeHandle {
        ctx,
        root,
        root_done: done,
    })
}

/// Stops the node when its log reports that it went backwards ([`crate::log::Log::fault`]):
/// the escalation reaches the root at once (the process exits 1 with the reason), as no
/// restart can bring back what the log lost.
async fn watch_log_fault(ctx: Arc<Ctx>, root: ActorRef<SupervisorMsg>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Some(why) = ctx.log.fault() {
            let reason = format!(
                "escalate: the log failed in a way {}: {why}",
                crate::supervisor::FATAL_MARK
            );
            tracing::error!(reason = %reason, "stopping the node");
            ctx.health.escalate(reason.clone());
            root.stop(Some(reason));
            return;
        }
    }
}

/// Every second, while the node lives: builds the content branch's HNSW graphs when the
/// catalogue's embeddings reached `ranker.ann_min_items` rows, and again once enough rows
/// changed since ([`ContentIndex::ann_due`](crate::content_index::ContentIndex::ann_due)),
/// once no embedding changed for a second (or it was due for half a minute), on a
/// thread of its own, off the request path.
async fn build_content_graphs(ctx: std::sync::Weak<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_gen = None;
    let mut due_since: Option<std::time::Instant> = None;
    loop {
        tick.tick().await;
        let Some(c) = ctx.upgrade() else {
            return;
        };
        let min = c.settings.ranker.ann_min_items;
        let (due, gen) = {
            let mut idx = c.content.write();
            (idx.ann_due(min), idx.generation())
        };
        // While the catalogue is being loaded, wait for a quiet second (for at most
        // half a minute) rather than build over a part of it again and again.
        let quiet = last_gen.replace(gen) == Some(gen);
        let waited = due_since
            .get_or_insert_with(std::time::Instant::now)
            .elapsed();
        if !due {
            due_since = None;
        }
        if !due || !(quiet || waited >= Duration::from_secs(30)) {
            if c.content.read().ann().is_none() {
                c.metrics.content_ann_items.set(0);
            }
            continue;
        }
        due_since = None;
        // A thread of its own (as for the ALS index): a build of minutes never holds up
        // the runtime's shutdown.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("content-ann-build".into())
            .spawn(move || {
                let r = crate::content_index::build_ann(&c.content, &c.settings.ranker.ann);
                crate::Discard::discard(tx.send((c, r)));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the content hnsw build; exact scoring answers");
            continue;
        }
        match rx.await {
            Ok((c, Ok(Some(ann)))) => {
                tracing::info!(
                    rows = ann.rows(),
                    build_ms = (ann.build_seconds() * 1e3) as u64,
                    memory_mb = ann.memory_bytes() >> 20,
                    "content hnsw graphs built and swapped in"
                );
                c.metrics.content_ann_items.set(ann.rows() as i64);
                c.metrics.content_ann_build_seconds.set(ann.build_seconds());
            }
            Ok((_, Ok(None))) => {}
            Ok((_, Err(e))) => {
                tracing::error!(error = %e, "content hnsw build failed; exact scoring answers")
            }
            Err(_) => tracing::error!("the content hnsw build ended without an answer (panicked)"),
        }
    }
}

/// Every few seconds, hands the allocator's free pages back to the system once it holds
/// more than a few MiB of them (a load's request buffers, a catch-up's decoded batches),
/// so resident memory follows what is live ([`crate::alloc`]).
async fn trim_memory() {
    const EVERY: Duration = Duration::from_secs(5);
    const FREE_HELD_MAX: usize = 16 << 20;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if crate::alloc::stats().is_some_and(|s| s.free_held > FREE_HELD_MAX) {
            crate::Discard::discard(tokio::task::spawn_blocking(crate::alloc::trim).await);
        }
    }
}

/// Retention (`journal.retention`): every checkpoint interval, deletes the records of
/// each stream that every consumer of it has checkpointed past.
async fn retain(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(ctx.settings.checkpoint_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let covered = match consumer::retainable(&ctx).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "retention postponed");
                continue;
            }
        };
        for (s, covered) in covered {
            match ctx.log.truncate(s, covered.saturating_add(1)).await {
                Ok(0) => {}
                Ok(n) => {
                    ctx.metrics.log_truncated.inc_by(n);
                    tracing::debug!(
                        stream = s,
                        records = n,
                        "records past every checkpoint deleted"
                    );
                }
                Err(e) => tracing::warn!(stream = s, error = %e, "retention postponed"),
            }
        }
    }
}

/// Appends records to the node's log; one position per entry once every one is
/// acknowledged. Entries are checked at this boundary (an event or erasure must name its
/// user's partition, an item operation the catalog): a request with a wrong one is
/// refused whole, nothing written.
pub async fn append(
    ctx: &Ctx,
    entries: Vec<crate::log::AppendEntry>,
    timeout: Duration,
) -> Result<Vec<crate::log::Position>, crate::log::LogError> {
    use crate::log::LogError;
    if ctx.health.draining.load(Ordering::Relaxed) {
        return Err(LogError::Unavailable("node is shutting down".into()));
    }
    ctx.check_entries(&entries).map_err(LogError::Refused)?;
    let started = std::time::Instant::now();
    let positions = match tokio::time::timeout(timeout, ctx.log.append(entries)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(LogError::Unavailable(format!(
                "the log did not acknowledge within {} ms; a retry with the same ids is safe",
                timeout.as_millis()
            )))
        }
    };
    // Counted here, whichever log took them (the embedded journal or JetStream) and
    // whoever wrote (the request layer, the demo's loader).
    let dups = positions.iter().filter(|p| p.duplicate).count() as u64;
    let m = &ctx.metrics;
    m.append_seconds.observe(started.elapsed().as_secs_f64());
    m.events_acked.inc_by(positions.len() as u64 - dups);
    m.events_duplicate.inc_by(dups);
    Ok(positions)
}

/// `Observe` of every actor in the tree plus the supervisors' records, asked all at once:
/// the whole answer takes at most about `timeout`, however many actors are busy (an actor
/// stuck on the log answers `Timeout`).
pub async fn observe_all(
    ctx: &Ctx,
    timeout: Duration,
) -> (
    Vec<(String, Result<Observation, CallError>)>,
    Vec<(String, Option<SupervisorSnapshot>)>,
) {
    type Pending<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = (String, Result<Observation, CallError>)> + Send + 'a>,
    >;
    let mut asks: Vec<Pending<'static>> = Vec::new();
    let ask = |name: String, kind: Option<consumer::Kind>| -> Pending<'static> {
        Box::pin(async move {
            let r = match kind {
                None if name == names::JOURNAL => call(&name, timeout, JournalMsg::Observe).await,
                None if name == names::CONTENT_ENCODER => {
                    call(&name, timeout, ContentEncoderMsg::Observe).await
                }
                None if name == names::ALS_TRAINER => {
                    call(&name, timeout, AlsTrainerMsg::Observe).await
                }
                None => call(&name, timeout, RankerMsg::Observe).await,
                Some(consumer::Kind::Catalog) => call(&name, timeout, CatalogMsg::Observe).await,
                Some(consumer::Kind::ItemStats) => {
                    call(&name, timeout, ItemStatsMsg::Observe).await
                }
                Some(consumer::Kind::UserFeatures) => {
                    call(&name, timeout, UserFeaturesMsg::Observe).await
                }
            };
            (name, r)
        })
    };
    if ctx.embedded_log() {
        asks.push(ask(names::JOURNAL.into(), None));
    }
    asks.push(ask(names::CONTENT_ENCODER.into(), None));
    for c in consumer::consumers(&ctx.settings) {
        // A cluster node runs only the partitions it holds.
        if c.kind == consumer::Kind::UserFeatures
            && ctx.cluster.is_some()
            && ractor::registry::where_is(c.scope.clone()).is_none()
        {
            continue;
        }
        asks.push(ask(c.scope.clone(), Some(c.kind)));
    }
    asks.push(ask(names::ALS_TRAINER.into(), None));
    asks.push(ask(names::RANKER.into(), None));
    let mut supervisors = vec![names::NODE_SUPERVISOR, names::PARTITIONS_SUPERVISOR];
    if ctx.cluster.is_some() {
        supervisors.push(names::CLUSTER_SUPERVISOR);
    }
    let sups = supervisors.into_iter().map(|s| async move {
        (
            s.to_string(),
            call(s, timeout, SupervisorMsg::Observe).await.ok(),
        )
    });
    futures_util::future::join(
        futures_util::future::join_all(asks),
        futures_util::future::join_all(sups),
    )
    .await
}

/// Graceful stop: refuse new writes, let the journal commit what it holds, checkpoint
/// every consumer, then stop the tree (children in reverse start order).
pub async fn shutdown(handle: NodeHandle) -> Vec<String> {
    let ctx = handle.ctx.clone();
    ctx.health.draining.store(true, Ordering::Relaxed);
    let t = Duration::from_secs(30);
    let mut problems = Vec::new();
    // Observe is queued behind every pending append and flush: when it answers, the
    // journal has committed (or failed) all of them.
    if ctx.embedded_log() {
        if let Err(e) = call(names::JOURNAL, t, JournalMsg::Observe).await {
            problems.push(format!("journal: {e}"));
        }
    }
    // A cluster node checkpoints, stops and releases the partitions it holds first, so
    // their next owners take them at once instead of waiting for the leases to lapse.
    if ctx.cluster.is_some() {
        crate::cluster::leader::release(Duration::from_secs(10)).await;
        problems.extend(crate::cluster::lease::release_all(Duration::from_secs(120)).await);
    }
    let mut results: Vec<(String, Result<CheckpointReply, CallError>)> = Vec::new();
    for c in consumer::consumers(&ctx.settings) {
        if c.kind == consumer::Kind::UserFeatures && ctx.cluster.is_some() {
            continue;
        }
        let r = match c.kind {
            consumer::Kind::UserFeatures => call(&c.scope, t, UserFeaturesMsg::Checkpoint).await,
            consumer::Kind::ItemStats => call(&c.scope, t, ItemStatsMsg::Checkpoint).await,
            consumer::Kind::Catalog => call(&c.scope, t, CatalogMsg::Checkpoint).await,
        };
        results.push((c.scope, r));
    }
    for (n, r) in results {
        match r {
            Ok(c) if c.error.is_none() => {}
            Ok(c) => problems.push(format!("{n}: {}", c.error.unwrap_or_default())),
            Err(e) => problems.push(format!("{n}: {e}")),
        }
    }
    if let Err(e) = call(names::NODE_SUPERVISOR, t, SupervisorMsg::Shutdown).await {
        problems.push(format!("supervisor: {e}"));
    }
    if tokio::time::timeout(t, handle.root_done).await.is_err() {
        problems.push("supervision tree did not stop in time".into());
    }
    problems
}

/// The root supervisor's cell (for waiting on escalation).
pub fn root_cell(handle: &NodeHandle) -> ActorCell {
    handle.root.get_cell()
}
