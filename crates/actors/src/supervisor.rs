//! A restarting supervisor: OTP-like restart intensity (at most R restarts in T, then
//! escalate) and capped exponential backoff, per child. ractor itself has no restart
//! strategy (its default stops the supervisor when a child dies), so every supervisor in
//! Troupe is this actor.
//!
//! Restarted children get a new `ActorRef` under the same registered name; callers
//! re-resolve with `ractor::registry::where_is`. A child that exceeds its intensity makes
//! this supervisor stop with an `escalate:` reason, which its own parent treats as a
//! failure of that child. The root reports escalation through [`crate::ctx::Health`].

use crate::Discard;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent,
};
use ractor_cluster_derive::RactorMessage;
use serde::Serialize;

use crate::settings::RestartPolicy;

/// A failure that restarting cannot fix (records lost to retention, a checkpoint that
/// cannot be rebuilt): the supervisor escalates at once instead of restarting the child
/// until its intensity runs out.
#[derive(Debug)]
pub struct Fatal(pub String);

/// Marks the reason of a fatal escalation, so a parent supervisor passes it on at once.
pub const FATAL_MARK: &str = "a restart cannot fix";

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// A child whose scope a newer owner claimed (its state writes are fenced): restarting it
/// would only be refused again, and escalating would take down what this node still
/// owns, so the supervisor leaves it stopped and shows it as deposed.
#[derive(Debug)]
pub struct Deposed(pub String);

impl std::fmt::Display for Deposed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "deposed: {}", self.0)
    }
}

impl std::error::Error for Deposed {}

/// Starts (or restarts) one child linked to the given supervisor.
pub type StartFn = Arc<
    dyn Fn(ActorCell) -> Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>
        + Send
        + Sync,
>;

/// Called with the reason when a supervisor escalates.
pub type FailureHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Called with a child's name when it failed, and awaited before the restart is
/// scheduled (it counts the failure durably, so the next incarnation sees the count).
pub type FailureCounter =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A supervised child.
#[derive(Clone)]
pub struct ChildSpec {
    pub name: String,
    pub start: StartFn,
    pub policy: RestartPolicy,
}

impl ChildSpec {
    /// A child that is an actor `A` built fresh by `make` on every (re)start.
    pub fn new<A, F>(name: &str, policy: RestartPolicy, make: F) -> ChildSpec
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        let name_owned = name.to_string();
        let make = Arc::new(make);
        ChildSpec {
            name: name.to_string(),
            policy,
            start: Arc::new(move |sup: ActorCell| {
                let name = name_owned.clone();
                let make = make.clone();
                Box::pin(async move {
                    let (actor, args) = make();
                    let (r, _) = Actor::spawn_linked(Some(name), actor, args, sup).await?;
                    Ok(r.get_cell())
                })
            }),
        }
    }
}

/// Supervisor arguments.
pub struct SupervisorArgs {
    pub children: Vec<ChildSpec>,
    pub on_failure: Option<FailureCounter>,
    /// Called when this supervisor escalates (the root uses it to mark the node unhealthy).
    pub on_escalate: Option<FailureHook>,
    /// When set, a child that exceeds its restart intensity (or fails fatally) is removed
    /// and reported here, `(child, reason)`, instead of the supervisor escalating: the
    /// partitions of a cluster node, where one bad partition must not take the node down.
    pub on_give_up: Option<GiveUpHook>,
    /// How long a child gets to stop (`Remove`, `Shutdown`) before it is killed.
    pub stop_timeout: Duration,
}

/// The usual [`SupervisorArgs::stop_timeout`].
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops `cell` (registered as `name`), waiting at most `limit`. A child that does not
/// stop in time (its handler stuck on a call that does not return) is killed, which drops
/// the handler at once, and its name is waited for until it is free, so that the next
/// incarnation (the next claim of a partition) can register it. An error says what could
/// not be finished.
pub async fn stop_child(
    name: &str,
    cell: ActorCell,
    limit: Duration,
    reason: &str,
) -> Result<(), String> {
    let mut problem = None;
    if cell
        .stop_and_wait(Some(reason.to_string()), Some(limit))
        .await
        .is_err()
    {
        tracing::warn!(child = %name, "child did not stop in time; killing it");
        problem = Some(format!(
            "{name} did not stop within {} ms and was killed",
            limit.as_millis()
        ));
        if let Err(e) = cell.kill_and_wait(Some(limit)).await {
            return Err(format!("{name} did not stop, nor die when killed: {e}"));
        }
    }
    let deadline = Instant::now() + limit;
    while ractor::registry::where_is(name).is_some_and(|c| c.get_id() == cell.get_id()) {
        if Instant::now() >= deadline {
            return Err(format!("{name} stopped but its name is still registered"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match problem {
        Some(p) => Err(p),
        None => Ok(()),
    }
}

/// See [`SupervisorArgs::on_give_up`].
pub type GiveUpHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Supervisor messages.
#[derive(RactorMessage)]
pub enum SupervisorMsg {
    /// Restart the named child (sent to itself after the backoff).
    Restart(String),
    /// Start and supervise one more child (refused while a child of that name runs).
    Add(ChildSpec, RpcReplyPort<Result<(), String>>),
    /// Stop a child, waiting for it, and forget it (no restart, no failure counted).
    Remove(String, RpcReplyPort<bool>),
    Observe(RpcReplyPort<SupervisorSnapshot>),
    /// Stop children in reverse start order, waiting for each, then stop.
    Shutdown(RpcReplyPort<()>),
}

/// What `Observe` returns.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SupervisorSnapshot {
    pub children: Vec<ChildSnapshot>,
}

/// One child's supervision record.
#[derive(Debug, Clone, Serialize)]
pub struct ChildSnapshot {
    pub name: String,
    pub alive: bool,
    pub restarts: u64,
    /// Incarnation number (1 for the first start).
    pub generation: u64,
    pub last_failure: Option<String>,
    /// Stopped for good: a newer owner claimed its scope ([`Deposed`]).
    pub deposed: bool,
}

struct Child {
    spec: ChildSpec,
    cell: Option<ActorCell>,
    recent: VecDeque<Instant>,
    restarts: u64,
    generation: u64,
    last_failure: Option<String>,
    deposed: bool,
}

impl Child {
    /// A child just started for the first time.
    fn started(spec: ChildSpec, cell: ActorCell) -> Child {
        Child {
            spec,
            cell: Some(cell),
            recent: VecDeque::new(),
            restarts: 0,
            generation: 1,
            last_failure: None,
            deposed: false,
        }
    }
}

pub struct SupervisorState {
    children: Vec<Child>,
    on_failure: Option<FailureCounter>,
    on_escalate: Option<FailureHook>,
    on_give_up: Option<GiveUpHook>,
    stop_timeout: Duration,
    stopping: bool,
}

/// The supervisor actor.
pub struct Supervisor;

/// Backoff before restart number `n` (1-based) within the window.
pub fn backoff(policy: &RestartPolicy, n: u32) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(20));
    policy
        .backoff_base
        .saturating_mul(factor)
        .min(policy.backoff_max)
}

impl Supervisor {
    async fn child_failed(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        cell: &ActorCell,
        why: String,
        fatal: bool,
        deposed: bool,
    ) {
        if state.stopping {
            return;
        }
        let Some(idx) = state
            .children
            .iter()
            .position(|c| c.cell.as_ref().is_some_and(|x| x.get_id() == cell.get_id()))
        else {
            return;
        };
        state.children[idx].cell = None;
        if deposed {
            // Not a failure to count: the scope is another owner's now.
            let child = &mut state.children[idx];
            tracing::warn!(child = %child.spec.name, reason = %why, "child deposed: left stopped");
            child.last_failure = Some(why);
            child.deposed = true;
            return;
        }
        if let Some(h) = &state.on_failure {
            h(state.children[idx].spec.name.clone()).await;
        }
        Self::child_down(myself, state, idx, why, fatal);
    }

    /// Counts a failure of child `idx` (no longer running) and schedules its restart
    /// after the backoff, or escalates when the restart intensity is exceeded or the
    /// failure is [`Fatal`].
    fn child_down(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        idx: usize,
        why: String,
        fatal: bool,
    ) {
        let child = &mut state.children[idx];
        tracing::warn!(child = %child.spec.name, reason = %why, generation = child.generation, "child failed");
        child.last_failure = Some(why.clone());
        let now = Instant::now();
        let policy = child.spec.policy.clone();
        child.recent.push_back(now);
        while child
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            child.recent.pop_front();
        }
        let n = child.recent.len() as u32;
        if state.on_give_up.is_none() && (fatal || n > policy.max_restarts) {
            let reason = if fatal {
                format!(
                    "escalate: child {} failed in a way {FATAL_MARK}: {}",
                    child.spec.name, why
                )
            } else {
                format!(
                    "escalate: child {} failed {} times within {:?} (last: {})",
                    child.spec.name, n, policy.window, why
                )
            };
            tracing::error!(reason = %reason, "restart intensity exceeded");
            if let Some(h) = &state.on_escalate {
                h(&reason);
            }
            state.stopping = true;
            myself.stop(Some(reason));
            return;
        }
        if let Some(give_up) = state.on_give_up.clone() {
            if fatal || n > policy.max_restarts {
                let child = state.children.remove(idx);
                tracing::error!(child = %child.spec.name, reason = %why, "child given up");
                give_up(&child.spec.name, &why);
                return;
            }
        }
        let name = state.children[idx].spec.name.clone();
        myself.send_after(backoff(&policy, n), move || SupervisorMsg::Restart(name));
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut children = Vec::with_capacity(args.children.len());
        for spec in args.children {
            let cell = (spec.start)(myself.get_cell()).await?;
            children.push(Child::started(spec, cell));
        }
        Ok(SupervisorState {
            children,
            on_failure: args.on_failure,
            on_escalate: args.on_escalate,
            on_give_up: args.on_give_up,
            stop_timeout: args.stop_timeout,
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Restart(name) => {
                if state.stopping {
                    return Ok(());
                }
                // A child removed since its failure is not restarted.
                let Some(idx) = state.children.iter().position(|c| c.spec.name == name) else {
                    return Ok(());
                };
                let child = &mut state.children[idx];
                if child.cell.is_some() {
                    return Ok(());
                }
                match (child.spec.start)(myself.get_cell()).await {
                    Ok(cell) => {
                        child.cell = Some(cell);
                        child.restarts += 1;
                        child.generation += 1;
                        tracing::info!(child = %child.spec.name, generation = child.generation, "child restarted");
                    }
                    Err(e) => {
                        // A failed start counts like a failure of the child.
                        Self::child_down(&myself, state, idx, format!("start failed: {e}"), false);
                    }
                }
            }
            SupervisorMsg::Add(spec, reply) => {
                if state.stopping {
                    reply
                        .send(Err("the supervisor is stopping".into()))
                        .discard();
                    return Ok(());
                }
                if let Some(i) = state.children.iter().position(|c| c.spec.name == spec.name) {
                    if state.children[i].cell.is_some() {
                        reply
                            .send(Err(format!("{} is already running", spec.name)))
                            .discard();
                        return Ok(());
                    }
                    state.children.remove(i);
                }
                match (spec.start)(myself.get_cell()).await {
                    Ok(cell) => {
                        state.children.push(Child::started(spec, cell));
                        reply.send(Ok(())).discard();
                    }
                    Err(e) => reply.send(Err(format!("{}: {e}", spec.name))).discard(),
                }
            }
            SupervisorMsg::Remove(name, reply) => {
                let found = state.children.iter().position(|c| c.spec.name == name);
                if let Some(i) = found {
                    let child = state.children.remove(i);
                    // Its termination event finds no child any more and is ignored.
                    if let Some(cell) = child.cell {
                        if let Err(e) = stop_child(&name, cell, state.stop_timeout, "removed").await
                        {
                            tracing::warn!(child = %name, error = %e, "child removal");
                        }
                    }
                }
                reply.send(found.is_some()).discard();
            }
            SupervisorMsg::Observe(reply) => {
                let snap = SupervisorSnapshot {
                    children: state
                        .children
                        .iter()
                        .map(|c| ChildSnapshot {
                            name: c.spec.name.clone(),
                            alive: c.cell.is_some(),
                            restarts: c.restarts,
                            generation: c.generation,
                            last_failure: c.last_failure.clone(),
                            deposed: c.deposed,
                        })
                        .collect(),
                };
                reply.send(snap).discard();
            }
            SupervisorMsg::Shutdown(reply) => {
                state.stopping = true;
                for c in state.children.iter_mut().rev() {
                    if let Some(cell) = c.cell.take() {
                        if let Err(e) =
                            stop_child(&c.spec.name, cell, state.stop_timeout, "shutdown").await
                        {
                            tracing::warn!(child = %c.spec.name, error = %e, "child shutdown");
                        }
                    }
                }
                reply.send(()).discard();
                myself.stop(Some("shutdown".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let fatal = err.downcast_ref::<Fatal>().is_some();
                let deposed = err.downcast_ref::<Deposed>().is_some();
                self.child_failed(&myself, state, &cell, err.to_string(), fatal, deposed)
                    .await;
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                // A child never stops on its own: an unexpected stop is a failure.
                let why = reason.unwrap_or_else(|| "stopped".into());
                // A child that escalated fatally stopped its own subtree: pass it on.
                let fatal = why.contains(FATAL_MARK);
                self.child_failed(&myself, state, &cell, why, fatal, false)
                    .await;
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child whose handler never returns once it got a message (a call that hangs).
    struct Stuck;

    #[derive(RactorMessage)]
    struct Hang;

    impl Actor for Stuck {
        type Msg = Hang;
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<Hang>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
        async fn handle(
            &self,
            _: ActorRef<Hang>,
            _: Hang,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            std::future::pending::<()>().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_child_that_ignores_stop_is_killed_and_its_name_freed() {
        let name = "stuck-child-test";
        let spec = || ChildSpec::new(name, RestartPolicy::default(), || (Stuck, ()));
        let (sup, _) = Actor::spawn(
            None,
            Supervisor,
            SupervisorArgs {
                children: vec![spec()],
                on_failure: None,
                on_escalate: None,
                on_give_up: None,
                stop_timeout: Duration::from_millis(200),
            },
        )
        .await
        .unwrap();
        let child: ActorRef<Hang> = ractor::registry::where_is(name).unwrap().into();
        child.cast(Hang).unwrap();
        let removed = ractor::call!(sup, SupervisorMsg::Remove, name.to_string()).unwrap();
        assert!(removed);
        assert!(ractor::registry::where_is(name).is_none(), "name freed");
        // The next claim of the same name (a partition taken again) starts.
        let added = ractor::call!(sup, SupervisorMsg::Add, spec()).unwrap();
        assert_eq!(added, Ok(()));
        let again: ActorRef<Hang> = ractor::registry::where_is(name).unwrap().into();
        again.cast(Hang).unwrap();
        ractor::call!(sup, SupervisorMsg::Shutdown).unwrap();
        assert!(ractor::registry::where_is(name).is_none());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(1),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(35),
        };
        assert_eq!(backoff(&p, 1), Duration::from_millis(10));
        assert_eq!(backoff(&p, 2), Duration::from_millis(20));
        assert_eq!(backoff(&p, 3), Duration::from_millis(35));
        assert_eq!(backoff(&p, 50), Duration::from_millis(35));
    }
}
