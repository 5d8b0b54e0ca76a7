//! The in-process store: the same two algorithms as the Redis script, over a
//! map guarded by one lock, with a clock that tests control. Used when no
//! Redis is configured and as the fallback while Redis cannot answer.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::Check;
use super::window::Observed;
use crate::config::ratelimit::Algorithm;

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

enum State {
    Counter { index: u64, curr: u64, prev: u64 },
    Log(VecDeque<u64>),
}

struct Entry {
    state: State,
    window_ms: u64,
    touched_ms: u64,
}

pub struct LocalStore {
    clock: Box<dyn Clock>,
    entries: Mutex<HashMap<String, Entry>>,
    operations: AtomicU64,
}

/// Sweep expired entries every this many decisions, so memory follows the
/// number of active callers, not the number ever seen.
const SWEEP_EVERY: u64 = 4096;

impl LocalStore {
    pub fn new(clock: Box<dyn Clock>) -> Self {
        LocalStore {
            clock,
            entries: Mutex::new(HashMap::new()),
            operations: AtomicU64::new(0),
        }
    }

    /// Observe every check, and count them all only if every one fits; with
    /// `commit = false` only observe (for inspection).
    pub fn check(&self, checks: &[Check], commit: bool) -> Vec<Observed> {
        let now = self.clock.now_ms();
        let Ok(mut entries) = self.entries.lock() else {
            return Vec::new();
        };
        if self.operations.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            entries.retain(|_, e| now.saturating_sub(e.touched_ms) < 2 * e.window_ms);
        }
        let observed: Vec<Observed> = checks
            .iter()
            .map(|c| observe(entries.get_mut(&c.key), c, now))
            .collect();
        let fits = checks
            .iter()
            .zip(&observed)
            .all(|(c, o)| c.budget.judge(*o).allowed);
        if commit && fits {
            for c in checks {
                let entry = entries.entry(c.key.clone()).or_insert_with(|| Entry {
                    state: match c.budget.algorithm {
                        Algorithm::SlidingWindow => State::Counter {
                            index: now / c.budget.window_ms,
                            curr: 0,
                            prev: 0,
                        },
                        Algorithm::SlidingLog => State::Log(VecDeque::new()),
                    },
                    window_ms: c.budget.window_ms,
                    touched_ms: now,
                });
                entry.touched_ms = now;
                match &mut entry.state {
                    State::Counter { curr, .. } => *curr += c.budget.cost,
                    State::Log(log) => log.extend(std::iter::repeat_n(now, c.budget.cost as usize)),
                }
            }
        }
        observed
    }
}

/// Bring one entry up to `now` and report it.
fn observe(entry: Option<&mut Entry>, check: &Check, now: u64) -> Observed {
    let window = check.budget.window_ms;
    let index = now / window;
    let elapsed_ms = now - index * window;
    let Some(entry) = entry else {
        return match check.budget.algorithm {
            Algorithm::SlidingWindow => Observed::Counter {
                prev: 0,
                curr: 0,
                elapsed_ms,
            },
            Algorithm::SlidingLog => Observed::Log {
                count: 0,
                wait_ms: window,
            },
        };
    };
    match &mut entry.state {
        State::Counter {
            index: seen,
            curr,
            prev,
        } => {
            if *seen != index {
                *prev = if *seen + 1 == index { *curr } else { 0 };
                *curr = 0;
                *seen = index;
            }
            Observed::Counter {
                prev: *prev,
                curr: *curr,
                elapsed_ms,
            }
        }
        State::Log(log) => {
            while log.front().is_some_and(|t| *t + window <= now) {
                log.pop_front();
            }
            let count = log.len() as u64;
            let must_leave = (count + check.budget.cost).saturating_sub(check.budget.limit);
            let index = usize::try_from(must_leave.saturating_sub(1)).unwrap_or(0);
            let wait_ms = log.get(index).map_or(window, |t| t + window - now);
            Observed::Log { count, wait_ms }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ratelimit::window::Budget;

    #[derive(Clone)]
    struct ManualClock(Arc<AtomicU64>);

    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn check(key: &str, algorithm: Algorithm, limit: u64) -> Check {
        Check {
            rule: "r".into(),
            index: 0,
            key: key.into(),
            budget: Budget {
                algorithm,
                limit,
                window_ms: 10_000,
                cost: 1,
            },
            on_redis_error: crate::config::ratelimit::RedisErrorPolicy::Local,
        }
    }

    fn allowed(store: &LocalStore, checks: &[Check]) -> bool {
        let observed = store.check(checks, true);
        checks
            .iter()
            .zip(observed)
            .all(|(c, o)| c.budget.judge(o).allowed)
    }

    #[test]
    fn window_slides_with_the_clock() {
        let time = Arc::new(AtomicU64::new(1_000_000));
        let store = LocalStore::new(Box::new(ManualClock(Arc::clone(&time))));
        let c = [check("a", Algorithm::SlidingWindow, 5)];
        let passed = (0..8).filter(|_| allowed(&store, &c)).count();
        assert_eq!(passed, 5);
        // Half a window later the previous five weigh 2.5: two more fit.
        time.fetch_add(15_000, Ordering::SeqCst);
        let passed = (0..8).filter(|_| allowed(&store, &c)).count();
        assert_eq!(passed, 2);
        // Two windows later everything is forgotten.
        time.fetch_add(20_000, Ordering::SeqCst);
        assert_eq!((0..8).filter(|_| allowed(&store, &c)).count(), 5);
    }

    #[test]
    fn sliding_log_forgets_each_entry_after_one_window() {
        let time = Arc::new(AtomicU64::new(0));
        let store = LocalStore::new(Box::new(ManualClock(Arc::clone(&time))));
        let c = [check("login", Algorithm::SlidingLog, 2)];
        assert!(allowed(&store, &c));
        time.store(4_000, Ordering::SeqCst);
        assert!(allowed(&store, &c));
        assert!(!allowed(&store, &c));
        time.store(10_000, Ordering::SeqCst);
        assert!(allowed(&store, &c), "the first entry left at 10 s");
        assert!(!allowed(&store, &c));
    }

    #[test]
    fn a_refused_request_counts_against_no_rule() {
        let store = LocalStore::new(Box::new(ManualClock(Arc::new(AtomicU64::new(0)))));
        let loose = check("loose", Algorithm::SlidingWindow, 100);
        let tight = check("tight", Algorithm::SlidingWindow, 1);
        assert!(allowed(&store, &[loose.clone(), tight.clone()]));
        for _ in 0..10 {
            assert!(!allowed(&store, &[loose.clone(), tight.clone()]));
        }
        let o = store.check(&[loose], false);
        assert_eq!(
            o[0],
            Observed::Counter {
                prev: 0,
                curr: 1,
                elapsed_ms: 0
            }
        );
    }
}
