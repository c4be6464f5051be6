//! Circuit breaker per ranker branch: closed -> (N consecutive failures) -> open ->
//! (after the open interval) half-open with one probe -> closed on success, open again
//! on failure.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    open_until: Option<Instant>,
    probe_in_flight: bool,
    transitions: VecDeque<(BreakerState, u64)>,
    opened: u64,
}

/// A breaker; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Breaker {
    pub name: String,
    threshold: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
    born: Instant,
}

/// Serializable view for `/v1/cluster`.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    pub name: String,
    pub state: BreakerState,
    pub consecutive_failures: u32,
    pub times_opened: u64,
    /// Recent transitions: state entered and milliseconds since the breaker was created.
    pub transitions: Vec<(BreakerState, u64)>,
}

impl Breaker {
    pub fn new(name: &str, threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            name: name.to_string(),
            threshold: threshold.max(1),
            open_for,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                open_until: None,
                probe_in_flight: false,
                transitions: VecDeque::new(),
                opened: 0,
            }),
            born: Instant::now(),
        }
    }

    fn go(&self, inner: &mut Inner, to: BreakerState) {
        if inner.state != to {
            inner.state = to;
            inner
                .transitions
                .push_back((to, self.born.elapsed().as_millis() as u64));
            if inner.transitions.len() > 32 {
                inner.transitions.pop_front();
            }
            tracing::info!(breaker = %self.name, state = ?to, "breaker state changed");
        }
    }

    /// May a call go through now? In half-open state only one probe at a time.
    pub fn allow(&self) -> bool {
        let mut i = self.inner.lock();
        match i.state {
            BreakerState::Closed => true,
            BreakerState::Open => {
                if i.open_until.is_some_and(|t| Instant::now() >= t) {
                    self.go(&mut i, BreakerState::HalfOpen);
                    i.probe_in_flight = true;
                    true
                } else {
                    false
                }
            }
            BreakerState::HalfOpen => {
                if i.probe_in_flight {
                    false
                } else {
                    i.probe_in_flight = true;
                    true
                }
            }
        }
    }

    /// Records the outcome of an allowed call.
    pub fn record(&self, ok: bool) {
        let mut i = self.inner.lock();
        i.probe_in_flight = false;
        if ok {
            i.failures = 0;
            self.go(&mut i, BreakerState::Closed);
            return;
        }
        i.failures += 1;
        if i.state == BreakerState::HalfOpen || i.failures >= self.threshold {
            i.open_until = Some(Instant::now() + self.open_for);
            i.opened += 1;
            self.go(&mut i, BreakerState::Open);
        }
    }

    pub fn state(&self) -> BreakerState {
        self.inner.lock().state
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let i = self.inner.lock();
        BreakerSnapshot {
            name: self.name.clone(),
            state: i.state,
            consecutive_failures: i.failures,
            times_opened: i.opened,
            transitions: i.transitions.iter().copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_open_half_open_closed() {
        let b = Breaker::new("als", 2, Duration::from_millis(0));
        assert!(b.allow());
        b.record(false);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        // Open interval of 0: the next call is the half-open probe; a second is refused.
        assert!(b.allow());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allow());
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.allow());
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        let states: Vec<BreakerState> = b.snapshot().transitions.iter().map(|t| t.0).collect();
        use BreakerState::*;
        assert_eq!(states, vec![Open, HalfOpen, Open, HalfOpen, Closed]);
    }

    #[test]
    fn open_refuses_until_interval() {
        let b = Breaker::new("x", 1, Duration::from_secs(3600));
        b.record(false);
        assert!(!b.allow());
        assert_eq!(b.state(), BreakerState::Open);
    }
}
