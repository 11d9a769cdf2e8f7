//! Per-volume exponential backoff after failed destroys.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use protocol::native::FailedVolume;
use protocol::Handle;

#[derive(Debug, Clone)]
struct Failure {
    attempts: u32,
    error: String,
    next_try: Instant,
}

/// Remembers failed destroys and when each may be tried again.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: HashMap<Handle, Failure>,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            failures: HashMap::new(),
        }
    }

    /// Records a failure at `now`; the wait doubles with each attempt, up to the cap.
    pub fn failed(&mut self, handle: &Handle, error: String, now: Instant) -> u32 {
        let f = self.failures.entry(handle.clone()).or_insert(Failure {
            attempts: 0,
            error: String::new(),
            next_try: now,
        });
        f.attempts = f.attempts.saturating_add(1);
        f.error = error;
        let factor = 2u32.saturating_pow(f.attempts.saturating_sub(1).min(20));
        f.next_try = now + self.base.saturating_mul(factor).min(self.cap);
        f.attempts
    }

    /// Forgets a volume (destroyed, or gone from the inventory).
    pub fn succeeded(&mut self, handle: &Handle) {
        self.failures.remove(handle);
    }

    /// Whether `handle` must wait at `now`.
    pub fn waiting(&self, handle: &Handle, now: Instant) -> bool {
        self.failures.get(handle).is_some_and(|f| f.next_try > now)
    }

    /// Keeps only the volumes for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&Handle) -> bool) {
        self.failures.retain(|h, _| keep(h));
    }

    /// Every failing volume, for the report.
    pub fn report(&self) -> Vec<FailedVolume> {
        let mut v: Vec<FailedVolume> = self
            .failures
            .iter()
            .map(|(h, f)| FailedVolume {
                handle: h.clone(),
                error: f.error.clone(),
                attempts: f.attempts,
            })
            .collect();
        v.sort_by(|a, b| a.handle.cmp(&b.handle));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_the_wait_after_each_failure_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let h = Handle::new("v").expect("handle");
        let t = Instant::now();
        assert_eq!(b.failed(&h, "busy".into(), t), 1);
        assert!(b.waiting(&h, t + Duration::from_millis(999)));
        assert!(!b.waiting(&h, t + Duration::from_secs(1)));
        b.failed(&h, "busy".into(), t);
        assert!(b.waiting(&h, t + Duration::from_millis(1999)));
        for _ in 0..10 {
            b.failed(&h, "busy".into(), t);
        }
        assert!(!b.waiting(&h, t + Duration::from_secs(5)));
        assert_eq!(b.report()[0].attempts, 12);
        b.succeeded(&h);
        assert!(b.report().is_empty());
    }
}
