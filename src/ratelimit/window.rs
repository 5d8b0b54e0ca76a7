//! The arithmetic of the two algorithms, free of any store or clock: given
//! what a store observed for one rule, is the request allowed, what remains,
//! and when may the caller come back. Redis and the local store both report
//! through [`Observed`], so both decide identically.

use crate::config::ratelimit::Algorithm;

/// What a store saw for one rule just before this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Sliding-window counter: the previous and current window's counts and
    /// how far into the current window `now` is.
    Counter {
        prev: u64,
        curr: u64,
        elapsed_ms: u64,
    },
    /// Sliding log: entries in the last window, and how long until the entry
    /// whose expiry matters (the one that must leave for this request to fit,
    /// or the oldest) leaves the window.
    Log { count: u64, wait_ms: u64 },
}

/// One rule's verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Budget left after this request (0 when refused).
    pub remaining: u64,
    /// Seconds until the caller may try again (refused), or until the
    /// budget is whole again (allowed). At least 1.
    pub reset_secs: u64,
}

/// The limit a rule enforces, with the cost of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub algorithm: Algorithm,
    pub limit: u64,
    pub window_ms: u64,
    pub cost: u64,
}

fn secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

impl Budget {
    pub fn judge(&self, observed: Observed) -> Outcome {
        match observed {
            Observed::Counter {
                prev,
                curr,
                elapsed_ms,
            } => self.judge_counter(prev, curr, elapsed_ms.min(self.window_ms)),
            Observed::Log { count, wait_ms } => {
                let allowed = count + self.cost <= self.limit;
                Outcome {
                    allowed,
                    remaining: if allowed {
                        self.limit - count - self.cost
                    } else {
                        0
                    },
                    reset_secs: secs(if allowed && count + self.cost == 0 {
                        self.window_ms
                    } else {
                        wait_ms
                    }),
                }
            }
        }
    }

    /// Cloudflare's estimate: `prev × (1 − elapsed/window) + curr`.
    fn judge_counter(&self, prev: u64, curr: u64, elapsed: u64) -> Outcome {
        let window = self.window_ms as f64;
        let weight = 1.0 - elapsed as f64 / window;
        let estimate = prev as f64 * weight + curr as f64;
        let limit = self.limit as f64;
        let cost = self.cost as f64;
        let allowed = estimate + cost <= limit;
        if allowed {
            let remaining = (limit - estimate - cost).floor().max(0.0) as u64;
            // The previous window's share is gone when this window ends.
            let reset = if prev == 0 && curr + self.cost == 0 {
                self.window_ms
            } else {
                self.window_ms - elapsed
            };
            return Outcome {
                allowed,
                remaining,
                reset_secs: secs(reset),
            };
        }
        let wait_ms = if curr as f64 + cost <= limit {
            // Waiting for the previous window's share to decay enough:
            // prev × (1 − (elapsed + t)/window) + curr + cost ≤ limit.
            let fraction = 1.0 - (limit - curr as f64 - cost) / prev as f64;
            (fraction * window - elapsed as f64).max(0.0)
        } else {
            // Not even this window's own count fits: wait for the next window
            // and for this count, then previous, to decay:
            // curr × (1 − t/window) + cost ≤ limit.
            let until_next = window - elapsed as f64;
            let fraction = if curr == 0 {
                0.0
            } else {
                (1.0 - (limit - cost) / curr as f64).clamp(0.0, 1.0)
            };
            until_next + fraction * window
        };
        Outcome {
            allowed,
            remaining: 0,
            reset_secs: secs(wait_ms.ceil() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(prev: u64, curr: u64, elapsed_ms: u64) -> Observed {
        Observed::Counter {
            prev,
            curr,
            elapsed_ms,
        }
    }

    fn counter(limit: u64) -> Budget {
        Budget {
            algorithm: Algorithm::SlidingWindow,
            limit,
            window_ms: 60_000,
            cost: 1,
        }
    }

    #[test]
    fn exactly_the_limit_passes_within_one_window() {
        let b = counter(3);
        let mut curr = 0;
        let mut verdicts = Vec::new();
        for _ in 0..4 {
            let o = b.judge(Observed::Counter {
                prev: 0,
                curr,
                elapsed_ms: 1_000,
            });
            if o.allowed {
                curr += 1;
            }
            verdicts.push((o.allowed, o.remaining));
        }
        assert_eq!(verdicts, [(true, 2), (true, 1), (true, 0), (false, 0)]);
    }

    #[test]
    fn previous_window_weighs_less_as_the_window_slides() {
        // A full previous window blocks at the start of the next...
        let b = counter(10);
        assert!(!b.judge(at(10, 0, 0)).allowed);
        // ...allows one once a tenth of it has decayed...
        let o = b.judge(at(10, 0, 6_000));
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        // ...and half of it by the middle.
        let o = b.judge(at(10, 0, 30_000));
        assert_eq!((o.allowed, o.remaining), (true, 4));
        // No boundary burst: 10 at the end of one window and 10 at the start
        // of the next (fixed windows would allow 20 in a few seconds).
        assert!(!b.judge(at(10, 1, 1_000)).allowed);
    }

    #[test]
    fn retry_after_is_when_the_request_would_fit() {
        let b = counter(10);
        // Previous window's share must decay from 10 to 9 → 6 s in.
        let o = b.judge(at(10, 0, 0));
        assert_eq!(o.reset_secs, 6);
        // This window is full at 15 s: 45 s to its end, then 10 × (1 − t/60) + 1 ≤ 10 → 6 s.
        let o = b.judge(at(0, 10, 15_000));
        assert_eq!(o.reset_secs, 51);
        // Checking at that moment (the count is now the previous window's) allows it.
        assert!(b.judge(at(10, 0, 6_000)).allowed);
    }

    #[test]
    fn cost_counts_several_requests() {
        let b = Budget {
            cost: 4,
            ..counter(10)
        };
        assert!(b.judge(at(0, 6, 0)).allowed);
        assert!(!b.judge(at(0, 7, 0)).allowed);
    }

    #[test]
    fn sliding_log_is_exact() {
        let b = Budget {
            algorithm: Algorithm::SlidingLog,
            ..counter(2)
        };
        assert_eq!(
            b.judge(Observed::Log {
                count: 1,
                wait_ms: 59_000
            }),
            Outcome {
                allowed: true,
                remaining: 0,
                reset_secs: 59
            }
        );
        assert_eq!(
            b.judge(Observed::Log {
                count: 2,
                wait_ms: 12_300
            }),
            Outcome {
                allowed: false,
                remaining: 0,
                reset_secs: 13
            }
        );
    }
}
