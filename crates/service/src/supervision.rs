//! When a device's probe worker keeps failing: restarts spaced by a backoff, and a device
//! marked unhealthy after repeated failures within a window (a job that succeeds in between
//! starts the count again), refusing jobs until a cooldown has passed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Failures within this window count together.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(120);
/// This many failures within the window make a device unhealthy.
pub const FAILURES_TO_UNHEALTHY: usize = 3;
/// The first restart's delay; each failure in the window doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest delay before a restart.
const LONGEST_BACKOFF: Duration = Duration::from_secs(10);

/// A device's record of worker failures.
#[derive(Debug, Default)]
pub struct Health {
    failures: VecDeque<Instant>,
    unhealthy: Option<(Instant, String)>,
}

impl Health {
    /// Counts a failure at `now` for `reason`; returns whether it made the device unhealthy.
    pub fn failed(&mut self, now: Instant, reason: &str) -> bool {
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > FAILURE_WINDOW)
        {
            self.failures.pop_front();
        }
        if self.failures.len() >= FAILURES_TO_UNHEALTHY && self.unhealthy.is_none() {
            self.unhealthy = Some((now, reason.to_string()));
            return true;
        }
        false
    }

    /// A job succeeded: the device works, and earlier failures no longer count.
    pub fn succeeded(&mut self) {
        self.failures.clear();
    }

    /// Whether the device refuses jobs (until [`Health::refusal`] finds its cooldown over).
    pub fn is_unhealthy(&self) -> bool {
        self.unhealthy.is_some()
    }

    /// How long to wait before the next restart.
    pub fn backoff(&self) -> Duration {
        let doublings = self.failures.len().saturating_sub(1).min(16) as u32;
        (FIRST_BACKOFF * 2u32.pow(doublings)).min(LONGEST_BACKOFF)
    }

    /// Why the device refuses jobs at `now`, if it does. Past `cooldown` it takes jobs again,
    /// with its failures forgotten: a fault that persists makes it unhealthy again.
    pub fn refusal(&mut self, now: Instant, cooldown: Duration) -> Option<(String, Duration)> {
        let (since, reason) = self.unhealthy.as_ref()?;
        let elapsed = now.duration_since(*since);
        if elapsed >= cooldown {
            self.unhealthy = None;
            self.failures.clear();
            return None;
        }
        Some((reason.clone(), cooldown - elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_make_a_device_unhealthy_until_the_cooldown() {
        let start = Instant::now();
        let cooldown = Duration::from_secs(30);
        let mut health = Health::default();
        assert!(!health.failed(start, "crash"));
        assert_eq!(health.backoff(), FIRST_BACKOFF);
        assert!(!health.failed(start + Duration::from_secs(1), "crash"));
        assert_eq!(health.backoff(), FIRST_BACKOFF * 2);
        assert!(health.refusal(start, cooldown).is_none());
        assert!(health.failed(start + Duration::from_secs(2), "hang"));
        let (reason, wait) = health
            .refusal(start + Duration::from_secs(12), cooldown)
            .unwrap();
        assert_eq!((reason.as_str(), wait), ("hang", Duration::from_secs(20)));
        assert!(health
            .refusal(start + Duration::from_secs(32), cooldown)
            .is_none());
        assert!(!health.failed(start + Duration::from_secs(33), "crash"));
        assert!(!health.failed(start + Duration::from_secs(34), "crash"));
        health.succeeded();
        assert!(!health.failed(start + Duration::from_secs(35), "crash"));
        assert_eq!(health.backoff(), FIRST_BACKOFF);
    }

    #[test]
    fn failures_outside_the_window_are_forgotten_and_the_backoff_is_bounded() {
        let start = Instant::now();
        let mut health = Health::default();
        for i in 0..2 {
            health.failed(start + Duration::from_secs(i), "crash");
        }
        assert!(!health.failed(start + FAILURE_WINDOW + Duration::from_secs(5), "crash"));
        for i in 0..40 {
            health.failed(
                start + FAILURE_WINDOW * 3 + Duration::from_millis(i),
                "crash",
            );
        }
        assert_eq!(health.backoff(), LONGEST_BACKOFF);
    }
}
