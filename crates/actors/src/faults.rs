//! Fault injection for tests: make a chosen actor panic, fail or stall on a chosen record,
//! or make a ranker branch fail or stall. The node refuses a fault section unless
//! `TROUPE_ALLOW_FAULTS=1` is set; the hook itself is compiled into every build so tests
//! exercise the binary users run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::record::{Payload, Record};

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    Panic,
    /// Return an error from the handler (the actor fails without a panic).
    Error,
    /// Sleep for the given time (simulates a hung actor or branch).
    Stall(Duration),
}

/// One configured fault.
#[derive(Debug)]
pub struct Fault {
    /// Actor kind (`user_features`, `item_stats`, `catalog`, `journal`,
    /// `ranker`), a branch (`branch.als`, `branch.content`, `branch.popularity`), or a
    /// step of the model plane (`als_training`: stall a training run;
    /// `model_blob.corrupt`: damage a snapshot's bytes as read), or `log_follow` (stall
    /// the JetStream log's follower before it hands on a batch).
    pub target: String,
    pub action: FaultAction,
    /// Fire on records whose event id / item id / user equals this (any record if `None`).
    pub on_key: Option<String>,
    /// Fire at most this many times (unlimited if `None`).
    pub times: Option<u64>,
    /// Occasions let pass before the first firing.
    pub skip: u64,
    occasions: AtomicU64,
    fired: AtomicU64,
}

impl Fault {
    pub fn new(
        target: &str,
        action: FaultAction,
        on_key: Option<String>,
        times: Option<u64>,
    ) -> Fault {
        Fault {
            target: target.to_string(),
            action,
            on_key,
            times,
            skip: 0,
            occasions: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        }
    }

    /// The same fault, firing only after `skip` occasions have passed.
    pub fn skipping(mut self, skip: u64) -> Fault {
        self.skip = skip;
        self
    }

    fn take(&self) -> bool {
        if self.occasions.fetch_add(1, Ordering::Relaxed) < self.skip {
            return false;
        }
        let n = self.fired.fetch_add(1, Ordering::Relaxed);
        match self.times {
            Some(t) if n >= t => {
                self.fired.fetch_sub(1, Ordering::Relaxed);
                false
            }
            _ => true,
        }
    }

    /// How many times the fault fired.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }
}

/// The faults of a node (usually none).
#[derive(Debug, Default)]
pub struct Faults {
    pub list: Vec<Fault>,
}

fn record_key(r: &Record) -> Vec<&str> {
    match &r.payload {
        Payload::Event(e) => {
            let mut v = vec![e.user.as_str(), e.item.as_str()];
            if let Some(id) = &e.event_id {
                v.push(id);
            }
            v
        }
        Payload::EraseUser { user } => vec![user.as_str()],
        Payload::ItemUpsert(i) => vec![i.id.as_str()],
        Payload::ItemDelete { id } => vec![id.as_str()],
    }
}

impl Faults {
    /// The fault to fire for `target` on `record`, if any.
    pub fn on_record(&self, target: &str, record: &Record) -> Option<FaultAction> {
        if self.list.is_empty() {
            return None;
        }
        let keys = record_key(record);
        self.list
            .iter()
            .find(|f| {
                f.target == target
                    && f.on_key.as_deref().is_none_or(|k| keys.contains(&k))
                    && f.take()
            })
            .map(|f| f.action)
    }

    /// The fault to fire for `target` on a request about `key` (a user or item id).
    pub fn on_key(&self, target: &str, key: &str) -> Option<FaultAction> {
        self.list
            .iter()
            .find(|f| {
                f.target == target && f.on_key.as_deref().is_none_or(|k| k == key) && f.take()
            })
            .map(|f| f.action)
    }

    /// The fault to fire for a call of `target` (branches), if any.
    pub fn on_call(&self, target: &str) -> Option<FaultAction> {
        self.list
            .iter()
            .find(|f| f.target == target && f.take())
            .map(|f| f.action)
    }
}

/// Runs the fault (if any) of a call of `target` (the control plane's actors:
/// `lease_manager`, `lease_renewer`, `membership`, `gateway`): panics, returns an error, or
/// stalls.
pub async fn fire(faults: &Faults, target: &str) -> Result<(), InjectedFault> {
    match faults.on_call(target) {
        None => Ok(()),
        Some(FaultAction::Panic) => panic!("injected panic in {target}"),
        Some(FaultAction::Error) => Err(InjectedFault(target.to_string())),
        Some(FaultAction::Stall(d)) => {
            tracing::warn!(target, stall_ms = d.as_millis() as u64, "injected stall");
            tokio::time::sleep(d).await;
            Ok(())
        }
    }
}

/// Error raised by an injected `Error` fault.
#[derive(Debug, thiserror::Error)]
#[error("injected fault in {0}")]
pub struct InjectedFault(pub String);

/// Runs the fault (if any) of `target` on `record`: panics, returns an error, or stalls.
pub async fn apply(faults: &Faults, target: &str, record: &Record) -> Result<(), InjectedFault> {
    match faults.on_record(target, record) {
        None => Ok(()),
        Some(FaultAction::Panic) => panic!(
            "injected panic in {target} at {}/{}",
            record.stream, record.offset
        ),
        Some(FaultAction::Error) => Err(InjectedFault(target.to_string())),
        Some(FaultAction::Stall(d)) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
    }
}
